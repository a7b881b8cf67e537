"""InfoNCE over several score directions with one joint or per-direction partition function, and hardness
weighting of a chosen subset of negatives: the controls of sentence-transformers'
``MultipleNegativesRankingLoss`` (``directions``, ``partition_mode``, ``hardness_mode``,
``hardness_strength``), computed without any (B, M) matrix: :func:`directional_info_nce`.

Every direction is a row-wise log-sum-exp over a set of columns defined by ownership (which query a row or
a column belongs to), so it runs block by block through :class:`_BlockLogSumExp`: extra memory is one score
block and O(rows) statistics, whatever the batch size, and the backward recomputes the blocks.
"""

from __future__ import annotations

import math

import torch

from .. import settings as _settings
from .._ext import as_tensor, check_float_matrix
from ..engine import compute_dtype
from ..engine.blocks import block_shape
from .info_nce_gather import gather_with_grad
from .info_nce_math import lse_value

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
PARTITION_MODES = ("joint", "per_direction")
HARDNESS_MODES = ("in_batch_negatives", "hard_negatives", "all_negatives")

# Which entries of a direction's score matrix are left out (-inf), by ownership:
#   "none": none; "own": the column belongs to the row's query (its own positive and hard negatives, or the
#   query itself when the columns are queries).
# Which entries get the hardness term (value only):
#   None; "own_hard": the row's own hard negatives; "others": columns of other queries (in-batch
#   negatives: their positives and hard negatives); "not_own_positive": every column but the row's positive.
_PENALTY_FOR_MODE = {"hard_negatives": "own_hard", "in_batch_negatives": "others",
                     "all_negatives": "not_own_positive"}


