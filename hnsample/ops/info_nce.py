"""Memory-flat InfoNCE with in-batch negative masking, HCL, GIST, hardness and margin options:
:func:`info_nce`. The ops it runs on are in :mod:`.info_nce_ops` (registration), their block passes in
:mod:`.info_nce_blocks`, the loss math in :mod:`.info_nce_math` and the cross-rank gather in
:mod:`.info_nce_gather`. Nothing of size B x M is ever materialized: extra memory is one score block
(plus one guide block) and O(B + M) statistics.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import settings as _settings
from .._ext import as_tensor, check_finite, check_float_matrix, check_ids, check_labels
from ..engine import compute_dtype
from . import info_nce_ops  # noqa: F401  (registers the ops)
from .info_nce_blocks import fused_rows
from .info_nce_gather import ColumnLogSumExpAcrossRanks, gather_docs
from .info_nce_math import PositiveScores, min_positive, pair_scores, row_losses

REDUCTIONS = ("mean", "sum", "none")


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
        cfg = _settings.current()
        block_size = cfg.info_nce_block_size_cuda if dev.type == "cuda" else cfg.info_nce_block_size_cpu
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
        docs, positive_ids, doc_ids, doc_labels, guide_docs = gather_docs(
            docs, positive_ids, doc_ids, doc_labels, guide_docs
        )
        m = docs.shape[0]

    ct = compute_dtype(queries.dtype)
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
            s_pos = pair_scores(queries, docs, idx, ct)
    else:
        if wants_grad and queries.dtype != ct:
            # 16-bit inputs: the positive terms' gradients and the negatives' nearly cancel, so they must be
            # summed before the one rounding to 16 bits (autograd would round each on its own).
            queries, docs = queries.to(ct), docs.to(ct)
        s_pos = PositiveScores.apply(queries, docs, idx, ct)

    with torch.no_grad():
        upper = None
        if fn_margin is not None or fn_relative is not None:
            s_min = min_positive(s_pos.detach(), valid, 0.0)
            upper = torch.full_like(s_min, math.inf)
            if fn_margin is not None:
                upper = torch.minimum(upper, s_min - fn_margin)
            if fn_relative is not None:
                upper = torch.minimum(upper, s_min - s_min.abs() * fn_relative)
            upper = torch.where(has_pos, upper, math.inf).contiguous()
        guide_upper = None
        if guide_queries is not None:
            g_pos = pair_scores(guide_queries, guide_docs, idx, ct)
            guide_upper = min_positive(g_pos, valid, guide_margin).contiguous()
        positive_doc_ids = doc_ids[idx] if doc_ids is not None else None

    tensors = (queries, docs, tau, positive_ids.contiguous(), positive_doc_ids, doc_ids, query_labels, doc_labels,
               upper, guide_queries, guide_docs, guide_upper)
    scalars = dict(hardness_alpha=hardness_alpha, hcl_beta=hcl_beta, positive_margin=positive_margin,
                   block_size=block_size)
    if fused:
        weight = 1.0 if reduction == "sum" else 1.0 / max(int(has_pos.sum()), 1)
        out = torch.ops.hnsample.info_nce_stats_fused(*tensors, s_pos.to(torch.float64), tau_plus=tau_plus,
                                                      row_weight=weight, **scalars)
        s1, s0, count, col, s_pos = out[0], out[1], out[2], out[3], out[9]
    else:
        s1, s0, count, col = torch.ops.hnsample.info_nce_stats(*tensors, symmetric=symmetric, **scalars)
    if gather and symmetric:
        col = ColumnLogSumExpAcrossRanks.apply(col)
    rows = row_losses(s_pos, valid, tau, s1, s0, count, col, idx, positive_margin, tau_plus, symmetric)
    if reduction == "none":
        return rows.to(ct)
    total = rows.sum()
    if reduction == "mean":
        total = total / has_pos.sum().clamp_min(1)
    return total.to(ct)
