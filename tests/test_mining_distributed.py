"""Distributed mining: 2 gloo processes on the CPU return exactly what one process returns (sampling
modes and filter statistics included), and a rank that fails or dies makes every rank fail with a clear
error instead of hanging."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hnsample.mining import FILTERS, mine_hard_negatives

CONFIGS = {
    "top": dict(num_negatives=6, relative_margin=0.02, min_score=-0.6, skip_top=2, filter_statistics=True,
                query_batch_size=7),
    "uniform": dict(num_negatives=5, sampling="uniform", skip_top=1, pool=30, seed=77, query_batch_size=9),
    "softmax": dict(num_negatives=5, sampling="softmax", temperature=0.05, relative_margin=0.05, seed=5,
                    query_batch_size=40),
}

WORKER = textwrap.dedent("""
    import datetime, os, sys
    import numpy as np
    import torch
    import torch.distributed as dist
    import hnsample.mining as M

    rank, world, d, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    configs = eval(sys.argv[5])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    q, c = d + "/q.npy", d + "/c.npy"
    pos = np.load(d + "/pos.npy")
    labels = dict(query_labels=np.load(d + "/ql.npy"), candidate_labels=np.load(d + "/cl.npy"))
    common = dict(device="cpu", progress=False, verbose=False, corpus_shard_size=23)
    if mode == "ok":
        for name, kw in configs.items():
            r = M.mine_hard_negatives(q, c, pos, **labels, **kw, **common,
                                      checkpoint_dir=d + "/ck_" + name if name == "softmax" else None)
            np.savez(f"{d}/{name}_{rank}.npz", indices=r.indices.numpy(), scores=r.scores.numpy(),
                     positive_scores=r.positive_scores.numpy(),
                     eligible=r.eligible.numpy() if r.eligible is not None else np.zeros(0),
                     counts=np.array([r.filter_counts[f] for f in M.FILTERS] if r.filter_counts else []))
        # a rerun over the finished checkpoint: rank 0 reads every batch and broadcasts it
        r = M.mine_hard_negatives(q, c, pos, **labels, **configs["softmax"], **common,
                                  checkpoint_dir=d + "/ck_softmax")
        np.save(f"{d}/resumed_{rank}.npy", r.indices.numpy())
        # Done with gloo once the barrier returns: leave through os._exit, skipping torch's gloo teardown
        # at interpreter exit, which can abort a rank depending on which peer exits first.
        dist.barrier()
        print("finished", flush=True)
        os._exit(0)
    elif mode == "fail-mid":
        from hnsample.engine import CpuBackend, CpuKernels, registry

        class Flaky(CpuKernels):  # rank 1 fails in its second query batch
            batches = set()
            def check(self, params):
                self.batches.add(params.noise_row_offset)
                if rank == 1 and len(self.batches) == 2:
                    raise OSError("disk read failed (injected)")
            def select_block(self, params, *args):
                self.check(params)
                super().select_block(params, *args)
            def screen_block(self, params, *args):
                self.check(params)
                super().screen_block(params, *args)

        with registry.use("cpu", CpuBackend(Flaky())):
            M.mine_hard_negatives(q, c, pos, **configs["top"], **common)
    elif mode == "fail-validation":
        kw = dict(configs["softmax"], seed=None)  # rank 0 would wait in the seed broadcast
        M.mine_hard_negatives(q, c, pos[:-1] if rank == 1 else pos, **kw, **common)
    elif mode == "die":
        if rank == 1:
            os._exit(3)
        M.mine_hard_negatives(q, c, pos, **configs["top"], **common)
    print("finished", flush=True)
""")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    g = np.random.default_rng(3)
    # Entries +-1 in d = 16: every row has norm 4, so the cosine scores are sums of exact products of
    # +-0.25, the same bits whatever blocks, shards or threads the GEMM is cut into (ranks cut the corpus
    # differently from one process), with plenty of exact ties for the id rule.
    np.save(d / "q.npy", g.choice(np.array([-1.0, 1.0], dtype=np.float32), (80, 16)))
    np.save(d / "c.npy", g.choice(np.array([-1.0, 1.0], dtype=np.float32), (301, 16)))
    np.save(d / "pos.npy", g.integers(-1, 301, (80, 3)))
    np.save(d / "ql.npy", g.integers(0, 5, 80))
    np.save(d / "cl.npy", g.integers(0, 5, 301))
    (d / "worker.py").write_text(WORKER)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(d, mode: str, world: int = 2, timeout: float = 120) -> list[tuple[int, str]]:
    env = dict(__import__("os").environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, str(d / "worker.py"), str(r), str(world), str(d), mode,
                               repr(CONFIGS)], cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(world)]
    out = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"mode {mode}: a rank hung")
        out.append((p.returncode, so.decode() + se.decode()))
    return out


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(inputs):
    d = inputs
    results = _launch(d, "ok")
    for rc, log in results:
        assert rc == 0, log
    q, c, pos = np.load(d / "q.npy"), np.load(d / "c.npy"), np.load(d / "pos.npy")
    labels = dict(query_labels=np.load(d / "ql.npy"), candidate_labels=np.load(d / "cl.npy"))
    for name, kw in CONFIGS.items():
        one = mine_hard_negatives(q, c, pos, **labels, **kw, device="cpu", progress=False, verbose=False)
        for rank in range(2):
            with np.load(d / f"{name}_{rank}.npz") as z:
                assert np.array_equal(z["indices"], one.indices.numpy()), (name, rank)
                assert np.array_equal(z["scores"], one.scores.numpy()), (name, rank)
                np.testing.assert_array_equal(z["positive_scores"], one.positive_scores.numpy())
                if one.filter_counts is not None:
                    assert z["counts"].tolist() == [one.filter_counts[f] for f in FILTERS]
                    assert np.array_equal(z["eligible"], one.eligible.numpy())
    assert len(list((d / "ck_softmax").glob("batch_*.npz"))) == 2  # written once, by rank 0
    with np.load(d / "softmax_0.npz") as z:
        for rank in range(2):
            assert np.array_equal(np.load(d / f"resumed_{rank}.npy"), z["indices"])


@pytest.mark.slow
def test_a_failing_rank_fails_every_rank(inputs):
    results = _launch(inputs, "fail-mid")
    for rc, log in results:
        assert rc != 0
        assert "finished" not in log
        assert "rank 1: OSError: disk read failed (injected)" in log, log[-2000:]


@pytest.mark.slow
def test_a_rank_failing_validation_fails_every_rank(inputs):
    for rc, log in _launch(inputs, "fail-validation"):
        assert rc != 0 and "finished" not in log
        assert "argument validation on rank 1: ValueError: positives must have one row per query" in log, \
            log[-2000:]


@pytest.mark.slow
def test_a_dead_rank_does_not_hang_the_others(inputs):
    results = _launch(inputs, "die", timeout=100)
    assert results[1][0] == 3
    rc, log = results[0]
    assert rc != 0 and "finished" not in log
    assert "lost contact with the other ranks" in log or "Connection closed" in log, log[-2000:]
