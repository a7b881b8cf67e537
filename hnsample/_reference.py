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
# row hi); u = (top 52 bits of (x0 << 32 | x1) + 0.5) / 2**52. Re-derived here in numpy so the test
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
    return noise_from_bits((c0 << np.uint64(32)) | c1)


def noise_from_bits(bits: np.ndarray | int) -> np.ndarray:
    """u = (m + 0.5) / 2**52 for the top 52 bits m of a 64-bit Philox output: m + 0.5 is exact in
    float64, so 0 < u < 1 for every input."""
    m = np.asarray(bits, dtype=np.uint64) >> np.uint64(12)
    return (m.astype(np.float64) + 0.5) / 2.0**52


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
    """x / ||x||, with zero rows left at zero (a zero vector has cosine 0 with everything); a row with a
    NaN stays NaN (its scores are NaN, so it is never eligible)."""
    norm = x.norm(dim=1, keepdim=True)
    zero = norm == 0
    return torch.where(zero, torch.zeros_like(x), x / torch.where(zero, torch.ones_like(norm), norm))


def canonical_dots(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """D_ij of the canonical score (float64): products of the inputs in float64 (exact for float32 and
    16-bit inputs), summed into eight lanes P_r over t = r, r + 8, r + 16, ... in that order, then
    D = ((P_0 + P_4) + (P_2 + P_6)) + ((P_1 + P_5) + (P_3 + P_7))."""
    q, c = queries.double(), candidates.double()
    lanes = torch.zeros((q.shape[0], c.shape[0], 8), dtype=torch.float64)
    for t in range(q.shape[1]):
        lanes[:, :, t % 8] += q[:, None, t] * c[None, :, t]
    p = lanes.unbind(-1)
    return ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]))


def canonical_norms(x: torch.Tensor) -> torch.Tensor:
    """N_i = sqrt(D(x_i, x_i)) (float64)."""
    q = x.double()
    lanes = torch.zeros((q.shape[0], 8), dtype=torch.float64)
    for t in range(q.shape[1]):
        lanes[:, t % 8] += q[:, t] * q[:, t]
    p = lanes.unbind(-1)
    return torch.sqrt(((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7])))


def similarity(queries: torch.Tensor, candidates: torch.Tensor, metric: str = "dot") -> torch.Tensor:
    """The scores a selection ranks. float32 / float16 / bfloat16 inputs: the canonical scores,
    float32(D_ij) ("dot") or float32(D_ij / (N_i N_j)) ("cosine", 0 for a zero vector), every step an
    IEEE float64 operation in the fixed order of canonical_dots: the same bits on every machine.
    float64 inputs: q_i . c_j of the float64 rows (normalized for cosine)."""
    if queries.dtype != torch.float64:
        dots = canonical_dots(queries, candidates)
        if metric != "cosine":
            return dots.float()
        nq, nc = canonical_norms(queries), canonical_norms(candidates)
        den = nq[:, None] * nc[None, :]
        zero = (nq[:, None] == 0) | (nc[None, :] == 0)
        return torch.where(zero, torch.zeros_like(dots), dots / torch.where(zero, torch.ones_like(den), den)).float()
    q, c = queries, candidates
    if metric == "cosine":
        q, c = normalize_rows(q), normalize_rows(c)
    return q @ c.T


def differentiable_similarity(queries: torch.Tensor, candidates: torch.Tensor, metric: str = "dot") -> torch.Tensor:
    """The real-valued score formula in the compute dtype, through autograd: the canonical scores are its
    values rounded, so their gradients are this formula's."""
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
        chosen = choose(eligible, k, skip_top=skip_top, pool=pool, sampling=sampling, temperature=temperature,
                        seed=seed, row=row_offset + i)
        for t, (s, j) in enumerate(chosen):
            out_s[i, t] = s
            out_j[i, t] = j
    return out_s, out_j


def choose(eligible: list[tuple[float, int]], k: int, *, skip_top: int, pool: int | None, sampling: str,
           temperature: float, seed: int, row: int) -> list[tuple[float, int]]:
    """The window and the sampling over one row's eligible (score, id) pairs: rank by (score desc, id
    asc), drop skip_top, keep the next pool (all if None); "top" takes the first k, "uniform"/"softmax"
    the k largest sampling keys (noise row `row`). Returned sorted by (score desc, id asc)."""
    eligible = sorted(eligible, key=lambda t: (-t[0], t[1]))
    window = eligible[skip_top:] if pool is None else eligible[skip_top : skip_top + pool]
    if sampling == "top":
        return window[:k]
    keyed = [(sample_key(sampling, s, temperature, seed, row, j), s, j) for s, j in window]
    keyed.sort(key=lambda t: (-t[0], t[2]))
    return sorted(((s, j) for _, s, j in keyed[:k]), key=lambda t: (-t[0], t[1]))


