"""What mining hands a user: per-pair positive scores, result files named by string ids that
datasets/pandas read as they are, file modes, resuming with or without filter statistics, filter
statistics whose shares add up, and the defaults and warnings of margins and softmax sampling."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import torch

from hnsample import MinedNegatives, mine_hard_negatives
from hnsample.mining import DEFAULT_TEMPERATURE

QUIET = dict(progress=False, verbose=False, device="cpu")


def _data(b=12, n=60, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, c = torch.randn(b, d, generator=g), torch.randn(n, d, generator=g)
    pos = torch.randint(0, n, (b, 3), generator=g)
    pos[::3, 2] = -1
    pos[1, 1:] = -1
    return q, c, pos


def test_each_positive_carries_its_own_score():
    q, c, pos = _data()
    r = mine_hard_negatives(q, c, pos, num_negatives=3, metric="dot", **QUIET)
    want = torch.einsum("bd,bpd->bp", q, c[pos.clamp_min(0)])
    want[pos < 0] = math.nan
    torch.testing.assert_close(r.positive_pair_scores, want, equal_nan=True)
    # the margin's reference stays the row minimum
    torch.testing.assert_close(r.positive_scores, torch.where(pos >= 0, want, math.inf).amin(dim=1))
    qt, ct = [f"q{i}" for i in range(12)], [f"d{j}" for j in range(60)]
    for fmt, col in (("triplet", "scores"), ("labeled-pair", "score"), ("labeled-list", "scores")):
        ds = r.to_sentence_transformers(qt, ct, fmt, output_scores=True)
        first = {}
        for a, p, s in zip(ds["anchor"], ds["positive"], ds[col], strict=True):
            if fmt == "labeled-pair":
                first.setdefault((a, p), s)
            else:
                first.setdefault((a, p if isinstance(p, str) else p[0]), s[0])
        for i in range(12):
            for t, j in enumerate(pos[i].tolist()):
                if j >= 0 and (f"q{i}", f"d{j}") in first:
                    assert first[(f"q{i}", f"d{j}")] == pytest.approx(float(want[i, t]), abs=1e-6), (fmt, i, t)


def test_files_name_the_string_ids_and_load_as_tables(tmp_path):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("pyarrow")
    q, c, pos = _data()
    qids, cids = [f"query-{i}" for i in range(12)], [f"doc-{j}" for j in range(60)]
    r = mine_hard_negatives(q, c, pos, num_negatives=4, query_ids=qids, corpus_ids=cids, **QUIET)
    assert r.query_ids == qids and r.corpus_ids == cids
    for ext in (".jsonl", ".parquet", ".npz"):
        path = tmp_path / f"r{ext}"
        r.save(path)
        back = MinedNegatives.load(path)
        assert torch.equal(back.indices, r.indices) and torch.equal(back.positives, r.positives)
        torch.testing.assert_close(back.positive_pair_scores, r.positive_pair_scores, equal_nan=True)
        assert back.query_ids == qids and back.corpus_ids == cids
    first = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])
    assert "meta" not in first
    assert first["query"] == "query-0"
    assert first["negatives"] == [cids[j] for j in r.indices[0].tolist()]
    assert first["positives"] == [cids[j] for j in pos[0].tolist() if j >= 0]
    for kind, path in (("json", tmp_path / "r.jsonl"), ("parquet", tmp_path / "r.parquet")):
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
        assert table.num_rows == 12 and table[3]["query"] == "query-3"
        assert table[3]["negatives"] == [cids[j] for j in r.indices[3].tolist()]
    pd = pytest.importorskip("pandas")
    frame = pd.read_json(tmp_path / "r.jsonl", lines=True)
    assert list(frame["query"]) == qids


def test_files_without_ids_use_row_numbers_and_drop_padding(tmp_path):
    q, c, pos = _data()
    r = mine_hard_negatives(q, c, pos, num_negatives=4, skip_top=55, **QUIET)  # rows come up short
    r.save(tmp_path / "r.jsonl")
    recs = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [rec["query"] for rec in recs] == list(range(12))
    for rec, row in zip(recs, r.indices.tolist(), strict=True):
        assert rec["negatives"] == [j for j in row if j >= 0]
        assert len(rec["scores"]) == len(rec["negatives"])


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_files_get_the_users_umask(tmp_path, mask):
    q, c, pos = _data()
    old = os.umask(mask)
    try:
        r = mine_hard_negatives(q, c, pos, num_negatives=2, checkpoint_dir=tmp_path / "ckpt", query_batch_size=5,
                                **QUIET)
        for ext in (".jsonl", ".npz", ".parquet"):
            r.save(tmp_path / f"r{ext}")
    finally:
        os.umask(old)
    paths = [tmp_path / "r.jsonl", tmp_path / "r.jsonl.meta.json", tmp_path / "r.npz", tmp_path / "r.parquet",
             tmp_path / "ckpt" / "manifest.json", tmp_path / "ckpt" / "batch_0000000.npz"]
    for p in paths:
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p


def test_resume_is_not_refused_when_only_filter_statistics_differ(tmp_path):
    q, c, pos = _data()
    kw = dict(num_negatives=3, relative_margin=0.05, query_batch_size=5, checkpoint_dir=tmp_path, **QUIET)
    plain = mine_hard_negatives(q, c, pos, **kw)
    stats = mine_hard_negatives(q, c, pos, filter_statistics=True, **kw)  # batches without counts are redone
    fresh = mine_hard_negatives(q, c, pos, filter_statistics=True, **{**kw, "checkpoint_dir": tmp_path / "new"})
    assert stats.filter_counts == fresh.filter_counts
    assert torch.equal(stats.indices, plain.indices)
    again = mine_hard_negatives(q, c, pos, **kw)  # files holding counts serve a run without them
    assert torch.equal(again.indices, plain.indices) and again.filter_counts is None


def test_filter_statistics_shares_add_up():
    q, c, pos = _data(b=20, n=80)
    r = mine_hard_negatives(q, c, pos, num_negatives=3, relative_margin=0.05, max_score=1.5, skip_top=4,
                            filter_statistics=True, metric="dot", **QUIET)
    table = r.summary()
    rows = re.findall(r"^(removed: \w+|skipped: skip_top|eligible after skip)\s+([\d,]+)\s+([\d.]+)%$", table,
                      flags=re.M)
    assert len(rows) == 9
    counts = [int(n.replace(",", "")) for _, n, _ in rows]
    assert sum(counts) == 20 * 80
    assert sum(float(s) for _, _, s in rows) == pytest.approx(100, abs=0.06)
    assert re.search(r"^total\s+1,600\s+100\.00%$", table, flags=re.M)
    assert counts[-2] == r.filter_counts["skip_top"] and counts[-1] == r.filter_counts["eligible"] - counts[-2]


def test_a_margin_without_a_positive_score_is_an_error():
    q, c, pos = _data()
    for kw in (dict(relative_margin=0.05), dict(absolute_margin=0.0)):
        with pytest.raises(ValueError, match="needs a positive score"):
            mine_hard_negatives(q, c, None, num_negatives=2, **kw, **QUIET)
        with pytest.raises(ValueError, match="needs a positive score"):
            mine_hard_negatives(q, c, torch.zeros(12, 0, dtype=torch.int64), num_negatives=2, **kw, **QUIET)
    mine_hard_negatives(q, c, None, num_negatives=2, relative_margin=0.05, positive_scores=torch.ones(12), **QUIET)
    pos[4] = -1
    pos[7] = -1
    with pytest.warns(UserWarning, match=r"queries \[4, 7\] \(2 of 12\) have no positive"):
        mine_hard_negatives(q, c, pos, num_negatives=2, relative_margin=0.05, **QUIET)


def test_softmax_temperature_default_suits_cosine_and_warns_for_dot():
    q, c, pos = _data()
    r = mine_hard_negatives(q, c, pos, num_negatives=3, sampling="softmax", seed=1, **QUIET)
    assert r.params["temperature"] == DEFAULT_TEMPERATURE == 0.05
    explicit = mine_hard_negatives(q, c, pos, num_negatives=3, sampling="softmax", seed=1, temperature=0.05, **QUIET)
    assert torch.equal(r.indices, explicit.indices)
    with pytest.warns(UserWarning, match="softmax sampling without a temperature"):
        mine_hard_negatives(q, c, pos, num_negatives=3, sampling="softmax", seed=1, metric="dot", **QUIET)


def test_id_lists_are_checked_without_qrels():
    q, c, pos = _data()
    with pytest.raises(ValueError, match=r"query_ids must have one id per row \(12\), got 2"):
        mine_hard_negatives(q, c, pos, num_negatives=2, query_ids=["a", "b"], **QUIET)
    with pytest.raises(ValueError, match="corpus_ids has a duplicate id 'x'"):
        mine_hard_negatives(q, c, pos, num_negatives=2, corpus_ids=["x"] * 60, **QUIET)


def test_saved_parquet_keeps_ids_in_its_metadata(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    q, c, pos = _data()
    r = mine_hard_negatives(q, c, pos, num_negatives=2, query_ids=[f"q{i}" for i in range(12)], **QUIET)
    r.save(tmp_path / "r.parquet")
    meta = json.loads(pq.read_table(tmp_path / "r.parquet").schema.metadata[b"hnsample"])
    assert meta["query_ids"][:2] == ["q0", "q1"] and meta["corpus_ids"] is None
    assert np.array_equal(MinedNegatives.load(tmp_path / "r.parquet").indices.numpy(), r.indices.numpy())
