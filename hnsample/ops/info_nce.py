"""Memory-flat InfoNCE with in-batch negative masking, HCL, GIST, hardness and margin options.

The op ``hnsample::info_nce_stats`` (torch.library custom op with fake and autograd implementations,
its backward being the op ``hnsample::info_nce_stats_backward``) streams blocks of scores and returns
per-row log-sum-exp statistics of the negatives (and per-column statistics for the symmetric loss);
:func:`info_nce` combines them with the positive logits into the loss. Nothing of size B x M is ever
materialized: extra memory is one score block (plus one guide block) and O(B + M) statistics.
``hnsample::info_nce_stats_fused`` computes the same statistics and, for a scalar loss, the gradients
during the forward pass (3 GEMM-equivalents instead of 4; see fused_rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import _C
from .._ext import (
    as_tensor,
    check_finite,
    check_float_matrix,
    check_ids,
    check_labels,
    dtype_code,
    num_threads,
    ptr,
    stream_of,
)
from .topk import _device_guard, block_shape

REDUCTIONS = ("mean", "sum", "none")
# Score elements per block: 64 MB of float32 on the CPU (full rows of up to 65,536 docs for 256-row
# GEMMs in the fused path); GPUs want bigger GEMMs.
DEFAULT_BLOCK_SIZE = {"cpu": 1 << 24, "cuda": 1 << 26}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class _PairRules:
    """The tensors and scalars of the per-pair rule, in the form the kernels take."""

    positive_ids: torch.Tensor  # (B, P) int64, -1 = padding
    positive_doc_ids: torch.Tensor | None  # (B, P) int64
    doc_ids: torch.Tensor | None
    query_labels: torch.Tensor | None
    doc_labels: torch.Tensor | None
    upper: torch.Tensor | None  # (B,) float64
    guide_upper: torch.Tensor | None  # (B,) float64
    inv_temperature: float
    hardness_alpha: float
    hcl_beta: float
    positive_margin: float
    symmetric: bool

    def params(self, rows: int, cols: int) -> Any:
        p = _C.InfoNceParams()
        p.num_rows, p.num_cols = rows, cols
        p.positive_ids, p.positive_stride, p.positive_cols = (
            ptr(self.positive_ids),
            self.positive_ids.stride(0),
            self.positive_ids.shape[1],
        )
        p.positive_doc_ids, p.doc_ids = ptr(self.positive_doc_ids), ptr(self.doc_ids)
        if self.query_labels is not None and self.doc_labels is not None:
            p.query_labels, p.doc_labels = ptr(self.query_labels), ptr(self.doc_labels)
        p.upper, p.guide_upper = ptr(self.upper), ptr(self.guide_upper)
        p.inv_temperature = self.inv_temperature
        p.hardness_alpha, p.hcl_beta, p.positive_margin = (
            self.hardness_alpha,
            self.hcl_beta,
            self.positive_margin,
        )
        p.symmetric = self.symmetric
        return p


def _blocks(
    queries: torch.Tensor,
    docs: torch.Tensor,
    guide_queries: torch.Tensor | None,
    guide_docs: torch.Tensor | None,
    block_size: int,
):
    """Yields (i0, j0, q_rows, d_cols, scores, guide_scores) over the (B, M) pair grid, columns outer so
    each doc block is converted once; the score buffers are reused between blocks."""
    b, m = queries.shape[0], docs.shape[0]
    ct = _compute_dtype(queries.dtype)
    q = queries.to(ct)
    gq = guide_queries.to(ct) if guide_queries is not None else None
    br, bc = block_shape(b, m, block_size)
    buf = torch.empty((br, bc), dtype=ct, device=queries.device)
    gbuf = torch.empty((br, bc), dtype=ct, device=queries.device) if gq is not None else None
    for j0 in range(0, m, bc):
        j1 = min(m, j0 + bc)
        d = docs[j0:j1].to(ct)
        gd = guide_docs[j0:j1].to(ct) if guide_docs is not None else None
        for i0 in range(0, b, br):
            i1 = min(b, i0 + br)
            out = buf[: i1 - i0, : j1 - j0]
            torch.matmul(q[i0:i1], d.T, out=out)
            gout = None
            if gbuf is not None:
                gout = gbuf[: i1 - i0, : j1 - j0]
                torch.matmul(gq[i0:i1], gd.T, out=gout)
            yield i0, j0, q[i0:i1], d, out, gout


def _run_block(
    params: Any, backward: bool, out: torch.Tensor, gout: torch.Tensor | None, i0: int, j0: int
) -> None:
    _C.info_nce_block(
        params,
        backward,
        out.data_ptr(),
        ptr(gout),
        dtype_code(out),
        out.shape[0],
        out.shape[1],
        out.stride(0),
        out.stride(1),
        gout.stride(0) if gout is not None else 0,
        gout.stride(1) if gout is not None else 0,
        i0,
        j0,
        out.device.type == "cuda",
        stream_of(out),
        num_threads(),
    )


def _rules(
    temperature,
    positive_ids,
    positive_doc_ids,
    doc_ids,
    query_labels,
    doc_labels,
    upper,
    guide_upper,
    hardness_alpha,
    hcl_beta,
    positive_margin,
    symmetric,
) -> _PairRules:
    return _PairRules(
        positive_ids.contiguous(),
        None if positive_doc_ids is None else positive_doc_ids.contiguous(),
        doc_ids,
        query_labels,
        doc_labels,
        upper,
        guide_upper,
        1.0 / float(temperature),
        hardness_alpha,
        hcl_beta,
        positive_margin,
        symmetric,
    )


# ----------------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("hnsample::info_nce_stats", mutates_args=())
def _info_nce_stats_op(
    queries: torch.Tensor,
    docs: torch.Tensor,
    temperature: torch.Tensor,
    positive_ids: torch.Tensor,
    positive_doc_ids: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    query_labels: torch.Tensor | None,
    doc_labels: torch.Tensor | None,
    upper: torch.Tensor | None,
    guide_queries: torch.Tensor | None,
    guide_docs: torch.Tensor | None,
    guide_upper: torch.Tensor | None,
    hardness_alpha: float,
    hcl_beta: float,
    positive_margin: float,
    symmetric: bool,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, m = queries.shape[0], docs.shape[0]
    dev = queries.device
    rules = _rules(
        temperature,
        positive_ids,
        positive_doc_ids,
        doc_ids,
        query_labels,
        doc_labels,
        upper,
        guide_upper,
        hardness_alpha,
        hcl_beta,
        positive_margin,
        symmetric,
    )
    row_stats = torch.zeros((b, 5), dtype=torch.float64, device=dev)
    row_stats[:, 0] = -math.inf
    row_stats[:, 2] = -math.inf
    col_stats = torch.zeros((m if symmetric else 0, 2), dtype=torch.float64, device=dev)
    col_stats[:, 0] = -math.inf
    p = rules.params(b, m)
    p.row_stats, p.col_stats = ptr(row_stats), ptr(col_stats)
    with torch.no_grad(), _device_guard(queries):
        for i0, j0, _q, _d, out, gout in _blocks(queries, docs, guide_queries, guide_docs, block_size):
            _run_block(p, False, out, gout, i0, j0)
    count = row_stats[:, 4].clone()
    s1 = _lse_value(row_stats[:, 0], row_stats[:, 1])
    s0 = _lse_value(row_stats[:, 2], row_stats[:, 3]) if hcl_beta != 0.0 else torch.log(count)
    col = _lse_value(col_stats[:, 0], col_stats[:, 1])
    return s1, s0, count, col


def _lse_value(m: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """m + log z, and -inf for an empty statistic (z = 0); a NaN statistic stays NaN."""
    return torch.where(z == 0, -math.inf, m + torch.log(torch.where(z == 0, 1.0, z)))


@_info_nce_stats_op.register_fake
def _(
    queries,
    docs,
    temperature,
    positive_ids,
    positive_doc_ids,
    doc_ids,
    query_labels,
    doc_labels,
    upper,
    guide_queries,
    guide_docs,
    guide_upper,
    hardness_alpha,
    hcl_beta,
    positive_margin,
    symmetric,
    block_size,
):
    b, m = queries.shape[0], docs.shape[0]
    row = queries.new_empty((b,), dtype=torch.float64)
    return row, row.new_empty((b,)), row.new_empty((b,)), row.new_empty((m if symmetric else 0,))


@torch.library.custom_op("hnsample::info_nce_stats_backward", mutates_args=())
def _info_nce_backward_op(
    grad_s1: torch.Tensor,
    grad_s0: torch.Tensor,
    grad_col: torch.Tensor,
    s1: torch.Tensor,
    s0: torch.Tensor,
    col: torch.Tensor,
    queries: torch.Tensor,
    docs: torch.Tensor,
    temperature: torch.Tensor,
    positive_ids: torch.Tensor,
    positive_doc_ids: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    query_labels: torch.Tensor | None,
    doc_labels: torch.Tensor | None,
    upper: torch.Tensor | None,
    guide_queries: torch.Tensor | None,
    guide_docs: torch.Tensor | None,
    guide_upper: torch.Tensor | None,
    hardness_alpha: float,
    hcl_beta: float,
    positive_margin: float,
    symmetric: bool,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, m = queries.shape[0], docs.shape[0]
    ct = _compute_dtype(queries.dtype)
    rules = _rules(
        temperature,
        positive_ids,
        positive_doc_ids,
        doc_ids,
        query_labels,
        doc_labels,
        upper,
        guide_upper,
        hardness_alpha,
        hcl_beta,
        positive_margin,
        symmetric,
    )
    row_coef = torch.stack([grad_s1, s1, grad_s0, s0], dim=1).to(torch.float64).contiguous()
    col_coef = torch.stack([grad_col, col], dim=1).to(torch.float64).contiguous()
    tau_acc = torch.zeros((b,), dtype=torch.float64, device=queries.device)
    p = rules.params(b, m)
    p.row_coef, p.col_coef, p.tau_acc = ptr(row_coef), ptr(col_coef), ptr(tau_acc)
    grad_q = torch.zeros((b, queries.shape[1]), dtype=ct, device=queries.device)
    grad_d = torch.zeros((m, docs.shape[1]), dtype=ct, device=docs.device)
    with torch.no_grad(), _device_guard(queries):
        for i0, j0, q, d, out, gout in _blocks(queries, docs, guide_queries, guide_docs, block_size):
            _run_block(p, True, out, gout, i0, j0)
            grad_q[i0 : i0 + out.shape[0]].addmm_(out, d)
            grad_d[j0 : j0 + out.shape[1]].addmm_(out.T, q)
    # dL/dtau = sum_ij c_ij dl_ij/dtau with dl_ij/dtau = -u_ij / tau.
    grad_t = (-tau_acc.sum() / temperature.to(torch.float64)).to(temperature.dtype).reshape(temperature.shape)
    return grad_q.to(queries.dtype), grad_d.to(docs.dtype), grad_t


@_info_nce_backward_op.register_fake
def _(grad_s1, grad_s0, grad_col, s1, s0, col, queries, docs, temperature, *rest):
    return torch.empty_like(queries), torch.empty_like(docs), torch.empty_like(temperature)


_STATS_FIELDS = (
    "queries",
    "docs",
    "temperature",
    "positive_ids",
    "positive_doc_ids",
    "doc_ids",
    "query_labels",
    "doc_labels",
    "upper",
    "guide_queries",
    "guide_docs",
    "guide_upper",
)


def _stats_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[: len(_STATS_FIELDS)], output[0], output[1], output[3])
    ctx.scalars = inputs[len(_STATS_FIELDS) :]


def _stats_backward(ctx, grad_s1, grad_s0, _grad_count, grad_col):
    saved = ctx.saved_tensors
    tensors, (s1, s0, col) = saved[: len(_STATS_FIELDS)], saved[len(_STATS_FIELDS) :]
    grad_s1 = torch.zeros_like(s1) if grad_s1 is None else grad_s1
    grad_s0 = torch.zeros_like(s0) if grad_s0 is None else grad_s0
    grad_col = torch.zeros_like(col) if grad_col is None else grad_col
    gq, gd, gt = _info_nce_backward_op(grad_s1, grad_s0, grad_col, s1, s0, col, *tensors, *ctx.scalars)
    return (gq, gd, gt) + (None,) * (len(_STATS_FIELDS) - 3 + len(ctx.scalars))


_info_nce_stats_op.register_autograd(_stats_backward, setup_context=_stats_setup)


# ----------------------------------------------------------------------------------------------------
# Fused forward+gradient op: 3 GEMM-equivalents instead of 4. When a row block can hold its full row
# of scores (block_size // M rows), the row statistics are final once that block is scored, so the
# loss's derivatives with respect to them (for a scalar "mean"/"sum" loss they do not depend on other
# rows) are known and the gradient matmuls run on the scores already in memory. The op returns the
# same statistics as info_nce_stats plus the gradients for a unit upstream gradient; its backward
# scales them, or recomputes exactly (info_nce_stats_backward) if the upstream gradient of the
# statistics is not a multiple of the one assumed (the loss was not used as a plain scalar).

# A full-row block must hold at least this many rows for the fused path: thinner GEMMs lose more than
# the saved fourth GEMM-equivalent (measured on the CPU; see benchmarks/results_info_nce.md).
FUSED_MIN_ROWS = 256


def fused_rows(b: int, m: int, block_size: int) -> int:
    """Rows per full-row block of the fused path, or 0 when it does not apply to this shape."""
    rows = block_size // max(m, 1)
    return min(rows, b) if rows >= min(b, FUSED_MIN_ROWS) and b > 0 else 0


@torch.library.custom_op("hnsample::info_nce_stats_fused", mutates_args=())
def _info_nce_fused_op(
    queries: torch.Tensor,
    docs: torch.Tensor,
    temperature: torch.Tensor,
    positive_ids: torch.Tensor,
    positive_doc_ids: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    query_labels: torch.Tensor | None,
    doc_labels: torch.Tensor | None,
    upper: torch.Tensor | None,
    guide_queries: torch.Tensor | None,
    guide_docs: torch.Tensor | None,
    guide_upper: torch.Tensor | None,
    hardness_alpha: float,
    hcl_beta: float,
    positive_margin: float,
    symmetric: bool,
    block_size: int,
    positive_scores: torch.Tensor,
    tau_plus: float,
    row_weight: float,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    b, m, d = queries.shape[0], docs.shape[0], queries.shape[1]
    dev = queries.device
    ct = _compute_dtype(queries.dtype)
    rules = _rules(
        temperature,
        positive_ids,
        positive_doc_ids,
        doc_ids,
        query_labels,
        doc_labels,
        upper,
        guide_upper,
        hardness_alpha,
        hcl_beta,
        positive_margin,
        False,
    )
    row_stats = torch.zeros((b, 5), dtype=torch.float64, device=dev)
    row_stats[:, 0] = -math.inf
    row_stats[:, 2] = -math.inf
    row_coef = torch.zeros((b, 4), dtype=torch.float64, device=dev)
    tau_acc = torch.zeros((b,), dtype=torch.float64, device=dev)
    grad_pos = torch.zeros(positive_scores.shape, dtype=torch.float64, device=dev)
    p = rules.params(b, m)
    p.row_stats, p.row_coef, p.tau_acc = ptr(row_stats), ptr(row_coef), ptr(tau_acc)
    grad_q = torch.zeros((b, d), dtype=ct, device=dev)
    grad_d = torch.zeros((m, d), dtype=ct, device=dev)
    valid = positive_ids >= 0
    tau = temperature.detach().to(torch.float64)
    br = max(1, fused_rows(b, m, block_size))
    with torch.no_grad(), _device_guard(queries):
        q = queries.to(ct)
        dc = docs.to(ct)
        gq = guide_queries.to(ct) if guide_queries is not None else None
        gd = guide_docs.to(ct) if guide_docs is not None else None
        buf = torch.empty((br, m), dtype=ct, device=dev)
        gbuf = torch.empty((br, m), dtype=ct, device=dev) if gq is not None else None
        for i0 in range(0, b, br):
            i1 = min(b, i0 + br)
            out = buf[: i1 - i0]
            torch.matmul(q[i0:i1], dc.T, out=out)
            gout = None
            if gbuf is not None:
                gout = gbuf[: i1 - i0]
                torch.matmul(gq[i0:i1], gd.T, out=gout)
            _run_block(p, False, out, gout, i0, 0)
            # The rows' statistics are final: differentiate their (scalar-weighted) losses.
            st = row_stats[i0:i1]
            s1 = _lse_value(st[:, 0], st[:, 1])
            cnt = st[:, 4]
            s0 = _lse_value(st[:, 2], st[:, 3]) if hcl_beta != 0.0 else torch.log(cnt)
            g1, g_l = _closed_form_grads(
                positive_scores[i0:i1], valid[i0:i1], tau, s1, s0, cnt, positive_margin, tau_plus
            )
            g1 = g1 * row_weight
            g0 = -g1
            grad_pos[i0:i1] = g_l * (row_weight / tau)
            row_coef[i0:i1] = torch.stack([g1, s1, g0, s0], dim=1)
            _run_block(p, True, out, gout, i0, 0)
            torch.mm(out, dc, out=grad_q[i0:i1])
            grad_d.addmm_(out.T, q[i0:i1])
    count = row_stats[:, 4].clone()
    s1 = _lse_value(row_stats[:, 0], row_stats[:, 1])
    s0 = _lse_value(row_stats[:, 2], row_stats[:, 3]) if hcl_beta != 0.0 else torch.log(count)
    # The positive terms' gradients for the same unit upstream (the positive scores are an output).
    _add_positive_grads(q, dc, positive_ids.clamp_min(0), grad_pos.to(ct), grad_q, grad_d)
    grad_t = (-tau_acc.sum() / tau).to(temperature.dtype).reshape(temperature.shape)
    return (
        s1,
        s0,
        count,
        s1.new_empty(0),
        grad_q.to(queries.dtype),
        grad_d.to(docs.dtype),
        grad_t,
        row_coef[:, 0].clone(),
        row_coef[:, 2].clone(),
        positive_scores.clone(),
        grad_pos,
    )


@_info_nce_fused_op.register_fake
def _(queries, docs, temperature, *rest):
    b = queries.shape[0]
    row = queries.new_empty((b,), dtype=torch.float64)
    return (
        row,
        row.new_empty((b,)),
        row.new_empty((b,)),
        row.new_empty((0,)),
        torch.empty_like(queries),
        torch.empty_like(docs),
        torch.empty_like(temperature),
        row.new_empty((b,)),
        row.new_empty((b,)),
        torch.empty_like(rest[14]),
        torch.empty_like(rest[14]),
    )


def _fused_setup(ctx, inputs, output):
    n = len(_STATS_FIELDS)
    ctx.save_for_backward(*inputs[:n], output[0], output[1], output[3], *output[4:9], output[10])
    ctx.scalars = inputs[n : n + 5]


def _upstream_scale(grad: torch.Tensor, assumed: torch.Tensor) -> torch.Tensor | None:
    """c with grad == c * assumed (to float64 rounding), or None when grad is not such a multiple."""
    denom = (assumed * assumed).sum()
    c = (grad * assumed).sum() / denom if bool(denom > 0) else grad.new_zeros(())
    err = (grad - c * assumed).abs().max() if grad.numel() else grad.new_zeros(())
    return c if bool(err <= 1e-9 * grad.abs().max() + 1e-300) else None


@torch.library.custom_op("hnsample::info_nce_fused_backward", mutates_args=())
def _info_nce_fused_backward_op(
    grad_s1: torch.Tensor,
    grad_s0: torch.Tensor,
    grad_spos: torch.Tensor,
    s1: torch.Tensor,
    s0: torch.Tensor,
    col: torch.Tensor,
    grad_q: torch.Tensor,
    grad_d: torch.Tensor,
    grad_t: torch.Tensor,
    g1: torch.Tensor,
    g0: torch.Tensor,
    gpos: torch.Tensor,
    queries: torch.Tensor,
    docs: torch.Tensor,
    temperature: torch.Tensor,
    positive_ids: torch.Tensor,
    positive_doc_ids: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    query_labels: torch.Tensor | None,
    doc_labels: torch.Tensor | None,
    upper: torch.Tensor | None,
    guide_queries: torch.Tensor | None,
    guide_docs: torch.Tensor | None,
    guide_upper: torch.Tensor | None,
    hardness_alpha: float,
    hcl_beta: float,
    positive_margin: float,
    symmetric: bool,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # A custom op of its own so that the value-dependent choice below stays out of traced graphs.
    grads, assumed = _upstream_pairs(grad_s1, g1, grad_s0, g0, grad_spos, gpos, hcl_beta)
    c = _upstream_scale(grads, assumed)
    if c is not None:
        return (c * grad_q).to(grad_q.dtype), (c * grad_d).to(grad_d.dtype), (c * grad_t).to(grad_t.dtype)
    gq, gd, gt = _info_nce_backward_op(
        grad_s1,
        grad_s0,
        torch.zeros_like(col),
        s1,
        s0,
        col,
        queries,
        docs,
        temperature,
        positive_ids,
        positive_doc_ids,
        doc_ids,
        query_labels,
        doc_labels,
        upper,
        guide_queries,
        guide_docs,
        guide_upper,
        hardness_alpha,
        hcl_beta,
        positive_margin,
        symmetric,
        block_size,
    )
    ct = _compute_dtype(queries.dtype)
    pq = torch.zeros(queries.shape, dtype=ct, device=queries.device)
    pd = torch.zeros(docs.shape, dtype=ct, device=docs.device)
    _add_positive_grads(queries, docs, positive_ids.clamp_min(0), grad_spos.to(ct), pq, pd)
    return (gq.to(ct) + pq).to(queries.dtype), (gd.to(ct) + pd).to(docs.dtype), gt


@_info_nce_fused_backward_op.register_fake
def _(grad_s1, grad_s0, grad_spos, s1, s0, col, grad_q, grad_d, grad_t, *rest):
    return torch.empty_like(grad_q), torch.empty_like(grad_d), torch.empty_like(grad_t)


def _upstream_pairs(grad_s1, g1, grad_s0, g0, grad_spos, gpos, hcl_beta: float):
    """The upstream gradients of the fused op's differentiable outputs and the ones it assumed, flat.
    S0 matters only with HCL weights (otherwise the kernels ignore its gradient)."""
    grads = [grad_s1, grad_spos.reshape(-1)] + ([grad_s0] if hcl_beta != 0.0 else [])
    assumed = [g1, gpos.reshape(-1)] + ([g0] if hcl_beta != 0.0 else [])
    return torch.cat(grads).to(torch.float64), torch.cat(assumed)


def _fused_backward(ctx, grad_s1, grad_s0, _grad_count, _grad_col, *more):
    saved = ctx.saved_tensors
    n = len(_STATS_FIELDS)
    tensors, (s1, s0, col) = saved[:n], saved[n : n + 3]
    grad_q, grad_d, grad_t, g1, g0, gpos = saved[n + 3 :]
    grad_s1 = torch.zeros_like(s1) if grad_s1 is None else grad_s1
    grad_s0 = torch.zeros_like(s0) if grad_s0 is None else grad_s0
    grad_spos = torch.zeros_like(gpos) if more[5] is None else more[5]
    tracing = torch.compiler.is_compiling() or torch._guards.detect_fake_mode((grad_s1, g1)) is not None
    if not tracing:
        grads, assumed = _upstream_pairs(grad_s1, g1, grad_s0, g0, grad_spos, gpos, ctx.scalars[1])
        if bool(((grads - assumed).abs() <= 1e-12 * assumed.abs() + 1e-300).all()):
            # loss.backward() on the loss itself: hand the stored gradients over without a scaled
            # copy, which would double the gradient memory at its peak.
            return (grad_q, grad_d, grad_t) + (None,) * (n - 3 + 8)
    gq, gd, gt = _info_nce_fused_backward_op(
        grad_s1, grad_s0, grad_spos, s1, s0, col, grad_q, grad_d, grad_t, g1, g0, gpos, *tensors, *ctx.scalars
    )
    return (gq, gd, gt) + (None,) * (n - 3 + 8)


_info_nce_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup)


# ----------------------------------------------------------------------------------------------------
# Validation and the loss built on the statistics


def _check_rows(name: str, x: Any, rows: int, device: torch.device) -> torch.Tensor:
    x = as_tensor(name, x)
    check_float_matrix(name, x)
    if x.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device}, got {x.device}")
    return x


def _check_scalar(
    name: str, v: Any, lo: float | None = None, hi: float | None = None, hi_open: bool = False
) -> float:
    v = check_finite(name, v)
    if v is None:
        raise TypeError(f"{name} must be a float, got None")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v}")
    return v


def _check_temperature(temperature: Any, device: torch.device) -> torch.Tensor:
    """A 0-d float64 tensor; keeps the autograd link to a learnable temperature."""
    if isinstance(temperature, torch.Tensor):
        if not temperature.is_floating_point():
            raise TypeError(f"temperature must be a float tensor, got {temperature.dtype}")
        if temperature.numel() != 1:
            raise ValueError(f"temperature must hold one value, got shape {tuple(temperature.shape)}")
        if temperature.device != device:
            raise ValueError(f"temperature must be on {device}, got {temperature.device}")
        if not torch.compiler.is_compiling():
            v = float(temperature.detach().reshape(()))
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"temperature must be finite and > 0, got {v}")
        return temperature.reshape(()).to(torch.float64)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float or a tensor, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return torch.tensor(float(temperature), dtype=torch.float64, device=device)


def _gather_docs(docs, positive_ids, doc_ids, doc_labels, guide_docs):
    """Concatenates the doc-side tensors of every rank (docs keep their gradient: the backward of
    all_gather sums each rank's contribution back to its owner) and shifts positive ids to the
    concatenated numbering."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("gather=True needs an initialized torch.distributed process group")
    from torch.distributed.nn.functional import all_gather as all_gather_with_grad

    world, rank = dist.get_world_size(), dist.get_rank()

    def plain(t):
        if t is None:
            return None
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=0)

    sizes = plain(torch.tensor([docs.shape[0]], device=docs.device))
    if bool((sizes != docs.shape[0]).any()):
        raise ValueError(f"gather=True needs the same number of docs on every rank, got {sizes.tolist()}")
    offset = rank * docs.shape[0]
    all_docs = torch.cat(all_gather_with_grad(docs.contiguous()), dim=0)
    positive_ids = torch.where(positive_ids >= 0, positive_ids + offset, positive_ids)
    return all_docs, positive_ids, plain(doc_ids), plain(doc_labels), plain(guide_docs)


