"""Every bad input raises ValueError or TypeError naming the argument, and no input, however odd, takes
the process down."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import hnsample

B, N, D = 3, 5, 4
Q, C = torch.randn(B, D), torch.randn(N, D)
S = torch.randn(B, N)
META = torch.device("meta")


def sim(**kw):
    args = dict(queries=Q, candidates=C, k=2)
    args.update(kw)
    q, c, k = args.pop("queries"), args.pop("candidates"), args.pop("k")
    return hnsample.topk_similarity(q, c, k, **args)


def from_scores(**kw):
    args = dict(scores=S, k=2)
    args.update(kw)
    s, k = args.pop("scores"), args.pop("k")
    return hnsample.topk_from_scores(s, k, **args)


IDS = torch.tensor([[0], [1], [2]])

# (id, keyword arguments, exception, regex the message must match). Each runs through both public
# functions unless it names an argument only one of them has.
COMMON_CASES = [
    ("k_negative", dict(k=-1), ValueError, r"\bk\b.*>= 0"),
    ("k_float", dict(k=2.0), TypeError, r"\bk\b.*int"),
    ("k_bool", dict(k=True), TypeError, r"\bk\b.*int"),
    ("k_tensor", dict(k=torch.tensor(2)), TypeError, r"\bk\b.*int"),
    ("skip_top_negative", dict(skip_top=-1), ValueError, r"skip_top.*>= 0"),
    ("skip_top_float", dict(skip_top=1.5), TypeError, r"skip_top.*int"),
    ("pool_zero", dict(pool=0), ValueError, r"pool.*>= 1"),
    ("pool_negative", dict(pool=-3), ValueError, r"pool.*>= 1"),
    ("pool_float", dict(pool=2.0), TypeError, r"pool.*int"),
    ("sampling_unknown", dict(sampling="random"), ValueError, r"sampling.*'random'"),
    ("sampling_not_str", dict(sampling=1), ValueError, r"sampling"),
    ("temperature_zero", dict(sampling="softmax", temperature=0.0), ValueError, r"temperature.*> 0"),
    ("temperature_negative", dict(sampling="softmax", temperature=-1.0), ValueError, r"temperature"),
    ("temperature_nan", dict(sampling="softmax", temperature=math.nan), ValueError, r"temperature"),
    ("temperature_inf", dict(sampling="softmax", temperature=math.inf), ValueError, r"temperature"),
    ("temperature_subnormal", dict(sampling="softmax", temperature=5e-324), ValueError, r"temperature"),
    ("temperature_str", dict(temperature="1"), TypeError, r"temperature.*float"),
    ("absolute_margin_inf", dict(absolute_margin=math.inf), ValueError, r"absolute_margin.*finite"),
    ("absolute_margin_nan", dict(absolute_margin=math.nan), ValueError, r"absolute_margin.*finite"),
    ("relative_margin_inf", dict(relative_margin=-math.inf), ValueError, r"relative_margin.*finite"),
    ("relative_margin_nan", dict(relative_margin=math.nan), ValueError, r"relative_margin.*finite"),
    ("relative_margin_str", dict(relative_margin="0.1"), TypeError, r"relative_margin"),
    ("min_score_nan", dict(min_score=math.nan), ValueError, r"min_score.*finite"),
    ("max_score_inf", dict(max_score=math.inf), ValueError, r"max_score.*finite"),
    ("max_score_tensor", dict(max_score=torch.tensor(1.0)), TypeError, r"max_score"),
    (
        "positives_too_large",
        dict(positives=torch.tensor([[0], [N], [1]])),
        ValueError,
        r"positives.*\[0, 5\)",
    ),
    ("positives_below_pad", dict(positives=torch.tensor([[0], [-2], [1]])), ValueError, r"positives.*-1"),
    (
        "exclude_too_large",
        dict(exclude=torch.tensor([[0, 9], [1, 1], [2, 2]])),
        ValueError,
        r"exclude.*\[0, 5\)",
    ),
    ("exclude_below_pad", dict(exclude=torch.full((B, 1), -7)), ValueError, r"exclude"),
    ("positives_float", dict(positives=IDS.float()), TypeError, r"positives.*integer"),
    ("positives_half", dict(positives=IDS.half()), TypeError, r"positives.*integer"),
    ("exclude_bool", dict(exclude=IDS.bool()), TypeError, r"exclude.*integer"),
    ("exclude_complex", dict(exclude=IDS.to(torch.complex64)), TypeError, r"exclude.*integer"),
    ("positives_list", dict(positives=[[0], [1], [2]]), TypeError, r"positives.*Tensor"),
    ("positives_rows", dict(positives=torch.tensor([[0], [1]])), ValueError, r"positives.*shape \(3, P\)"),
    ("positives_3d", dict(positives=IDS.unsqueeze(0)), ValueError, r"positives.*shape"),
    ("positives_device", dict(positives=IDS.to(META)), ValueError, r"positives.*on cpu"),
    ("exclude_numpy_float", dict(exclude=np.zeros((B, 1))), TypeError, r"exclude.*integer"),
    (
        "labels_alone",
        dict(query_labels=torch.zeros(B, dtype=torch.int64)),
        ValueError,
        r"query_labels and candidate_labels",
    ),
    (
        "candidate_labels_alone",
        dict(candidate_labels=torch.zeros(N, dtype=torch.int64)),
        ValueError,
        r"query_labels and candidate_labels",
    ),
    (
        "query_labels_shape",
        dict(
            query_labels=torch.zeros(B + 1, dtype=torch.int64),
            candidate_labels=torch.zeros(N, dtype=torch.int64),
        ),
        ValueError,
        r"query_labels.*shape \(3,\)",
    ),
    (
        "candidate_labels_shape",
        dict(
            query_labels=torch.zeros(B, dtype=torch.int64),
            candidate_labels=torch.zeros(N - 1, dtype=torch.int64),
        ),
        ValueError,
        r"candidate_labels.*shape \(5,\)",
    ),
    (
        "candidate_labels_2d",
        dict(
            query_labels=torch.zeros(B, dtype=torch.int64),
            candidate_labels=torch.zeros(1, N, dtype=torch.int64),
        ),
        ValueError,
        r"candidate_labels.*shape",
    ),
    (
        "query_labels_float",
        dict(query_labels=torch.zeros(B), candidate_labels=torch.zeros(N, dtype=torch.int64)),
        TypeError,
        r"query_labels.*integer",
    ),
    (
        "candidate_labels_list",
        dict(query_labels=torch.zeros(B, dtype=torch.int64), candidate_labels=[0] * N),
        TypeError,
        r"candidate_labels.*Tensor",
    ),
    (
        "labels_device",
        dict(
            query_labels=torch.zeros(B, dtype=torch.int64).to(META),
            candidate_labels=torch.zeros(N, dtype=torch.int64),
        ),
        ValueError,
        r"query_labels.*on cpu",
    ),
    (
        "positive_scores_shape",
        dict(positive_scores=torch.zeros(B + 1), absolute_margin=0.1),
        ValueError,
        r"positive_scores.*shape \(3,\)",
    ),
    (
        "positive_scores_int",
        dict(positive_scores=torch.zeros(B, dtype=torch.int64), absolute_margin=0.1),
        TypeError,
        r"positive_scores.*float",
    ),
    (
        "positive_scores_list",
        dict(positive_scores=[0.0] * B, absolute_margin=0.1),
        TypeError,
        r"positive_scores.*Tensor",
    ),
    (
        "positive_scores_device",
        dict(positive_scores=torch.zeros(B).to(META), absolute_margin=0.1),
        ValueError,
        r"positive_scores.*on cpu",
    ),
    ("generator_type", dict(sampling="uniform", generator=np.random.default_rng(0)), TypeError, r"generator"),
    ("seed_float", dict(sampling="uniform", seed=1.5), TypeError, r"seed.*int"),
]

SIMILARITY_CASES = [
    ("queries_1d", dict(queries=torch.randn(D)), ValueError, r"queries must be 2-D"),
    ("queries_3d", dict(queries=torch.randn(1, B, D)), ValueError, r"queries must be 2-D"),
    ("candidates_1d", dict(candidates=torch.randn(N)), ValueError, r"candidates must be 2-D"),
    ("mismatched_d", dict(candidates=torch.randn(N, D + 1)), ValueError, r"same dimension d.*4 and 5"),
    ("dtype_mismatch", dict(candidates=C.double()), TypeError, r"same dtype"),
    ("dtype_mismatch_half", dict(queries=Q.half()), TypeError, r"same dtype"),
    ("device_mismatch", dict(candidates=C.to(META)), ValueError, r"same device"),
    (
        "integer_queries",
        dict(queries=torch.ones(B, D, dtype=torch.int64), candidates=torch.ones(N, D, dtype=torch.int64)),
        TypeError,
        r"queries must be float",
    ),
    (
        "bool_candidates",
        dict(queries=torch.ones(B, D, dtype=torch.bool), candidates=torch.ones(N, D, dtype=torch.bool)),
        TypeError,
        r"queries must be float",
    ),
    ("queries_list", dict(queries=Q.tolist()), TypeError, r"queries must be a torch.Tensor"),
    ("candidates_scalar", dict(candidates=1.0), TypeError, r"candidates must be a torch.Tensor"),
    ("queries_none", dict(queries=None), TypeError, r"queries"),
    ("metric_unknown", dict(metric="l2"), ValueError, r"metric.*'l2'"),
    ("metric_none", dict(metric=None), ValueError, r"metric"),
    ("block_size_zero", dict(block_size=0), ValueError, r"block_size.*>= 1"),
    ("block_size_float", dict(block_size=1e6), TypeError, r"block_size.*int"),
]

FROM_SCORES_CASES = [
    ("scores_1d", dict(scores=torch.randn(N)), ValueError, r"scores must be 2-D"),
    ("scores_3d", dict(scores=torch.randn(1, B, N)), ValueError, r"scores must be 2-D"),
    ("scores_int", dict(scores=torch.ones(B, N, dtype=torch.int32)), TypeError, r"scores must be float"),
    ("scores_list", dict(scores=S.tolist()), TypeError, r"scores must be a torch.Tensor"),
    ("scores_numpy_int", dict(scores=np.ones((B, N), dtype=np.int64)), TypeError, r"scores must be float"),
]


def _ids(cases):
    return [c[0] for c in cases]


@pytest.mark.parametrize("name,kw,exc,match", COMMON_CASES, ids=_ids(COMMON_CASES))
@pytest.mark.parametrize("op", [sim, from_scores], ids=["similarity", "from_scores"])
def test_bad_filter_arguments(op, name, kw, exc, match):
    with pytest.raises(exc, match=match):
        op(**kw)


@pytest.mark.parametrize("name,kw,exc,match", SIMILARITY_CASES, ids=_ids(SIMILARITY_CASES))
def test_bad_similarity_inputs(name, kw, exc, match):
    with pytest.raises(exc, match=match):
        sim(**kw)


@pytest.mark.parametrize("name,kw,exc,match", FROM_SCORES_CASES, ids=_ids(FROM_SCORES_CASES))
def test_bad_score_inputs(name, kw, exc, match):
    with pytest.raises(exc, match=match):
        from_scores(**kw)


def test_valid_edge_arguments_are_accepted():
    """The boundaries of the checked ranges are valid input."""
    assert sim(k=0).indices.shape == (B, 0)
    assert sim(skip_top=0, pool=1).indices.shape == (B, 2)
    assert sim(positives=torch.tensor([[N - 1], [-1], [0]])).indices.shape == (B, 2)
    assert sim(k=np.int64(3), skip_top=np.int32(1)).indices.shape == (B, 3)
    assert from_scores(sampling="softmax", temperature=1e-300, seed=0).indices.shape == (B, 2)
    assert from_scores(absolute_margin=np.float64(0.5), relative_margin=1, min_score=-1).indices.shape == (
        B,
        2,
    )
    assert from_scores(sampling="uniform", seed=-5).indices.shape == (B, 2)  # any int seeds
    assert from_scores(sampling="uniform", seed=2**100).indices.shape == (B, 2)


# A script run in a child process so that a crash shows up as a failed test, not a dead test run.
ADVERSARIAL = textwrap.dedent(
    """
    import math, sys
    import numpy as np
    import torch
    import hnsample
    from hnsample import _C
    from hnsample.engine import SelectionState, build_selection

    nan, inf = math.nan, math.inf
    rng = np.random.default_rng(0)
    q = torch.from_numpy(rng.standard_normal((7, 5))).float()
    c = torch.from_numpy(rng.standard_normal((300, 5))).float()
    bad = q.clone(); bad[::2] = nan; bad[1, 0] = inf; bad[3, 1] = -inf
    calls = [
        lambda: hnsample.topk_similarity(bad, c, 9, metric="cosine", positives=torch.full((7, 3), -1),
                                         absolute_margin=0.0, relative_margin=0.0),
        lambda: hnsample.topk_similarity(q, bad.repeat(40, 1), 5, positives=torch.arange(7) % 280,
                                         relative_margin=0.5, sampling="softmax", seed=1),
        lambda: hnsample.topk_similarity(q[:, :1].expand(7, 5), c[:1].expand(300, 5), 400, skip_top=2,
                                         sampling="uniform", seed=2, block_size=1),
        lambda: hnsample.topk_from_scores(torch.full((4, 1000), nan), 50, sampling="softmax", seed=3),
        lambda: hnsample.topk_from_scores(torch.full((4, 1000), inf), 50, pool=7, sampling="softmax", seed=3),
        lambda: hnsample.topk_from_scores(torch.full((4, 1000), -inf).half(), 50, skip_top=999, seed=3,
                                          sampling="uniform"),
        lambda: hnsample.topk_from_scores(torch.randn(3, 70), 10**6, exclude=torch.full((3, 500), 69),
                                          positives=torch.full((3, 2), 0), relative_margin=1e300,
                                          positive_scores=torch.tensor([inf, -inf, nan])),
        lambda: hnsample.topk_from_scores(torch.randn(2, 9), 3, sampling="softmax", temperature=1e-300,
                                          min_score=-1e300, max_score=1e300, seed=2**64 - 5),
        lambda: hnsample.topk_from_scores(torch.randn(2, 9).bfloat16()[:, ::2], 3,
                                          query_labels=torch.tensor([2**62, -2**62]),
                                          candidate_labels=torch.full((5,), 2**62)),
        lambda: hnsample.topk_from_scores(torch.randn(0, 10**7).as_strided((0, 10**7), (0, 0)), 5),
        lambda: hnsample.topk_from_scores(torch.randn(1, 1).expand(10**4, 10**3), 2, pool=3,
                                          sampling="softmax", seed=5),
    ]
    for i, call in enumerate(calls):
        out = call()
        assert out.indices.shape[1] == out.scores.shape[1], i
        valid = out.indices >= 0
        assert bool(torch.isnan(out.scores[valid]).any()) is False, i
    # misuse of the compiled module itself throws a Python exception (ValueError: the launcher's
    # parameter checks) instead of aborting
    sel = build_selection(4, 10, torch.device("cpu"), 3, positives=None, exclude=None, query_labels=None,
                          candidate_labels=None, positive_scores=None, absolute_margin=None,
                          relative_margin=None, min_score=None, max_score=None, skip_top=0, pool=None,
                          sampling="top", temperature=1.0, generator=None, seed=None, positive_values=None)
    state = SelectionState(sel, 4, torch.device("cpu"))
    block = torch.zeros(4, 10)
    raised = 0
    for thunk in (
        lambda: state.offer(block, 1, 0),  # rows past the state
        lambda: _C.topk_select_block(state.params, block.data_ptr(), 99, 4, 10, 10, 1, 0, 0, False, 0, 1),
        lambda: state.merge(SelectionState(build_selection(
            3, 10, torch.device("cpu"), 3, positives=None, exclude=None, query_labels=None,
            candidate_labels=None, positive_scores=None, absolute_margin=None, relative_margin=None,
            min_score=None, max_score=None, skip_top=0, pool=None, sampling="top", temperature=1.0,
            generator=None, seed=None, positive_values=None), 3, torch.device("cpu"))),
    ):
        try:
            thunk()
        except ValueError:
            raised += 1
    assert raised == 3, raised
    if not _C.built_with_cuda or not torch.cuda.is_available():
        try:  # no CUDA build (RuntimeError) or the launcher's check of the null outputs (ValueError)
            _C.topk_finalize(state.params, 0, 0, True, 0, 1)
        except (RuntimeError, ValueError):
            raised += 1
        assert raised == 4
    print("survived", len(calls))
    """
)


def test_adversarial_inputs_do_not_crash_the_process(tmp_path):
    # run outside the checkout so the child imports the installed package, as the tests do
    proc = subprocess.run(
        [sys.executable, "-c", ADVERSARIAL], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "survived 11" in proc.stdout
