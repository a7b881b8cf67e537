"""mine_hard_negatives: exactness against topk_similarity and the reference, inputs (memory-mapped .npy,
qrels, lists), filter statistics, checkpoints, result files, sentence-transformers export, the CLI."""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import pytest
import torch

import hnsample
from hnsample import _reference as R
from hnsample import mining_cli
from hnsample.checkpoint import CheckpointDir
from hnsample.mining import FILTERS, MinedNegatives, mine_hard_negatives
from hnsample.mining_io import MatrixSource

QUIET = dict(progress=False, verbose=False)


def _data(b=23, n=157, d=12, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=g, dtype=dtype)
    c = torch.randn(n, d, generator=g, dtype=dtype)
    pos = torch.randint(0, n, (b, 2), generator=g)
    pos[::4, 1] = -1
    return q, c, pos


SELECTIONS = {
    "top-margin": dict(relative_margin=0.05, skip_top=2),
    "top-pool-bounds": dict(absolute_margin=0.01, min_score=-0.5, max_score=0.6, skip_top=1, pool=30),
    "uniform-pool": dict(sampling="uniform", skip_top=3, pool=40, seed=11),
    "uniform-unbounded": dict(sampling="uniform", skip_top=2, seed=5),
    "softmax": dict(sampling="softmax", temperature=0.05, relative_margin=0.05, skip_top=2, pool=50, seed=3),
}


@pytest.mark.parametrize("name", list(SELECTIONS))
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_matches_topk_similarity_across_batches_and_shards(name, metric):
    q, c, pos = _data()
    kw = SELECTIONS[name]
    ref = hnsample.topk_similarity(q, c, 6, metric=metric, positives=pos, **kw)
    for qb, shard, block in [(None, None, None), (5, 17, 40), (23, 157, 7)]:
        r = mine_hard_negatives(q, c, pos, num_negatives=6, metric=metric, query_batch_size=qb,
                                corpus_shard_size=shard, block_size=block, device="cpu", **kw, **QUIET)
        assert torch.equal(r.indices, ref.indices), (qb, shard, block)
        torch.testing.assert_close(r.scores, ref.scores.to(torch.float32))


def test_matches_reference_with_every_filter():
    q, c, pos = _data(b=9, n=60)
    g = torch.Generator().manual_seed(1)
    exclude = [[1, 2, 3], [], [59]] + [[int(x)] for x in torch.randint(0, 60, (6,), generator=g)]
    ql = torch.randint(0, 3, (9,), generator=g)
    cl = torch.randint(0, 3, (60,), generator=g)
    kw = dict(relative_margin=0.02, min_score=-0.4, max_score=0.7, skip_top=1, pool=25, sampling="softmax",
              temperature=0.1, seed=9)
    r = mine_hard_negatives(q, c, pos, num_negatives=4, exclude=exclude, query_labels=ql, candidate_labels=cl,
                            query_batch_size=4, corpus_shard_size=13, device="cpu", **kw, **QUIET)
    ex = torch.full((9, 3), -1, dtype=torch.int64)
    for i, row in enumerate(exclude):
        ex[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    _, ref_j = R.topk_similarity(q, c, 4, metric="cosine", positives=pos, exclude=ex, query_labels=ql,
                                 candidate_labels=cl, **kw)
    assert torch.equal(r.indices, ref_j)


def test_exact_when_filters_remove_the_top_of_every_row():
    # A fixed candidate window (sentence-transformers' range_max) would come up short here.
    q, c, _ = _data(b=6, n=200)
    scores = R.similarity(q, c, "cosine")
    top = torch.topk(scores, 120, dim=1).indices
    r = mine_hard_negatives(q, c, None, num_negatives=5, exclude=top, device="cpu", corpus_shard_size=33,
                            **QUIET)
    assert bool((r.indices >= 0).all())
    _, ref_j = R.topk_similarity(q, c, 5, metric="cosine", exclude=top)
    assert torch.equal(r.indices, ref_j)


def test_npy_inputs_are_memory_mapped_and_match(tmp_path):
    q, c, pos = _data()
    np.save(tmp_path / "q.npy", q.numpy())
    np.save(tmp_path / "c.npy", c.numpy())
    src = MatrixSource("corpus", tmp_path / "c.npy")
    assert isinstance(src.data, np.memmap)
    a = mine_hard_negatives(str(tmp_path / "q.npy"), tmp_path / "c.npy", pos.numpy(), num_negatives=5,
                            corpus_shard_size=20, device="cpu", **QUIET)
    b = mine_hard_negatives(q, c, pos, num_negatives=5, device="cpu", **QUIET)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.scores, b.scores)


