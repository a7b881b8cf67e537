"""Literal tables for topk_from_scores / topk_similarity: hand-checked cases with the expected ids (and
scores where they say something) written out, so a failure reads as data.

Every expectation was worked out by hand from the documented semantics (see the comments), not by
running the code. Conventions: ``NEG`` is the -inf padding score, -1 the padding id; scores are float64
unless a row says otherwise, so decimal bounds are reasoned about in float64.

Row A, used by several tables, and its ranking (score descending, ties to the lower id):

    id     0    1     2    3    4    5     6    7
    A     0.5  2.0  -1.0  2.0  0.0  1.5  -0.5  1.0      ranking: 1, 3, 5, 7, 0, 4, 6, 2
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hnsample

NEG = -math.inf
INF = math.inf
NAN = math.nan
A = [0.5, 2.0, -1.0, 2.0, 0.0, 1.5, -0.5, 1.0]
ID_ARGS = ("positives", "exclude", "query_labels", "candidate_labels")


def case(case_id: str, scores, k: int, kwargs: dict, indices: list, expected_scores: list | None = None, *,
         dtype: torch.dtype = torch.float64):
    return pytest.param(scores, k, kwargs, indices, expected_scores, dtype, id=case_id)


def _arguments(kwargs: dict) -> dict:
    """Lists become tensors: ids and labels int64, positive_scores float64 (a tensor is passed as is)."""
    out = {}
    for key, v in kwargs.items():
        if isinstance(v, list) and key in ID_ARGS:
            v = torch.tensor(v, dtype=torch.int64)
        elif isinstance(v, list) and key == "positive_scores":
            v = torch.tensor(v, dtype=torch.float64)
        out[key] = v
    return out


def check(out: hnsample.TopK, indices: list, expected_scores: list | None) -> None:
    assert out.indices.dtype == torch.int64
    assert out.indices.tolist() == indices
    if expected_scores is not None:
        assert out.scores.tolist() == expected_scores


def run_from_scores(scores, k, kwargs, indices, expected_scores, dtype):
    s = scores if isinstance(scores, torch.Tensor) else torch.tensor(scores, dtype=dtype)
    check(hnsample.topk_from_scores(s, k, **_arguments(kwargs)), indices, expected_scores)


PARAMS = "scores, k, kwargs, indices, expected_scores, dtype"

# ----------------------------------------------------------------------------------------------------
# Ties: equal scores rank by lower id, also where skip_top, pool or k cut through the tie

TIES = [
    case("equal_row_lower_ids_first", [[1.0, 1.0, 1.0, 1.0]], 4, {}, [[0, 1, 2, 3]], [[1, 1, 1, 1]]),
    case("tie_at_the_top_of_A", [A], 3, {}, [[1, 3, 5]], [[2, 2, 1.5]]),
    case("k_cuts_a_tie", [[0.0, 5.0, 5.0, 5.0]], 2, {}, [[1, 2]], [[5, 5]]),
    case("alternating_values", [[1.0, 2.0, 1.0, 2.0, 1.0]], 5, {}, [[1, 3, 0, 2, 4]], [[2, 2, 1, 1, 1]]),
    # ids 1 and 3 tie at 2.0; skip_top=1 drops the lower id, 1
    case("skip_top_cuts_a_tie", [A], 2, {"skip_top": 1}, [[3, 5]], [[2, 1.5]]),
    # ranking 0, 1, 2, 3, 4 (1, 2, 3 tie at 1.0); skip 1, the window of 2 is ids 1, 2
    case("pool_cuts_a_tie", [[3.0, 1.0, 1.0, 1.0, 0.0]], 5, {"skip_top": 1, "pool": 2},
         [[1, 2, -1, -1, -1]], [[1, 1, NEG, NEG, NEG]]),
    case("window_inside_a_tie", [[1.0] * 6], 3, {"skip_top": 2, "pool": 2}, [[2, 3, -1]], [[1, 1, NEG]]),
    case("signed_zeros_tie", [[-0.0, 0.0, -0.0]], 3, {}, [[0, 1, 2]]),
    case("tie_with_exclude", [[2.0] * 5], 3, {"exclude": [[0, 2]]}, [[1, 3, 4]]),
    case("infinities_tie", [[INF, 1.0, INF]], 2, {}, [[0, 2]], [[INF, INF]]),
    # -inf is a score (>= the default min_score of -inf), not padding: ids 0 and 2 are returned
    case("minus_inf_is_a_score", [[NEG, 0.0, NEG]], 4, {}, [[1, 0, 2, -1]], [[0, NEG, NEG, NEG]]),
    case("ties_per_row", [[1.0, 1.0], [2.0, 3.0]], 1, {}, [[0], [1]], [[1], [3]]),
    # sampling k >= |window| returns the whole window, sorted: window = ids 1, 2 of a tie
    case("uniform_sampling_of_a_tied_window", [[1.0, 1.0, 1.0, 1.0, 0.0]], 3,
         {"skip_top": 1, "pool": 2, "sampling": "uniform", "seed": 5}, [[1, 2, -1]], [[1, 1, NEG]]),
]


@pytest.mark.parametrize(PARAMS, TIES)
def test_ties(scores, k, kwargs, indices, expected_scores, dtype):
    run_from_scores(scores, k, kwargs, indices, expected_scores, dtype)


# ----------------------------------------------------------------------------------------------------
# Margins and positive scores. Row M: id 0 is the positive (p = -0.5 unless overridden); the others,
# by rank: 5 (0.0), 1 (-0.5), 4 (-0.54), 2 (-0.55), 3 (-0.56), 6 (-2.0). Eligible: s <= bound, where
# bound = min(p - absolute_margin, p - |p| * relative_margin), computed in float64.

M = [[-0.5, -0.5, -0.55, -0.56, -0.54, 0.0, -2.0]]
P0 = {"positives": [[0]]}

MARGINS = [
    # -0.5 - 0.5 * 0.1 = -0.55000000000000000277 before rounding; the nearest double is the double
    # -0.55 itself, so id 2 (s = -0.55) sits exactly on the closed bound and is kept
    case("relative_negative_p", M, 4, P0 | {"relative_margin": 0.1}, [[2, 3, 6, -1]], [[-0.55, -0.56, -2.0, NEG]]),
    case("relative_one", M, 3, P0 | {"relative_margin": 1.0}, [[6, -1, -1]]),  # bound -1.0
    case("relative_negative_margin", M, 4, P0 | {"relative_margin": -0.1}, [[1, 4, 2, 3]]),  # bound -0.45
    case("relative_zero_is_closed", M, 6, P0 | {"relative_margin": 0.0}, [[1, 4, 2, 3, 6, -1]]),  # bound -0.5
    case("absolute", M, 4, P0 | {"absolute_margin": 0.05}, [[2, 3, 6, -1]]),  # bound -0.55, as above
    case("absolute_zero_is_closed", M, 2, P0 | {"absolute_margin": 0.0}, [[1, 4]], [[-0.5, -0.54]]),
    case("absolute_negative", M, 6, P0 | {"absolute_margin": -0.5}, [[5, 1, 4, 2, 3, 6]]),  # bound 0.0
    # bounds -0.51 (absolute) and -0.55 (relative): the lower one applies
    case("both_relative_lower", M, 4, P0 | {"absolute_margin": 0.01, "relative_margin": 0.1}, [[2, 3, 6, -1]]),
    case("both_absolute_lower", M, 2, P0 | {"absolute_margin": 0.3, "relative_margin": 0.1}, [[6, -1]]),  # -0.8
    # p = min(s_5, s_4) = min(0.0, -0.54) = -0.54: ids 0 and 1 (-0.5) are now above the bound
    case("p_is_min_over_positives", M, 4, {"positives": [[5, 4]], "absolute_margin": 0.0}, [[2, 3, 6, -1]]),
    case("padding_in_positives", M, 2, {"positives": [[-1, 0, -1]], "absolute_margin": 0.0}, [[1, 4]]),
    # no valid positive: no margin filter at all, and id 0 is an ordinary candidate
    case("no_valid_positive_no_margin", M, 4, {"positives": [[-1, -1]], "absolute_margin": 1.0}, [[5, 0, 1, 4]]),
    # positive_scores overrides p (positives still excluded): bound 0.5 - 0.05 = 0.45
    case("positive_scores_override", M, 4, P0 | {"positive_scores": [0.5], "relative_margin": 0.1},
         [[5, 1, 4, 2]]),
    # without positives, id 0 is a candidate: bound 0.0 - 0.5 = -0.5 keeps ids 0 and 1 (-0.5)
    case("positive_scores_without_positives", M, 4, {"positive_scores": [0.0], "absolute_margin": 0.5},
         [[0, 1, 4, 2]]),
    # float32(-0.55) = -0.550000011920928955...: the bound is below the double -0.55, so id 2 is out
    case("positive_scores_float32_rounding", M, 3,
         P0 | {"positive_scores": torch.tensor([-0.55], dtype=torch.float32), "absolute_margin": 0.0},
         [[3, 6, -1]]),
    # row 0: p = 3, bound 3 - 1.5 = 1.5; row 1: p = 0, bound 0 - 0 = 0 (a relative margin is void at p = 0)
    case("per_row_p", [[0.0, 1.0, 2.0, 3.0], [0.0, -1.0, -2.0, -3.0]], 3,
         {"positives": [[3], [0]], "relative_margin": 0.5}, [[1, 0, -1], [1, 2, 3]]),
]


@pytest.mark.parametrize(PARAMS, MARGINS)
def test_margins_and_positive_scores(scores, k, kwargs, indices, expected_scores, dtype):
    run_from_scores(scores, k, kwargs, indices, expected_scores, dtype)


# ----------------------------------------------------------------------------------------------------
# NaN and infinite scores. Row N: ranking of the non-NaN ids 5 (2.0), 0 (1.0), 2 (0.5), 3 (-1.0).

N = [[1.0, NAN, 0.5, -1.0, NAN, 2.0]]
S_INF = [[INF, NEG, 1.0, NAN]]

NANS = [
    case("nan_never_selected", N, 6, {}, [[5, 0, 2, 3, -1, -1]], [[2, 1, 0.5, -1, NEG, NEG]]),
    case("nan_positive_absolute", N, 3, {"positives": [[1]], "absolute_margin": 0.0}, [[-1, -1, -1]]),
    case("nan_positive_relative", N, 3, {"positives": [[1]], "relative_margin": 0.1}, [[-1, -1, -1]]),
    case("nan_positive_without_margin", N, 4, {"positives": [[1]]}, [[5, 0, 2, 3]]),
    # p = min(1.0, NaN) is NaN by definition, not 1.0
    case("nan_among_valid_positives", N, 3, {"positives": [[0, 4]], "absolute_margin": 0.0}, [[-1, -1, -1]]),
    case("nan_row_padding_only", N, 3, {"positives": [[0, -1]], "absolute_margin": 0.0}, [[2, 3, -1]]),  # p = 1
    case("nan_positive_scores", N, 3, {"positive_scores": [NAN], "absolute_margin": 0.0}, [[-1, -1, -1]]),
    case("nan_positive_scores_without_margin", N, 3, {"positive_scores": [NAN]}, [[5, 0, 2]]),
    # positive_scores replaces the NaN p: bound 1.0, and id 0 (1.0) is on it
    case("override_replaces_nan_p", N, 3, {"positives": [[1]], "positive_scores": [1.0], "absolute_margin": 0.0},
         [[0, 2, 3]]),
    case("all_nan_row", [[NAN, NAN]], 2, {}, [[-1, -1]], [[NEG, NEG]]),
    case("nan_with_bounds", N, 3, {"min_score": 0.5, "max_score": 1.0}, [[0, 2, -1]]),
    case("infinities", S_INF, 4, {}, [[0, 2, 1, -1]], [[INF, 1, NEG, NEG]]),
    case("max_score_drops_inf", S_INF, 4, {"max_score": 1.0}, [[2, 1, -1, -1]]),
    case("min_score_drops_minus_inf", S_INF, 4, {"min_score": -1e300}, [[0, 2, -1, -1]]),
    # p = +inf: the absolute bound inf - 1 = inf keeps every non-NaN candidate
    case("inf_positive_absolute", S_INF, 4, {"positives": [[0]], "absolute_margin": 1.0}, [[2, 1, -1, -1]]),
    # p = +inf: the relative bound inf - inf * 0.1 is NaN, so nothing passes
    case("inf_positive_relative", S_INF, 2, {"positives": [[0]], "relative_margin": 0.1}, [[-1, -1]]),
]


@pytest.mark.parametrize(PARAMS, NANS)
def test_nan_and_infinite_scores(scores, k, kwargs, indices, expected_scores, dtype):
    run_from_scores(scores, k, kwargs, indices, expected_scores, dtype)


# ----------------------------------------------------------------------------------------------------
# Labels: a candidate sharing the query's label is masked. Both rows score 3, 2, 1, 0.

L = [[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]]
CL = [0, 1, 0, 1]

LABELS = [
    case("two_labels", L, 4, {"query_labels": [0, 1], "candidate_labels": CL}, [[1, 3, -1, -1], [0, 2, -1, -1]]),
    case("label_absent", L, 4, {"query_labels": [5, 5], "candidate_labels": CL}, [[0, 1, 2, 3], [0, 1, 2, 3]]),
    case("every_candidate_shares", L, 2, {"query_labels": [7, 7], "candidate_labels": [7, 7, 7, 7]},
         [[-1, -1], [-1, -1]]),
    # -1 is an ordinary label here (labels have no padding value)
    case("minus_one_is_a_label", L, 4, {"query_labels": [-1, 0], "candidate_labels": [-1, 0, -1, 0]},
         [[1, 3, -1, -1], [0, 2, -1, -1]]),
    case("labels_and_exclude", L, 2, {"query_labels": [0, 1], "candidate_labels": CL, "exclude": [[1], [0]]},
         [[3, -1], [2, -1]]),
    case("labels_then_skip_top", L, 2, {"query_labels": [0, 1], "candidate_labels": CL, "skip_top": 1},
         [[3, -1], [2, -1]]),
    case("int32_labels", L, 4, {"query_labels": torch.tensor([0, 1], dtype=torch.int32),
                                "candidate_labels": torch.tensor(CL, dtype=torch.int32)},
         [[1, 3, -1, -1], [0, 2, -1, -1]]),
    case("labels_beyond_int32", L, 4, {"query_labels": [2**40, 0], "candidate_labels": [2**40, 1, 2**40, 1]},
         [[1, 3, -1, -1], [0, 1, 2, 3]]),
    # row 0: p = s_01 = 2, bound 1.5, labels mask ids 0 and 2 -> only id 3 (0.0);
    # row 1: p = s_10 = 3, bound 2.5, labels mask ids 1 and 3 -> only id 2 (1.0)
    case("labels_and_margin", L, 2, {"query_labels": [0, 1], "candidate_labels": CL, "positives": [[1], [0]],
                                     "absolute_margin": 0.5}, [[3, -1], [2, -1]]),
]


@pytest.mark.parametrize(PARAMS, LABELS)
def test_labels(scores, k, kwargs, indices, expected_scores, dtype):
    run_from_scores(scores, k, kwargs, indices, expected_scores, dtype)


# ----------------------------------------------------------------------------------------------------
# exclude / positives as id lists (-1 = padding, duplicates allowed). Row A ranking 1, 3, 5, 7, 0, ...

IDS = [
    case("exclude_one", [A], 3, {"exclude": [[1]]}, [[3, 5, 7]]),
    case("exclude_with_padding", [A], 3, {"exclude": [[-1, 3, -1]]}, [[1, 5, 7]]),
    case("exclude_duplicates", [A], 3, {"exclude": [[3, 3, 1, 1]]}, [[5, 7, 0]]),
    case("exclude_everything", [A], 2, {"exclude": [list(range(8))]}, [[-1, -1]], [[NEG, NEG]]),
    case("positives_are_excluded", [A], 3, {"positives": [[1, 3]]}, [[5, 7, 0]]),
    case("positives_and_exclude_overlap", [A], 3, {"positives": [[1]], "exclude": [[1, 5]]}, [[3, 7, 0]]),
    case("positives_padding_and_duplicates", [A], 3, {"positives": [[-1, 5, 5]]}, [[1, 3, 7]]),
    case("one_id_per_row_as_a_vector", [A], 3, {"positives": [5]}, [[1, 3, 7]]),
    case("exclude_below_the_top_k", [A], 3, {"exclude": [[2]]}, [[1, 3, 5]]),
    case("all_padding", [A], 3, {"exclude": [[-1, -1]]}, [[1, 3, 5]]),
    case("per_row_ids", [A, A], 2, {"exclude": [[1], [3]]}, [[3, 5], [1, 5]]),
    case("int32_ids", [A], 3, {"exclude": torch.tensor([[1, 3]], dtype=torch.int32)}, [[5, 7, 0]]),
    case("zero_width_ids", [A], 3, {"exclude": torch.zeros((1, 0), dtype=torch.int64)}, [[1, 3, 5]]),
]


@pytest.mark.parametrize(PARAMS, IDS)
def test_exclude_and_positives(scores, k, kwargs, indices, expected_scores, dtype):
    run_from_scores(scores, k, kwargs, indices, expected_scores, dtype)


# ----------------------------------------------------------------------------------------------------
# min_score / max_score: closed bounds, compared in float64. Row A.

F32_TENTHS = [[0.1, 0.2]]  # as float32: 0.100000001490116..., 0.200000002980232...

BOUNDS = [
    case("min_is_closed", [A], 5, {"min_score": 1.0}, [[1, 3, 5, 7, -1]], [[2, 2, 1.5, 1, NEG]]),
    case("max_is_closed", [A], 5, {"max_score": 1.0}, [[7, 0, 4, 6, 2]], [[1, 0.5, 0, -0.5, -1]]),
    case("interval", [A], 5, {"min_score": 0.0, "max_score": 1.5}, [[5, 7, 0, 4, -1]]),
    case("point_interval", [A], 3, {"min_score": 2.0, "max_score": 2.0}, [[1, 3, -1]]),
    case("empty_interval", [A], 2, {"min_score": 1.0, "max_score": 0.5}, [[-1, -1]]),
    case("min_between_values", [A], 4, {"min_score": 1.25}, [[1, 3, 5, -1]]),
    case("min_at_the_lowest_score", [A], 8, {"min_score": -1.0}, [[1, 3, 5, 7, 0, 4, 6, 2]]),
    case("max_at_the_lowest_score", [A], 2, {"max_score": -1.0}, [[2, -1]]),
    case("max_below_everything", [A], 2, {"max_score": -5.0}, [[-1, -1]]),
    # float32(0.1) > 0.1 (the double): it passes min_score=0.1 and fails max_score=0.1
    case("float32_above_decimal_min", F32_TENTHS, 2, {"min_score": 0.1}, [[1, 0]], dtype=torch.float32),
    case("float32_above_decimal_max", F32_TENTHS, 2, {"max_score": 0.1}, [[-1, -1]], dtype=torch.float32),
    case("float32_on_its_own_value", F32_TENTHS, 2, {"max_score": float(np.float32(0.1))}, [[0, -1]],
         dtype=torch.float32),
    case("bounds_then_skip_top", [A], 3, {"min_score": 0.0, "skip_top": 2}, [[5, 7, 0]]),
]


@pytest.mark.parametrize(PARAMS, BOUNDS)
def test_score_bounds(scores, k, kwargs, indices, expected_scores, dtype):
    run_from_scores(scores, k, kwargs, indices, expected_scores, dtype)


# ----------------------------------------------------------------------------------------------------
# skip_top / pool windows over the ranking of A: 1, 3, 5, 7, 0, 4, 6, 2

WINDOWS = [
    case("no_window", [A], 3, {}, [[1, 3, 5]]),
    case("skip_2", [A], 3, {"skip_top": 2}, [[5, 7, 0]]),
    case("skip_1_pool_2", [A], 3, {"skip_top": 1, "pool": 2}, [[3, 5, -1]], [[2, 1.5, NEG]]),
    case("pool_1", [A], 3, {"pool": 1}, [[1, -1, -1]]),
    case("skip_6", [A], 3, {"skip_top": 6}, [[6, 2, -1]]),
    case("skip_n", [A], 2, {"skip_top": 8}, [[-1, -1]]),
    case("skip_past_n", [A], 2, {"skip_top": 20, "pool": 5}, [[-1, -1]]),
    case("pool_past_n", [A], 4, {"skip_top": 5, "pool": 10}, [[4, 6, 2, -1]]),
    case("pool_past_n_after_skip", [A], 3, {"skip_top": 7, "pool": 5}, [[2, -1, -1]]),
    case("pool_larger_than_k", [A], 2, {"pool": 100}, [[1, 3]]),
    # the window is taken over the eligible ranking 1, 3, 7, 0, 4, 6, 2 (5 excluded)
    case("window_after_exclude", [A], 3, {"exclude": [[5]], "skip_top": 2}, [[7, 0, 4]]),
    case("window_after_min_score", [A], 3, {"min_score": 0.0, "skip_top": 3}, [[7, 0, 4]]),
    # sampling k >= |window| takes the whole window (any seed), sorted by score
    case("uniform_whole_window", [A], 5, {"skip_top": 1, "pool": 3, "sampling": "uniform", "seed": 1},
         [[3, 5, 7, -1, -1]]),
    case("softmax_whole_window", [A], 2, {"skip_top": 4, "pool": 2, "sampling": "softmax", "seed": 2},
         [[0, 4]], [[0.5, 0.0]]),
]


@pytest.mark.parametrize(PARAMS, WINDOWS)
def test_windows(scores, k, kwargs, indices, expected_scores, dtype):
    run_from_scores(scores, k, kwargs, indices, expected_scores, dtype)


# ----------------------------------------------------------------------------------------------------
# k > N, and zero sizes: padding is id -1 with score -inf

SIZES = [
    case("k_greater_than_n", [[1.0, 2.0]], 4, {}, [[1, 0, -1, -1]], [[2, 1, NEG, NEG]]),
    case("k_greater_than_eligible", [[1.0, 2.0, 3.0]], 3, {"exclude": [[2]]}, [[1, 0, -1]], [[2, 1, NEG]]),
    case("k_greater_than_n_after_skip", [[1.0, 2.0, 3.0]], 5, {"skip_top": 1}, [[1, 0, -1, -1, -1]]),
    case("k_equals_n", [[3.0, 1.0, 2.0]], 3, {}, [[0, 2, 1]], [[3, 2, 1]]),
    case("no_candidates", torch.zeros((2, 0), dtype=torch.float64), 2, {}, [[-1, -1], [-1, -1]],
         [[NEG, NEG], [NEG, NEG]]),
    case("no_candidates_with_filters", torch.zeros((1, 0), dtype=torch.float64), 2,
         {"positives": [[-1]], "absolute_margin": 0.0, "skip_top": 1}, [[-1, -1]]),
    case("no_queries", torch.zeros((0, 3), dtype=torch.float64), 2, {}, []),
    case("k_zero", [[1.0, 2.0]], 0, {}, [[]], [[]]),
]


@pytest.mark.parametrize(PARAMS, SIZES)
def test_sizes_and_padding(scores, k, kwargs, indices, expected_scores, dtype):
    run_from_scores(scores, k, kwargs, indices, expected_scores, dtype)


def test_padding_shapes_for_empty_batches():
    out = hnsample.topk_from_scores(torch.zeros((0, 3)), 2)
    assert tuple(out.indices.shape) == (0, 2) and tuple(out.scores.shape) == (0, 2)
    out = hnsample.topk_from_scores(torch.zeros((2, 3)), 0)
    assert tuple(out.indices.shape) == (2, 0)


# ----------------------------------------------------------------------------------------------------
# topk_similarity on tiny integer matrices, scores computed by hand
#
#   queries   q0 = [1, 0, 2]   q1 = [0, 1, -1]
#   candidates c0 = [1, 1, 0]  c1 = [2, 0, 1]  c2 = [0, 0, 1]  c3 = [-1, 1, 1]  c4 = [1, 0, 2]
#
#   s_0j = 1+0+0, 2+0+2, 0+0+2, -1+0+2, 1+0+4 = [1, 4, 2, 1, 5]    ranking 4, 1, 2, 0, 3
#   s_1j = 0+1+0, 0+0-1, 0+0-1, 0+1-1, 0+0-2 = [1, -1, -1, 0, -2]  ranking 0, 3, 1, 2, 4

Q = [[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]
C = [[1.0, 1.0, 0.0], [2.0, 0.0, 1.0], [0.0, 0.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 0.0, 2.0]]

# cosine: every norm is a power of two, so the scores are exact
#   q0 = [1, 1, 1, 1] (|q0| = 2)   q1 = [2, 0, 0, 0] (2)   q2 = 0 (cosine 0 with everything)
#   c0 = [1, 1, 1, 1]  c1 = [1, -1, 1, -1]  c2 = [0, 0, 0, 4]  c3 = -c0  c4 = [1, 1, -1, 1]  (norms 2, 2, 4, 2, 2)
#   s_0j = 1, 0, 0.5, -1, 0.5     ranking 0, 2, 4, 1, 3
#   s_1j = 0.5, 0.5, 0, -0.5, 0.5  ranking 0, 1, 4, 2, 3
QC = [[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
CC = [[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0], [0.0, 0.0, 0.0, 4.0], [-1.0, -1.0, -1.0, -1.0],
      [1.0, 1.0, -1.0, 1.0]]


def sim_case(case_id: str, queries, candidates, k: int, kwargs: dict, indices: list, expected_scores=None, *,
             dtype: torch.dtype = torch.float32):
    return pytest.param(queries, candidates, k, kwargs, indices, expected_scores, dtype, id=case_id)


SIMILARITY = [
    sim_case("dot_k3", Q, C, 3, {}, [[4, 1, 2], [0, 3, 1]], [[5, 4, 2], [1, 0, -1]]),
    sim_case("dot_ties_lower_id", Q, C, 5, {}, [[4, 1, 2, 0, 3], [0, 3, 1, 2, 4]],
             [[5, 4, 2, 1, 1], [1, 0, -1, -1, -2]]),
    sim_case("dot_block_size_1", Q, C, 5, {"block_size": 1}, [[4, 1, 2, 0, 3], [0, 3, 1, 2, 4]]),
    sim_case("dot_float64", Q, C, 3, {}, [[4, 1, 2], [0, 3, 1]], [[5, 4, 2], [1, 0, -1]], dtype=torch.float64),
    sim_case("dot_bfloat16", Q, C, 3, {}, [[4, 1, 2], [0, 3, 1]], [[5, 4, 2], [1, 0, -1]], dtype=torch.bfloat16),
    sim_case("dot_float16", Q, C, 3, {}, [[4, 1, 2], [0, 3, 1]], [[5, 4, 2], [1, 0, -1]], dtype=torch.float16),
    # row 0: p = s_04 = 5 keeps every other candidate; row 1: p = s_10 = 1
    sim_case("positive_margin_zero", Q, C, 3, {"positives": [[4], [0]], "absolute_margin": 0.0},
             [[1, 2, 0], [3, 1, 2]]),
    # row 0: p = s_02 = 2, bound 1 -> ids 0 and 3 (both 1); row 1: p = s_13 = 0, bound -1 -> ids 1, 2, 4
    sim_case("positive_margin_one", Q, C, 3, {"positives": [[2], [3]], "absolute_margin": 1.0},
             [[0, 3, -1], [1, 2, 4]], [[1, 1, NEG], [-1, -1, -2]]),
    # row 0: p = 1, bound 1 - 0.5 = 0.5: every other score is >= 1; row 1: p = -1, bound -1 - 0.5 = -1.5
    sim_case("relative_margin_negative_p", Q, C, 3, {"positives": [[0], [1]], "relative_margin": 0.5},
             [[-1, -1, -1], [4, -1, -1]], [[NEG, NEG, NEG], [-2, NEG, NEG]]),
    # row 0 (label 0) masks c0, c1, c4; row 1 (label 1) masks c2, c3
    sim_case("labels", Q, C, 3, {"query_labels": [0, 1], "candidate_labels": [0, 0, 1, 1, 0]},
             [[2, 3, -1], [0, 1, 4]]),
    sim_case("score_bounds", Q, C, 4, {"min_score": 1.0, "max_score": 4.0}, [[1, 2, 0, 3], [0, -1, -1, -1]]),
    # row 0 without id 4: ranking 1, 2, 0, 3, skip 1; row 1: ranking 0, 3, 1, 2, 4, skip 1
    sim_case("exclude_and_skip", Q, C, 2, {"exclude": [[4], [-1]], "skip_top": 1}, [[2, 0], [3, 1]]),
    sim_case("sampling_whole_window", Q, C, 2, {"pool": 2, "sampling": "uniform", "seed": 0}, [[4, 1], [0, 3]]),
    sim_case("cosine", QC, CC, 3, {"metric": "cosine"}, [[0, 2, 4], [0, 1, 4], [0, 1, 2]],
             [[1, 0.5, 0.5], [0.5, 0.5, 0.5], [0, 0, 0]]),
    # row 0: p = s_04 = 0.5 -> 2 (0.5), 1 (0), 3 (-1); row 1: p = s_12 = 0 -> only 3 (-0.5);
    # row 2: no valid positive, no margin: the all-zero row ranks by id
    sim_case("cosine_margin", QC, CC, 3, {"metric": "cosine", "positives": [[4], [2], [-1]], "absolute_margin": 0.0},
             [[2, 1, 3], [3, -1, -1], [0, 1, 2]], [[0.5, 0, -1], [-0.5, NEG, NEG], [0, 0, 0]]),
]


@pytest.mark.parametrize("queries, candidates, k, kwargs, indices, expected_scores, dtype", SIMILARITY)
def test_similarity_on_hand_computed_matrices(queries, candidates, k, kwargs, indices, expected_scores, dtype):
    q, c = torch.tensor(queries, dtype=dtype), torch.tensor(candidates, dtype=dtype)
    check(hnsample.topk_similarity(q, c, k, **_arguments(kwargs)), indices, expected_scores)
