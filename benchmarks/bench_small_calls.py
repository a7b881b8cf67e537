"""Per-call overhead of the CPU kernels on small inputs, where starting threads would dominate.

    python benchmarks/bench_small_calls.py                      # 256x256 float32, k=8, 2 torch threads
    python benchmarks/bench_small_calls.py --json new.json --baseline old.json   # adds a ratio column

Each case is checked against hnsample._reference first, warmed up, then timed call by call
(time.perf_counter_ns around one public call); the table reports the median and the 10th/90th
percentiles over --repeats calls. With --baseline (a JSON file this script wrote before, e.g. from
another build) the table adds the ratio baseline median / this median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import hnsample
from hnsample import _C
from hnsample import _reference as R

CASES = [
    # (name, rows, cols, k, sampling)
    ("topk_from_scores 256x256 k=8", 256, 256, 8, "top"),
    ("topk_from_scores 64x64 k=8", 64, 64, 8, "top"),
    ("topk_from_scores 256x256 k=8 softmax", 256, 256, 8, "softmax"),
    ("topk_from_scores 1024x1024 k=8", 1024, 1024, 8, "top"),
]


def _check(scores: torch.Tensor, k: int, sampling: str) -> None:
    kw = dict(sampling=sampling, seed=1) if sampling != "top" else {}
    got = hnsample.topk_from_scores(scores, k, **kw)
    ref_s, ref_j = R.select_from_scores(scores, k, **kw)
    if not torch.equal(got.indices, ref_j):
        raise SystemExit(f"hnsample disagrees with the reference on {tuple(scores.shape)} {sampling}")


def _time_case(rows: int, cols: int, k: int, sampling: str, repeats: int, warmup: int) -> dict:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(rows, cols, generator=g)
    _check(scores, k, sampling)
    kw = dict(sampling=sampling, seed=1) if sampling != "top" else {}
    for _ in range(warmup):
        hnsample.topk_from_scores(scores, k, **kw)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        hnsample.topk_from_scores(scores, k, **kw)
        samples.append((time.perf_counter_ns() - t0) / 1000.0)
    samples.sort()
    return {
        "median_us": statistics.median(samples),
        "p10_us": samples[len(samples) // 10],
        "p90_us": samples[(len(samples) * 9) // 10],
        "repeats": repeats,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (the kernels use as many)")
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_small_calls.json"))
    parser.add_argument("--baseline", default=None, help="JSON from an earlier run: adds a ratio column")
    parser.add_argument("--case", default="", help="run only the cases whose name contains this text")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    results = {}
    for name, rows, cols, k, sampling in CASES:
        if args.case not in name:
            continue
        results[name] = _time_case(rows, cols, k, sampling, args.repeats, args.warmup)
    baseline = None
    if args.baseline:
        with open(args.baseline) as f:
            baseline = json.load(f)["cases"]

    report = {
        "machine": platform.processor() or platform.machine(),
        "cpu_isa": _C.cpu_isa(),
        "torch": torch.__version__,
        "threads": args.threads,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "cases": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)

    header = f"{'case':<40} {'median us':>10} {'p10 us':>9} {'p90 us':>9}"
    if baseline:
        header += f" {'base us':>9} {'speedup':>8}"
    print(f"cpu isa {report['cpu_isa']}, torch {report['torch']}, threads {args.threads}, {args.repeats} calls")
    print(header)
    for name, r in results.items():
        line = f"{name:<40} {r['median_us']:>10.1f} {r['p10_us']:>9.1f} {r['p90_us']:>9.1f}"
        if baseline and name in baseline:
            base = baseline[name]["median_us"]
            line += f" {base:>9.1f} {base / r['median_us']:>7.2f}x"
        print(line)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
