"""InfoNCE's block passes over the (B, M) pairs, on the engine's score blocks and a backend's kernels.

* :func:`forward_pass`: the per-row (and, symmetric, per-column) log-sum-exp statistics of the negatives.
* :func:`backward_pass`: the blocks recomputed and turned into dL/ds in place by the kernel, then the
  gradient matmuls (4 GEMM-equivalents in all with the forward).
* :func:`fused_pass`: when a block holds full rows, the row statistics are final as soon as it is
  scored, so the caller's coefficients are known and the gradient matmuls run on the scores already in
  memory (3 GEMM-equivalents).

Extra memory: one score block (plus one guide block) and O(B + M) statistics, never B x M.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from .. import _C
from .. import settings as _settings
from .._ext import ptr
from ..engine import block_shape, compute_dtype, score_blocks
from ..engine.blocks import MatmulProduct, product_for

# The tensors of the per-pair rule, in the order the ops take them (after queries, docs, temperature).
RULE_TENSORS = ("positive_ids", "positive_doc_ids", "doc_ids", "query_labels", "doc_labels", "upper",
                "guide_queries", "guide_docs", "guide_upper")


@dataclasses.dataclass
class PairRules:
    """What decides, per (query, doc) pair, positive / negative / masked and its logit (csrc/info_nce.h)."""

    positive_ids: torch.Tensor  # (B, P) int64, -1 = padding
    positive_doc_ids: torch.Tensor | None  # (B, P) int64 doc_ids of each positive
    doc_ids: torch.Tensor | None  # (M,)
    query_labels: torch.Tensor | None  # (B,)
    doc_labels: torch.Tensor | None  # (M,)
    upper: torch.Tensor | None  # (B,) float64: a negative scoring above it is masked
    guide_queries: torch.Tensor | None  # (B, d') guide embeddings (GIST)
    guide_docs: torch.Tensor | None  # (M, d')
    guide_upper: torch.Tensor | None  # (B,) float64: a negative whose guide score is above it is masked
    temperature: torch.Tensor  # 0-d
    hardness_alpha: float
    hcl_beta: float
    positive_margin: float
    symmetric: bool

    @classmethod
    def from_op(cls, temperature: torch.Tensor, tensors: tuple, hardness_alpha: float, hcl_beta: float,
                positive_margin: float, symmetric: bool) -> PairRules:
        """From an op's temperature, its RULE_TENSORS (in that order) and its scalars."""
        rules = cls(*tensors, temperature, hardness_alpha, hcl_beta, positive_margin, symmetric)
        rules.positive_ids = rules.positive_ids.contiguous()  # the kernels read [B, P] rows with one stride
        if rules.positive_doc_ids is not None:
            rules.positive_doc_ids = rules.positive_doc_ids.contiguous()
        return rules

    def params(self, rows: int, cols: int, like: torch.Tensor) -> Any:
        """The kernels' InfoNceParams for inputs like `like` (statistics buffers still to be set by the pass)."""
        p = _C.InfoNceParams()
        p.float_exp = (like.device.type == "cuda" and compute_dtype(like.dtype) == torch.float32
                       and _settings.current().info_nce_cuda_float_exp)
        p.num_rows, p.num_cols = rows, cols
        pos = self.positive_ids
        p.positive_ids, p.positive_stride, p.positive_cols = ptr(pos), pos.stride(0), pos.shape[1]
        p.positive_doc_ids, p.doc_ids = ptr(self.positive_doc_ids), ptr(self.doc_ids)
        if self.query_labels is not None and self.doc_labels is not None:
            p.query_labels, p.doc_labels = ptr(self.query_labels), ptr(self.doc_labels)
        p.upper, p.guide_upper = ptr(self.upper), ptr(self.guide_upper)
        p.inv_temperature = 1.0 / float(self.temperature)
        p.hardness_alpha, p.hcl_beta, p.positive_margin = self.hardness_alpha, self.hcl_beta, self.positive_margin
        p.symmetric = self.symmetric
        return p


def fused_rows(b: int, m: int, block_size: int) -> int:
    """Rows per full-row block of the fused pass, or 0 when it does not apply to this shape (a block
    must hold at least settings.info_nce_fused_min_rows full rows, or all of them)."""
    rows = block_size // max(m, 1)
    return min(rows, b) if rows >= min(b, _settings.current().info_nce_fused_min_rows) and b > 0 else 0


def _blocks(queries: torch.Tensor, docs: torch.Tensor, rules: PairRules, block_rows: int, block_cols: int):
    """Score blocks s = q d^T (and the guide's) in the compute dtype of the queries."""
    product = product_for(queries, "dot")
    guide = None
    if rules.guide_queries is not None:
        # The kernels read guide blocks in the score block's dtype: the guide's product must write that.
        guide = (rules.guide_queries, rules.guide_docs, MatmulProduct(queries.dtype, "dot"))
    return score_blocks(queries, docs, product, block_rows, block_cols, guide=guide)