def test_half_precision_inputs_match_topk_similarity():
    q, c, pos = _data(dtype=torch.bfloat16)
    r = mine_hard_negatives(q, c, pos, num_negatives=4, device="cpu", corpus_shard_size=40, **QUIET)
    ref = hnsample.topk_similarity(q, c, 4, metric="cosine", positives=pos)
    assert torch.equal(r.indices, ref.indices)


def test_several_devices_merge_exactly():
    q, c, pos = _data()
    kw = SELECTIONS["softmax"]
    one = mine_hard_negatives(q, c, pos, num_negatives=6, device="cpu", corpus_shard_size=20, **kw, **QUIET)
    two = mine_hard_negatives(q, c, pos, num_negatives=6, device=["cpu", "cpu", "cpu"], corpus_shard_size=20,
                              **kw, **QUIET)
    assert torch.equal(one.indices, two.indices)


def test_positive_scores_are_the_minimum_over_positives():
    q, c, pos = _data()
    r = mine_hard_negatives(q, c, pos, num_negatives=3, device="cpu", **QUIET)
    s = R.similarity(q, c, "cosine")
    for i in range(q.shape[0]):
        vals = [float(s[i, j]) for j in pos[i].tolist() if j >= 0]
        assert math.isclose(float(r.positive_scores[i]), min(vals), rel_tol=1e-5, abs_tol=1e-6)
    none = mine_hard_negatives(q, c, None, num_negatives=3, device="cpu", **QUIET)
    assert bool(none.positive_scores.isnan().all())


def _brute_force_counts(q, c, pos, exclude, ql, cl, kw):
    s = R.similarity(q, c, "dot").to(torch.float64)
    p, has_p = R.positive_reference_scores(s, pos, None)
    upper = R.upper_bounds(p, has_p, kw.get("absolute_margin"), kw.get("relative_margin"))
    counts = {f: 0 for f in FILTERS}
    eligible = []
    for i in range(q.shape[0]):
        pset = {j for j in pos[i].tolist() if j >= 0}
        eset = {j for j in exclude[i].tolist() if j >= 0} - pset
        e = 0
        for j in range(c.shape[0]):
            v = float(s[i, j])
            if j in pset:
                counts["positives"] += 1
            elif j in eset:
                counts["exclude"] += 1
            elif int(ql[i]) == int(cl[j]):
                counts["labels"] += 1
            elif math.isnan(v):
                counts["nan"] += 1
            elif not v >= kw["min_score"]:
                counts["min_score"] += 1
            elif not v <= kw["max_score"]:
                counts["max_score"] += 1
            elif not v <= float(upper[i]):
                counts["margin"] += 1
            else:
                e += 1
        eligible.append(e)
    return counts, eligible


def test_filter_statistics_are_exact():
    q, c, pos = _data(b=11, n=90)
    c[7] = float("nan")  # a NaN candidate scores NaN with everything (dot metric)
    g = torch.Generator().manual_seed(2)
    exclude = torch.randint(-1, 90, (11, 4), generator=g)
    exclude[:, 0] = pos[:, 0]  # overlaps with positives are counted once, as positives
    ql, cl = torch.randint(0, 4, (11,), generator=g), torch.randint(0, 4, (90,), generator=g)
    kw = dict(relative_margin=0.05, min_score=-0.3, max_score=0.5, skip_top=4)
    r = mine_hard_negatives(q, c, pos, num_negatives=5, exclude=exclude, query_labels=ql, candidate_labels=cl,
                            filter_statistics=True, query_batch_size=4, corpus_shard_size=25, block_size=30,
                            device=["cpu", "cpu"], metric="dot", **kw, **QUIET)
    counts, eligible = _brute_force_counts(q, c, pos, exclude, ql, cl, kw)
    for f in FILTERS:
        assert r.filter_counts[f] == counts[f], f
    assert r.eligible.tolist() == eligible
    assert r.filter_counts["eligible"] == sum(eligible)
    assert r.filter_counts["skip_top"] == sum(min(4, e) for e in eligible)
    found = (r.indices >= 0).sum(dim=1)
    assert torch.equal(found, (r.eligible - 4).clamp(0, 5))
    assert set(r.short_rows.tolist()) == {i for i, e in enumerate(eligible) if e - 4 < 5}


