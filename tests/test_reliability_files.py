"""Files that outlive a process: checkpoint directories (manifest binding, validation of every batch
file, temp-file cleanup, the directory lock, kills mid-write), result files read back by query id, and
the one-line errors of ``hnsample mine`` for bad input files."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from hnsample import mining_cli
from hnsample.mining import MinedNegatives, mine_hard_negatives

QUIET = dict(progress=False, verbose=False)
B, N, D, QB, K = 22, 97, 8, 5, 4
BATCH1 = "batch_0000001.npz"


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, c = torch.randn(B, D, generator=g), torch.randn(N, D, generator=g)
    pos = torch.randint(0, N, (B, 2), generator=g)
    return q, c, pos


def _mine(q, c, pos, ck=None, **kw):
    args = dict(num_negatives=K, query_batch_size=QB, device="cpu", relative_margin=0.05, skip_top=1)
    args.update(kw)
    return mine_hard_negatives(q, c, pos, checkpoint_dir=ck, **args, **QUIET)


def _same(a: MinedNegatives, b: MinedNegatives) -> bool:
    return torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)


# ----------------------------------------------------------------------------------------------------
# checkpoints: which batch files may be reused


def test_batch_files_without_a_manifest_are_refused(tmp_path):
    q, c, pos = _data()
    _mine(q, c, pos, tmp_path)
    (tmp_path / "manifest.json").unlink()
    q2, c2, pos2 = _data(seed=1)  # another corpus: reusing the batches would return the old run
    with pytest.raises(ValueError, match=r"holds 5 batch file\(s\) \(first: batch_0000000.npz\) but no "
                                         r"manifest.json.*never reused"):
        _mine(q2, c2, pos2, tmp_path)
    assert not (tmp_path / "manifest.json").exists()  # nothing written into the refused directory


def test_a_batch_file_of_another_run_is_refused(tmp_path):
    q, c, pos = _data()
    _mine(q, c, pos, tmp_path / "a", relative_margin=0.2)
    _mine(q, c, pos, tmp_path / "b")
    os.replace(tmp_path / "a" / BATCH1, tmp_path / "b" / BATCH1)  # same shapes, other parameters
    with pytest.raises(ValueError, match=rf"{BATCH1}' was written under another manifest"):
        _mine(q, c, pos, tmp_path / "b")


def _rewrite(path, **changes):
    with np.load(path) as z:
        arrays = {name: z[name] for name in z.files}
    arrays.update(changes)
    np.savez(path, **arrays)


@pytest.mark.parametrize("change, problem", [
    (lambda a: {"indices": a["indices"][:3], "scores": a["scores"][:3]},
     r"holds indices of shape \(3, 4\) and dtype int64, expected \(5, 4\)"),
    (lambda a: {"indices": a["indices"][:, :2], "scores": a["scores"][:, :2]}, r"indices of shape \(5, 2\)"),
    (lambda a: {"positive_scores": a["positive_scores"][:1]}, r"positive_scores of shape \(1,\)"),
    (lambda a: {"indices": a["indices"].astype(np.int32)}, r"indices of shape \(5, 4\) and dtype int32"),
    (lambda a: {"indices": np.where(a["indices"] >= 0, 10**9, -1)}, r"indices outside \[-1, 97\)"),
    (lambda a: {"indices": np.full_like(a["indices"], -2)}, r"indices outside \[-1, 97\)"),
    (lambda a: {"indices": np.full_like(a["indices"], 7)}, r"the same corpus id twice"),
    (lambda a: {"scores": np.full_like(a["scores"], np.nan)}, r"a NaN score for a found negative"),
    (lambda a: {"indices": np.full_like(a["indices"], -1)}, r"padding \(index -1\) whose score is not -inf"),
    (lambda a: {"checkpoint_batch": np.array(3)}, r"holds batch 3, not batch 1"),
    (lambda a: {"extra": np.zeros(2)}, r"holds the arrays \[.*'extra'"),
])
def test_every_batch_file_is_validated_on_read(tmp_path, change, problem):
    q, c, pos = _data()
    _mine(q, c, pos, tmp_path)
    path = tmp_path / BATCH1
    with np.load(path) as z:
        arrays = {name: z[name] for name in z.files}
    _rewrite(path, **change(arrays))
    with pytest.raises(ValueError, match=rf"checkpoint batch file '.*{BATCH1}' (holds )?{problem}.*delete it"):
        _mine(q, c, pos, tmp_path)


@pytest.mark.parametrize("content", [b"", b"garbage" * 20, None], ids=["empty", "garbage", "truncated"])
def test_unreadable_batch_files_name_the_file(tmp_path, content):
    q, c, pos = _data()
    direct = _mine(q, c, pos)
    _mine(q, c, pos, tmp_path)
    path = tmp_path / BATCH1
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content is None else content)
    with pytest.raises(ValueError, match=rf"checkpoint batch file '.*{BATCH1}' cannot be read"):
        _mine(q, c, pos, tmp_path)
    path.unlink()  # the documented remedy: the batch is recomputed
    assert _same(_mine(q, c, pos, tmp_path), direct)


def test_a_damaged_manifest_names_the_file(tmp_path):
    q, c, pos = _data()
    _mine(q, c, pos, tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": 2, "queries"')
    with pytest.raises(ValueError, match=r"checkpoint manifest '.*manifest.json' is not valid JSON"):
        _mine(q, c, pos, tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"manifest.json' is not a JSON object"):
        _mine(q, c, pos, tmp_path)


def test_a_filter_statistics_batch_is_validated_too(tmp_path):
    q, c, pos = _data()
    _mine(q, c, pos, tmp_path, filter_statistics=True)
    with np.load(tmp_path / BATCH1) as z:
        counts = z["filter_counts"]
    _rewrite(tmp_path / BATCH1, filter_counts=counts - 1000)
    with pytest.raises(ValueError, match="filter counts below 0"):
        _mine(q, c, pos, tmp_path, filter_statistics=True)


# ----------------------------------------------------------------------------------------------------
# checkpoints: temp files, kills and the directory lock


def test_stale_temp_files_are_removed_when_a_run_opens_the_directory(tmp_path):
    q, c, pos = _data()
    _mine(q, c, pos, tmp_path)
    (tmp_path / BATCH1).unlink()
    stale = [tmp_path / ".batch_0000001.npz.k2j4x1.tmp", tmp_path / ".manifest.json.a8f0.tmp"]
    for p in stale:
        p.write_bytes(b"PK\x03\x04 partial")
    (tmp_path / "notes.txt").write_text("kept")
    _mine(q, c, pos, tmp_path)
    assert not any(p.exists() for p in stale)
    assert (tmp_path / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lock", *(f"batch_{i:07d}.npz" for i in range(5)), "manifest.json", "notes.txt"]


KILLED_WRITE = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from hnsample.checkpoint import atomic_write
    def half_then_die(f):
        f.write(open(sys.argv[2], "rb").read()[:300])
        f.flush()
        os._exit(9)
    atomic_write(Path(sys.argv[1]), half_then_die)
""")