def _rows(operand: Any, ct: torch.dtype) -> torch.Tensor:
    """A score block's operand rows in the compute dtype, for the gradient GEMMs (16-bit rows of the
    mixed-precision product are converted, exactly)."""
    return operand.rows if operand.rows.dtype == ct else operand.rows.to(ct)


def new_row_stats(b: int, device: torch.device) -> torch.Tensor:
    """(B, 5) running statistics: max / sum of exp((1+beta) l), max / sum of exp(beta l), count."""
    st = torch.zeros((b, 5), dtype=torch.float64, device=device)
    st[:, 0] = -math.inf
    st[:, 2] = -math.inf
    return st


def forward_pass(queries: torch.Tensor, docs: torch.Tensor, rules: PairRules, block_size: int,
                 kernels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_stats (B, 5), col_stats (M, 2) or (0, 2)) of the negatives, float64."""
    b, m = queries.shape[0], docs.shape[0]
    row_stats = new_row_stats(b, queries.device)
    col_stats = torch.zeros((m if rules.symmetric else 0, 2), dtype=torch.float64, device=queries.device)
    col_stats[:, 0] = -math.inf
    p = rules.params(b, m, queries)
    p.row_stats, p.col_stats = ptr(row_stats), ptr(col_stats)
    for blk in _blocks(queries, docs, rules, *block_shape(b, m, block_size)):
        kernels.info_nce_block(p, False, blk.scores, blk.guide, blk.i0, blk.j0)
    return row_stats, col_stats


def backward_pass(queries: torch.Tensor, docs: torch.Tensor, rules: PairRules, block_size: int, kernels: Any,
                  row_coef: torch.Tensor, col_coef: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_queries, grad_docs in the compute dtype, tau_acc (B,)) for the statistics' upstream
    coefficients row_coef (B, 4) = [dL/dS1, S1, dL/dS0, S0] and col_coef (M, 2) = [dL/dC, C]."""
    b, m = queries.shape[0], docs.shape[0]
    ct = compute_dtype(queries.dtype)
    tau_acc = torch.zeros((b,), dtype=torch.float64, device=queries.device)
    p = rules.params(b, m, queries)
    p.row_coef, p.col_coef, p.tau_acc = ptr(row_coef), ptr(col_coef), ptr(tau_acc)
    grad_q = torch.zeros((b, queries.shape[1]), dtype=ct, device=queries.device)
    grad_d = torch.zeros((m, docs.shape[1]), dtype=ct, device=docs.device)
    for blk in _blocks(queries, docs, rules, *block_shape(b, m, block_size)):
        out = blk.scores
        kernels.info_nce_block(p, True, out, blk.guide, blk.i0, blk.j0)
        grad_q[blk.i0:blk.i0 + out.shape[0]].addmm_(out, _rows(blk.candidates, ct))
        grad_d[blk.j0:blk.j0 + out.shape[1]].addmm_(out.T, _rows(blk.queries, ct))
    return grad_q, grad_d, tau_acc


RowCoefficients = Callable[[int, int, torch.Tensor], torch.Tensor]


def fused_pass(queries: torch.Tensor, docs: torch.Tensor, rules: PairRules, rows_per_block: int, kernels: Any,
               coefficients: RowCoefficients
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and backward in one sweep of full-row blocks of rows_per_block rows: once a block's row
    statistics are final, coefficients(i0, i1, row_stats[i0:i1]) gives their (rows, 4) row_coef and the
    block is turned into dL/ds and multiplied out. Returns (row_stats, row_coef, tau_acc, grad_q,
    grad_d), gradients in the compute dtype."""
    b, m, d = queries.shape[0], docs.shape[0], queries.shape[1]
    dev = queries.device
    ct = compute_dtype(queries.dtype)
    row_stats = new_row_stats(b, dev)
    row_coef = torch.zeros((b, 4), dtype=torch.float64, device=dev)
    tau_acc = torch.zeros((b,), dtype=torch.float64, device=dev)
    p = rules.params(b, m, queries)
    p.row_stats, p.row_coef, p.tau_acc = ptr(row_stats), ptr(row_coef), ptr(tau_acc)
    grad_q = torch.zeros((b, d), dtype=ct, device=dev)
    grad_d = torch.zeros((m, d), dtype=ct, device=dev)
    for blk in _blocks(queries, docs, rules, rows_per_block, m):
        out, i0, i1 = blk.scores, blk.i0, blk.i0 + blk.scores.shape[0]
        kernels.info_nce_block(p, False, out, blk.guide, i0, 0)
        row_coef[i0:i1] = coefficients(i0, i1, row_stats[i0:i1])
        kernels.info_nce_block(p, True, out, blk.guide, i0, 0)
        torch.mm(out, _rows(blk.candidates, ct), out=grad_q[i0:i1])
        grad_d.addmm_(out.T, _rows(blk.queries, ct))
    return row_stats, row_coef, tau_acc, grad_q, grad_d
