"""Benchmark of hnsample.info_nce against naive torch (matmul + mask + cross_entropy + backward).

Two measurements, each run in its own subprocess so peak-RSS numbers are not polluted by earlier runs:

  time:   B = M (default 8192), d = 768, float32, forward + backward; correctness is checked against
          the naive loss first, then naive and hnsample runs alternate and medians are reported.
  memory: B = M (default 65,536), hnsample only (naive needs B*M*4*2 bytes: > 30 GB); peak extra
          memory = peak RSS during forward + backward minus RSS after the inputs are allocated.

Usage:
  python benchmarks/bench_info_nce.py time   [--n 8192] [--d 768] [--repeats 5] [--json out.json]
  python benchmarks/bench_info_nce.py memory [--n 65536] [--d 768] [--json out.json]
  python benchmarks/bench_info_nce.py all    # both, printing a table
Run "memory" directly with MALLOC_MMAP_THRESHOLD_=131072 in the environment ("all" sets it) so that
freed blocks leave the RSS.
Add --device cuda for the GPU (times with CUDA events, memory via torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) of this process; False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _inputs(n: int, d: int, device: str, dtype):
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g, device=device, dtype=dtype), dim=1)
    c = torch.nn.functional.normalize(torch.randn(n, d, generator=g, device=device, dtype=dtype), dim=1)
    c = torch.nn.functional.normalize(c + q, dim=1)  # related positives, like a trained encoder
    doc_ids = torch.arange(n, device=device)
    doc_ids[1::97] = doc_ids[0::97][: doc_ids[1::97].numel()]  # a few duplicates to mask
    return q.requires_grad_(), c.requires_grad_(), doc_ids


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_time(
    n: int, d: int, repeats: int, device: str, dtype_name: str, block_size: int | None = None
) -> dict:
    import torch
    import torch.nn.functional as F

    import hnsample

    dtype = getattr(torch, dtype_name)
    q, c, doc_ids = _inputs(n, d, device, dtype)
    tau = 0.05
    labels = torch.arange(n, device=device)

    def naive(masked: bool):
        s = (q @ c.T).float() / tau
        if masked:
            dup = (doc_ids.unsqueeze(0) == doc_ids[labels].unsqueeze(1)) & (labels.unsqueeze(1) != labels)
            s = s.masked_fill(dup, float("-inf"))
        loss = F.cross_entropy(s, labels)
        loss.backward()
        return loss

    def ours(masked: bool):
        loss = hnsample.info_nce(
            q, c, temperature=tau, doc_ids=doc_ids if masked else None, block_size=block_size
        )
        loss.backward()
        return loss

    results = {}
    for masked in (False, True):
        q.grad = c.grad = None
        want = naive(masked).item()
        wq, wc = q.grad.clone(), c.grad.clone()
        q.grad = c.grad = None
        got = ours(masked).item()
        err_q = float((q.grad - wq).abs().max() / wq.abs().max())
        err_c = float((c.grad - wc).abs().max() / wc.abs().max())
        assert abs(got - want) <= 1e-4 * max(1.0, abs(want)), (got, want)
        assert err_q < 1e-3 and err_c < 1e-3, (err_q, err_c)
        times = {"naive": [], "hnsample": []}
        for _ in range(repeats):
            for name, fn in (("naive", naive), ("hnsample", ours)):
                q.grad = c.grad = None
                _sync(device)
                t0 = time.perf_counter()
                fn(masked)
                _sync(device)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        results["masked" if masked else "plain"] = {
            "naive_s": med["naive"],
            "hnsample_s": med["hnsample"],
            "ratio": med["hnsample"] / med["naive"],
            "all_naive_s": times["naive"],
            "all_hnsample_s": times["hnsample"],
            "loss": got,
            "max_rel_grad_err": max(err_q, err_c),
        }
    return {
        "n": n,
        "d": d,
        "device": device,
        "dtype": dtype_name,
        "block_size": block_size,
        "threads": torch.get_num_threads(),
        "results": results,
    }


def run_memory(n: int, d: int, device: str, dtype_name: str) -> dict:
    import torch

    import hnsample

    dtype = getattr(torch, dtype_name)
    q, c, doc_ids = _inputs(n, d, device, dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_bytes()
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    loss = hnsample.info_nce(q, c, temperature=0.05, doc_ids=doc_ids)
    loss.backward()
    _sync(device)
    elapsed = time.perf_counter() - t0
    out = {
        "n": n,
        "d": d,
        "device": device,
        "dtype": dtype_name,
        "loss": float(loss.detach()),
        "seconds": elapsed,
        "input_bytes": 2 * n * d * q.element_size(),
        "grad_bytes": 2 * n * d * q.element_size(),
        "naive_logits_bytes": 2 * n * n * 4,
    }
    if device == "cuda":
        out["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    else:
        # With the mark reset after the inputs exist, VmHWM - RSS(inputs) is the op's peak extra
        # memory; without the reset it is an upper bound (input creation may hold the mark).
        out["peak_extra_bytes"] = _peak_rss_bytes() - base_rss
        out["peak_is_exact"] = reset
    out["peak_extra_without_grads_bytes"] = out["peak_extra_bytes"] - out["grad_bytes"]
    return out


def _subprocess(kind: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        kind,
        "--n",
        str(args.n_time if kind == "time" else args.n_memory),
        "--d",
        str(args.d),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--json",
        "-",
    ]
    # A fixed mmap threshold makes glibc return every large block to the OS when freed, so RSS tracks
    # live memory instead of the allocator's retained arenas.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def _table(time_res: dict | None, mem_res: dict | None) -> str:
    lines = ["| measurement | naive torch | hnsample | ratio |", "|---|---|---|---|"]
    if time_res:
        n, d = time_res["n"], time_res["d"]
        for k, r in time_res["results"].items():
            lines.append(
                f"| B=M={n}, d={d} {time_res['dtype']} fwd+bwd time ({k}) | {r['naive_s']:.2f} s | "
                f"{r['hnsample_s']:.2f} s | {r['ratio']:.2f}x |"
            )
    if mem_res:
        n = mem_res["n"]
        lines.append(
            f"| B=M={n}, d={mem_res['d']} peak extra memory (incl. {mem_res['grad_bytes'] / 2**30:.2f} GiB "
            f"grads) | > {mem_res['naive_logits_bytes'] / 2**30:.0f} GiB (logits + grad, not run) | "
            f"{mem_res['peak_extra_bytes'] / 2**30:.2f} GiB | - |"
        )
        lines.append(f"| B=M={n} fwd+bwd time | - | {mem_res['seconds']:.0f} s | - |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["time", "memory", "all"])
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--block-size", type=int, default=None, help="info_nce block_size (time only)")
    ap.add_argument("--json", default=None, help="write results here ('-' for stdout)")
    args = ap.parse_args()
    if args.kind == "all":
        args.n_time = args.n or 8192
        args.n_memory = 65536 if args.device == "cpu" else 262144
        res = {"time": _subprocess("time", args), "memory": _subprocess("memory", args)}
        print(_table(res["time"], res["memory"]))
    elif args.kind == "time":
        res = run_time(args.n or 8192, args.d, args.repeats, args.device, args.dtype, args.block_size)
    else:
        res = run_memory(args.n or 65536, args.d, args.device, args.dtype)
    if args.json == "-":
        print(json.dumps(res))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    if args.kind != "all" and args.json != "-":
        print(_table(res if args.kind == "time" else None, res if args.kind == "memory" else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