def test_a_write_killed_midway_leaves_nothing_that_reads_as_a_batch(tmp_path):
    q, c, pos = _data()
    direct = _mine(q, c, pos)
    _mine(q, c, pos, tmp_path)
    good = tmp_path / BATCH1
    (tmp_path / "good.bin").write_bytes(good.read_bytes())
    good.unlink()
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(good), str(tmp_path / "good.bin")],
                          capture_output=True, cwd=tmp_path)
    assert proc.returncode == 9, proc.stderr
    assert not good.exists() and any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert _same(_mine(q, c, pos, tmp_path), direct)
    assert good.exists() and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


HOLDER = textwrap.dedent("""
    import sys, time
    from hnsample.checkpoint import CheckpointDir
    d = CheckpointDir(sys.argv[1], {"holder": 1})
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_directory_in_use_is_refused_and_freed_when_its_holder_is_killed(tmp_path):
    from hnsample.checkpoint import CheckpointDir

    q, c, pos = _data()
    ck = tmp_path / "ck"
    with CheckpointDir(ck, {"other": 1}):
        with pytest.raises(ValueError, match=rf"checkpoint_dir '{ck}' is in use by another running process "
                                             rf"\(pid {os.getpid()}\)"):
            _mine(q, c, pos, ck)
    (ck / "manifest.json").unlink()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ck)], stdout=subprocess.PIPE, cwd=tmp_path)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(ValueError, match=rf"in use by another running process \(pid {holder.pid}\)"):
            _mine(q, c, pos, ck)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    (ck / "manifest.json").unlink()
    assert _same(_mine(q, c, pos, ck), _mine(q, c, pos))  # the kernel dropped the dead holder's lock


def test_the_lock_is_released_when_a_run_fails(tmp_path):
    q, c, pos = _data()
    _mine(q, c, pos, tmp_path)
    _rewrite(tmp_path / BATCH1, checkpoint_batch=np.array(2))
    with pytest.raises(ValueError, match="not batch 1"):
        _mine(q, c, pos, tmp_path)
    (tmp_path / BATCH1).unlink()
    _mine(q, c, pos, tmp_path)  # not "in use"


# ----------------------------------------------------------------------------------------------------
# result files: rows placed by query id, everything checked


def _result():
    q, c, pos = _data()
    return _mine(q, c, pos[:, :1].clone(), skip_top=90, num_negatives=6)  # short rows: -1 / -inf padding


def _jsonl_lines(r, tmp_path):
    """The records of r saved as .jsonl (one per line, nothing else: the metadata is in the sidecar)."""
    r.save(tmp_path / "r.jsonl")
    return (tmp_path / "r.jsonl").read_text().splitlines()


def _write_jsonl(tmp_path, name: str, lines: list[str]) -> None:
    """Writes lines as tmp_path/name with a copy of r.jsonl's metadata sidecar beside it."""
    (tmp_path / name).write_text("\n".join(lines) + "\n")
    (tmp_path / f"{name}.meta.json").write_bytes((tmp_path / "r.jsonl.meta.json").read_bytes())


def _equal(a: MinedNegatives, b: MinedNegatives) -> None:
    assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)
    assert torch.equal(a.positives, b.positives)
    torch.testing.assert_close(a.positive_scores, b.positive_scores, equal_nan=True)


