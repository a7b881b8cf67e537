"""``hnsample mine`` as a new user finds it: --help, string ids in the outputs, texts in TSV/JSONL and a
sentence-transformers dataset written directly, TREC files separated by spaces, a reranker's candidate
scores, and resuming with --filter-stats."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
import torch

import hnsample
from hnsample import mining_cli
from hnsample.mining_io import read_candidate_scores, read_qrels
from hnsample.texts import normalize_text, positive_duplicates, read_texts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hnsample mine")
    mining_cli.add_arguments(p)
    return p


def _mine(capsys, *argv: str) -> tuple[int, str, str]:
    args = _parser().parse_args(list(argv))
    rc = mining_cli.run(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_help_states_each_default_once():
    text = _parser().format_help()
    assert "(default: None)" not in text
    for block in re.split(r"\n  (?=-)", text):
        assert block.count("default") <= 1, block
    flat = " ".join(text.split())
    assert "(default: 2**22)" in flat and "(default: 16384)" in flat and "(default: 0.05" in flat


@pytest.fixture
def files(tmp_path):
    """Embeddings, BEIR-style JSONL queries, a TSV corpus with ids, TREC qrels separated by spaces."""
    g = torch.Generator().manual_seed(0)
    b, n, d = 6, 30, 8
    c = torch.randn(n, d, generator=g)
    pos = torch.arange(b) * 4
    q = c[pos] + 0.3 * torch.randn(b, d, generator=g)
    np.save(tmp_path / "q.npy", q.numpy())
    np.save(tmp_path / "c.npy", c.numpy())
    qids, cids = [f"q{i}" for i in range(b)], [f"doc-{j}" for j in range(n)]
    ctexts = [f"document number {j} about topic {j % 5}" for j in range(n)]
    ctexts[1] = "  DOCUMENT number 0 about   topic 0 "  # repeats query 0's positive's text
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": f"question {i}", "title": ""})
                                                    + "\n" for i in qids))
    (tmp_path / "corpus.tsv").write_text("".join(f"{i}\t{t}\n" for i, t in zip(cids, ctexts, strict=True)))
    (tmp_path / "qrels.txt").write_text("".join(f"{qids[i]} 0 {cids[int(pos[i])]} 1\n" for i in range(b)))
    return dict(tmp=tmp_path, q=q, c=c, pos=pos, qids=qids, cids=cids, ctexts=ctexts)


def test_texts_ids_and_a_dataset_in_one_command(capsys, files):
    datasets = pytest.importorskip("datasets")
    t = files["tmp"]
    rc, out, err = _mine(capsys, "--queries", str(t / "q.npy"), "--corpus", str(t / "c.npy"), "--positives",
                         str(t / "qrels.txt"), "--queries-text", str(t / "queries.jsonl"), "--corpus-text",
                         str(t / "corpus.tsv"), "--num-negatives", "3", "--out", str(t / "neg.jsonl"),
                         "--dataset-out", str(t / "train.jsonl"), "--dataset-format", "n-tuple", "--dataset-scores",
                         "--device", "cpu", "--no-progress")
    assert rc == 0, err
    records = [json.loads(line) for line in (t / "neg.jsonl").read_text().splitlines()]
    assert [r["query"] for r in records] == files["qids"]  # named by the ids of the text files
    assert records[0]["positives"] == ["doc-0"]
    assert all(re.fullmatch(r"doc-\d+", x) for r in records for x in r["negatives"])
    assert "doc-1" not in records[0]["negatives"]  # the positive's text written again is never a negative
    train = datasets.load_dataset("json", data_files=str(t / "train.jsonl"), split="train")
    assert train.column_names == ["anchor", "positive", "negative_1", "negative_2", "negative_3", "scores"]
    assert train[0]["anchor"] == "question q0" and train[0]["positive"] == files["ctexts"][0]
    want = hnsample.mine_hard_negatives(files["q"], files["c"], files["pos"][:, None], num_negatives=3,
                                        exclude=[[1]] + [[]] * 5, device="cpu", progress=False, verbose=False)
    assert [[files["cids"][j] for j in row] for row in want.indices.tolist()] == [r["negatives"] for r in records]
    assert train[0]["scores"][0] == pytest.approx(float(want.positive_pair_scores[0, 0]), abs=1e-6)


def test_row_numbers_name_rows_when_there_are_no_ids(capsys, files):
    t = files["tmp"]
    np.save(t / "pos.npy", files["pos"][:, None].numpy())
    rc, _, err = _mine(capsys, "--queries", str(t / "q.npy"), "--corpus", str(t / "c.npy"), "--positives",
                       str(t / "pos.npy"), "--out", str(t / "neg.jsonl"), "--device", "cpu", "--no-progress",
                       "--quiet")
    assert rc == 0, err
    first = json.loads((t / "neg.jsonl").read_text().splitlines()[0])
    assert first["query"] == 0 and first["positives"] == [0]


def test_candidate_scores_from_a_reranker(capsys, files):
    t = files["tmp"]
    g = torch.Generator().manual_seed(1)
    lines, trec = [], []
    lists = {}
    for i, qid in enumerate(files["qids"]):
        listed = torch.randperm(30, generator=g)[:10].tolist()
        if int(files["pos"][i]) not in listed:
            listed[0] = int(files["pos"][i])  # the reranker scored the positive too
        scores = (torch.randint(0, 64, (10,), generator=g).double() / 16).tolist()
        lists[i] = (listed, scores)
        for rank, (j, s) in enumerate(zip(listed, scores, strict=True)):
            lines.append(f"{qid}\t{files['cids'][j]}\t{s}")
            trec.append(f"{qid} Q0 {files['cids'][j]} {rank + 1} {s} myrun")
    (t / "reranked.tsv").write_text("\n".join(lines) + "\n")
    (t / "reranked.run").write_text("\n".join(trec) + "\n")
    (t / "qids.txt").write_text("\n".join(files["qids"]) + "\n")
    (t / "cids.txt").write_text("\n".join(files["cids"]) + "\n")
    ids = torch.tensor([lists[i][0] for i in range(6)])
    scores = torch.tensor([lists[i][1] for i in range(6)], dtype=torch.float32)
    want = hnsample.topk_from_candidates(ids, scores, 3, num_candidates=30, positives=files["pos"][:, None],
                                         relative_margin=0.1)
    for name in ("reranked.tsv", "reranked.run"):
        rc, out, err = _mine(capsys, "--candidates-scores", str(t / name), "--positives", str(t / "qrels.txt"),
                             "--query-ids", str(t / "qids.txt"), "--corpus-ids", str(t / "cids.txt"),
                             "--relative-margin", "0.1", "--num-negatives", "3", "--filter-stats",
                             "--out", str(t / "neg.npz"))
        assert rc == 0, err
        got = hnsample.MinedNegatives.load(t / "neg.npz")
        assert torch.equal(got.indices, want.indices), name
        assert got.filter_counts["positives"] == 6 and "removed: margin" in out
        assert got.query_ids == files["qids"]


def test_candidate_scores_errors_name_the_line(tmp_path):
    (tmp_path / "bad.tsv").write_text("0\t1\t0.5\n0\t9\t0.25\n")
    with pytest.raises(ValueError, match=r"bad.tsv' line 2: unknown corpus id '9'"):
        read_candidate_scores(tmp_path / "bad.tsv", 2, 5)
    (tmp_path / "twice.tsv").write_text("0\t1\t0.5\n1\t2\t1\n0\t1\t0.25\n")
    with pytest.raises(ValueError, match=r"twice.tsv' line 3: corpus id '1' is listed twice for query '0'"):
        read_candidate_scores(tmp_path / "twice.tsv", 2, 5)
    (tmp_path / "nan.tsv").write_text("0\t1\tnan\n")
    with pytest.raises(ValueError, match=r"line 1: score 'nan' is not a finite number"):
        read_candidate_scores(tmp_path / "nan.tsv", 2, 5)
    (tmp_path / "c.jsonl").write_text(json.dumps({"query": 1, "candidates": [3, 0], "scores": [0.5, 0.75]}) + "\n")
    ids, scores = read_candidate_scores(tmp_path / "c.jsonl", 2, 5)
    assert ids.tolist() == [[-1, -1], [3, 0]] and scores[1].tolist() == [0.5, 0.75]


def test_candidate_scores_without_sizes_is_an_error(capsys, tmp_path):
    (tmp_path / "r.tsv").write_text("0\t1\t0.5\n")
    rc, _, err = _mine(capsys, "--candidates-scores", str(tmp_path / "r.tsv"), "--out", str(tmp_path / "o.npz"))
    assert rc == 2 and "needs the number of queries" in err
    rc, _, err = _mine(capsys, "--out", str(tmp_path / "o.npz"))
    assert rc == 2 and "--queries and --corpus are required" in err
    rc, _, err = _mine(capsys, "--queries", "q.npy", "--corpus", "c.npy", "--out", str(tmp_path / "o.npz"),
                       "--dataset-out", str(tmp_path / "t.jsonl"))
    assert rc == 2 and "--dataset-out needs --queries-text and --corpus-text" in err


def test_trec_qrels_separated_by_spaces(tmp_path):
    (tmp_path / "qrels").write_text("q1 0 d2 1\nq0 0 d0 2\nq0 0 d1 0\n")
    got = read_qrels(tmp_path / "qrels", 2, 3, ["q0", "q1"], ["d0", "d1", "d2"])
    assert got == [[0], [2]]
    (tmp_path / "two").write_text("q0  d1\n")
    assert read_qrels(tmp_path / "two", 2, 3, ["q0", "q1"], ["d0", "d1", "d2"]) == [[1], []]
    (tmp_path / "bad").write_text("q0 0 d1 1 extra junk\n")
    with pytest.raises(ValueError, match=r"line 1: expected 2-4 tab- or space-separated columns, got 6"):
        read_qrels(tmp_path / "bad", 2, 3, ["q0", "q1"], ["d0", "d1", "d2"])


def test_resume_with_filter_stats_added(capsys, files):
    t = files["tmp"]
    np.save(t / "pos.npy", files["pos"][:, None].numpy())
    argv = ["--queries", str(t / "q.npy"), "--corpus", str(t / "c.npy"), "--positives", str(t / "pos.npy"),
            "--out", str(t / "neg.npz"), "--checkpoint-dir", str(t / "ckpt"), "--query-batch-size", "2",
            "--device", "cpu", "--no-progress", "--relative-margin", "0.05"]
    assert _mine(capsys, *argv)[0] == 0
    rc, out, err = _mine(capsys, *argv, "--filter-stats")
    assert rc == 0, err
    assert "removed: margin" in out


def test_text_files(tmp_path):
    (tmp_path / "plain.tsv").write_text("first text\nsecond text\n")
    assert read_texts("corpus_text", tmp_path / "plain.tsv") == (None, ["first text", "second text"])
    (tmp_path / "ids.tsv").write_text("a\tfirst\tpart\nb\tsecond\n")
    assert read_texts("corpus_text", tmp_path / "ids.tsv") == (["a", "b"], ["first\tpart", "second"])
    (tmp_path / "mixed.tsv").write_text("a\tfirst\nno tab here\n")
    with pytest.raises(ValueError, match=r"mixed.tsv' line 2: expected id<TAB>text"):
        read_texts("corpus_text", tmp_path / "mixed.tsv")
    (tmp_path / "dup.jsonl").write_text('{"_id": "x", "text": "a"}\n{"id": "x", "text": "b"}\n')
    with pytest.raises(ValueError, match=r"id 'x' appears twice"):
        read_texts("corpus_text", tmp_path / "dup.jsonl")
    (tmp_path / "notext.jsonl").write_text('{"_id": "x", "title": "a"}\n')
    with pytest.raises(ValueError, match=r"line 1: expected an object with a string \"text\""):
        read_texts("corpus_text", tmp_path / "notext.jsonl")


def test_normalized_duplicates():
    assert normalize_text("  Hello\tWORLD \n") == "hello world"
    corpus = ["Paris is big.", "paris  is BIG.", "Rome is old.", "Paris is big. "]
    assert positive_duplicates([[0], [2], [1, 0], []], corpus) == [[1, 3], [], [3], []]
