"""Inputs that used to lose data or change meaning silently: qrels and id files (headers, trailing tabs,
NaN relevance, blank lines, byte-order marks), uint64 ids that do not fit int64, big-endian and
reversed .npy embeddings, CPU device indices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hnsample
from hnsample import (
    MPerClassBatchSampler,
    NegativeQueue,
    NeighbourBatchSampler,
    NoDuplicatesBatchSampler,
    batch_hard,
    topk_similarity,
    triplet_margin_loss,
)
from hnsample.mining import mine_hard_negatives
from hnsample.mining_io import MatrixSource

QUIET = dict(progress=False, verbose=False)
BIG = 2**64 - 1


def _data(b=4, n=30, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randn(n, d, generator=g)


def _positives(q, c, qrels, **kw):
    return mine_hard_negatives(q, c, qrels, num_negatives=2, device="cpu", **kw, **QUIET).positives.tolist()


# ----------------------------------------------------------------------------------------------------
# qrels files


def test_a_first_line_ending_in_a_tab_is_data_not_a_header(tmp_path):
    q, c = _data()
    f = tmp_path / "qrels.tsv"
    for text, line in [("0\t5\t\n1\t7\n", 1), ("1\t7\n0\t5\t\n", 2)]:
        f.write_text(text)
        with pytest.raises(ValueError, match=rf"positives file '.*qrels.tsv' line {line}: relevance '' is empty"):
            _positives(q, c, f)


def test_header_detection_by_content(tmp_path):
    q, c = _data()
    f = tmp_path / "qrels.tsv"
    f.write_text("query-id\tcorpus-id\tscore\n0\t5\t1\n2\t9\t1\n")  # BEIR header: skipped
    assert _positives(q, c, f) == [[5], [-1], [9], [-1]]
    f.write_text("0\t5\tyes\n2\t9\t1\n")  # known ids: a data line with a bad score, not a header
    with pytest.raises(ValueError, match=r"line 1: relevance 'yes' is not a number"):
        _positives(q, c, f)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf"])
def test_non_finite_relevance_is_an_error_naming_file_and_line(tmp_path, value):
    q, c = _data()
    f = tmp_path / "qrels.tsv"
    f.write_text(f"0\t5\t1\n1\t7\t{value}\n")
    with pytest.raises(ValueError, match=rf"positives file '.*qrels.tsv' line 2: relevance '{value}' is not a "
                                         "finite number"):
        _positives(q, c, f)
    f.write_text(f"0\t0\t5\t1\n1\t0\t7\t{value}\n")  # TREC layout
    with pytest.raises(ValueError, match="line 2: relevance"):
        _positives(q, c, f)


def test_byte_order_marks_are_dropped(tmp_path):
    q, c = _data()
    (tmp_path / "qids.txt").write_text("\ufeffq-a\nq-b\nq-c\nq-d\n", encoding="utf-8")
    (tmp_path / "cids.txt").write_text("\ufeff" + "\n".join(f"d{j}" for j in range(30)) + "\n")
    (tmp_path / "qrels.tsv").write_text("\ufeffq-a\td0\t1\nq-c\td9\t1\n")
    got = _positives(q, c, tmp_path / "qrels.tsv", query_ids=tmp_path / "qids.txt",
                     corpus_ids=tmp_path / "cids.txt")
    assert got == [[0], [-1], [9], [-1]]
    (tmp_path / "plain.tsv").write_text("\ufeff0\t5\n")
    assert _positives(q, c, tmp_path / "plain.tsv") == [[5], [-1], [-1], [-1]]


def test_blank_lines_inside_id_files_are_errors_naming_the_line(tmp_path):
    q, c = _data()
    (tmp_path / "qrels.tsv").write_text("q-c\td1\n")
    cids = "\n".join(f"d{j}" for j in range(30)) + "\n"
    (tmp_path / "cids.txt").write_text(cids)
    # 5 lines for 4 queries with one blank: skipping it would shift q-c and q-d onto rows 2 and 3 of
    # another file's meaning; the count matches, so only the blank line tells.
    (tmp_path / "qids.txt").write_text("q-a\nq-b\n\nq-c\n")
    with pytest.raises(ValueError, match=r"query_ids file '.*qids.txt' line 3 is blank"):
        _positives(q, c, tmp_path / "qrels.tsv", query_ids=tmp_path / "qids.txt",
                   corpus_ids=tmp_path / "cids.txt")
    (tmp_path / "qids.txt").write_text("q-a\n   \nq-b\nq-c\n")
    with pytest.raises(ValueError, match=r"line 2 is blank"):
        _positives(q, c, tmp_path / "qrels.tsv", query_ids=tmp_path / "qids.txt",
                   corpus_ids=tmp_path / "cids.txt")
    (tmp_path / "qids.txt").write_text("q-a\nq-b\nq-c\nq-d\n\n\n")  # blank lines after the last id: fine
    assert _positives(q, c, tmp_path / "qrels.tsv", query_ids=tmp_path / "qids.txt",
                      corpus_ids=tmp_path / "cids.txt") == [[-1], [-1], [1], [-1]]


# ----------------------------------------------------------------------------------------------------
# uint64 ids


def _uint64(values, kind):
    a = np.array(values, dtype=np.uint64)
    return a if kind == "numpy" else torch.from_numpy(a)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_uint64_ids_that_do_not_fit_int64_are_rejected(kind):
    q, c = _data()
    with pytest.raises(ValueError, match=r"positives holds values >= 2\*\*63"):
        topk_similarity(q, c, 3, positives=_uint64([[1], [2], [BIG], [3]], kind))
    with pytest.raises(ValueError, match=r"exclude holds values >= 2\*\*63"):
        topk_similarity(q, c, 3, exclude=_uint64([[1], [2], [2**63], [3]], kind))
    with pytest.raises(ValueError, match=r"query_labels holds values >= 2\*\*63"):
        topk_similarity(q, c, 3, query_labels=_uint64([1, 2, BIG, 3], kind),
                        candidate_labels=torch.zeros(30, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"positives holds values >= 2\*\*63"):
        mine_hard_negatives(q, c, _uint64([[1], [2], [BIG], [3]], kind), device="cpu", **QUIET)
    with pytest.raises(ValueError, match=r"exclude holds values >= 2\*\*63"):
        mine_hard_negatives(q, c, None, exclude=_uint64([[1], [2], [BIG], [3]], kind), device="cpu", **QUIET)
    # Values that fit are read as they are.
    small = _uint64([[1], [2], [5], [3]], kind)
    want = topk_similarity(q, c, 3, positives=torch.tensor([[1], [2], [5], [3]]))
    assert torch.equal(topk_similarity(q, c, 3, positives=small).indices, want.indices)


def test_uint64_ids_in_lists_samplers_and_queue():
    q, c = _data()
    with pytest.raises(ValueError, match=r"positives must hold corpus ids in \[0, 30\)"):
        mine_hard_negatives(q, c, [[1], [2], [BIG], [3]], device="cpu", **QUIET)
    with pytest.raises(ValueError, match=r"positives must hold corpus ids"):
        mine_hard_negatives(q, c, [1, 2, np.uint64(BIG), 3], device="cpu", **QUIET)
    with pytest.raises(ValueError, match=r"neighbours holds values >= 2\*\*63"):
        NeighbourBatchSampler(np.array([[1], [BIG]], dtype=np.uint64), 2)
    with pytest.raises(ValueError, match=r"keys holds values >= 2\*\*63"):
        NoDuplicatesBatchSampler(np.array([1, BIG], dtype=np.uint64), 2)
    with pytest.raises(ValueError, match=r"labels holds values >= 2\*\*63"):
        MPerClassBatchSampler(np.array([1, 1, BIG, BIG], dtype=np.uint64), 2, 4)
    with pytest.raises(ValueError, match=r"labels holds values >= 2\*\*63"):
        batch_hard(c[:4], torch.from_numpy(np.array([1, 1, 2, BIG], dtype=np.uint64)))
    anchors = torch.from_numpy(np.array([BIG], dtype=np.uint64))
    with pytest.raises(ValueError, match=r"triplets.anchors holds values >= 2\*\*63"):
        triplet_margin_loss(c[:4], (anchors, torch.tensor([1]), torch.tensor([2])), 0.1)
    queue = NegativeQueue(4, 6)
    with pytest.raises(ValueError, match=r"ids holds values >= 2\*\*63"):
        queue.enqueue(c[:2], ids=np.array([1, BIG], dtype=np.uint64))
    with pytest.raises(ValueError, match=r"query_ids holds values >= 2\*\*63"):
        queue.mine(q, 2, query_ids=np.array([1, 2, 3, BIG], dtype=np.uint64))


# ----------------------------------------------------------------------------------------------------
# .npy embeddings: byte order and strides


def test_big_endian_npy_is_accepted_and_stays_memory_mapped(tmp_path):
    q, c = _data(b=9, n=80)
    pos = torch.randint(0, 80, (9, 2), generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "q.npy", q.numpy().astype(">f4"))
    np.save(tmp_path / "c.npy", c.numpy().astype(">f4"))
    src = MatrixSource("corpus", tmp_path / "c.npy")
    assert isinstance(src.data, np.memmap) and src.data.dtype == np.dtype(">f4")
    assert src.torch_dtype == torch.float32
    assert src.fingerprint() == MatrixSource("corpus", c).fingerprint()
    kw = dict(num_negatives=4, relative_margin=0.05, query_batch_size=4, corpus_shard_size=17, device="cpu")
    want = mine_hard_negatives(q, c, pos, **kw, **QUIET)
    got = mine_hard_negatives(tmp_path / "q.npy", tmp_path / "c.npy", pos, **kw, **QUIET)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.scores, want.scores)
    # An in-memory big-endian array and a reversed (negative-stride) view are read too.
    got = mine_hard_negatives(q.numpy().astype(">f4"), c.numpy()[::-1].copy()[::-1], pos, **kw, **QUIET)
    assert torch.equal(got.indices, want.indices)
    rev = c.numpy()[::-1]
    got = mine_hard_negatives(q.numpy(), rev, (79 - pos), **kw, **QUIET)
    want_rev = mine_hard_negatives(q, torch.from_numpy(rev.copy()), (79 - pos), **kw, **QUIET)
    assert torch.equal(got.indices, want_rev.indices)
    # A checkpoint written from the native file resumes from the big-endian one (same fingerprint).
    np.save(tmp_path / "c_native.npy", c.numpy())
    mine_hard_negatives(q, tmp_path / "c_native.npy", pos, checkpoint_dir=tmp_path / "ck", **kw, **QUIET)
    again = mine_hard_negatives(q, tmp_path / "c.npy", pos, checkpoint_dir=tmp_path / "ck", **kw, **QUIET)
    assert torch.equal(again.indices, want.indices)


def test_non_float_big_endian_npy_is_still_refused(tmp_path):
    q, _ = _data()
    np.save(tmp_path / "c.npy", np.zeros((5, 6), dtype=">i4"))
    with pytest.raises(TypeError, match="corpus must hold float16, float32 or float64 values, got >i4"):
        mine_hard_negatives(q, tmp_path / "c.npy", None, **QUIET)


# ----------------------------------------------------------------------------------------------------
# CPU device indices


def test_cpu_device_indices():
    q, c = _data()
    pos = torch.tensor([[1], [2], [3], [4]])
    want = mine_hard_negatives(q, c, pos, num_negatives=3, device="cpu", **QUIET)
    for dev in ("cpu:0", torch.device("cpu", 0), ["cpu:0", "cpu"]):
        got = mine_hard_negatives(q, c, pos, num_negatives=3, device=dev, **QUIET)
        assert torch.equal(got.indices, want.indices)
    for dev in ("cpu:1", torch.device("cpu", 3), ["cpu", "cpu:2"]):
        with pytest.raises(ValueError, match=r"device 'cpu:\d': the CPU takes no device index; use 'cpu'"):
            mine_hard_negatives(q, c, pos, num_negatives=3, device=dev, **QUIET)
    assert hnsample.mining.resolve_devices("cpu:0") == [torch.device("cpu")]