def test_parquet_rows_are_placed_by_their_query_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    r = _result()
    assert r.short_rows.numel() > 0
    r.save(tmp_path / "r.parquet")
    table = pq.read_table(tmp_path / "r.parquet")
    shuffled = table.take(pa.array(np.random.default_rng(0).permutation(B)))
    pq.write_table(shuffled, tmp_path / "s.parquet")
    _equal(MinedNegatives.load(tmp_path / "s.parquet"), r)
    pq.write_table(table.take(pa.array([0, 1, 2, 2, *range(4, B)])), tmp_path / "dup.parquet")
    with pytest.raises(ValueError, match=r"dup.parquet': row 3: query 2 appears twice \(also row 2\)"):
        MinedNegatives.load(tmp_path / "dup.parquet")


def test_jsonl_rows_are_placed_by_query_and_gaps_or_repeats_are_refused(tmp_path):
    r = _result()
    records = _jsonl_lines(r, tmp_path)
    _write_jsonl(tmp_path, "rev.jsonl", records[::-1])
    _equal(MinedNegatives.load(tmp_path / "rev.jsonl"), r)
    _write_jsonl(tmp_path, "gap.jsonl", [*records[:3], *records[4:]])
    with pytest.raises(ValueError, match=r"gap.jsonl': no record for queries \[3\] \(1 of 22\)"):
        MinedNegatives.load(tmp_path / "gap.jsonl")
    _write_jsonl(tmp_path, "last.jsonl", records[:-1])
    with pytest.raises(ValueError, match=r"no record for queries \[21\]"):
        MinedNegatives.load(tmp_path / "last.jsonl")
    _write_jsonl(tmp_path, "dup.jsonl", [*records[:4], records[3], *records[4:]])
    with pytest.raises(ValueError, match=r"dup.jsonl': line 5: query 3 appears twice \(also line 4\)"):
        MinedNegatives.load(tmp_path / "dup.jsonl")


