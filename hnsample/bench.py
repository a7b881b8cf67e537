"""``hnsample bench``: times the fused top-k op against plain torch and faiss on this machine.

Each method runs in its own subprocess, once untimed and then ``repeats`` times, so that its peak extra
memory (ru_maxrss after the run minus ru_maxrss once the inputs exist) is its own. Correctness is
checked against torch naive first. Methods:

* ``hnsample``      topk_similarity with positives excluded and a relative margin, on the screening
                    product this machine's probe picks (``hnsample.settings`` ``screen_product="auto"``);
* ``hnsample_fp32``, ``hnsample_bf16``  the same on each screening product (docs/certified.md), with the
                    canonical rescorings per row;
* ``matmul``        bare blocked torch.matmul over the same blocks, no selection (the floor);
* ``matmul_bf16``   the same on bfloat16 copies (the floor of the bf16 product);
* ``torch_naive``   full (B, N) matmul + masked_fill of excluded/margin-violating entries + topk;
* ``torch_chunked`` the same per query chunk (bounded memory, plain torch);
* ``faiss``         faiss IndexFlatIP search of k + P (no margin filter: faiss has none), when installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from .cli import positive_int

METHODS = ("hnsample", "hnsample_fp32", "hnsample_bf16", "matmul", "matmul_bf16", "torch_naive", "torch_chunked",
           "faiss")


def _inputs(b: int, n: int, d: int, p: int, dtype: str, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=g)
    c = torch.randn(n, d, generator=g)
    pos = torch.randint(0, n, (b, p), generator=g)
    dt = getattr(torch, dtype)
    return q.to(dt), c.to(dt), pos


def _naive_masked_scores(q, c, pos, relative_margin):
    """Full score matrix with positives and margin violators set to -inf (plain torch)."""

    s = (q.float() @ c.float().T)
    p = s.gather(1, pos).amin(dim=1, keepdim=True)
    upper = p - p.abs() * relative_margin
    s.scatter_(1, pos, float("-inf"))
    return s.masked_fill_(s > upper, float("-inf"))


def _run_method(method: str, cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    import hnsample
    from hnsample.engine import block_shape

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    clock = time.process_time if cfg.get("timer") == "cpu" else time.perf_counter
    q, c, pos = _inputs(cfg["b"], cfg["n"], cfg["d"], cfg["p"], cfg["dtype"], cfg["seed"])
    k, margin, block = cfg["k"], cfg["relative_margin"], cfg["block_size"]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result: dict[str, Any] = {"method": method}

    if method.startswith("hnsample"):
        from hnsample import settings
        from hnsample.engine.blocks import probe_fastest

        product = method.partition("_")[2] or "auto"
        result["product"] = probe_fastest("cpu", q.dtype) if product == "auto" else product

        def fn():
            with settings.override(screen_product=product):
                return hnsample.topk_similarity(q, c, k, positives=pos, relative_margin=margin, block_size=block)

        if product != "auto":
            result["rescored_per_row"] = _rescorings(q, c, pos, k, margin, block, product)
    elif method.startswith("matmul"):
        gemm_dtype = torch.bfloat16 if method == "matmul_bf16" else torch.float32

        def fn():
            br, bc = block_shape(q.shape[0], c.shape[0], block)
            qf = q.to(gemm_dtype)
            buf = torch.empty(br, bc, dtype=gemm_dtype)
            for j in range(0, c.shape[0], bc):
                cb = c[j : j + bc].to(gemm_dtype)
                for i in range(0, q.shape[0], br):
                    torch.matmul(qf[i : i + br], cb.T, out=buf[: min(br, q.shape[0] - i), : cb.shape[0]])
            return None
    elif method == "torch_naive":
        def fn():
            s = _naive_masked_scores(q, c, pos, margin)
            v, i = s.topk(k, dim=1)
            return v, i
    elif method == "torch_chunked":
        def fn():
            outs = []
            chunk = max(1, block // max(1, c.shape[0]))
            for i in range(0, q.shape[0], chunk):
                s = _naive_masked_scores(q[i : i + chunk], c, pos[i : i + chunk], margin)
                outs.append(s.topk(k, dim=1))
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    elif method == "faiss":
        try:
            import faiss
        except ImportError:
            return {"method": method, "skipped": "faiss-cpu is not installed"}
        faiss.omp_set_num_threads(torch.get_num_threads())

        def fn():
            index = faiss.IndexFlatIP(c.shape[1])
            index.add(c.float().numpy())
            return index.search(q.float().numpy(), k + pos.shape[1])
    else:
        raise ValueError(f"unknown method {method!r}")

    times = []
    out = fn()  # one untimed call: lazy set-up (thread pool, the screening probe) is not what is measured
    for _ in range(cfg["repeats"]):
        t0 = clock()
        out = fn()
        times.append(clock() - t0)
    result["times"] = times
    result["median_s"] = statistics.median(times)
    result["peak_extra_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024.0
    if cfg.get("check") and method in ("hnsample", "torch_naive"):
        v, i = out
        result["kth_scores"] = v[:, -1].double().tolist()[:256]
        result["indices_head"] = i[:256].tolist()
    return result


def _rescorings(q, c, pos, k, margin, block, product) -> dict[str, float]:
    """Mean and 99th percentile over rows of the canonical rescorings of one run (the survivors of the
    screening), and the share of the time in the screening kernel."""
    import torch

    from hnsample import settings
    from hnsample.engine import SelectionState, build_selection, run_selection, selection_pair_scores

    with settings.override(screen_product=product):
        sel = build_selection(q.shape[0], c.shape[0], q.device, k, positives=pos, relative_margin=margin,
                              positive_values=lambda p: selection_pair_scores(q, c.__getitem__, p, "dot"))
        state = SelectionState(sel, q.shape[0], q.device)
        state.rescored = torch.zeros(q.shape[0], dtype=torch.int64)
        run_selection(q, c, sel, "dot", block, state=state)
    r = state.rescored.double()
    return {"mean": float(r.mean()), "p99": float(r.quantile(0.99)) if r.numel() else 0.0}


def run(args: argparse.Namespace) -> int:
    cfg = {
        "b": args.queries, "n": args.candidates, "d": args.dim, "k": args.k, "p": 1, "dtype": args.dtype,
        "relative_margin": 0.05, "block_size": args.block_size, "repeats": args.repeats, "seed": 0,
        "check": True, "threads": args.threads, "timer": args.timer,
    }
    methods = [m for m in args.methods.split(",") if m]
    results = []
    for m in methods:
        if m == "torch_naive" and cfg["b"] * cfg["n"] * 4 > args.naive_limit_gb * 2**30:
            results.append({"method": m, "skipped": f"needs > {args.naive_limit_gb} GB"})
            continue
        proc = subprocess.run(
            [sys.executable, "-c", "import json,sys; from hnsample.bench import _run_method;"
             "print(json.dumps(_run_method(sys.argv[1], json.loads(sys.argv[2]))))", m, json.dumps(cfg)],
            capture_output=True, text=True, env=dict(os.environ), cwd=tempfile.gettempdir(),
        )
        if proc.returncode != 0:
            results.append({"method": m, "failed": True,
                            "skipped": f"failed: {proc.stderr.strip().splitlines()[-1:]}"})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    by = {r["method"]: r for r in results}
    check = "not checked"
    if "hnsample" in by and "torch_naive" in by and "kth_scores" in by["hnsample"] and "kth_scores" in by["torch_naive"]:
        a, b = by["hnsample"], by["torch_naive"]
        kth_err = max(abs(x - y) for x, y in zip(a["kth_scores"], b["kth_scores"], strict=False))
        rows = list(zip(a["indices_head"], b["indices_head"], strict=True))
        same = sum(x == y for x, y in rows)
        check = f"{same}/{len(rows)} of the first rows identical, max |kth score diff| = {kth_err:.2e}"
        if kth_err > 1e-3:
            print(f"CORRECTNESS CHECK FAILED: {check}")
            return 1
    floor = by.get("matmul", {}).get("median_s")
    naive = by.get("torch_naive", {}).get("median_s")
    print(f"hnsample bench  B={cfg['b']} N={cfg['n']} d={cfg['d']} k={cfg['k']} {cfg['dtype']}, positives "
          f"excluded (P=1), relative_margin=0.05, threads={args.threads or _threads()}, timer={args.timer}, "
          f"{platform.processor() or platform.machine()}")
    print(f"correctness vs torch naive: {check}")
    if "product" in by.get("hnsample", {}):
        print(f"screening product picked by this machine's probe: {by['hnsample']['product']}")
    print(f"{'method':<15}{'median s':>10}{'vs matmul':>11}{'naive / this':>14}{'peak extra MB':>15}"
          f"{'rescored/row':>16}")
    for r in results:
        if "skipped" in r:
            print(f"{r['method']:<15}  skipped: {r['skipped']}")
            continue
        t = r["median_s"]
        vs_floor = f"{t / floor:.3f}x" if floor else "-"
        vs_naive = f"{naive / t:.2f}x" if naive else "-"
        rescored = r.get("rescored_per_row")
        extra = f"{rescored['mean']:>8.1f} p99 {rescored['p99']:.0f}" if rescored else ""
        print(f"{r['method']:<15}{t:>10.3f}{vs_floor:>11}{vs_naive:>14}{r['peak_extra_mb']:>15.0f}  {extra}")
    if args.json:
        for r in results:
            r.pop("indices_head", None)
            r.pop("kth_scores", None)
        with open(args.json, "w") as f:
            json.dump({"config": cfg, "check": check, "results": results}, f, indent=1)
        print(f"wrote {args.json}")
    return 1 if any(r.get("failed") for r in results) else 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queries", "-B", type=positive_int, default=1024, help="number of queries B (default 1024)")
    p.add_argument("--candidates", "-N", type=positive_int, default=50_000, help="number of candidates N (default 50,000)")
    p.add_argument("--dim", "-d", type=positive_int, default=384, help="embedding dimension d (default 384)")
    p.add_argument("-k", type=positive_int, default=64, help="negatives per query (default 64)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="input dtype")
    p.add_argument("--block-size", type=positive_int, default=1 << 22, help="score elements per block (default 2**22)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per method; the median is reported")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--naive-limit-gb", type=float, default=8.0, help="skip torch naive above this score size")
    p.add_argument("--json", default=None, help="write the results as JSON to this path")
    p.add_argument("--threads", type=positive_int, default=None, help="torch / kernel threads (default: torch's)")
    p.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                   help="wall: perf_counter; cpu: process time, which other jobs on a shared machine do not "
                        "inflate (meaningful with --threads 1)")
