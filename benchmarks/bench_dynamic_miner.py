"""Time per training step of DynamicNegativeMiner.mine (k hard + r random negatives per query against
a fixed document index) at B=256, N=1M, d=768, against plain torch (full (B, N) score matrix, positives
masked, torch.topk, then random draws) and against the score matmul alone (the floor for exact mining).

First checks both against the reference selection on a small index, then warms up, then times
``--repeats`` steps and reports medians. Prints a table last and writes JSON.

    python benchmarks/bench_dynamic_miner.py                      # CPU, in-memory float32 index
    python benchmarks/bench_dynamic_miner.py --storage npy        # memory-mapped .npy index
    python benchmarks/bench_dynamic_miner.py --device cuda        # GPU (index copied to the device)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import hnsample
from hnsample import _reference as ref


def torch_baseline(queries: torch.Tensor, docs: torch.Tensor, positives: torch.Tensor, k: int, r: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """What a training loop does by hand: materialize (B, N) scores, mask positives, topk, then draw r
    random ids per row that are neither positive nor hard (multinomial over the eligible mask)."""
    scores = queries @ docs.T
    scores.scatter_(1, positives, -math.inf)
    hard = scores.topk(k, dim=1).indices
    eligible = torch.ones_like(scores, dtype=torch.float32)
    eligible.scatter_(1, positives, 0).scatter_(1, hard, 0)
    rand = torch.multinomial(eligible.cpu(), r, replacement=False, generator=generator).to(queries.device)
    return hard, torch.cat([hard, rand], dim=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def check_correctness(device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    docs = torch.randn(5000, 32, generator=g)
    q = torch.randn(16, 32, generator=g)
    pos = torch.randint(0, 5000, (16, 2), generator=g)
    miner = hnsample.DynamicNegativeMiner(docs.to(device), chunk_rows=1500)
    got = miner.mine(q.to(device), pos.to(device), 8, random=8, seed=0)
    _, want = ref.topk_similarity(q, docs, 8, positives=pos)
    assert torch.equal(got.ids[:, :8].cpu(), want), "hard negatives differ from the reference"
    base_hard, _ = torch_baseline(q.to(device), docs.to(device), pos.to(device), 8, 8, g)
    assert torch.equal(base_hard.cpu(), want), "baseline differs from the reference"
    rand = got.ids[:, 8:].cpu()
    assert not (rand.unsqueeze(2) == torch.cat([pos, want], 1).unsqueeze(1)).any()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--random", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--storage", choices=["tensor", "npy"], default="tensor")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--json", default="benchmarks/results/dynamic_miner.json")
    args = parser.parse_args()
    device = torch.device(args.device)

    check_correctness(device)
    g = torch.Generator().manual_seed(0)
    docs = torch.empty(args.docs, args.dim)
    for i in range(0, args.docs, 1 << 16):  # filled in chunks: randn of the whole index doubles peak memory
        docs[i : i + (1 << 16)] = torch.randn(min(1 << 16, args.docs - i), args.dim, generator=g)
    queries = torch.randn(args.batch, args.dim, generator=g).to(device)
    positives = torch.randint(0, args.docs, (args.batch, 1), generator=g).to(device)

    tmp = None
    if args.storage == "npy":
        tmp = tempfile.TemporaryDirectory()
        path = Path(tmp.name) / "docs.npy"
        np.save(path, docs.numpy())
        miner = hnsample.DynamicNegativeMiner(path, device=device)
    else:
        docs = docs.to(device)
        miner = hnsample.DynamicNegativeMiner(docs)

    step = [0]

    def mine():
        step[0] += 1
        miner.mine(queries, positives, args.k, random=args.random, seed=step[0])

    rows = [("hnsample DynamicNegativeMiner.mine", time_steps(mine, device, args.repeats))]
    if not args.skip_baseline:
        base_docs = docs.to(device)
        block = torch.empty(args.batch, 1 << 16, device=device)

        def matmul_only():
            for j in range(0, args.docs, 1 << 16):
                c = base_docs[j : j + (1 << 16)]
                torch.matmul(queries, c.T, out=block[:, : c.shape[0]])

        rows.append(("lower bound: the blocked matmul alone", time_steps(matmul_only, device, args.repeats)))
        rows.append(("torch: full scores + topk + multinomial",
                     time_steps(lambda: torch_baseline(queries, base_docs, positives, args.k, args.random, g),
                                device, args.repeats)))
    if tmp is not None:
        tmp.cleanup()

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": str(device), "storage": args.storage, "torch_threads": torch.get_num_threads(),
        "B": args.batch, "N": args.docs, "d": args.dim, "k": args.k, "random": args.random,
        "repeats": args.repeats,
        "rows": [{"name": n, "times_s": t, "median_s": statistics.median(t)} for n, t in rows],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    base = statistics.median(rows[0][1])
    print(f"\nB={args.batch} N={args.docs} d={args.dim} k={args.k} r={args.random} device={device} "
          f"storage={args.storage} threads={torch.get_num_threads()}")
    print(f"{'method':45} {'median s/step':>14} {'vs hnsample':>12}")
    for name, times in rows:
        med = statistics.median(times)
        print(f"{name:45} {med:14.3f} {med / base:11.2f}x")


if __name__ == "__main__":
    main()