def test_jsonl_of_earlier_versions_with_a_meta_line_still_loads(tmp_path):
    r = _result()
    records = _jsonl_lines(r, tmp_path)
    meta = (tmp_path / "r.jsonl.meta.json").read_text()
    (tmp_path / "old.jsonl").write_text("\n".join([json.dumps({"meta": json.loads(meta)}), *records]) + "\n")
    _equal(MinedNegatives.load(tmp_path / "old.jsonl"), r)


@pytest.mark.parametrize("edit, problem", [
    (lambda rec: dict(rec, query=22), r"line 1: query 22 is outside \[0, 22\)"),
    (lambda rec: dict(rec, query="0"), r"line 1: query '0' is a string id but the metadata holds no id list"),
    (lambda rec: dict(rec, negatives=list(range(7)), scores=[0.0] * 7), r"line 1: negatives has 7 entries, more than"),
    (lambda rec: dict(rec, negatives=[1.5] * 6), r"line 1: negatives holds a value that is not an integer"),
    (lambda rec: dict(rec, negatives=[1, 2, 3], scores=[0.5]), r"line 1: scores must be a list as long as negatives"),
    (lambda rec: dict(rec, negatives=[10**9] * 6, scores=[0.0] * 6), r"indices hold ids outside \[-1, 97\)"),
    (lambda rec: {k: v for k, v in rec.items() if k != "positives"}, r"line 1 has no field 'positives'"),
])
def test_jsonl_record_problems_name_the_file_and_line(tmp_path, edit, problem):
    first, *rest = _jsonl_lines(_result(), tmp_path)
    _write_jsonl(tmp_path, "bad.jsonl", [json.dumps(edit(json.loads(first))), *rest])
    with pytest.raises(ValueError, match=rf"result file '.*bad.jsonl': {problem}"):
        MinedNegatives.load(tmp_path / "bad.jsonl")


def test_malformed_result_files_name_the_file(tmp_path):
    records = _jsonl_lines(_result(), tmp_path)
    _write_jsonl(tmp_path, "cut.jsonl", [*records[:5], records[5][:20]])
    with pytest.raises(ValueError, match=r"cut.jsonl': line 6 is not valid JSON"):
        MinedNegatives.load(tmp_path / "cut.jsonl")
    (tmp_path / "bad.npz").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match=r"bad.npz': cannot be read"):
        MinedNegatives.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("change, problem", [
    (lambda a: {"scores": a["scores"][:-1]}, r"scores must be a float array of shape \(22, 6\)"),
    (lambda a: {"positive_scores": a["positive_scores"][:3]}, r"positive_scores must be a float array"),
    (lambda a: {"indices": a["indices"][:-1], "scores": a["scores"][:-1]},
     r"holds 21 rows but its metadata says 22 queries"),
    (lambda a: {"positives": a["positives"][:4]}, r"positives must be an integer array of shape \(22, P\)"),
    (lambda a: {"indices": a["indices"].astype(np.float32)}, r"indices must be a 2-D integer array"),
    (lambda a: {"indices": np.full_like(a["indices"], 97)}, r"indices hold ids outside \[-1, 97\)"),
    (lambda a: {"indices": np.full(a["indices"].shape, 2**64 - 1, np.uint64)}, r"indices hold ids outside"),
])
def test_npz_shape_and_value_mismatches_are_refused(tmp_path, change, problem):
    _result().save(tmp_path / "r.npz")
    with np.load(tmp_path / "r.npz") as z:
        arrays = {name: z[name] for name in z.files}
    arrays.update(change(arrays))
    np.savez(tmp_path / "r.npz", **arrays)
    with pytest.raises(ValueError, match=rf"result file '.*r.npz': {problem}"):
        MinedNegatives.load(tmp_path / "r.npz")


# ----------------------------------------------------------------------------------------------------
# hnsample mine: bad input files are one-line errors with exit status 2


