"""Golden entries of topk_similarity and topk_from_scores: every filter, window and sampling mode, dtypes,
layouts, degenerate sizes, and the gradients of the returned scores."""

from __future__ import annotations

import numpy as np
import torch

import hnsample

from .corpus import Context, Data, entry, exact, ids_tensor, tensor, topk_fields

DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16, "f16": torch.float16}
METRICS = ("dot", "cosine")


def sim_inputs(data: Data, b: int, n: int, metric: str, dtype: torch.dtype = torch.float32,
               d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and candidates with exact duplicates (candidates 1 = 3 = n//2 and 0 = n-1, queries 0 = b-1),
    so equal scores, and the tie rule, occur whatever the values."""
    rows = data.unit_rows if metric == "cosine" else data.dot_rows
    q, c = rows(b, d), rows(n, d)
    if n >= 6:
        c[n - 1] = c[0]
        c[n // 2] = c[1]
        c[3] = c[1]
    if b >= 3:
        q[b - 1] = q[0]
    return tensor(q, dtype), tensor(c, dtype)


def score_matrix(q: torch.Tensor, c: torch.Tensor, metric: str) -> np.ndarray:
    """float64 scores, used only to choose ids (e.g. each row's weakest candidate as its positive)."""
    q64, c64 = q.to(torch.float64), c.to(torch.float64)
    if metric == "cosine":
        q64 = q64 / q64.norm(dim=1, keepdim=True).clamp_min(1e-300)
        c64 = c64 / c64.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (q64 @ c64.T).numpy()


def ranked_ids(s: np.ndarray, fraction: float) -> np.ndarray:
    """(B,) each row's candidate at descending rank round(fraction * (N - 1)) (NaN last, ties to the
    lower id): a strong positive for small fractions, a weak one (p_i < 0 on most rows) for large ones."""
    order = np.argsort(-np.where(np.isnan(s), -np.inf, s), axis=1, kind="stable")
    return order[:, int(round(fraction * (s.shape[1] - 1)))]


def scale(metric: str) -> float:
    """Typical score magnitude: margins and bounds are multiples of it (dyadic, so exact)."""
    return 4.0 if metric == "dot" else 0.25


# ----------------------------------------------------------------------------------------------------
# topk_similarity: every dtype x metric, plain and with every filter at once


def _dtype_entries() -> None:
    for dt_name, dtype in DTYPES.items():
        for metric in METRICS:

            @entry(f"topk_similarity/{dt_name}_{metric}")
            def _(ctx: Context, dtype=dtype, metric=metric):
                d = ctx.data
                b, n = 6, 37
                q, c = sim_inputs(d, b, n, metric, dtype)
                u = scale(metric)
                pos, exc = d.ids(b, 3, n), ids_tensor(d.ids(b, 2, n))
                pos[:, 0] = ranked_ids(score_matrix(q, c, metric), 0.1)  # p_i: a strong positive or lower
                pos = ids_tensor(pos)
                ql, cl = ids_tensor(d.integers(0, 2, b)), ids_tensor(d.integers(0, 2, n))
                out = {}
                out |= topk_fields(hnsample.topk_similarity(q, c, 7, metric=metric), "plain_")
                out |= topk_fields(hnsample.topk_similarity(
                    q, c, 5, metric=metric, positives=pos, absolute_margin=u / 4, relative_margin=0.25,
                ), "margins_")
                out |= topk_fields(hnsample.topk_similarity(
                    q, c, 5, metric=metric, positives=pos, exclude=exc, query_labels=ql, candidate_labels=cl,
                    absolute_margin=0.0, min_score=-4 * u, max_score=6 * u, skip_top=1, pool=8,
                ), "all_")
                out |= topk_fields(hnsample.topk_similarity(
                    q, c, 4, metric=metric, positives=pos, exclude=exc, sampling="softmax",
                    temperature=u, seed=123, pool=12,
                ), "softmax_")
                return out


_dtype_entries()


# ----------------------------------------------------------------------------------------------------
# topk_similarity: one filter at a time (float32)


def _per_metric(name: str):
    def wrap(fn):
        for metric in METRICS:
            entry(f"topk_similarity/{name}_{metric}")(lambda ctx, metric=metric: fn(ctx, metric))
        return fn
    return wrap


@_per_metric("relative_margin_negative_p")
def _(ctx: Context, metric: str):
    # Each row's positives are a weak candidate (so p_i < 0 on most rows) and a random id or -1: the
    # relative bound p - |p| m then sits below p for m > 0 and above it for m < 0.
    d = ctx.data
    b, n = 8, 30
    q, c = sim_inputs(d, b, n, metric)
    pos = np.stack([ranked_ids(score_matrix(q, c, metric), 0.85), d.ids(b, 1, n, pad=0.5)[:, 0]], axis=1)
    out = {"positives": exact(pos)}
    for tag, m in (("m025", 0.25), ("m1", 1.0), ("mneg025", -0.25)):
        out |= topk_fields(hnsample.topk_similarity(q, c, 6, metric=metric, positives=ids_tensor(pos),
                                                    relative_margin=m), f"{tag}_")
    return out


@_per_metric("absolute_margin")
def _(ctx: Context, metric: str):
    d = ctx.data
    b, n = 8, 30
    q, c = sim_inputs(d, b, n, metric)
    pos = ids_tensor(d.ids(b, 2, n))
    u = scale(metric)
    out = {}
    for tag, m in (("zero", 0.0), ("pos", u), ("neg", -u / 2)):
        out |= topk_fields(hnsample.topk_similarity(q, c, 6, metric=metric, positives=pos, absolute_margin=m),
                           f"{tag}_")
    out |= topk_fields(hnsample.topk_similarity(q, c, 6, metric=metric, positives=pos, absolute_margin=u / 2,
                                                relative_margin=0.5), "both_")
    return out


@_per_metric("positive_scores")
def _(ctx: Context, metric: str):
    # positive_scores overrides p_i (NaN: nothing passes a margin; without a margin it plays no role)
    d = ctx.data
    b, n = 6, 25
    q, c = sim_inputs(d, b, n, metric)
    u = scale(metric)
    ps = torch.tensor([-2.5, 0.0, 3.0, float("nan"), 1.5, -0.25], dtype=torch.float32) * u
    pos = ids_tensor(d.ids(b, 2, n))
    out = {}
    out |= topk_fields(hnsample.topk_similarity(q, c, 5, metric=metric, positive_scores=ps, absolute_margin=u / 2),
                       "abs_")
    out |= topk_fields(hnsample.topk_similarity(q, c, 5, metric=metric, positives=pos, positive_scores=ps,
                                                relative_margin=0.1), "rel_")
    out |= topk_fields(hnsample.topk_similarity(q, c, 5, metric=metric, positive_scores=ps.to(torch.float64)),
                       "nomargin_")
    return out


@_per_metric("exclude_positives")
def _(ctx: Context, metric: str):
    d = ctx.data
    b, n = 7, 20
    q, c = sim_inputs(d, b, n, metric)
    pos, exc = d.ids(b, 4, n, pad=0.4), d.ids(b, 5, n, pad=0.4)
    pos[0] = [1, 1, -1, 3]  # duplicates and padding; 1 and 3 are the same vector
    exc[1] = -1  # all padding
    out = {}
    out |= topk_fields(hnsample.topk_similarity(q, c, 8, metric=metric, positives=ids_tensor(pos)), "pos_")
    out |= topk_fields(hnsample.topk_similarity(q, c, 8, metric=metric, exclude=ids_tensor(exc)), "exc_")
    out |= topk_fields(hnsample.topk_similarity(q, c, 8, metric=metric, positives=ids_tensor(pos),
                                                exclude=ids_tensor(exc)), "both_")
    out |= topk_fields(hnsample.topk_similarity(  # int32 ids, one id per row as a (B,) vector
        q, c, 8, metric=metric, positives=torch.from_numpy(pos[:, 0].astype(np.int32)),
        exclude=torch.from_numpy(exc.astype(np.int32))), "int32_")
    return out


@_per_metric("labels")
def _(ctx: Context, metric: str):
    d = ctx.data
    b, n = 7, 26
    q, c = sim_inputs(d, b, n, metric)
    ql, cl = d.integers(0, 3, b), d.integers(0, 3, n)
    out = {}
    out |= topk_fields(hnsample.topk_similarity(q, c, 6, metric=metric, query_labels=ids_tensor(ql),
                                                candidate_labels=ids_tensor(cl)), "int64_")
    out |= topk_fields(hnsample.topk_similarity(
        q, c, 6, metric=metric, query_labels=torch.from_numpy(ql.astype(np.int32)),
        candidate_labels=torch.from_numpy(cl.astype(np.int32)), exclude=ids_tensor(d.ids(b, 2, n))), "int32_")
    return out


@_per_metric("score_bounds")
def _(ctx: Context, metric: str):
    # closed bounds on values that occur as scores (integers for dot, multiples of 1/16 for cosine)
    d = ctx.data
    b, n = 6, 30
    q, c = sim_inputs(d, b, n, metric)
    u = scale(metric)
    out = {}
    for tag, kw in (("min", dict(min_score=-u / 2)), ("max", dict(max_score=u / 2)),
                    ("both", dict(min_score=-u, max_score=u)), ("point", dict(min_score=0.0, max_score=0.0)),
                    ("empty", dict(min_score=u, max_score=-u))):
        out |= topk_fields(hnsample.topk_similarity(q, c, 7, metric=metric, **kw), f"{tag}_")
    return out


@_per_metric("windows")
def _(ctx: Context, metric: str):
    d = ctx.data
    b, n = 5, 24
    q, c = sim_inputs(d, b, n, metric)
    exc = ids_tensor(d.ids(b, 3, n))
    out = {}
    for skip, pool in ((0, None), (0, 3), (2, None), (2, 4), (5, 1), (n - 3, 10), (n, None), (n + 5, 2),
                       (3, n + 10)):
        tag = f"s{skip}_p{pool}_"
        out |= topk_fields(hnsample.topk_similarity(q, c, 4, metric=metric, exclude=exc, skip_top=skip,
                                                    pool=pool), tag)
    return out


@_per_metric("sampling")
def _(ctx: Context, metric: str):
    d = ctx.data
    b, n = 6, 40
    q, c = sim_inputs(d, b, n, metric)
    pos = ids_tensor(d.ids(b, 2, n))
    u = scale(metric)
    calls = {
        "uniform": dict(sampling="uniform", seed=1),
        "uniform_window": dict(sampling="uniform", seed=2, skip_top=1, pool=6),
        "uniform_short": dict(sampling="uniform", seed=3, pool=3),
        "softmax_cold": dict(sampling="softmax", temperature=u / 8, seed=4),
        "softmax_hot": dict(sampling="softmax", temperature=8 * u, seed=5, pool=10),
        "softmax_margin": dict(sampling="softmax", temperature=u, seed=2**62 + 7, positives=pos,
                               absolute_margin=0.0),
        "softmax_generator": dict(sampling="softmax", temperature=u, generator=torch.Generator().manual_seed(11)),
        "uniform_generator": dict(sampling="uniform", generator=torch.Generator().manual_seed(12), skip_top=2),
        "top_seed_ignored": dict(sampling="top", seed=99),
    }
    out = {}
    for tag, kw in calls.items():
        out |= topk_fields(hnsample.topk_similarity(q, c, 5, metric=metric, **kw), f"{tag}_")
    return out


@entry("topk_similarity/k_greater_than_n")
def _(ctx: Context):
    d = ctx.data
    q, c = sim_inputs(d, 4, 9, "dot")
    exc = ids_tensor(d.ids(4, 3, 9))
    out = topk_fields(hnsample.topk_similarity(q, c, 13, exclude=exc), "dot_")
    qc, cc = sim_inputs(d, 4, 9, "cosine")
    out |= topk_fields(hnsample.topk_similarity(qc, cc, 12, metric="cosine", skip_top=2), "cosine_")
    out |= topk_fields(hnsample.topk_similarity(q, c, 11, sampling="uniform", seed=8), "uniform_")
    return out


@entry("topk_similarity/empty")
def _(ctx: Context):
    d = ctx.data
    q, c = sim_inputs(d, 3, 8, "dot")
    out = {}
    # N = 0 with every filter given (ids all padding), B = 0, k = 0, d = 0
    out |= topk_fields(hnsample.topk_similarity(
        q, c[:0], 4, positives=torch.full((3, 2), -1), exclude=torch.full((3, 1), -1),
        query_labels=torch.zeros(3, dtype=torch.int64), candidate_labels=torch.zeros(0, dtype=torch.int64),
        absolute_margin=0.0, relative_margin=0.5, min_score=-1.0, skip_top=1, pool=2), "n0_")
    out |= topk_fields(hnsample.topk_similarity(q[:0], c, 4, positives=torch.zeros((0, 2), dtype=torch.int64),
                                                absolute_margin=1.0), "b0_")
    out |= topk_fields(hnsample.topk_similarity(q, c, 0, sampling="softmax", seed=1), "k0_")
    out |= topk_fields(hnsample.topk_similarity(q[:, :0], c[:, :0], 5), "d0_")
    out |= topk_fields(hnsample.topk_similarity(q[:0], c[:0], 2, metric="cosine"), "b0n0_")
    return out


def _block_entries() -> None:
    for bs in (1, 2, 7, 64, 4096, None):

        @entry(f"topk_similarity/block_size_{bs}")
        def _(ctx: Context, bs=bs):
            # the same calls for every block size (inputs keyed by a shared name): all must agree
            d = Data("topk_similarity/block_size", ctx.data.tier)
            b, n = 9, 47
            out = {}
            for metric in METRICS:
                q, c = sim_inputs(d, b, n, metric)
                pos, exc = ids_tensor(d.ids(b, 2, n)), ids_tensor(d.ids(b, 2, n))
                ql, cl = ids_tensor(d.integers(0, 3, b)), ids_tensor(d.integers(0, 3, n))
                u = scale(metric)
                out |= topk_fields(hnsample.topk_similarity(
                    q, c, 6, metric=metric, positives=pos, exclude=exc, query_labels=ql, candidate_labels=cl,
                    absolute_margin=u / 4, skip_top=1, block_size=bs), f"{metric}_top_")
                out |= topk_fields(hnsample.topk_similarity(
                    q, c, 6, metric=metric, positives=pos, relative_margin=0.25, sampling="softmax",
                    temperature=u, seed=77, pool=20, block_size=bs), f"{metric}_softmax_")
                out |= topk_fields(hnsample.topk_similarity(
                    q, c, 6, metric=metric, exclude=exc, sampling="uniform", seed=78, block_size=bs),
                    f"{metric}_uniform_")
            return out


_block_entries()


@entry("topk_similarity/numpy")
def _(ctx: Context):
    d = ctx.data
    q, c = sim_inputs(d, 5, 21, "cosine")
    qn, cn = q.numpy(), c.numpy()
    pos = d.ids(5, 2, 21)
    out = hnsample.topk_similarity(qn, cn, 6, metric="cosine", positives=pos, absolute_margin=0.0)
    assert isinstance(out.indices, np.ndarray) and isinstance(out.scores, np.ndarray)
    res = topk_fields(out, "f32_")
    out = hnsample.topk_similarity(qn.astype(np.float64), cn.astype(np.float64), 6, metric="cosine",
                                   exclude=pos, sampling="uniform", seed=4)
    assert isinstance(out.indices, np.ndarray)
    return res | topk_fields(out, "f64_")


@entry("topk_similarity/non_contiguous")
def _(ctx: Context):
    # Views into buffers whose other elements are NaN: a stride read wrongly shows as a NaN score.
    d = ctx.data
    b, n = 6, 19
    out = {}
    for metric in METRICS:
        q, c = sim_inputs(d, b, n, metric)
        qbuf = torch.full((32, b), float("nan")).T  # column-major (b, 32)
        qbuf[:, ::2] = q
        cbuf = torch.full((2 * n, 32), float("nan"))
        cbuf[::2, 1::2] = c
        qs, cs = qbuf[:, ::2], cbuf[::2, 1::2]
        pos = ids_tensor(d.ids(2, b, n)).T  # transposed ids
        ql = ids_tensor(d.integers(0, 2, 2 * b))[::2]
        cl = ids_tensor(d.integers(0, 2, 2 * n))[::2]
        assert not (qs.is_contiguous() or cs.is_contiguous() or pos.is_contiguous() or ql.is_contiguous())
        kw = dict(metric=metric, absolute_margin=0.0)
        out |= topk_fields(hnsample.topk_similarity(qs, cs, 5, positives=pos, query_labels=ql, candidate_labels=cl,
                                                    **kw), f"{metric}_strided_")
        out |= topk_fields(hnsample.topk_similarity(q, c, 5, positives=pos.contiguous(), query_labels=ql.contiguous(),
                                                    candidate_labels=cl.contiguous(), **kw), f"{metric}_contiguous_")
    return out


@entry("topk_similarity/ties")
def _(ctx: Context):
    # Most candidates are one vector: the ranking is by id within the tie, across skip_top and pool
    d = ctx.data
    q, c = sim_inputs(d, 3, 30, "dot", d=8)
    c[:] = c[0]
    c[7] = 2 * c[0]
    c[20] = -c[0]
    q[1] = 0  # all scores 0: the k lowest eligible ids
    out = {}
    out |= topk_fields(hnsample.topk_similarity(q, c, 6), "top_")
    out |= topk_fields(hnsample.topk_similarity(q, c, 4, skip_top=3, exclude=torch.tensor([[0], [4], [-1]])),
                       "skip_")
    out |= topk_fields(hnsample.topk_similarity(q, c, 4, skip_top=27, pool=2), "skip_past_")
    out |= topk_fields(hnsample.topk_similarity(q, c, 3, skip_top=1, pool=5, sampling="uniform", seed=3), "pool_")
    out |= topk_fields(hnsample.topk_similarity(q, c, 5, block_size=4), "blocks_")
    return out


@entry("topk_similarity/large")
def _(ctx: Context):
    # rows long enough to cross SIMD chunks and several blocks; filters and sampling on top
    d = ctx.data
    b, n = 4, 700
    out = {}
    for metric in METRICS:
        q, c = sim_inputs(d, b, n, metric)
        pos, exc = ids_tensor(d.ids(b, 4, n)), ids_tensor(d.ids(b, 40, n))
        out |= topk_fields(hnsample.topk_similarity(q, c, 30, metric=metric, positives=pos, exclude=exc,
                                                    absolute_margin=0.0), f"{metric}_top_")
        out |= topk_fields(hnsample.topk_similarity(q, c, 30, metric=metric, exclude=exc, skip_top=50, pool=200,
                                                    sampling="softmax", temperature=scale(metric), seed=5,
                                                    block_size=1000), f"{metric}_softmax_")
    return out


@entry("topk_similarity/cosine_zero_rows")
def _(ctx: Context):
    d = ctx.data
    q, c = sim_inputs(d, 4, 12, "cosine")
    q[1] = 0
    c[2] = 0
    c[5] = 0
    out = topk_fields(hnsample.topk_similarity(q, c, 12, metric="cosine"), "all_")
    out |= topk_fields(hnsample.topk_similarity(q, c, 5, metric="cosine", positives=torch.tensor([[2], [0], [5], [-1]]),
                                                absolute_margin=0.0), "margin_")
    return out


# ----------------------------------------------------------------------------------------------------
# topk_from_scores


def _from_scores_dtype_entries() -> None:
    for dt_name, dtype in DTYPES.items():

        @entry(f"topk_from_scores/{dt_name}")
        def _(ctx: Context, dtype=dtype):
            d = ctx.data
            b, n = 6, 33
            s = tensor(d.scores((b, n), specials=0.12), dtype)
            pos, exc = d.ids(b, 3, n), ids_tensor(d.ids(b, 3, n))
            pos[:, 0] = ranked_ids(s.to(torch.float64).numpy(), 0.1)
            pos = ids_tensor(pos)
            ql, cl = ids_tensor(d.integers(0, 2, b)), ids_tensor(d.integers(0, 2, n))
            out = topk_fields(hnsample.topk_from_scores(s, 8), "plain_")
            out |= topk_fields(hnsample.topk_from_scores(
                s, 6, positives=pos, exclude=exc, query_labels=ql, candidate_labels=cl, absolute_margin=0.25,
                relative_margin=0.5, min_score=-2.5, max_score=2.75, skip_top=1, pool=9), "all_")
            out |= topk_fields(hnsample.topk_from_scores(s, 5, positives=pos, sampling="softmax", temperature=0.5,
                                                         seed=31), "softmax_")
            return out


_from_scores_dtype_entries()


@entry("topk_from_scores/nan_inf")
def _(ctx: Context):
    d = ctx.data
    b, n = 6, 20
    s = d.scores((b, n), specials=0.3)
    s[0] = np.nan  # a row of NaN: nothing eligible
    s[1, :5] = np.inf
    s[2, :] = -np.inf
    s[2, 7] = 0.5
    st = tensor(s)
    out = topk_fields(hnsample.topk_from_scores(st, 7), "plain_")
    out |= topk_fields(hnsample.topk_from_scores(st, 7, max_score=2.0), "max_")
    out |= topk_fields(hnsample.topk_from_scores(st, 7, min_score=-1.0), "min_")
    out |= topk_fields(hnsample.topk_from_scores(st, 4, skip_top=2, pool=3), "window_")
    out |= topk_fields(hnsample.topk_from_scores(st, 4, sampling="softmax", seed=6), "softmax_")
    out |= topk_fields(hnsample.topk_from_scores(st, 4, sampling="uniform", seed=6), "uniform_")
    return out


@entry("topk_from_scores/nan_positive_score")
def _(ctx: Context):
    d = ctx.data
    b, n = 6, 15
    s = d.scores((b, n))
    s[:, 3] = np.nan
    s[:, 9] = np.inf
    pos = d.ids(b, 2, n)
    pos[0] = [3, -1]  # NaN positive: p NaN, nothing passes a margin
    pos[1] = [3, 4]  # NaN among valid positives: p NaN
    pos[2] = [9, -1]  # +inf positive: p = inf, the absolute bound is inf
    pos[3] = [-1, -1]  # no valid positive: no margin filter
    st = tensor(s)
    out = {"positives": exact(pos)}
    out |= topk_fields(hnsample.topk_from_scores(st, 6, positives=ids_tensor(pos), absolute_margin=0.25), "abs_")
    out |= topk_fields(hnsample.topk_from_scores(st, 6, positives=ids_tensor(pos), relative_margin=0.5), "rel_")
    out |= topk_fields(hnsample.topk_from_scores(st, 6, positives=ids_tensor(pos)), "nomargin_")
    return out


@entry("topk_from_scores/margins")
def _(ctx: Context):
    d = ctx.data
    b, n = 8, 24
    s = d.scores((b, n), specials=0.05)
    st = tensor(s, torch.float64)
    pos = np.stack([ranked_ids(s, 0.4), d.ids(b, 1, n)[:, 0]], axis=1)
    ps = tensor(d.integers(-8, 8, b) / 4, torch.float32)
    out = {"positives": exact(pos)}
    for tag, kw in (("abs0", dict(absolute_margin=0.0)), ("abs", dict(absolute_margin=0.5)),
                    ("absneg", dict(absolute_margin=-0.75)), ("rel", dict(relative_margin=0.1)),
                    ("relneg", dict(relative_margin=-0.2)), ("both", dict(absolute_margin=0.25, relative_margin=0.3))):
        out |= topk_fields(hnsample.topk_from_scores(st, 8, positives=ids_tensor(pos), **kw), f"{tag}_")
        out |= topk_fields(hnsample.topk_from_scores(st, 8, positive_scores=ps, **kw), f"{tag}_ps_")
    return out


@entry("topk_from_scores/filters")
def _(ctx: Context):
    d = ctx.data
    b, n = 7, 26
    st = tensor(d.scores((b, n), specials=0.05))
    pos, exc = d.ids(b, 3, n, pad=0.4), d.ids(b, 4, n, pad=0.4)
    pos[0] = [2, 2, -1]
    ql, cl = ids_tensor(d.integers(0, 3, b)), ids_tensor(d.integers(0, 3, n))
    out = {}
    out |= topk_fields(hnsample.topk_from_scores(st, 9, positives=ids_tensor(pos)), "pos_")
    out |= topk_fields(hnsample.topk_from_scores(st, 9, exclude=ids_tensor(exc)), "exc_")
    out |= topk_fields(hnsample.topk_from_scores(st, 9, positives=ids_tensor(pos[:, 0])), "pos1d_")
    out |= topk_fields(hnsample.topk_from_scores(st, 9, query_labels=ql, candidate_labels=cl), "labels_")
    out |= topk_fields(hnsample.topk_from_scores(st, 9, min_score=-1.0, max_score=1.0), "bounds_")
    out |= topk_fields(hnsample.topk_from_scores(st, 9, min_score=0.25, max_score=0.25), "point_")
    return out


@entry("topk_from_scores/windows_sampling")
def _(ctx: Context):
    d = ctx.data
    b, n = 5, 30
    st = tensor(d.scores((b, n), specials=0.05))
    out = {}
    for skip, pool in ((0, 2), (3, None), (4, 6), (n - 2, 5), (n + 1, None)):
        out |= topk_fields(hnsample.topk_from_scores(st, 4, skip_top=skip, pool=pool), f"s{skip}_p{pool}_")
    for tag, kw in (("uniform", dict(sampling="uniform", seed=0)),
                    ("uniform_pool", dict(sampling="uniform", seed=1, skip_top=2, pool=7)),
                    ("softmax", dict(sampling="softmax", seed=2, temperature=0.25)),
                    ("softmax_pool", dict(sampling="softmax", seed=3, temperature=4.0, pool=12)),
                    ("softmax_gen", dict(sampling="softmax", generator=torch.Generator().manual_seed(9)))):
        out |= topk_fields(hnsample.topk_from_scores(st, 5, **kw), f"{tag}_")
    return out


@entry("topk_from_scores/sizes")
def _(ctx: Context):
    d = ctx.data
    st = tensor(d.scores((4, 6), specials=0.2))
    out = {}
    out |= topk_fields(hnsample.topk_from_scores(st, 10, exclude=torch.tensor([[0], [1], [-1], [5]])), "k_gt_n_")
    out |= topk_fields(hnsample.topk_from_scores(st[:, :0], 3, positives=torch.full((4, 1), -1),
                                                 absolute_margin=0.0), "n0_")
    out |= topk_fields(hnsample.topk_from_scores(st[:0], 3), "b0_")
    out |= topk_fields(hnsample.topk_from_scores(st, 0), "k0_")
    # a constant row longer than a SIMD chunk: the k lowest eligible ids
    flat = torch.zeros(3, 300)
    out |= topk_fields(hnsample.topk_from_scores(flat, 70, exclude=torch.tensor([[0], [5], [299]])), "flat_")
    big = tensor(d.scores((3, 500), specials=0.02))
    out |= topk_fields(hnsample.topk_from_scores(big, 40, skip_top=7, pool=100), "big_")
    return out


@entry("topk_from_scores/layouts")
def _(ctx: Context):
    d = ctx.data
    b, n = 5, 18
    base = d.scores((2 * n, 3 * b), specials=0.1)
    t = tensor(base)
    views = {
        "transposed": t.T[:b],  # column-major rows
        "step": t[::2, ::3].T,  # strides (3, 2n): both non-unit
        "f16_step": t.to(torch.float16)[1::2, ::3].T,
    }
    out = {}
    for tag, v in views.items():
        assert not v.is_contiguous()
        out |= topk_fields(hnsample.topk_from_scores(v, 6, exclude=torch.tensor([[1]] * b)), f"{tag}_")
    # numpy in, numpy out, including a negative stride torch cannot view
    arr = base[:b, :n]
    res = hnsample.topk_from_scores(arr, 6)
    assert isinstance(res.indices, np.ndarray)
    out |= topk_fields(res, "numpy_")
    res = hnsample.topk_from_scores(arr[:, ::-1], 6, positives=np.array([[0], [1], [2], [3], [4]]),
                                    absolute_margin=0.0)
    assert isinstance(res.indices, np.ndarray)
    out |= topk_fields(res, "numpy_reversed_")
    return out


# ----------------------------------------------------------------------------------------------------
# Gradients of the returned scores (padding must contribute nothing; weights are small integers)


def _grad_weights(data: Data, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    return tensor(data.integers(-2, 3, shape).astype(np.float64), dtype)


def _grad_entries() -> None:
    for dt_name, dtype in (("f32", torch.float32), ("f64", torch.float64), ("bf16", torch.bfloat16)):
        for metric in METRICS:
            if dt_name == "bf16" and metric == "cosine":
                continue

            @entry(f"grad/topk_similarity_{metric}_{dt_name}")
            def _(ctx: Context, dtype=dtype, metric=metric):
                d = ctx.data
                b, n, k = 6, 14, 9
                q, c = sim_inputs(d, b, n, metric, dtype)
                q.requires_grad_(True)
                c.requires_grad_(True)
                pos = ids_tensor(d.ids(b, 2, n))
                res = hnsample.topk_similarity(q, c, k, metric=metric, positives=pos, exclude=ids_tensor(d.ids(b, 4, n)),
                                               absolute_margin=0.0)
                w = _grad_weights(d, (b, k), res.scores.dtype)
                gq, gc = torch.autograd.grad(res.scores, (q, c), grad_outputs=w)
                return topk_fields(res) | {"grad_queries": exact(gq), "grad_candidates": exact(gc)}


_grad_entries()


def _grad_from_scores_entries() -> None:
    for dt_name, dtype in (("f32", torch.float32), ("f64", torch.float64), ("f16", torch.float16)):

        @entry(f"grad/topk_from_scores_{dt_name}")
        def _(ctx: Context, dtype=dtype):
            d = ctx.data
            b, n, k = 5, 12, 8
            s = tensor(d.scores((b, n), specials=0.15), dtype).requires_grad_(True)
            res = hnsample.topk_from_scores(s, k, exclude=ids_tensor(d.ids(b, 3, n)), min_score=-2.0)
            w = _grad_weights(d, (b, k), res.scores.dtype)
            (g,) = torch.autograd.grad(res.scores, (s,), grad_outputs=w)
            st = tensor(d.scores((2 * n, b))).requires_grad_(True)
            res2 = hnsample.topk_from_scores(st.T[:, ::2], 4, sampling="uniform", seed=3)
            (g2,) = torch.autograd.grad(res2.scores, (st,), grad_outputs=_grad_weights(d, (b, 4), torch.float32))
            return (topk_fields(res) | {"grad_scores": exact(g)} | topk_fields(res2, "strided_")
                    | {"strided_grad_scores": exact(g2)})


_grad_from_scores_entries()