def test_summary_table(capsys):
    q, c, pos = _data()
    r = mine_hard_negatives(q, c, pos, num_negatives=4, relative_margin=0.0, filter_statistics=True,
                            device="cpu", progress=False, verbose=True)
    out = capsys.readouterr().out
    for word in ("Positive", "Negative", "Difference", "75%", "margin", "eligible",
                 "queries came up short"):
        assert word in out
    qs = r.score_quantiles()
    assert qs["negative"]["count"] == float((r.indices >= 0).sum())
    assert "Per-filter counts not computed" in mine_hard_negatives(q, c, pos, num_negatives=2, device="cpu",
                                                                   **QUIET).summary()


# ------------------------------------------------------------------------------------------------------
# positives: qrels and lists


def test_qrels_with_id_maps_and_lists(tmp_path):
    q, c, _ = _data(b=4, n=30)
    qids = ["q-a", "q-b", "q-c", "q-d"]
    cids = [f"doc{j}" for j in range(30)]
    (tmp_path / "qids.txt").write_text("\n".join(qids) + "\n")
    (tmp_path / "qrels.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq-a\tdoc3\t1\nq-a\tdoc5\t2\nq-b\tdoc7\t1\nq-c\tdoc9\t0\nq-d\tdoc1\t1\n")
    r = mine_hard_negatives(q, c, tmp_path / "qrels.tsv", query_ids=tmp_path / "qids.txt", corpus_ids=cids,
                            num_negatives=3, relative_margin=0.0, device="cpu", **QUIET)
    lists = [[3, 5], [7], [], [1]]
    r2 = mine_hard_negatives(q, c, lists, num_negatives=3, relative_margin=0.0, device="cpu", **QUIET)
    assert torch.equal(r.indices, r2.indices)
    assert r.positives.tolist() == [[3, 5], [7, -1], [-1, -1], [1, -1]]
    (tmp_path / "two.tsv").write_text("0\t3\n0\t5\n1\t7\n3\t1\n")
    r3 = mine_hard_negatives(q, c, tmp_path / "two.tsv", num_negatives=3, relative_margin=0.0, device="cpu",
                             **QUIET)
    assert torch.equal(r3.indices, r2.indices)
    (tmp_path / "trec.tsv").write_text("q-a\t0\tdoc3\t1\nq-a\t0\tdoc5\t1\nq-b\t0\tdoc7\t1\nq-d\t0\tdoc1\t1\n")
    r4 = mine_hard_negatives(q, c, tmp_path / "trec.tsv", query_ids=qids, corpus_ids=cids, num_negatives=3,
                             relative_margin=0.0, device="cpu", **QUIET)
    assert torch.equal(r4.indices, r2.indices)


def test_qrels_errors(tmp_path):
    q, c, _ = _data(b=2, n=5)
    (tmp_path / "bad.tsv").write_text("0\tdoc-x\n")
    with pytest.raises(ValueError, match="line 1: unknown corpus id 'doc-x'"):
        mine_hard_negatives(q, c, tmp_path / "bad.tsv", **QUIET)
    (tmp_path / "badq.tsv").write_text("7\t1\n")
    with pytest.raises(ValueError, match="unknown query id '7'"):
        mine_hard_negatives(q, c, tmp_path / "badq.tsv", **QUIET)
    with pytest.raises(ValueError, match="positives file does not exist"):
        mine_hard_negatives(q, c, tmp_path / "missing.tsv", **QUIET)
    with pytest.raises(ValueError, match="query_ids must have one id per row"):
        mine_hard_negatives(q, c, tmp_path / "bad.tsv", query_ids=["a"], **QUIET)
    with pytest.raises(ValueError, match="corpus_ids has a duplicate id"):
        mine_hard_negatives(q, c, tmp_path / "bad.tsv", corpus_ids=["a"] * 5, **QUIET)