def _block_masks(row_owner: torch.Tensor, col_owner: torch.Tensor, col_kind: torch.Tensor, exclude: str,
                 penalty: str | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(excluded, penalized) boolean (rows, cols) masks of one block, or None where the rule is empty."""
    own = row_owner[:, None] == col_owner[None, :]
    excluded = own if exclude == "own" else None
    if penalty is None:
        return excluded, None
    if penalty == "own_hard":
        pen = own & (col_kind[None, :] >= 1)
    elif penalty == "others":
        pen = ~own
    else:  # "not_own_positive"
        pen = ~(own & (col_kind[None, :] == 0))
    return excluded, pen


class _BlockLogSumExp(torch.autograd.Function):
    """lse_r = log sum_{c not excluded} exp(scale * s_rc + strength * [c penalized] * stopgrad(s_rc)), with
    s_rc = x_r . y_c in the compute dtype, one (at most block_size) block of scores at a time.

    Backward: with w_rc = exp(l_rc - lse_r) * g_r (0 for excluded entries and for rows with no column),
    dx = scale * w @ y, dy = scale * w^T @ x, dscale = sum_rc w_rc s_rc. The hardness term carries no
    gradient (stop-gradient), as in sentence-transformers."""

    @staticmethod
    def forward(ctx, x, y, scale, row_owner, col_owner, col_kind, exclude, penalty, strength, block_size):
        ct = compute_dtype(x.dtype)
        xr, yr = x.detach().to(ct), y.detach().to(ct)
        sc = scale.detach().to(ct)
        rows, cols = xr.shape[0], yr.shape[0]
        lse = torch.full((rows,), -math.inf, dtype=ct, device=x.device)
        br, bc = block_shape(rows, max(cols, 1), block_size)
        for r0 in range(0, rows, br):
            r1 = min(rows, r0 + br)
            m = torch.full((r1 - r0,), -math.inf, dtype=ct, device=x.device)
            acc = torch.zeros((r1 - r0,), dtype=ct, device=x.device)
            for c0 in range(0, cols, bc):
                c1 = min(cols, c0 + bc)
                logits = _logits(xr[r0:r1], yr[c0:c1], sc, row_owner[r0:r1], col_owner[c0:c1],
                                 col_kind[c0:c1], exclude, penalty, strength)[0]
                bm = logits.amax(dim=1)
                new_m = torch.maximum(m, bm)
                safe = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
                acc = acc * torch.exp(m - safe) + torch.exp(logits - safe[:, None]).sum(dim=1)
                m = new_m
            lse[r0:r1] = lse_value(m, acc)
        ctx.save_for_backward(x, y, scale, row_owner, col_owner, col_kind, lse)
        ctx.rule = (exclude, penalty, strength, block_size)
        return lse

    @staticmethod
    def backward(ctx, grad):
        x, y, scale, row_owner, col_owner, col_kind, lse = ctx.saved_tensors
        exclude, penalty, strength, block_size = ctx.rule
        ct = lse.dtype
        xr, yr, sc = x.detach().to(ct), y.detach().to(ct), scale.detach().to(ct)
        g = torch.where(torch.isfinite(lse), grad.to(ct), torch.zeros_like(lse))
        want_x, want_y, want_s = ctx.needs_input_grad[:3]
        dx = torch.zeros_like(xr) if want_x else None
        dy = torch.zeros_like(yr) if want_y else None
        ds = torch.zeros((), dtype=ct, device=x.device)
        rows, cols = xr.shape[0], yr.shape[0]
        br, bc = block_shape(rows, max(cols, 1), block_size)
        for r0 in range(0, rows, br):
            r1 = min(rows, r0 + br)
            for c0 in range(0, cols, bc):
                c1 = min(cols, c0 + bc)
                logits, s = _logits(xr[r0:r1], yr[c0:c1], sc, row_owner[r0:r1], col_owner[c0:c1],
                                    col_kind[c0:c1], exclude, penalty, strength)
                lr = lse[r0:r1, None]
                w = torch.exp(logits - torch.where(torch.isfinite(lr), lr, torch.zeros_like(lr))) * g[r0:r1, None]
                if want_s:
                    ds += (w * s).sum()
                w = w * sc
                if want_x:
                    dx[r0:r1] += w @ yr[c0:c1]
                if want_y:
                    dy[c0:c1] += w.T @ xr[r0:r1]
        return (dx.to(x.dtype) if want_x else None, dy.to(y.dtype) if want_y else None,
                ds.to(scale.dtype) if want_s else None, None, None, None, None, None, None, None)


def _logits(x, y, scale, row_owner, col_owner, col_kind, exclude, penalty, strength):
    s = x @ y.T
    logits = s * scale
    excluded, pen = _block_masks(row_owner, col_owner, col_kind, exclude, penalty)
    if pen is not None and strength != 0.0:
        logits = logits + (strength * s) * pen
    if excluded is not None:
        logits = logits.masked_fill(excluded, -math.inf)
    return logits, s


def directional_info_nce(
    queries: torch.Tensor,
    docs: list[torch.Tensor] | tuple[torch.Tensor, ...],
    *,
    temperature: float | torch.Tensor = 0.05,
    directions: tuple[str, ...] = ("query_to_doc",),
    partition_mode: str = "joint",
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    gather: bool = False,
    block_size: int | None = None,
) -> torch.Tensor:
    r"""sentence-transformers' ``MultipleNegativesRankingLoss`` with all of its controls, memory-flat.

    ``queries`` (B, d); ``docs`` a list of (B, d) columns: ``docs[0][i]`` is query i's positive,
    ``docs[k][i]`` (k >= 1) its k-th hard negative. Scores are dot products (normalize first for cosine) in
    float32 (float64 for float64 inputs); ``scale = 1 / temperature``. With ``gather=True`` (under
    torch.distributed) queries and docs of every rank, concatenated in rank order, are the columns
    (``W`` rows in all, this rank's queries ``o .. o+B-1``); otherwise ``W = B``, ``o = 0``. The doc columns
    are ``D = [docs[0] of every rank; docs[1] of every rank; ...]``, so column ``c`` belongs to query
    ``c mod W`` and is its positive when ``c < W``.

    Directions, for local row i (global index ``o + i``), each a set of logits:

    - ``query_to_doc``: ``scale * q_i . D_c`` for every column c (the positive ``c = o + i`` included);
    - ``query_to_query``: ``scale * q_i . q_j`` over every query j but i itself;
    - ``doc_to_query``: ``scale * p_i . q_j`` over every query j (``p_i = docs[0][i]``);
    - ``doc_to_doc``: ``scale * p_i . D_c`` over the columns that do not belong to query ``o + i``.

    ``hardness_mode`` adds ``hardness_strength * stopgrad(q_i . D_c)`` to query_to_doc logits of its
    hard negatives (``"hard_negatives"``: the row's own, ``c >= W``), of the in-batch negatives
    (``"in_batch_negatives"``: the columns of other queries) or of every negative (``"all_negatives"``);
    never to the positive, never to other directions.

    With the positive logit ``l_i = scale * q_i . p_i`` and ``LSE_k(i)`` the log-sum-exp of direction k's
    logits, the partition is ``log Z_i = log sum_k exp(LSE_k(i))`` (``"joint"``: one softmax over the union)
    or ``mean_k LSE_k(i)`` (``"per_direction"``), and the loss is ``mean_i (log Z_i - l_i)``: exactly
    sentence-transformers' formula. A direction with no columns for a row (one query and
    ``query_to_query``) has ``LSE = -inf``, as there. ``temperature`` may be a tensor that requires grad
    (a learnable temperature receives its gradient).

    Memory: one block of ``block_size`` scores (``settings`` info_nce block size by default) and O(W)
    statistics per direction; the backward pass recomputes the blocks.
    """
    queries = as_tensor("queries", queries)
    check_float_matrix("queries", queries)
    if not isinstance(docs, (list, tuple)) or len(docs) < 1:
        raise ValueError("docs must be a non-empty list of (B, d) tensors: the positives, then hard negatives")
    docs = [as_tensor(f"docs[{k}]", t) for k, t in enumerate(docs)]
    for k, t in enumerate(docs):
        check_float_matrix(f"docs[{k}]", t)
        if t.shape != queries.shape:
            raise ValueError(f"docs[{k}] must have the shape of queries {tuple(queries.shape)}, got {tuple(t.shape)}")
        if t.device != queries.device:
            raise ValueError(f"docs[{k}] must be on {queries.device}, got {t.device}")
        if t.dtype != queries.dtype:
            raise TypeError(f"docs[{k}] must have the dtype of queries ({queries.dtype}), got {t.dtype}")
    directions, hardness_strength = check_controls(directions, partition_mode, hardness_mode, hardness_strength)
    if not isinstance(gather, bool):
        raise TypeError(f"gather must be a bool, got {type(gather).__name__}")
    if block_size is None:
        cfg = _settings.current()
        block_size = cfg.info_nce_block_size_cuda if queries.device.type == "cuda" else cfg.info_nce_block_size_cpu
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1 or None, got {block_size!r}")
    dev = queries.device
    ct = compute_dtype(queries.dtype)
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a float or a one-element tensor, got shape {tuple(temperature.shape)}")
        scale = 1.0 / temperature.reshape(()).to(device=dev, dtype=ct)
    else:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or not temperature > 0:
            raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
        scale = torch.tensor(1.0 / float(temperature), dtype=ct, device=dev)

    if queries.dtype != ct:
        # 16-bit inputs: every direction's gradient and the positive's are summed in the compute dtype and
        # rounded to 16 bits once (autograd would round each contribution on its own).
        queries, docs = queries.to(ct), [t.to(ct) for t in docs]
    b = queries.shape[0]
    offset = 0
    all_queries, all_docs = queries, docs
    if gather:
        (all_queries, *all_docs), offset = gather_with_grad([queries, *docs], "queries")
    w = all_queries.shape[0]
    d_all = torch.cat(all_docs, dim=0)
    row_owner = torch.arange(offset, offset + b, device=dev)
    q_owner = torch.arange(w, device=dev)
    q_kind = torch.zeros(w, dtype=torch.long, device=dev)
    d_owner = q_owner.repeat(len(docs))
    d_kind = torch.arange(len(docs), device=dev).repeat_interleave(w)
    local_pos = docs[0]
    strength = float(hardness_strength) if hardness_mode is not None else 0.0
    penalty = _PENALTY_FOR_MODE[hardness_mode] if strength > 0 else None

    lses = []
    for direction in directions:
        if direction == "query_to_doc":
            rows, cols, owner, kind, exclude, pen = queries, d_all, d_owner, d_kind, "none", penalty
        elif direction == "query_to_query":
            rows, cols, owner, kind, exclude, pen = queries, all_queries, q_owner, q_kind, "own", None
        elif direction == "doc_to_query":
            rows, cols, owner, kind, exclude, pen = local_pos, all_queries, q_owner, q_kind, "none", None
        else:  # doc_to_doc
            rows, cols, owner, kind, exclude, pen = local_pos, d_all, d_owner, d_kind, "own", None
        lses.append(_BlockLogSumExp.apply(rows, cols, scale, row_owner, owner, kind, exclude, pen,
                                          strength if pen else 0.0, block_size))
    stacked = torch.stack(lses, dim=1)
    log_z = torch.logsumexp(stacked, dim=1) if partition_mode == "joint" else stacked.mean(dim=1)
    positive = (queries.to(ct) * local_pos.to(ct)).sum(dim=1) * scale
    return (log_z - positive).mean()


def check_controls(directions, partition_mode, hardness_mode, hardness_strength) -> tuple[tuple[str, ...], float]:
    """Validates sentence-transformers' loss controls (its rules: distinct known directions including
    "query_to_doc"; per_direction only where every direction contains the positive); returns the directions
    as a tuple and the strength as a float."""
    if isinstance(directions, str) or not isinstance(directions, (list, tuple)):
        raise TypeError(f"directions must be a tuple of names from {DIRECTIONS}, got {directions!r}")
    directions = tuple(directions)
    bad = [x for x in directions if x not in DIRECTIONS]
    if bad:
        raise ValueError(f"directions: unknown name(s) {bad}; the names are {DIRECTIONS}")
    if len(set(directions)) != len(directions):
        raise ValueError(f"directions lists a name twice: {directions}")
    if "query_to_doc" not in directions:
        raise ValueError(f"directions must include 'query_to_doc' (the positive's direction), got {directions}")
    if partition_mode not in PARTITION_MODES:
        raise ValueError(f"partition_mode must be one of {PARTITION_MODES}, got {partition_mode!r}")
    if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
        raise ValueError("partition_mode='per_direction' needs every direction to contain the positive pair; "
                         "'query_to_query' and 'doc_to_doc' do not: use partition_mode='joint'")
    if hardness_mode is not None and hardness_mode not in HARDNESS_MODES:
        raise ValueError(f"hardness_mode must be None or one of {HARDNESS_MODES}, got {hardness_mode!r}")
    if isinstance(hardness_strength, bool) or not isinstance(hardness_strength, (int, float)) \
            or not math.isfinite(hardness_strength) or not hardness_strength >= 0:
        raise ValueError(f"hardness_strength must be a finite float >= 0, got {hardness_strength!r}")
    return directions, float(hardness_strength)
