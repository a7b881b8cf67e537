"""Two gloo processes: every sampler gives the ranks disjoint batches and the same number of them, each
epoch, with rank/world size read from torch.distributed; NegativeQueue.enqueue gathers uneven batches so
both ranks hold the same queue."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import hnsample

WORLD = 2


def _samplers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(150, 6, generator=g)
    labels = torch.arange(160) // 4  # 40 labels x 4 items: m = 4 uses every item once
    return {
        "no_duplicates": hnsample.NoDuplicatesBatchSampler([i % 40 for i in range(170)], 8, seed=1),
        "m_per_class": hnsample.MPerClassBatchSampler(labels, 4, 8, seed=2),
        "cluster": hnsample.ClusterBatchSampler(x, 16, seed=3),
        "neighbour": hnsample.NeighbourBatchSampler.from_embeddings(x, 8, 4, keys=torch.arange(150) // 3,
                                                                    seed=4),
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        result = {}
        for name, sampler in _samplers().items():
            epochs = []
            for epoch in range(2):
                sampler.set_epoch(epoch)
                batches = list(sampler)
                assert len(batches) == len(sampler)
                epochs.append(batches)
            result[name] = epochs
        queue = hnsample.NegativeQueue(12, 3, with_labels=True)
        for step, n in enumerate([2 + rank, 5 * rank, 4]):
            base = 100 * step + 10 * rank
            queue.enqueue(torch.full((n, 3), float(base)) + torch.arange(n).unsqueeze(1),
                          ids=base + torch.arange(n), labels=torch.full((n,), rank))
        emb, ids, labels = queue.contents()
        result["queue"] = (emb.clone(), ids.clone(), labels.clone(), int(queue.pointer))
        # Equal batch counts on every rank, checked in-process: a sum over ranks equal to WORLD times
        # this rank's count means no rank would wait for a step the others never take.
        counts = torch.tensor([len(e) for name, epochs in result.items() if name != "queue" for e in epochs])
        total = counts.clone()
        dist.all_reduce(total)
        assert torch.equal(total, WORLD * counts), (total, counts)
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
        # Both ranks are done with gloo once the barrier returns (the caller then leaves through os._exit).
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise


@pytest.mark.slow
def test_two_gloo_ranks(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    # Each rank is this file run as a script (a fresh interpreter, like torchrun's workers).
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(tmp_path / "init"), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out
    results = []
    for r in range(WORLD):
        with open(tmp_path / f"rank{r}.pkl", "rb") as f:
            results.append(pickle.load(f))

    for name in _samplers():
        for epoch in range(2):
            per_rank = [res[name][epoch] for res in results]
            assert len(per_rank[0]) == len(per_rank[1]) > 0, name
            items = [set(i for b in batches for i in b) for batches in per_rank]
            assert not items[0] & items[1], name
        assert results[0][name][0] != results[0][name][1], name  # set_epoch reshuffles

    emb0, ids0, lab0, ptr0 = results[0]["queue"]
    emb1, ids1, lab1, ptr1 = results[1]["queue"]
    assert torch.equal(emb0, emb1) and torch.equal(ids0, ids1) and torch.equal(lab0, lab1) and ptr0 == ptr1
    # 2+3, 0+5, 4+4 rows were enqueued (21 > 12): the queue holds the last 12, ranks in order per step.
    order = []
    for step, sizes in enumerate([(2, 3), (0, 5), (4, 4)]):
        for rank, n in enumerate(sizes):
            order.extend(100 * step + 10 * rank + i for i in range(n))
    assert sorted(ids0.tolist()) == sorted(order[-12:])
    assert torch.equal(emb0[:, 0], ids0.float())


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
    # Skip torch's gloo teardown at interpreter exit: depending on which peer exits first it can abort
    # the process ("terminate called without an active exception") after all work is done.
    sys.stdout.flush()
    os._exit(0)