# ------------------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_negatives=-1), ValueError, "num_negatives"),
    (dict(num_negatives=2.5), TypeError, "num_negatives"),
    (dict(metric="l2"), ValueError, "metric"),
    (dict(sampling="gumbel"), ValueError, "sampling"),
    (dict(temperature=0.0, sampling="softmax"), ValueError, "temperature"),
    (dict(query_batch_size=0), ValueError, "query_batch_size"),
    (dict(corpus_shard_size=0), ValueError, "corpus_shard_size"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(device="tpu"), ValueError, "device"),
    (dict(device=[]), ValueError, "device"),
    (dict(device=3), TypeError, "device"),
    (dict(skip_top=-1), ValueError, "skip_top"),
    (dict(pool=0), ValueError, "pool"),
    (dict(relative_margin=float("nan")), ValueError, "relative_margin"),
    (dict(exclude=[[999]] * 23), ValueError, "exclude"),
    (dict(query_labels=torch.zeros(23, dtype=torch.int64)), ValueError, "candidate_labels"),
    (dict(query_labels=torch.zeros(3, dtype=torch.int64),
          candidate_labels=torch.zeros(157, dtype=torch.int64)), ValueError, "query_labels"),
    (dict(positive_scores=torch.zeros(3)), ValueError, "positive_scores"),
    (dict(filter_statistics=1), TypeError, "filter_statistics"),
    (dict(checkpoint_dir=3), TypeError, "checkpoint_dir"),
])
def test_bad_arguments(kwargs, exc, match):
    q, c, pos = _data()
    with pytest.raises(exc, match=match):
        mine_hard_negatives(q, c, pos, **kwargs, **QUIET)


def test_bad_inputs(tmp_path):
    q, c, pos = _data()
    with pytest.raises(ValueError, match="same dimension"):
        mine_hard_negatives(q, c[:, :5], None, **QUIET)
    with pytest.raises(TypeError, match="same dtype"):
        mine_hard_negatives(q, c.double(), None, **QUIET)
    with pytest.raises(TypeError, match="queries must be"):
        mine_hard_negatives([[1.0]], c, None, **QUIET)
    with pytest.raises(ValueError, match="corpus must be 2-D"):
        mine_hard_negatives(q, c[0], None, **QUIET)
    with pytest.raises(TypeError, match="corpus must hold float"):
        mine_hard_negatives(q, np.zeros((3, 12), dtype=np.int32), None, **QUIET)
    with pytest.raises(ValueError, match="corpus path must name a .npy"):
        mine_hard_negatives(q, str(tmp_path / "c.txt"), None, **QUIET)
    with pytest.raises(ValueError, match="positives must hold corpus ids"):
        mine_hard_negatives(q, c, pos + 1000, **QUIET)
    with pytest.raises(ValueError, match="positives must have one row per query"):
        mine_hard_negatives(q, c, pos[:3], **QUIET)
    with pytest.raises(TypeError, match="positives must hold integer ids"):
        mine_hard_negatives(q, c, pos.float(), **QUIET)


def test_empty_inputs():
    q, c, _ = _data()
    r = mine_hard_negatives(q[:0], c, None, num_negatives=3, device="cpu", **QUIET)
    assert r.indices.shape == (0, 3)
    r = mine_hard_negatives(q, c[:0], None, num_negatives=3, device="cpu", filter_statistics=True, **QUIET)
    assert bool((r.indices == -1).all()) and r.filter_counts["eligible"] == 0
    r = mine_hard_negatives(q, c, None, num_negatives=0, device="cpu", **QUIET)
    assert r.indices.shape == (23, 0)


# ------------------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_resume_skips_finished_batches(tmp_path):
    q, c, pos = _data()
    kw = dict(num_negatives=4, sampling="softmax", temperature=0.1, query_batch_size=5, device="cpu",
              checkpoint_dir=tmp_path / "ck", **QUIET)
    first = mine_hard_negatives(q, c, pos, **kw)  # seed drawn and recorded in the manifest
    files = sorted((tmp_path / "ck").glob("batch_*.npz"))
    assert len(files) == 5
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["seed"] == first.params["seed"]
    files[2].unlink()
    (tmp_path / "ck" / ".batch_0000002.npz.junk.tmp").write_bytes(b"partial")  # a killed write
    from hnsample.engine import CpuBackend, CpuKernels, registry

    class RecordingKernels(CpuKernels):  # the first query row of every batch that is mined
        def __init__(self):
            super().__init__()
            self.batches: set[int] = set()

        def select_block(self, params, *args):
            self.batches.add(params.noise_row_offset)
            super().select_block(params, *args)

        def screen_block(self, params, *args):  # float32 inputs: screened blocks
            self.batches.add(params.noise_row_offset)
            super().screen_block(params, *args)

    kernels = RecordingKernels()
    with registry.use("cpu", CpuBackend(kernels)):
        again = mine_hard_negatives(q, c, pos, **kw)
    assert kernels.batches == {10}
    assert torch.equal(again.indices, first.indices)
    assert torch.equal(again.scores, first.scores)
    direct = hnsample.topk_similarity(q, c, 4, metric="cosine", positives=pos, sampling="softmax",
                                      temperature=0.1, seed=first.params["seed"])
    assert torch.equal(first.indices, direct.indices)


