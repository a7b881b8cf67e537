"""Resumable mining: a mining process killed (SIGKILL) at arbitrary moments loses no finished batch and
leaves no corrupt file; rerunning finishes the job with exactly the result of an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from hnsample.mining import mine_hard_negatives

B, N, D, BATCH = 600, 20000, 32, 10
KWARGS = dict(num_negatives=5, relative_margin=0.05, skip_top=3, pool=40, sampling="softmax", temperature=0.1,
              seed=1234, query_batch_size=BATCH, corpus_shard_size=4096, block_size=2000, device="cpu")

WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from hnsample.mining import mine_hard_negatives
    torch.set_num_threads(1)
    d = sys.argv[1]
    kwargs = eval(sys.argv[2])
    pos = np.load(d + "/pos.npy")
    mine_hard_negatives(d + "/q.npy", d + "/c.npy", pos, checkpoint_dir=d + "/ck", progress=False,
                        verbose=False, **kwargs)
""")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    g = np.random.default_rng(0)
    np.save(d / "q.npy", g.standard_normal((B, D), dtype=np.float32))
    np.save(d / "c.npy", g.standard_normal((N, D), dtype=np.float32))
    np.save(d / "pos.npy", g.integers(0, N, (B, 2)))
    (d / "worker.py").write_text(WORKER)
    return d


def _finished(ck) -> int:
    return len(list(ck.glob("batch_*.npz"))) if ck.exists() else 0


def _start(d):
    return subprocess.Popen([sys.executable, str(d / "worker.py"), str(d), repr(KWARGS)], cwd=d,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_after(d, proc, more: int, extra_delay: float) -> int:
    """SIGKILLs proc once `more` new batch files exist (plus extra_delay seconds, to land anywhere in a
    batch, a write included). Returns the number of finished batches when it was killed."""
    ck = d / "ck"
    start = _finished(ck)
    deadline = time.monotonic() + 120
    while _finished(ck) < start + more:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the worker made no progress"
        time.sleep(0.002)
    time.sleep(extra_delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return _finished(ck)


def _check_files(ck) -> set[int]:
    """Every batch file is complete and loadable; the directory lock and temporary files are the only
    other entries."""
    done = set()
    for p in ck.iterdir():
        if p.name in ("manifest.json", ".lock") or p.name.endswith(".tmp"):
            continue
        assert p.name.startswith("batch_") and p.suffix == ".npz", p.name
        with np.load(p) as z:
            assert z["indices"].shape == (BATCH, KWARGS["num_negatives"])
        done.add(int(p.stem.split("_")[1]))
    return done


@pytest.fixture
def one_torch_thread():
    """The workers mine with one torch thread; torch's CPU matmul rounds differently with other thread
    counts, so the in-process runs compared with them use one thread too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_result(inputs, one_torch_thread):
    d = inputs
    ck = d / "ck"
    total = B // BATCH
    seen: set[int] = set()
    for more, delay in [(2, 0.0), (3, 0.013), (1, 0.031)]:
        proc = _start(d)
        at_kill = _kill_after(d, proc, more, delay)
        assert at_kill < total, "the run finished before it could be killed; give it more work"
        done = _check_files(ck)
        assert seen <= done  # nothing finished earlier was lost
        seen = done
    # The finished batches were not recomputed: their files are untouched by the final run. It runs one
    # thread, as the worker did: on some CPUs the fp32 GEMM rounds differently with another thread count.
    stamps = {i: (ck / f"batch_{i:07d}.npz").stat().st_mtime_ns for i in seen}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = mine_hard_negatives(str(d / "q.npy"), str(d / "c.npy"), np.load(d / "pos.npy"),
                                      checkpoint_dir=ck, progress=False, verbose=False, **KWARGS)
        q, c = torch.from_numpy(np.load(d / "q.npy")), torch.from_numpy(np.load(d / "c.npy"))
        direct = mine_hard_negatives(q, c, np.load(d / "pos.npy"), progress=False, verbose=False, **KWARGS)
    finally:
        torch.set_num_threads(threads)
    assert _check_files(ck) == set(range(total))
    assert all((ck / f"batch_{i:07d}.npz").stat().st_mtime_ns == t for i, t in stamps.items())
    assert torch.equal(resumed.indices, direct.indices)
    assert torch.equal(resumed.scores, direct.scores)
    assert torch.equal(resumed.positive_scores, direct.positive_scores)