def select_from_candidates(candidate_ids: torch.Tensor, scores: torch.Tensor, k: int, *,
                           num_candidates: int | None = None, **filters) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_from_candidates, literally: row i lists (candidate_ids[i, c], scores[i, c]) pairs (id -1 =
    padding), which is the (B, N) score matrix whose unlisted entries are NaN (never eligible), so the
    selection is :func:`select_from_scores` on that matrix, ids as columns. The one difference: p_i
    (without positive_scores) is the minimum *listed* score of the row's positives, and a positive that
    is not listed has no score (KeyError when a margin needs it). N: num_candidates, else the length of
    candidate_labels, else one more than the largest id given."""
    ids = [t for t in (candidate_ids, filters.get("positives"), filters.get("exclude")) if t is not None]
    n = num_candidates
    if n is None:
        labels = filters.get("candidate_labels")
        n = labels.shape[0] if labels is not None else max((int(t.max()) + 1 for t in ids if t.numel()), default=0)
    b = scores.shape[0]
    dense = torch.full((b, n), math.nan, dtype=torch.float64)
    for i in range(b):
        for j, s in zip(candidate_ids[i].tolist(), scores[i].to(torch.float64).tolist(), strict=True):
            if j >= 0:
                dense[i, j] = s
    positives = filters.get("positives")
    margins = filters.get("absolute_margin") is not None or filters.get("relative_margin") is not None
    if margins and positives is not None and filters.get("positive_scores") is None:
        for i in range(b):
            for j in positives[i].tolist():
                if j >= 0 and j not in candidate_ids[i].tolist():
                    raise KeyError(f"row {i}: positive {j} is not listed, so it has no score")
    return select_from_scores(dense, k, **filters)


def topk_similarity(queries: torch.Tensor, candidates: torch.Tensor, k: int, *, metric: str = "dot",
                    **filters) -> tuple[torch.Tensor, torch.Tensor]:
    """Full score matrix (fp32 accumulation) followed by select_from_scores."""
    return select_from_scores(similarity(queries, candidates, metric), k, **filters)


# ----------------------------------------------------------------------------------------------------
# In-batch miners (hnsample.miners): the choices on the batch's scores against itself.


def canonical_squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """D2_ij (float64): x_t = fl64(fl64(a_it - b_jt)^2), summed into eight lanes P_r over t = r, r + 8, ...
    in that order, then D2 = ((P_0 + P_4) + (P_2 + P_6)) + ((P_1 + P_5) + (P_3 + P_7))."""
    x, y = a.double(), b.double()
    lanes = torch.zeros((x.shape[0], y.shape[0], 8), dtype=torch.float64)
    for t in range(x.shape[1]):
        diff = x[:, None, t] - y[None, :, t]
        lanes[:, :, t % 8] += diff * diff
    p = lanes.unbind(-1)
    return ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]))


def batch_scores(e: torch.Tensor, metric: str) -> torch.Tensor:
    """(B, B) float64 scores the miners rank, NaN wherever either row holds NaN or inf. float32 / 16-bit:
    "dot" / "cosine" the canonical scores (:func:`similarity`), "euclidean" -float32(sqrt(D2)) of
    :func:`canonical_squared_distances`. float64: the rows' dot products (unit rows for cosine),
    -torch.cdist(e, e) for "euclidean" (the float64 GEMM's scores, as the miners compute them)."""
    if metric == "euclidean":
        if e.dtype == torch.float64:
            s = -torch.cdist(e, e)
        else:
            s = -canonical_squared_distances(e, e).sqrt().float()
    else:
        s = similarity(e, e, metric)
    finite = e.isfinite().all(dim=1)
    s = s.to(torch.float64)
    return torch.where(finite[:, None] & finite[None, :], s, torch.full_like(s, math.nan))


def batch_hard(e: torch.Tensor, labels: torch.Tensor, metric: str) -> list[tuple[int, int, int]]:
    """(a, p, n) per anchor a in order: p = argmin s_ab over b != a with labels[b] == labels[a], n = argmax
    s_ab over labels[b] != labels[a], NaN never chosen, ties to the lower index; anchors without both
    are dropped."""
    s = batch_scores(e, metric)
    out = []
    for a in range(e.shape[0]):
        pos = [(float(s[a, j]), j) for j in range(e.shape[0]) if j != a and labels[j] == labels[a]]
        neg = [(float(s[a, j]), j) for j in range(e.shape[0]) if labels[j] != labels[a]]
        pos = [t for t in pos if not math.isnan(t[0])]
        neg = [t for t in neg if not math.isnan(t[0])]
        if pos and neg:
            out.append((a, min(pos)[1], min(neg, key=lambda t: (-t[0], t[1]))[1]))
    return out


def semi_hard(e: torch.Tensor, labels: torch.Tensor, margin: float, metric: str,
              negatives_per_pair: int | None) -> list[tuple[int, int, int]]:
    """(a, p, n) for every pair a != p of one label (a ascending, then p) and the negatives n (another
    label) with -margin <= fl64(s_an - s_ap) < 0 (comparisons of NaN fail), the hardest first (s_an
    descending, ties to the lower index), at most negatives_per_pair of them (all for None)."""
    s = batch_scores(e, metric)
    b = e.shape[0]
    out = []
    for a in range(b):
        for p in range(b):
            if p == a or labels[p] != labels[a]:
                continue
            x = s[a] - s[a, p]  # float64 subtraction, elementwise
            inside = (labels != labels[a]) & (x >= -margin) & (x < 0)
            window = sorted(((float(s[a, n]), n) for n in inside.nonzero()[:, 0].tolist()),
                            key=lambda t: (-t[0], t[1]))
            out.extend((a, p, n) for _, n in window[:negatives_per_pair])
    return out


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


# ----------------------------------------------------------------------------------------------------
# Distillation from teacher scores (hnsample.distillation): pair scores s_ij = q_i . c_j[i].


def margin_mse(queries: torch.Tensor, candidates: list[torch.Tensor], teacher_margins: torch.Tensor) -> torch.Tensor:
    """mean over rows i and negatives j of ((s_i0 - s_ij) - t_ij)^2; candidates = [positive, negatives]."""
    terms = []
    for i in range(queries.shape[0]):
        for j in range(1, len(candidates)):
            s_pos = torch.dot(queries[i], candidates[0][i])
            s_neg = torch.dot(queries[i], candidates[j][i])
            terms.append((s_pos - s_neg - teacher_margins[i, j - 1]) ** 2)
    return torch.stack(terms).mean()


def margin_mse_multi(queries: torch.Tensor, positives: list[torch.Tensor], negatives: list[torch.Tensor],
                     teacher_scores: torch.Tensor) -> torch.Tensor:
    """mean over rows i, positives p with a teacher score (not NaN) and negatives j of
    ((s_ip - s_ij) - (T_ip - T_i,P+j))^2; teacher_scores (B, P + k) of [positives, negatives]."""
    terms = []
    n_pos = len(positives)
    for i in range(queries.shape[0]):
        for p, pos in enumerate(positives):
            if torch.isnan(teacher_scores[i, p]):
                continue
            for j, neg in enumerate(negatives):
                margin = torch.dot(queries[i], pos[i]) - torch.dot(queries[i], neg[i])
                terms.append((margin - (teacher_scores[i, p] - teacher_scores[i, n_pos + j])) ** 2)
    return torch.stack(terms).mean()


def listwise_kl(queries: torch.Tensor, candidates: list[torch.Tensor], teacher_scores: torch.Tensor,
                student_temperature: float, teacher_temperature: float) -> torch.Tensor:
    """student_temperature^2 * mean over rows of KL(softmax(T_i / t_T) || softmax(s_i / t_S))."""
    rows = []
    for i in range(queries.shape[0]):
        s = torch.stack([torch.dot(queries[i], c[i]) for c in candidates]) / student_temperature
        p = torch.softmax(teacher_scores[i] / teacher_temperature, dim=0)
        log_q = s - torch.logsumexp(s, dim=0)
        rows.append(sum(p[j] * (torch.log(p[j]) - log_q[j]) for j in range(len(candidates)) if p[j] > 0))
    return torch.stack(rows).mean() * student_temperature**2
