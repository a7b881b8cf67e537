"""Plain-torch reference implementation of every hnsample op: the specification in executable form.

Written for clarity, not speed: it materializes the full score matrix and loops over rows. The tests
compare the fused kernels against these functions.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------
# Sampling noise: Philox-4x32-10 with key = seed and counter = (candidate lo, candidate hi, row lo,
# row hi); u = (top 53 bits of (x0 << 32 | x1) + 0.5) / 2**53. Re-derived here in numpy so the test
# suite checks the kernels' noise against an independent implementation.

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)


def uniform_noise(seed: int, rows: np.ndarray | int, cols: np.ndarray | int) -> np.ndarray:
    """u(seed, row, candidate) in (0, 1), elementwise over broadcast rows/cols (non-negative ints)."""
    rows = np.asarray(rows, dtype=np.uint64)
    cols = np.asarray(cols, dtype=np.uint64)
    rows, cols = np.broadcast_arrays(rows, cols)
    c0, c1 = cols & _MASK32, cols >> np.uint64(32)
    c2, c3 = rows & _MASK32, rows >> np.uint64(32)
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    bits = ((c0 << np.uint64(32)) | c1) >> np.uint64(11)
    return (bits.astype(np.float64) + 0.5) / 2.0**53


def sample_key(sampling: str, score: float, temperature: float, seed: int, row: int, col: int) -> float:
    """Sampling key; larger is chosen first. uniform: u; softmax: s / T - log(-log(u))."""
    u = float(uniform_noise(seed, row, col))
    if sampling == "softmax":
        return score * (1.0 / temperature) - math.log(-math.log(u))
    return u


# ----------------------------------------------------------------------------------------------------
# topk_similarity / topk_from_scores


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores accumulate in float32 (float64 for float64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """x / ||x||, with zero rows left at zero (a zero vector has cosine 0 with everything)."""
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, x / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(x))


def similarity(queries: torch.Tensor, candidates: torch.Tensor, metric: str = "dot") -> torch.Tensor:
    """s_ij = q_i . c_j ("dot") or q_i . c_j / (|q_i| |c_j|) ("cosine", 0 for a zero vector)."""
    ct = compute_dtype(queries.dtype)
    q, c = queries.to(ct), candidates.to(ct)
    if metric == "cosine":
        q, c = normalize_rows(q), normalize_rows(c)
    return q @ c.T


def positive_reference_scores(
    scores: torch.Tensor, positives: torch.Tensor | None, positive_scores: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, has_p): p_i = positive_scores[i] if given, else min of s_ij over the valid positives j."""
    b = scores.shape[0]
    if positive_scores is not None:
        return positive_scores.to(torch.float64), torch.ones(b, dtype=torch.bool)
    p = torch.zeros(b, dtype=torch.float64)
    has = torch.zeros(b, dtype=torch.bool)
    if positives is None:
        return p, has
    for i in range(b):
        vals = [float(scores[i, j]) for j in positives[i].tolist() if j >= 0]
        if vals:
            p[i] = min(vals) if not any(math.isnan(v) for v in vals) else float("nan")
            has[i] = True
    return p, has


def upper_bounds(
    p: torch.Tensor, has_p: torch.Tensor, absolute_margin: float | None, relative_margin: float | None
) -> torch.Tensor:
    """Per-row bound from the margin filters, in float64: s <= p - absolute_margin and
    s <= p - |p| * relative_margin; +inf for rows without a positive score."""
    upper = torch.full_like(p, math.inf)
    if absolute_margin is not None:
        upper = torch.minimum(upper, p - absolute_margin)
    if relative_margin is not None:
        upper = torch.minimum(upper, p - p.abs() * relative_margin)
    upper = torch.where(p.isnan() & (absolute_margin is not None or relative_margin is not None),
                        torch.full_like(p, math.nan), upper)
    return torch.where(has_p, upper, torch.full_like(p, math.inf))


