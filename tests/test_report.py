"""The peer benchmark report: its building blocks agree with plain torch, it writes its markdown and
JSON, and it reports a missing peer or a missing hnsample function instead of failing."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

_SPEC = importlib.util.spec_from_file_location("report", Path(__file__).resolve().parents[1] / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(_SPEC)
sys.modules["report"] = report  # dataclasses look their module up while the file runs
_SPEC.loader.exec_module(report)


def _args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    args = parser.parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def _brute_same_label(labels: torch.Tensor) -> list[list[int]]:
    n = len(labels)
    return [sorted(j for j in range(n) if j != i and labels[j] == labels[i]) for i in range(n)]


@pytest.mark.parametrize("labels", [[3, 1, 3, 3, 2, 1, 7], [0, 0, 0, 0], [5, 6, 7], [4]], ids=str)
def test_same_label_ids_lists_each_rows_group(labels):
    labels = torch.tensor(labels)
    got = report.same_label_ids(labels)
    assert got.shape[0] == len(labels)
    assert [sorted(int(j) for j in row if j >= 0) for row in got] == _brute_same_label(labels)


def test_same_label_ids_empty():
    assert report.same_label_ids(torch.empty(0, dtype=torch.long)).shape == (0, 0)


@pytest.mark.parametrize("per_label", [1, 2, 4])
def test_batch_hard_matches_the_full_matrix_miner(per_label):
    g = torch.Generator().manual_seed(per_label)
    x = torch.randn(48, 12, generator=g)
    labels = torch.randperm(48, generator=g) // per_label
    pos, neg = report.batch_hard_hnsample(x, labels)
    rpos, rneg = report.batch_hard_naive(x, labels)
    assert torch.equal(pos, rpos) and torch.equal(neg, rneg)
    assert bool((pos == -1).all()) == (per_label == 1)


def test_faiss_post_filter_drops_positives():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(20, 8, generator=g), torch.randn(300, 8, generator=g)
    # Each query's positive is its own best candidate, so the filter has something to drop.
    pos = (q @ c.T).argmax(dim=1, keepdim=True)
    got = report._faiss_topk(q, c, pos, 5)
    assert torch.equal(got, report._masked_topk(q, c, pos, 5))


def test_rows_equal_fraction():
    a = torch.tensor([[1, 2], [3, 4], [5, 6]])
    assert report.rows_equal_fraction(a, a) == 1.0
    assert report.rows_equal_fraction(a, torch.tensor([[1, 2], [4, 3], [5, 6]])) == pytest.approx(2 / 3)
    assert report.rows_equal_fraction(a, a[:2]) == 0.0


def test_quick_report_writes_tables_and_json(tmp_path, monkeypatch):
    out = tmp_path / "r" / "report.md"
    monkeypatch.setattr(sys, "argv", ["report.py"])
    assert report.run(_args(quick=True, repeats=1, out=out)) == 0
    text = out.read_text()
    for sec in report.SECTIONS.values():
        if not sec.missing():
            assert f"## {sec.title}" in text
    raw = json.loads(out.with_suffix(".json").read_text())
    rows = [r for rs in raw["results"].values() for r in rs]
    ran = [r for r in rows if r["skipped"] is None]
    assert {r["method"] for r in ran} >= {"hnsample", "torch naive"}
    # Exact methods on random float data (no ties) must agree row for row with the reference.
    assert all(r["agreement"] == 1.0 for r in ran), [(r["method"], r["agreement"]) for r in ran]
    assert all(r["median_s"] > 0 and r["peak_mb"] >= 0 and len(r["times_s"]) == 1 for r in ran)
    assert "| 1,000 | hnsample |" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not list(tmp_path.glob("r/*.png"))
    else:
        assert sorted(p.name for p in tmp_path.glob("r/*.png")) == sorted(
            f"report_{n}.png" for n, s in report.SECTIONS.items() if not s.missing())


def test_missing_peer_is_reported_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    out = tmp_path / "report.md"
    result = report.run_report(["corpus_topk"], report.Settings(torch.device("cpu"), repeats=1, quick=True),
                               out, "test", log=lambda _: None)
    rows = result["results"]["corpus_topk"]
    skipped = [r for r in rows if r.method == "faiss IndexFlatIP"]
    assert skipped and all("faiss-cpu is not installed" in r.skipped for r in skipped)
    assert all(r.median_s is not None for r in rows if r.method == "hnsample")
    assert "not run: faiss-cpu is not installed" in out.read_text()


def test_section_needing_a_missing_function_is_listed(tmp_path, monkeypatch):
    def never_called(settings):
        raise AssertionError("a section with a missing requirement must not run")

    sec = report.Section("needs_x", "Needs x", "N", "", never_called, requires=("no_such_function",))
    monkeypatch.setitem(report.SECTIONS, "needs_x", sec)
    out = tmp_path / "report.md"
    settings = report.Settings(torch.device("cpu"))
    result = report.run_report(["needs_x"], settings, out, "test", log=lambda _: None)
    assert "needs_x" in result["not_run"]
    assert "Not run: needs hnsample.no_such_function" in out.read_text()


def test_section_names_are_unique():
    with pytest.raises(ValueError, match="registered twice"):
        report.section("corpus_topk", "again", "N")(lambda settings: [])


@pytest.mark.parametrize("kw, match", [
    ({"sections": "corpus_topk,nope"}, "sections: unknown"),
    ({"repeats": 0}, "repeats must be >= 1"),
    ({"max_matrix_gb": 0.0}, "max_matrix_gb must be > 0"),
])
def test_bad_arguments(kw, match, capsys):
    with pytest.raises(ValueError, match=match):
        report.settings_from(_args(**kw))
    assert report.run(_args(**kw)) == 2
    assert match in capsys.readouterr().err


def test_matrix_guard_skips_the_dense_method(tmp_path):
    settings = report.Settings(torch.device("cpu"), repeats=1, quick=True, max_matrix_gb=1e-4)
    rows = report.corpus_topk(settings)
    naive = [r for r in rows if r.method == "torch naive"]
    assert naive and all(r.skipped and "score matrix" in r.skipped for r in naive)


def test_method_needing_a_missing_function_is_skipped():
    m = report.Method("x", lambda inputs: lambda: None, needs="no_such_function")
    assert report.missing_peer(m) == "this build has no hnsample.no_such_function"
    present = report.Method("y", lambda inputs: lambda: None, needs="topk_similarity")
    assert report.missing_peer(present) is None