def test_checkpoint_refuses_different_parameters(tmp_path):
    q, c, pos = _data()
    mine_hard_negatives(q, c, pos, num_negatives=4, checkpoint_dir=tmp_path, device="cpu", **QUIET)
    with pytest.raises(ValueError, match="different parameters.*num_negatives"):
        mine_hard_negatives(q, c, pos, num_negatives=5, checkpoint_dir=tmp_path, device="cpu", **QUIET)
    with pytest.raises(ValueError, match="different parameters.*positives"):
        mine_hard_negatives(q, c, pos.flip(1), num_negatives=4, checkpoint_dir=tmp_path, **QUIET)
    c2 = c.clone()
    c2[0, 0] += 1
    with pytest.raises(ValueError, match="different parameters.*corpus"):
        mine_hard_negatives(q, c2, pos, num_negatives=4, checkpoint_dir=tmp_path, **QUIET)
    # shard sizes and devices do not change the result, so they may change between runs
    mine_hard_negatives(q, c, pos, num_negatives=4, checkpoint_dir=tmp_path, corpus_shard_size=7,
                        device=["cpu", "cpu"], **QUIET)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="checkpoint_dir is not a directory"):
        CheckpointDir(tmp_path / "file", {})


# ------------------------------------------------------------------------------------------------------
# result files and sentence-transformers formats


@pytest.mark.parametrize("ext", [".npz", ".jsonl", ".parquet"])
def test_save_load_roundtrip(tmp_path, ext):
    if ext == ".parquet":
        pytest.importorskip("pyarrow")
    q, c, pos = _data()
    r = mine_hard_negatives(q, c, pos, num_negatives=6, relative_margin=0.0, skip_top=100, device="cpu",
                            filter_statistics=True, **QUIET)
    assert r.short_rows.numel() > 0  # padding (-1, -inf) must survive the round trip
    r.save(tmp_path / f"out{ext}")
    back = MinedNegatives.load(tmp_path / f"out{ext}")
    assert torch.equal(back.indices, r.indices)
    assert torch.equal(back.scores, r.scores)
    torch.testing.assert_close(back.positive_scores, r.positive_scores, equal_nan=True)
    assert torch.equal(back.positives, r.positives)
    assert back.filter_counts == r.filter_counts
    assert back.params == r.params


def test_save_rejects_unknown_extension(tmp_path):
    q, c, pos = _data()
    r = mine_hard_negatives(q, c, pos, num_negatives=2, device="cpu", **QUIET)
    with pytest.raises(ValueError, match="parquet, .jsonl or .npz"):
        r.save(tmp_path / "out.csv")
    with pytest.raises(ValueError, match="does not exist"):
        MinedNegatives.load(tmp_path / "nothing.npz")


def _small_result():
    return MinedNegatives(
        indices=torch.tensor([[4, 5], [6, -1], [7, 8]]),
        scores=torch.tensor([[0.5, 0.4], [0.3, -math.inf], [0.2, 0.1]]),
        positive_scores=torch.tensor([0.9, 0.8, 0.7]),
        positives=torch.tensor([[0, 1], [2, -1], [3, -1]]),
        params={"num_corpus": 9},
    )