def select_from_scores(
    scores: torch.Tensor,
    k: int,
    *,
    positives: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
    query_labels: torch.Tensor | None = None,
    candidate_labels: torch.Tensor | None = None,
    positive_scores: torch.Tensor | None = None,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    min_score: float | None = None,
    max_score: float | None = None,
    skip_top: int = 0,
    pool: int | None = None,
    sampling: str = "top",
    temperature: float = 1.0,
    seed: int = 0,
    row_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection rule, literally. Returns (scores float64 (B, k), indices int64 (B, k)).

    Candidate j is eligible for row i iff: j not in positives[i] or exclude[i]; labels differ (when both
    are given); s_ij >= min_score; s_ij <= max_score; s_ij <= upper_i (margins); s_ij is not NaN. All
    comparisons are made in float64. Eligible candidates are ranked by (score desc, index asc); the first
    skip_top are dropped, the window is the next `pool` (all if None); "top" takes the window's first k,
    "uniform"/"softmax" take the k largest sampling keys (noise row = row_offset + i). Output sorted by
    (score desc, index asc), padded with (-inf, -1).
    """
    b, n = scores.shape
    s64 = scores.to(torch.float64)
    p, has_p = positive_reference_scores(scores, positives, positive_scores)
    upper = upper_bounds(p, has_p, absolute_margin, relative_margin)
    out_s = torch.full((b, k), -math.inf, dtype=torch.float64)
    out_j = torch.full((b, k), -1, dtype=torch.int64)
    for i in range(b):
        banned = set()
        for ids in (positives, exclude):
            if ids is not None:
                banned.update(j for j in ids[i].tolist() if j >= 0)
        row = s64[i].tolist()
        eligible = []
        for j, s in enumerate(row):
            if math.isnan(s) or j in banned:
                continue
            if query_labels is not None and candidate_labels is not None:
                if int(query_labels[i]) == int(candidate_labels[j]):
                    continue
            if min_score is not None and not s >= min_score:
                continue
            if max_score is not None and not s <= max_score:
                continue
            if not s <= float(upper[i]):
                continue
            eligible.append((s, j))
        eligible.sort(key=lambda t: (-t[0], t[1]))
        window = eligible[skip_top:] if pool is None else eligible[skip_top : skip_top + pool]
        if sampling == "top":
            chosen = window[:k]
        else:
            keyed = [(sample_key(sampling, s, temperature, seed, row_offset + i, j), s, j) for s, j in window]
            keyed.sort(key=lambda t: (-t[0], t[2]))
            chosen = sorted(((s, j) for _, s, j in keyed[:k]), key=lambda t: (-t[0], t[1]))
        for t, (s, j) in enumerate(chosen):
            out_s[i, t] = s
            out_j[i, t] = j
    return out_s, out_j


def topk_similarity(queries: torch.Tensor, candidates: torch.Tensor, k: int, *, metric: str = "dot",
                    **filters) -> tuple[torch.Tensor, torch.Tensor]:
    """Full score matrix (fp32 accumulation) followed by select_from_scores."""
    return select_from_scores(similarity(queries, candidates, metric), k, **filters)


# ----------------------------------------------------------------------------------------------------
# info_nce: the literal full-matrix InfoNCE with every masking and weighting option (float64).


def info_nce(
    queries: torch.Tensor,
    docs: torch.Tensor,
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
) -> torch.Tensor:
    """hnsample.info_nce on the full (B, M) matrix, row by row, in float64 (see its docstring)."""
    q, d = queries.to(torch.float64), docs.to(torch.float64)
    if isinstance(temperature, torch.Tensor):
        tau = temperature.to(torch.float64).reshape(())
    else:
        tau = float(temperature)
    b, m = q.shape[0], d.shape[0]
    s = q @ d.T
    sd = s.detach()
    if positive_ids is None:
        positive_ids = torch.arange(b).unsqueeze(1)
    positive_ids = positive_ids.reshape(b, -1).cpu()
    positives = [[int(j) for j in positive_ids[i] if j >= 0] for i in range(b)]
    is_pos = torch.zeros((b, m), dtype=torch.bool)
    for i in range(b):
        for p in positives[i]:
            is_pos[i, p] = True
    masked = torch.zeros((b, m), dtype=torch.bool)
    if doc_ids is not None:
        for i in range(b):
            for p in positives[i]:
                masked[i] |= (doc_ids.cpu() == doc_ids[p].cpu())
    if query_labels is not None:
        masked |= query_labels.cpu().unsqueeze(1) == doc_labels.cpu().unsqueeze(0)
    guide = None
    if guide_queries is not None:
        guide = guide_queries.to(torch.float64) @ guide_docs.to(torch.float64).T
    for i in range(b):
        if not positives[i]:
            continue
        s_plus = min(float(sd[i, p]) for p in positives[i])
        for j in range(m):
            v = float(sd[i, j])
            if false_negative_margin is not None and v > s_plus - false_negative_margin:
                masked[i, j] = True
            rel = false_negative_relative_margin
            if rel is not None and v > s_plus - abs(s_plus) * rel:
                masked[i, j] = True
        if guide is not None:
            g_plus = min(float(guide[i, p]) for p in positives[i])
            masked[i] |= (guide[i].cpu() > g_plus - guide_margin)
    masked &= ~is_pos
    negative = ~masked & ~is_pos
    logits = torch.where(is_pos, (s - positive_margin) / tau, s / tau + hardness_alpha * sd)

    rows = []
    for i in range(b):
        if not positives[i]:
            rows.append(torch.zeros((), dtype=torch.float64))
            continue
        pos_mass = torch.exp(logits[i, is_pos[i]]).sum()
        negs = logits[i, negative[i]]
        n = negs.numel()
        if n:
            w = torch.exp(hcl_beta * negs) / torch.exp(hcl_beta * negs).mean()
            r = (w * torch.exp(negs)).sum()
        else:
            r = torch.zeros((), dtype=torch.float64)
        terms = []
        for p in positives[i]:
            if tau_plus > 0:
                floor = n * torch.exp(-1.0 / torch.as_tensor(tau, dtype=torch.float64))
                ng = torch.maximum((r - tau_plus * n * torch.exp(logits[i, p])) / (1 - tau_plus), floor)
            else:
                ng = r
            terms.append(-torch.log(torch.exp(logits[i, p]) / (pos_mass + ng)))
        row = torch.stack(terms).mean()
        if symmetric:
            back = []
            for p in positives[i]:
                column = logits[:, p][is_pos[:, p] | negative[:, p]]
                back.append(-logits[i, p] + torch.logsumexp(column, dim=0))
            row = 0.5 * (row + torch.stack(back).mean())
        rows.append(row)
    out = torch.stack(rows)
    if reduction == "none":
        return out
    if reduction == "sum":
        return out.sum()
    with_pos = sum(1 for i in range(b) if positives[i])
    return out.sum() / max(with_pos, 1)
