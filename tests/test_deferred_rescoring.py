"""Deferred rescoring of a certified CPU pass (engine.selection.ScreenedPass, csrc/cpu/topk_screen.cpp):
survivors wait across the blocks of a pass and are rescored once at its end. The selection must be the
same bits as rescoring every survivor in its block and as the canonical reference, with lists that
overflow at every step, across passes over several candidate chunks, and after an interrupted pass;
and it must rescore fewer candidates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_certified import assert_bits

import hnsample
from hnsample import _C, settings
from hnsample import _reference as R
from hnsample.engine import SelectionState, build_selection
from hnsample.engine import selection as selection_module
from hnsample.engine.blocks import score_blocks, screen_product
from hnsample.engine.selection import ScreenedPass

WINDOW_SAMPLINGS = [
    ("top", {}),
    ("top_window", {"skip_top": 3, "pool": 9}),
    ("uniform_pool", {"sampling": "uniform", "seed": 4, "skip_top": 1, "pool": 12}),
    ("softmax_pool", {"sampling": "softmax", "seed": 2, "temperature": 0.5, "pool": 7}),
]


def random_rows(seed: int, b: int, n: int, d: int, dtype: torch.dtype = torch.float32):
    rng = np.random.default_rng(seed)
    q = torch.from_numpy(rng.standard_normal((b, d)).astype(np.float32)).to(dtype)
    c = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32)).to(dtype)
    c[5:9] = c[4]  # exact duplicates: ties decided by id after the deferred rescoring
    return q, c, torch.from_numpy(rng.integers(-1, n, (b, 2)))


@pytest.fixture
def count_flushes(monkeypatch):
    calls = []
    real = SelectionState.flush_deferred

    def spy(self, *args, **kwargs):
        calls.append((self.sel.sampling, self.params.mode))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SelectionState, "flush_deferred", spy)
    return calls


@pytest.mark.parametrize("slots", ["default", "one", "off"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("metric", ["dot", "cosine"])
@pytest.mark.parametrize("name,kw", WINDOW_SAMPLINGS, ids=[s[0] for s in WINDOW_SAMPLINGS])
def test_deferred_selection_equals_the_reference(monkeypatch, count_flushes, slots, dtype, metric, name, kw):
    if slots == "one":  # every list is full after one survivor: prune and rescore-in-block at every step
        monkeypatch.setattr(selection_module, "DEFER_SLOTS_PER_CAPACITY", 0)
        monkeypatch.setattr(selection_module, "DEFER_EXTRA_SLOTS", 1)
    if slots == "off":
        monkeypatch.setattr(selection_module, "DEFER_MAX_BYTES", 0)
    q, c, pos = random_rows(hash((name, metric, str(dtype))) % 2**32, 11, 900, 29, dtype)
    filters = dict(kw, positives=pos, relative_margin=0.05)
    want = R.topk_similarity(q, c, 5, metric=metric, **filters)
    for block in (None, 640, 101):
        for product in ("fp32", "bf16"):
            with settings.override(screen_product=product):
                got = hnsample.topk_similarity(q, c, 5, metric=metric, block_size=block, **filters)
            assert_bits(got, want)
    ours = [call for call in count_flushes if call[0] == kw.get("sampling", "top")]  # not the product probe's
    assert bool(ours) == (slots != "off")


def test_stream_sampling_is_not_deferred(count_flushes):
    q, c, pos = random_rows(3, 7, 500, 16)
    kw = dict(sampling="softmax", seed=9, temperature=0.3, skip_top=2, positives=pos)
    assert_bits(hnsample.topk_similarity(q, c, 4, block_size=700, **kw), R.topk_similarity(q, c, 4, **kw))
    assert all(mode == _C.SelectMode.window for _, mode in count_flushes)
    assert not [call for call in count_flushes if call[0] == "softmax"]


def test_passes_over_candidate_chunks_equal_one_pass():
    # Mining offers the corpus shard by shard to one state: each pass flushes its own survivors, and a
    # later pass starts from the state's exact scores.
    q, c, pos = random_rows(8, 40, 2500, 24)
    want = R.topk_similarity(q, c, 6, metric="cosine", positives=pos, absolute_margin=0.01)
    mined = hnsample.mine_hard_negatives(q, c, pos, num_negatives=6, metric="cosine", absolute_margin=0.01,
                                         corpus_shard_size=700, query_batch_size=13, block_size=5000,
                                         device="cpu", progress=False, verbose=False)
    assert torch.equal(mined.indices, want[1])
    assert torch.equal(mined.scores.float().view(torch.int32), want[0].float().view(torch.int32))


def selection_state(q, c, k, **kw):
    args = dict(positives=None, exclude=None, query_labels=None, candidate_labels=None, positive_scores=None,
                absolute_margin=None, relative_margin=None, min_score=None, max_score=None, skip_top=0, pool=None,
                sampling="top", temperature=1.0, generator=None, seed=None, positive_values=None)
    args.update(kw)
    state = SelectionState(build_selection(q.shape[0], c.shape[0], q.device, k, **args), q.shape[0], q.device)
    state.rescored = torch.zeros(q.shape[0], dtype=torch.int64)
    return state


def run_pass(state, q, c, block_cols):
    product = screen_product(q.dtype, "dot", q.shape[1], q.device)
    with ScreenedPass(state) as screened:
        for blk in score_blocks(q, c, product, q.shape[0], block_cols):
            screened.offer(blk, blk.j0)
    return state


def test_deferral_rescores_fewer_candidates(monkeypatch):
    # Without deferral, a candidate entering a row's running top-k is rescored in its block even if a
    # later block evicts it (about k ln(blocks) of them); deferred, only those that may end in the top k.
    q, c, _ = random_rows(1, 32, 40_000, 32)
    deferred = run_pass(selection_state(q, c, 8), q, c, 500)
    monkeypatch.setattr(selection_module, "DEFER_MAX_BYTES", 0)
    direct = run_pass(selection_state(q, c, 8), q, c, 500)
    assert torch.equal(deferred.finalize()[1], direct.finalize()[1])
    assert deferred.rescored.double().mean() < 0.5 * direct.rescored.double().mean()
    assert (deferred.rescored >= 8).all()


def test_an_interrupted_pass_leaves_no_waiting_survivors():
    q, c, _ = random_rows(2, 6, 3000, 16)
    state = selection_state(q, c, 4)
    product = screen_product(q.dtype, "dot", q.shape[1], q.device)
    with pytest.raises(KeyboardInterrupt):
        with ScreenedPass(state) as screened:
            for blk in score_blocks(q, c, product, 6, 500):
                screened.offer(blk, blk.j0)
                if blk.j0 >= 1500:
                    raise KeyboardInterrupt
    assert int(state.deferred_lists()[2].sum()) == 0 and int(state.deferred_lists()[4].sum()) == 0


def test_bad_flush_tables_are_refused():
    q, c, _ = random_rows(4, 3, 400, 8)
    state = selection_state(q, c, 2)
    product = screen_product(q.dtype, "dot", q.shape[1], q.device)
    screened = ScreenedPass(state)
    for blk in score_blocks(q, c, product, 3, 200):
        screened.offer(blk, blk.j0)
    operand = product.operand(q, True)
    good = torch.tensor([[0, 200, c.data_ptr(), c.stride(0), 0], [200, 200, c[200:].data_ptr(), c.stride(0), 0]])
    with pytest.raises(ValueError, match="ascend"):
        state.flush_deferred(operand, 0, good.flip(0).contiguous())
    with pytest.raises(ValueError, match="ascend"):  # overlapping blocks
        state.flush_deferred(operand, 0, torch.tensor([[0, 300, c.data_ptr(), c.stride(0), 0], good[1].tolist()]))
    with pytest.raises(ValueError, match="no block"):
        state.flush_deferred(operand, 0, good[1:].contiguous())
    with pytest.raises(ValueError, match="no block"):  # ids past a block's rows
        state.flush_deferred(operand, 0, torch.tensor([[0, 100, c.data_ptr(), c.stride(0), 0],
                                                       [250, 150, c[250:].data_ptr(), c.stride(0), 0]]))
    with pytest.raises(ValueError, match="stride below dim"):
        state.flush_deferred(operand, 0, torch.tensor([[0, 400, c.data_ptr(), 3, 0]]))
    state.flush_deferred(operand, 0, good)
    want = R.topk_similarity(q, c, 2, metric="dot")
    s, j = state.finalize()
    assert torch.equal(j, want[1]) and torch.equal(s.float().view(torch.int32), want[0].float().view(torch.int32))


def test_deferred_lists_need_a_window_selection():
    q, c, _ = random_rows(5, 4, 300, 8)
    stream = selection_state(q, c, 3, sampling="uniform", seed=1)
    assert stream.deferred_lists() is None
    window = selection_state(q, c, 3)
    s = _C.ScreenBlock()
    s.set_approx(0, 0, 0, 0, 0, 1, 0, 0)
    window._point_at_deferred(s)
    with pytest.raises(ValueError, match="window selection"):
        _C.topk_screen_flush(stream.params, s, 0, 0, 1)


def test_one_row_blocks_and_empty_rows():
    # A one-row candidate block may have any row stride (an expanded row has 0); d = 0 rows have no data.
    q, c, _ = random_rows(6, 5, 401, 12)
    one = c.as_strided((1, 12), (0, 1))
    assert one.stride(0) == 0
    assert_bits(hnsample.topk_similarity(q, c, 3, block_size=5 * 200), R.topk_similarity(q, c, 3))
    assert_bits(hnsample.topk_similarity(q, one, 1), R.topk_similarity(q, one, 1))
    assert_bits(hnsample.topk_similarity(q[:, :0], c[:, :0], 2), R.topk_similarity(q[:, :0], c[:, :0], 2))