# Row chunks of the positive-pair helpers hold at most this many gathered elements.
_PAIR_CHUNK = 1 << 22


class _ColumnLogSumExpAcrossRanks(torch.autograd.Function):
    """C = log sum_r exp(C_r) over the ranks of the process group, elementwise (the per-column
    statistics of every rank's queries merged into those of all queries). Backward: the upstream
    gradient is summed over ranks (every rank's loss uses C) and scaled by dC/dC_r = exp(C_r - C)."""

    @staticmethod
    def forward(ctx, col):
        import torch.distributed as dist

        parts = [torch.empty_like(col) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, col.contiguous())
        merged = torch.logsumexp(torch.stack(parts), dim=0)
        ctx.save_for_backward(col, merged)
        return merged

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        col, merged = ctx.saved_tensors
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        share = torch.where(
            col == -math.inf, 0.0, torch.exp(col - torch.where(merged == -math.inf, 0.0, merged))
        )
        return total * share


def _pair_scores(
    queries: torch.Tensor, docs: torch.Tensor, idx: torch.Tensor, ct: torch.dtype
) -> torch.Tensor:
    """(B, P) scores q_i . d_idx[i, p] in dtype ct, gathering rows chunk by chunk (never (B, M), and
    at most _PAIR_CHUNK gathered elements at a time)."""
    b, n_pos = idx.shape
    out = torch.zeros((b, n_pos), dtype=ct, device=queries.device)
    if docs.shape[0] == 0:
        return out  # every positive id is padding
    step = max(1, _PAIR_CHUNK // max(1, n_pos * docs.shape[1]))
    for i0 in range(0, b, step):
        sl = idx[i0 : i0 + step]
        rows = docs[sl.reshape(-1)].reshape(sl.shape[0], n_pos, docs.shape[1]).to(ct)
        out[i0 : i0 + step] = torch.einsum("bd,bpd->bp", queries[i0 : i0 + step].to(ct), rows)
    return out


def _add_positive_grads(
    queries: torch.Tensor,
    docs: torch.Tensor,
    idx: torch.Tensor,
    grad: torch.Tensor,
    grad_q: torch.Tensor | None,
    grad_d: torch.Tensor | None,
) -> None:
    """Accumulates the gradients of the (B, P) positive scores q_i . d_idx[i, p] (upstream grad, in the
    dtype of grad_q / grad_d) into grad_q (B, d) and grad_d (M, d), gathering rows chunk by chunk."""
    b, n_pos = idx.shape
    dim = docs.shape[1]
    ct = grad.dtype
    if docs.shape[0] == 0:
        return  # every positive id is padding
    step = max(1, _PAIR_CHUNK // max(1, n_pos * dim))
    for i0 in range(0, b, step):
        sl = idx[i0 : i0 + step]
        g = grad[i0 : i0 + step]
        if grad_q is not None:
            rows = docs[sl.reshape(-1)].reshape(sl.shape[0], n_pos, dim).to(ct)
            grad_q[i0 : i0 + step] += torch.einsum("bp,bpd->bd", g, rows)
        if grad_d is not None:
            contrib = g.unsqueeze(2) * queries[i0 : i0 + step].to(ct).unsqueeze(1)
            grad_d.index_add_(0, sl.reshape(-1), contrib.reshape(-1, dim))


class _PositiveScores(torch.autograd.Function):
    """_pair_scores with autograd that keeps no (B, P, d) gathered rows alive: the backward gathers
    again in chunks, so the extra memory of the positive terms is just their gradients."""

    @staticmethod
    def forward(ctx, queries, docs, idx, ct):
        ctx.save_for_backward(queries, docs, idx)
        ctx.ct = ct
        return _pair_scores(queries, docs, idx, ct)

    @staticmethod
    def backward(ctx, grad):
        queries, docs, idx = ctx.saved_tensors
        ct = ctx.ct
        gq = torch.zeros(queries.shape, dtype=ct, device=queries.device) if ctx.needs_input_grad[0] else None
        gd = torch.zeros(docs.shape, dtype=ct, device=docs.device) if ctx.needs_input_grad[1] else None
        _add_positive_grads(queries, docs, idx, grad.to(ct), gq, gd)
        gq = gq.to(queries.dtype) if gq is not None else None
        gd = gd.to(docs.dtype) if gd is not None else None
        return gq, gd, None, None


def _min_positive(values: torch.Tensor, valid: torch.Tensor, margin: float) -> torch.Tensor:
    """min over a row's valid positives of values, minus margin; +inf for a row without positives."""
    v = torch.where(valid, values.to(torch.float64), math.inf).amin(dim=1)
    return torch.where(valid.any(dim=1), v - margin, math.inf)


def info_nce(
    queries: torch.Tensor,
    docs: torch.Tensor,
    *,
    positive_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    query_labels: torch.Tensor | None = None,
    doc_labels: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 0.05,
    symmetric: bool = False,
    false_negative_margin: float | None = None,
    false_negative_relative_margin: float | None = None,
    guide_queries: torch.Tensor | None = None,
    guide_docs: torch.Tensor | None = None,
    guide_margin: float = 0.0,
    hcl_beta: float = 0.0,
    tau_plus: float = 0.0,
    hardness_alpha: float = 0.0,
    positive_margin: float = 0.0,
    reduction: str = "mean",
    gather: bool = False,
    block_size: int | None = None,
) -> torch.Tensor:
    r"""InfoNCE over query rows and doc columns without ever forming the (B, M) logits.

    Scores are dot products ``s_ij = q_i . d_j`` (normalize the embeddings first for cosine; the
    sentence-transformers wrapper in :mod:`hnsample.losses` does), in float32 (float64 for float64
    inputs). Let ``tau`` be the temperature (a float, or a one-element tensor: when it requires grad it
    receives its gradient).

    **Pairs.** ``P(i)``, the positives of row i, are the ids ``>= 0`` in ``positive_ids[i]`` (shape (B,)
    or (B, P), -1 pads; a row may not list an id twice); by default ``P(i) = {i}`` (needs M >= B). Every
    other doc is a negative of row i unless it is *masked*; a positive is never masked. Negative j is
    masked for row i when any of these holds:

    - ``doc_ids[j] == doc_ids[p]`` for some p in P(i) (duplicates of a positive);
    - ``query_labels[i] == doc_labels[j]`` (same class);
    - ``s_ij > s_i+ - false_negative_margin``, and ``s_ij > s_i+ - |s_i+| * false_negative_relative_margin``,
      where ``s_i+ = min_{p in P(i)} s_ip`` (the weakest positive);
    - GIST: ``g_ij > g_i+ - guide_margin`` with guide scores ``g_ij = guide_queries[i] . guide_docs[j]``
      and ``g_i+ = min_{p in P(i)} g_ip``.

    Mask decisions carry no gradient. ``N(i)`` is the set of unmasked negatives, ``n_i = |N(i)|``.

    **Logits.** ``l_ip = (s_ip - positive_margin) / tau`` for p in P(i) (additive margin, AM-softmax);
    ``l_ij = s_ij / tau + hardness_alpha * stopgrad(s_ij)`` for j in N(i).

    **Row loss.** With ``Pos_i = log sum_{p in P(i)} exp(l_ip)`` and the HCL-weighted negative mass
    ``R_i = sum_{j in N(i)} w_ij exp(l_ij)``, ``w_ij = exp(beta l_ij) / mean_{k in N(i)} exp(beta l_ik)``
    (``beta = hcl_beta``; the weights carry gradient, as in Robinson et al.), the loss of positive p is::

        L_ip = -l_ip + log(exp(Pos_i) + Ng_ip)
        Ng_ip = R_i                                                      if tau_plus == 0
        Ng_ip = max((R_i - tau_plus * n_i * exp(l_ip)) / (1 - tau_plus),
                    n_i * exp(-1 / tau))                                 if tau_plus > 0

    and the row loss is the mean of ``L_ip`` over P(i). So a row with several positives keeps all of them
    in its denominator (each positive's term is ``-log(exp(l_ip) / sum_{j in P(i) u N(i)} exp(l_ij))`` when
    beta = tau_plus = 0); with one positive and beta = tau_plus = 0 this is the standard InfoNCE /
    sentence-transformers ``MultipleNegativesRankingLoss`` with ``scale = 1 / tau``. A row whose negatives
    are all masked has ``Ng = 0`` (loss 0 with one positive); a row without positives has loss 0.

    **Symmetric** (Sample4Geo): each positive pair also gets the doc->query term
    ``L'_ip = -l_ip + log sum_{k in V(p)} exp(l_kp)`` over the queries V(p) for which doc p is a positive
    or an unmasked negative (same masks and logits, no HCL), and the row loss becomes
    ``(mean_p L_ip + mean_p L'_ip) / 2``.

    **Reduction.** ``"none"``: (B,) row losses; ``"sum"``; ``"mean"``: the sum divided by the number of
    rows with at least one positive (0 when there is none). The result is float32 (float64 for float64
    inputs).

    **gather=True** (under torch.distributed): docs (and doc_ids, doc_labels, guide_docs) of every rank
    are concatenated in rank order and serve as candidates for the local queries; ``positive_ids`` are
    local doc indices and are shifted to the concatenated numbering; gradients flow back to each rank's
    docs. Every rank must pass the same number of docs. With ``symmetric=True`` the doc->query
    log-sum-exp of each doc runs over the queries of every rank (statistics are merged across ranks).

    Memory: one score block (``block_size`` elements, plus one guide block) and O(B + M) statistics,
    besides the (B, d) and (M, d) gradients. Two execution paths give the same result: for a scalar
    loss that needs gradients, when ``block_size // M`` rows (at least 256, or all of them) fit a block,
    the gradients are formed during the forward pass (3 GEMM-equivalents); otherwise (and for
    ``reduction="none"``, ``symmetric=True`` or under torch.compile) the backward pass recomputes the
    blocks (4 GEMM-equivalents).
    """
    queries = as_tensor("queries", queries)
    docs = as_tensor("docs", docs)
    check_float_matrix("queries", queries)
    check_float_matrix("docs", docs)
    if docs.shape[1] != queries.shape[1]:
        raise ValueError(
            f"docs must have {queries.shape[1]} columns like queries, got shape {tuple(docs.shape)}"
        )
    if docs.device != queries.device:
        raise ValueError(f"docs must be on {queries.device}, got {docs.device}")
    if docs.dtype != queries.dtype:
        raise TypeError(f"docs must have the dtype of queries ({queries.dtype}), got {docs.dtype}")
    dev = queries.device
    b, m = queries.shape[0], docs.shape[0]
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for name, flag in (("symmetric", symmetric), ("gather", gather)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    tau = _check_temperature(temperature, dev)
    fn_margin = check_finite("false_negative_margin", false_negative_margin)
    fn_relative = check_finite("false_negative_relative_margin", false_negative_relative_margin)
    guide_margin = _check_scalar("guide_margin", guide_margin)
    hcl_beta = _check_scalar("hcl_beta", hcl_beta, lo=0.0)
    tau_plus = _check_scalar("tau_plus", tau_plus, lo=0.0, hi=1.0, hi_open=True)
    hardness_alpha = _check_scalar("hardness_alpha", hardness_alpha)
    positive_margin = _check_scalar("positive_margin", positive_margin)
    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE.get(dev.type, DEFAULT_BLOCK_SIZE["cpu"])
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int or None, got {type(block_size).__name__}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if (guide_queries is None) != (guide_docs is None):
        raise ValueError("guide_queries and guide_docs must be given together")
    if guide_queries is not None:
        guide_queries = _check_rows("guide_queries", guide_queries, b, dev)
        guide_docs = _check_rows("guide_docs", guide_docs, m, dev)
        if guide_docs.shape[1] != guide_queries.shape[1]:
            raise ValueError(
                f"guide_docs must have {guide_queries.shape[1]} columns like guide_queries, "
                f"got shape {tuple(guide_docs.shape)}"
            )
        guide_queries, guide_docs = guide_queries.detach(), guide_docs.detach()
    if (query_labels is None) != (doc_labels is None):
        raise ValueError("query_labels and doc_labels must be given together")
    if query_labels is not None:
        query_labels = check_labels("query_labels", query_labels, b, dev)
        doc_labels = check_labels("doc_labels", doc_labels, m, dev)
    if doc_ids is not None:
        doc_ids = check_labels("doc_ids", doc_ids, m, dev)
    if positive_ids is None:
        if m < b:
            raise ValueError(f"positive_ids is required when docs has fewer rows ({m}) than queries ({b})")
        positive_ids = torch.arange(b, device=dev).unsqueeze(1)
    else:
        positive_ids = check_ids("positive_ids", positive_ids, b, dev, m)
        if positive_ids.shape[1] > 1 and not torch.compiler.is_compiling():
            srt = torch.sort(positive_ids, dim=1).values
            if bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()):
                raise ValueError("positive_ids must not list the same doc twice in a row")

    if gather:
        docs, positive_ids, doc_ids, doc_labels, guide_docs = _gather_docs(
            docs, positive_ids, doc_ids, doc_labels, guide_docs
        )
        m = docs.shape[0]

    ct = _compute_dtype(queries.dtype)
    valid = positive_ids >= 0
    has_pos = valid.any(dim=1)
    idx = positive_ids.clamp_min(0)
    wants_grad = torch.is_grad_enabled() and (
        queries.requires_grad or docs.requires_grad or tau.requires_grad
    )
    fused = bool(
        wants_grad
        and reduction != "none"
        and not symmetric
        and not torch.compiler.is_compiling()
        and fused_rows(b, m, block_size)
    )
    if fused:
        # The fused op returns the positive scores itself (their gradients are part of its stored ones).
        with torch.no_grad():
            s_pos = _pair_scores(queries, docs, idx, ct)
    else:
        s_pos = _PositiveScores.apply(queries, docs, idx, ct)

    with torch.no_grad():
        upper = None
        if fn_margin is not None or fn_relative is not None:
            s_min = _min_positive(s_pos.detach(), valid, 0.0)
            upper = torch.full_like(s_min, math.inf)
            if fn_margin is not None:
                upper = torch.minimum(upper, s_min - fn_margin)
            if fn_relative is not None:
                upper = torch.minimum(upper, s_min - s_min.abs() * fn_relative)
            upper = torch.where(has_pos, upper, math.inf).contiguous()
        guide_upper = None
        if guide_queries is not None:
            g_pos = _pair_scores(guide_queries, guide_docs, idx, ct)
            guide_upper = _min_positive(g_pos, valid, guide_margin).contiguous()
        positive_doc_ids = doc_ids[idx] if doc_ids is not None else None

    args = (
        queries,
        docs,
        tau,
        positive_ids.contiguous(),
        positive_doc_ids,
        doc_ids,
        query_labels,
        doc_labels,
        upper,
        guide_queries,
        guide_docs,
        guide_upper,
        hardness_alpha,
        hcl_beta,
        positive_margin,
        symmetric,
        block_size,
    )
    if fused:
        weight = 1.0 if reduction == "sum" else 1.0 / max(int(has_pos.sum()), 1)
        out = _info_nce_fused_op(*args, s_pos.to(torch.float64), tau_plus, weight)
        s1, s0, count, col, s_pos = out[0], out[1], out[2], out[3], out[9]
    else:
        s1, s0, count, col = _info_nce_stats_op(*args)
    if gather and symmetric:
        col = _ColumnLogSumExpAcrossRanks.apply(col)
    rows = _row_losses(s_pos, valid, tau, s1, s0, count, col, idx, positive_margin, tau_plus, symmetric)
    if reduction == "none":
        return rows.to(ct)
    total = rows.sum()
    if reduction == "mean":
        total = total / has_pos.sum().clamp_min(1)
    return total.to(ct)


def _closed_form_grads(
    s_pos: torch.Tensor,
    valid: torch.Tensor,
    tau: torch.Tensor,
    s1: torch.Tensor,
    s0: torch.Tensor,
    count: torch.Tensor,
    positive_margin: float,
    tau_plus: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Derivatives of the non-symmetric row loss of _row_losses, in closed form: (d row_i / d S1_i,
    d row_i / d l_iq). d / d S0_i is minus the first (S1, S0 enter only through log R = S1 - S0 + log n).
    With n_v = |P(i)|, A_ip = logaddexp(Pos_i, logNg_ip), sigma_ip = exp(logNg_ip - A_ip) and
    pi_iq = softmax_q(l_iq) over the row's positives:

        d row_i / d S1_i = (1 / n_v) sum_p sigma_ip * dlogNg_ip / dlogR_i
        d row_i / d l_iq = (1 / n_v) (pi_iq sum_p (1 - sigma_ip) + sigma_iq * dlogNg_iq / dl_iq - 1)

    dlogNg / dlogR = 1 and dlogNg / dl = 0 for tau_plus = 0; on the debiased branch 1 / (1 - e^t) and
    e^t / (e^t - 1); on the floor both 0 (the floor's own tau-dependence is left to autograd).
    """
    has_pos = valid.any(dim=1)
    has_neg = count > 0
    l_pos = (s_pos.to(torch.float64) - positive_margin) / tau
    l_valid = torch.where(valid, l_pos, -math.inf)
    pos_lse = torch.where(has_pos, torch.logsumexp(l_valid, dim=1), 0.0)
    log_n = torch.log(torch.where(has_neg, count, 1.0))
    log_r = torch.where(has_neg, torch.where(has_neg, s1, 0.0) - torch.where(has_neg, s0, 0.0) + log_n, 0.0)
    log_ng = log_r.unsqueeze(1).expand_as(l_pos)
    slope_r = torch.ones_like(l_pos)
    slope_l = torch.zeros_like(l_pos)
    if tau_plus > 0.0:
        floor = (log_n - 1.0 / tau).unsqueeze(1)
        t = math.log(tau_plus) + log_n.unsqueeze(1) + l_pos - log_r.unsqueeze(1)
        ok = t < 0
        t_safe = torch.where(ok, t, -1.0)
        debiased = log_r.unsqueeze(1) + torch.log1p(-torch.exp(t_safe)) - math.log1p(-tau_plus)
        on_debiased = ok & (debiased >= floor)
        log_ng = torch.where(on_debiased, debiased, floor)
        slope_r = torch.where(on_debiased, 1.0 / -torch.expm1(t_safe), 0.0)
        slope_l = torch.where(on_debiased, torch.exp(t_safe) / torch.expm1(t_safe), 0.0)
    sigma = torch.exp(log_ng - torch.logaddexp(pos_lse.unsqueeze(1), log_ng))
    sigma = torch.where(valid & has_neg.unsqueeze(1), sigma, 0.0)
    n_valid = valid.sum(dim=1).clamp_min(1)
    g_s1 = torch.where(has_pos, (sigma * slope_r).sum(dim=1) / n_valid, 0.0)
    pi = torch.where(valid, torch.exp(l_valid - pos_lse.unsqueeze(1)), 0.0)
    keep = torch.where(valid, 1.0 - sigma, 0.0).sum(dim=1, keepdim=True)
    g_l = torch.where(valid, (pi * keep + sigma * slope_l - 1.0) / n_valid.unsqueeze(1), 0.0)
    return g_s1, g_l


def _row_losses(
    s_pos: torch.Tensor,
    valid: torch.Tensor,
    tau: torch.Tensor,
    s1: torch.Tensor,
    s0: torch.Tensor,
    count: torch.Tensor,
    col: torch.Tensor,
    idx: torch.Tensor,
    positive_margin: float,
    tau_plus: float,
    symmetric: bool,
) -> torch.Tensor:
    """(B,) row losses from the positive scores and the negative statistics (float64, differentiable in
    s_pos, tau, s1, s0 and col). Every branch that is not taken is fed finite values so that no NaN
    reaches the gradients of masked rows."""
    has_pos = valid.any(dim=1)
    has_neg = count > 0
    l_pos = (s_pos.to(torch.float64) - positive_margin) / tau
    pos_lse = torch.logsumexp(torch.where(valid, l_pos, -math.inf), dim=1)
    pos_lse = torch.where(has_pos, pos_lse, 0.0)
    log_n = torch.log(torch.where(has_neg, count, 1.0))
    # log R_i = S1 - S0 + log n_i, where S1 = log sum exp((1+beta) l), S0 = log sum exp(beta l).
    log_r = torch.where(
        has_neg, torch.where(has_neg, s1, 0.0) - torch.where(has_neg, s0, 0.0) + log_n, -math.inf
    )
    log_ng = log_r.unsqueeze(1).expand_as(l_pos)
    if tau_plus > 0.0:
        floor = torch.where(has_neg, log_n - 1.0 / tau, -math.inf).unsqueeze(1)
        # R - tau_plus n e^{l_ip} = R (1 - e^t) with t = log(tau_plus n) + l_ip - log R.
        t = math.log(tau_plus) + log_n.unsqueeze(1) + l_pos - torch.where(has_neg, log_r, 0.0).unsqueeze(1)
        ok = (t < 0) & has_neg.unsqueeze(1)
        t_safe = torch.where(ok, t, -1.0)
        debiased = (
            torch.where(has_neg, log_r, 0.0).unsqueeze(1)
            + torch.log1p(-torch.exp(t_safe))
            - math.log1p(-tau_plus)
        )
        log_ng = torch.where(
            ok, torch.maximum(debiased, torch.where(has_neg.unsqueeze(1), floor, 0.0)), floor
        )
    log_ng = torch.where(has_pos.unsqueeze(1), log_ng, 0.0)
    per_pos = torch.logaddexp(pos_lse.unsqueeze(1), log_ng) - l_pos
    n_valid = valid.sum(dim=1).clamp_min(1)
    rows = torch.where(valid, per_pos, 0.0).sum(dim=1) / n_valid
    if symmetric:
        col_lse = col[idx]
        back = torch.where(valid, torch.where(valid, col_lse, 0.0) - l_pos, 0.0).sum(dim=1) / n_valid
        rows = 0.5 * (rows + back)
    return rows