def _cli(tmp_path, *extra):
    q, c, pos = _data()
    np.save(tmp_path / "q.npy", q.numpy())
    np.save(tmp_path / "c.npy", c.numpy())
    np.save(tmp_path / "pos.npy", pos.numpy())
    argv = ["--queries", str(tmp_path / "q.npy"), "--corpus", str(tmp_path / "c.npy"), "--positives",
            str(tmp_path / "pos.npy"), "--num-negatives", str(K), "--out", str(tmp_path / "out.npz"),
            "--device", "cpu", "--query-batch-size", str(QB), "--no-progress", "--quiet", *extra]
    parser = argparse.ArgumentParser(prog="hnsample mine")
    mining_cli.add_arguments(parser)
    return lambda: mining_cli.run(parser.parse_args(argv))


def _error_line(capsys, rc):
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("hnsample mine: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("damage, expected", [
    (lambda p: p.unlink(), r"positives file '.*pos.npy' is not a readable .npy array"),
    (lambda p: p.write_bytes(p.read_bytes()[:60]), r"positives file '.*pos.npy' is not a readable .npy array"),
    (lambda p: p.write_bytes(b""), r"positives file '.*pos.npy' is not a readable .npy array"),
])
def test_cli_bad_positives_npy_is_a_one_line_error(tmp_path, capsys, damage, expected):
    run = _cli(tmp_path)
    damage(tmp_path / "pos.npy")
    err = _error_line(capsys, run())
    assert __import__("re").search(expected, err), err


@pytest.mark.parametrize("name", ["q.npy", "c.npy"])
def test_cli_empty_or_truncated_embeddings_are_one_line_errors(tmp_path, capsys, name):
    run = _cli(tmp_path)
    (tmp_path / name).write_bytes(b"")
    assert f"{name}' is not a readable .npy array" in _error_line(capsys, run())
    data = np.lib.format.open_memmap(tmp_path / name, mode="w+", dtype=np.float32, shape=(50, D))
    del data
    with open(tmp_path / name, "r+b") as f:
        f.truncate(200)
    assert f"{name}' is not a readable .npy array" in _error_line(capsys, run())


def test_cli_corrupted_checkpoint_is_a_one_line_error(tmp_path, capsys):
    run = _cli(tmp_path, "--checkpoint-dir", str(tmp_path / "ck"))
    assert run() == 0
    (tmp_path / "ck" / BATCH1).write_bytes(b"PK\x03\x04 not a zip")
    err = _error_line(capsys, run())
    assert f"checkpoint batch file '{tmp_path / 'ck' / BATCH1}' cannot be read" in err
    (tmp_path / "ck" / "manifest.json").write_text("{")
    assert "manifest.json' is not valid JSON" in _error_line(capsys, run())


def test_cli_checks_the_output_path_before_mining(tmp_path, capsys, monkeypatch):
    import hnsample.mining

    def never(*args, **kwargs):
        raise AssertionError("mined although the output cannot be written")

    monkeypatch.setattr(hnsample.mining, "mine_hard_negatives", never)
    run = _cli(tmp_path)
    (tmp_path / "out.npz").mkdir()
    assert "out.npz' is a directory" in _error_line(capsys, run())
    run = _cli(tmp_path, "--out", str(tmp_path / "out.csv"))
    assert "path must end in .parquet, .jsonl or .npz" in _error_line(capsys, run())


def test_cli_unwritable_output_is_a_one_line_error(tmp_path, capsys):
    run = _cli(tmp_path, "--out", str(tmp_path / "missing" / "x" / "out.npz"))
    (tmp_path / "missing").write_text("a file where a directory is needed")  # mkdir fails: OSError
    assert "missing" in _error_line(capsys, run())


def test_cli_entry_point_exit_status_and_no_traceback(tmp_path):
    _cli(tmp_path)
    (tmp_path / "pos.npy").write_bytes(b"\x93NUMPY")
    proc = subprocess.run([sys.executable, "-m", "hnsample.cli", "mine", "--queries", str(tmp_path / "q.npy"),
                           "--corpus", str(tmp_path / "c.npy"), "--positives", str(tmp_path / "pos.npy"),
                           "--out", str(tmp_path / "o.npz"), "--device", "cpu", "--no-progress"],
                          capture_output=True, text=True, cwd="/")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("hnsample mine: error: positives file")