def test_sentence_transformers_formats(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # plain dicts without the datasets package
    r = _small_result()
    qt, ct = ["qa", "qb", "qc"], [f"d{j}" for j in range(9)]
    t = r.to_sentence_transformers(qt, ct, "triplet")
    assert list(t) == ["anchor", "positive", "negative"]
    assert list(zip(t["anchor"], t["positive"], t["negative"], strict=True)) == [
        ("qa", "d0", "d4"), ("qa", "d0", "d5"), ("qa", "d1", "d4"), ("qa", "d1", "d5"), ("qb", "d2", "d6"),
        ("qc", "d3", "d7"), ("qc", "d3", "d8")]
    n = r.to_sentence_transformers(qt, ct, "n-tuple", output_scores=True)
    assert list(n) == ["anchor", "positive", "negative_1", "negative_2", "scores"]
    assert n["anchor"] == ["qa", "qa", "qc"] and n["negative_2"] == ["d5", "d5", "d8"]
    assert n["scores"][2] == pytest.approx([0.7, 0.2, 0.1])
    p = r.to_sentence_transformers(qt, ct, "labeled-pair")
    assert p["label"] == [1, 1, 0, 0, 1, 0, 1, 0, 0]
    assert p["positive"][:4] == ["d0", "d1", "d4", "d5"]
    ll = r.to_sentence_transformers(qt, ct, "labeled-list", anchor_column="query")
    assert ll["query"] == ["qa", "qa", "qb", "qc"]
    assert ll["positive"][2] == ["d2", "d6"] and ll["labels"][2] == [1, 0]
    with pytest.raises(ValueError, match="format"):
        r.to_sentence_transformers(qt, ct, "quadruplet")
    with pytest.raises(ValueError, match="queries_text"):
        r.to_sentence_transformers(qt[:2], ct)
    with pytest.raises(ValueError, match="corpus_text"):
        r.to_sentence_transformers(qt, ct[:3])


def test_sentence_transformers_dataset():
    datasets = pytest.importorskip("datasets")
    ds = _small_result().to_sentence_transformers(["qa", "qb", "qc"], [f"d{j}" for j in range(9)], "n-tuple")
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["anchor", "positive", "negative_1", "negative_2"]
    assert len(ds) == 3


# ------------------------------------------------------------------------------------------------------
# CLI


def _cli(argv):
    parser = argparse.ArgumentParser(prog="hnsample mine")
    mining_cli.add_arguments(parser)
    return parser, mining_cli.run(parser.parse_args(argv))


def test_cli_mines_and_writes(tmp_path, capsys):
    q, c, pos = _data()
    np.save(tmp_path / "q.npy", q.numpy())
    np.save(tmp_path / "c.npy", c.numpy())
    lines = [f"{i}\t{j}\n" for i in range(23) for j in pos[i].tolist() if j >= 0]
    (tmp_path / "qrels.tsv").write_text("".join(lines))
    argv = ["--queries", str(tmp_path / "q.npy"), "--corpus", str(tmp_path / "c.npy"), "--positives",
            str(tmp_path / "qrels.tsv"), "--num-negatives", "4", "--relative-margin", "0.05",
            "--skip-top", "2",
            "--pool", "30", "--sampling", "softmax", "--temperature", "0.05", "--seed", "3", "--out",
            str(tmp_path / "neg.npz"), "--checkpoint-dir", str(tmp_path / "ck"), "--device", "cpu",
            "--query-batch-size", "8", "--no-progress", "--filter-stats"]
    _, rc = _cli(argv)
    assert rc == 0
    assert "Positive" in capsys.readouterr().out
    got = MinedNegatives.load(tmp_path / "neg.npz")
    ref = hnsample.topk_similarity(q, c, 4, metric="cosine", positives=pos, relative_margin=0.05, skip_top=2,
                                   pool=30, sampling="softmax", temperature=0.05, seed=3)
    assert torch.equal(got.indices, ref.indices)
    assert len(list((tmp_path / "ck").glob("batch_*.npz"))) == 3
    argv[argv.index("--num-negatives") + 1] = "5"
    _, rc = _cli(argv + ["--quiet"])
    assert rc == 2
    assert "different parameters" in capsys.readouterr().err


def test_cli_help_documents_every_flag():
    parser = argparse.ArgumentParser(prog="hnsample mine")
    mining_cli.add_arguments(parser)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.option_strings
    text = parser.format_help()
    for flag in ("--queries", "--corpus", "--positives", "--num-negatives", "--relative-margin", "--skip-top",
                 "--pool", "--sampling", "--temperature", "--out", "--checkpoint-dir", "--device"):
        assert flag in text


def test_progress_bar(capsys):
    pytest.importorskip("tqdm")
    q, c, pos = _data()
    mine_hard_negatives(q, c, pos, num_negatives=2, device="cpu", query_batch_size=5, progress=True,
                        verbose=False)
    err = capsys.readouterr().err
    assert "Mining hard negatives" in err and "23/23" in err
