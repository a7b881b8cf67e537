"""grad_cache under DistributedDataParallel (2 gloo processes) with info_nce(gather=True): the cached
step through the DDP-wrapped encoder leaves the gradients of the uncached step (the same mini-batches
with autograd, gradients averaged over ranks), dropout on."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

WORLD = 2

WORKER = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    import torch.nn.functional as F
    import hnsample
    rank, world, init_file, out_file = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:5]
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 8))
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    g = torch.Generator().manual_seed(10 + rank)
    cols = [torch.randn(7, 10, generator=g) for _ in range(3)]  # queries, positives, hard negatives

    def loss_fn(q, *docs):
        return hnsample.info_nce(q, torch.cat(docs), gather=True, hardness_alpha=0.3, temperature=0.1)

    out = {}
    for mode in ("uncached", "cached", "cached_ddp_sync_once"):
        net.zero_grad(set_to_none=True)
        torch.manual_seed(100 + rank)
        if mode == "uncached":
            embs = [torch.cat([F.normalize(net(mb), dim=-1) for mb in hnsample.mini_batches(c, 3)]) for c in cols]
            loss = loss_fn(*embs)
            loss.backward()
            for p in net.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        else:
            loss = hnsample.grad_cache(loss_fn, lambda x: F.normalize(ddp(x), dim=-1), cols, mini_batch_size=3,
                                       distributed_model=ddp if mode == "cached_ddp_sync_once" else None)
            loss.backward()
        out[mode] = (loss.detach(), [p.grad.clone() for p in net.parameters()])
    torch.save(out, out_file)
    dist.barrier()
    os._exit(0)
    """
)


def run_workers(tmp_path, script_text: str, world: int = WORLD, timeout: int = 180) -> list[dict]:
    """Runs ``script_text`` in ``world`` processes (argv: rank, world, init file, output file) from a
    directory outside the checkout, so the installed package is imported; returns each rank's output."""
    script = tmp_path / "worker.py"
    script.write_text(script_text)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), str(world), str(tmp_path / "init"),
                          str(tmp_path / f"out{r}.pt")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
        for r in range(world)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out.decode()
    return [torch.load(tmp_path / f"out{r}.pt") for r in range(world)]


def test_cached_step_under_ddp_with_gather_equals_uncached(tmp_path):
    results = run_workers(tmp_path, WORKER)
    for r, res in enumerate(results):
        want_loss, want = res["uncached"]
        for mode in ("cached", "cached_ddp_sync_once"):
            loss, grads = res[mode]
            torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-7)
            for g, w in zip(grads, want, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
            # DDP averaged the gradients: every rank holds the same ones.
            for g, g0 in zip(grads, results[0][mode][1], strict=True):
                torch.testing.assert_close(g, g0, rtol=1e-6, atol=1e-8)
        assert r == 0 or not torch.equal(res["uncached"][0], results[0]["uncached"][0])


DIRECTIONAL_WORKER = textwrap.dedent(
    """
    import os, sys, logging, torch, torch.distributed as dist
    import torch.nn.functional as F
    logging.disable(logging.WARNING)
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from hnsample.ops.directions import directional_info_nce
    rank, world, init_file, out_file = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:5]
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
    g = torch.Generator().manual_seed(20 + rank)
    controls = {"directions": ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
                "partition_mode": "joint", "hardness_mode": "in_batch_negatives", "hardness_strength": 4.0}
    out = {}
    for name in ("hnsample", "sentence_transformers"):
        leaves = [torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(20 + rank + 100 * k),
                              requires_grad=True) for k in range(3)]
        embs = [F.normalize(x, dim=-1) for x in leaves]
        if name == "hnsample":
            loss = directional_info_nce(embs[0], embs[1:], temperature=0.1, gather=True, **controls)
        else:
            mnrl = MultipleNegativesRankingLoss(torch.nn.Linear(1, 1), scale=10.0, gather_across_devices=True,
                                                **controls)
            loss = mnrl.compute_loss_from_embeddings(embs, None)
        loss.backward()
        out[name] = (loss.detach(), [x.grad for x in leaves])
    torch.save(out, out_file)
    dist.barrier()
    os._exit(0)
    """
)


def test_directional_loss_with_gather_equals_sentence_transformers(tmp_path):
    """directional_info_nce(gather=True) under 2 gloo processes: the loss and every rank's gradients of
    sentence-transformers' MultipleNegativesRankingLoss(gather_across_devices=True) with all four
    directions and in-batch hardness."""
    import pytest

    pytest.importorskip("sentence_transformers")
    for res in run_workers(tmp_path, DIRECTIONAL_WORKER):
        got_loss, got = res["hnsample"]
        want_loss, want = res["sentence_transformers"]
        torch.testing.assert_close(got_loss, want_loss)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
