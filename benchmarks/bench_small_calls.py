"""Per-call time of the CPU kernels on small inputs, where starting threads would dominate, and of the
in-batch miners on training-size batches.

    python benchmarks/bench_small_calls.py                      # 256x256 float32, k=8, 2 torch threads
    python benchmarks/bench_small_calls.py --json new.json --baseline old.json   # adds a ratio column
    python benchmarks/bench_small_calls.py --case miners --repeats 7 --warmup 1  # the miners only

Each case is checked against hnsample._reference first, warmed up, then timed call by call
(time.perf_counter_ns around one public call); the table reports the median and the 10th/90th
percentiles over --repeats calls. With --baseline (a JSON file this script wrote before, e.g. from
another build) the table adds the ratio baseline median / this median.

Miner cases (run only when --case names them, e.g. "miners"): batch_hard and semi_hard (one negative
per pair) on B float32 rows of d = 384, 4 rows per label (P x K sampling), standard normal entries. They
are checked on their first 256 rows against the reference's canonical choices (skipped, and said so,
when the reference in the build predates them).
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
MINER_CASES = [
    # (name, miner, batch, dim, metric)
    ("miners batch_hard B=1024 d=384 cosine", "batch_hard", 1024, 384, "cosine"),
    ("miners batch_hard B=4096 d=384 cosine", "batch_hard", 4096, 384, "cosine"),
    ("miners semi_hard B=1024 d=384 cosine", "semi_hard", 1024, 384, "cosine"),
    ("miners semi_hard B=4096 d=384 cosine", "semi_hard", 4096, 384, "cosine"),
    ("miners batch_hard B=1024 d=384 euclidean", "batch_hard", 1024, 384, "euclidean"),
    ("miners batch_hard B=4096 d=384 euclidean", "batch_hard", 4096, 384, "euclidean"),
    ("miners semi_hard B=1024 d=384 euclidean", "semi_hard", 1024, 384, "euclidean"),
    ("miners semi_hard B=4096 d=384 euclidean", "semi_hard", 4096, 384, "euclidean"),
]
SEMI_HARD_MARGIN = 0.2


def _check(scores: torch.Tensor, k: int, sampling: str) -> None:
    kw = dict(sampling=sampling, seed=1) if sampling != "top" else {}
    got = hnsample.topk_from_scores(scores, k, **kw)
    ref_s, ref_j = R.select_from_scores(scores, k, **kw)
    if not torch.equal(got.indices, ref_j):
        raise SystemExit(f"hnsample disagrees with the reference on {tuple(scores.shape)} {sampling}")


def _time_calls(call, repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        call()
        samples.append((time.perf_counter_ns() - t0) / 1000.0)
    samples.sort()
    return {
        "median_us": statistics.median(samples),
        "p10_us": samples[len(samples) // 10],
        "p90_us": samples[(len(samples) * 9) // 10],
        "repeats": repeats,
    }


def _time_case(rows: int, cols: int, k: int, sampling: str, repeats: int, warmup: int) -> dict:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(rows, cols, generator=g)
    _check(scores, k, sampling)
    kw = dict(sampling=sampling, seed=1) if sampling != "top" else {}
    return _time_calls(lambda: hnsample.topk_from_scores(scores, k, **kw), repeats, warmup)


def _miner_call(miner: str, e: torch.Tensor, labels: torch.Tensor, metric: str):
    if miner == "batch_hard":
        return lambda: hnsample.batch_hard(e, labels, metric=metric)
    return lambda: hnsample.semi_hard(e, labels, SEMI_HARD_MARGIN, metric=metric)


def _time_miner(miner: str, b: int, d: int, metric: str, repeats: int, warmup: int) -> dict:
    g = torch.Generator().manual_seed(b)
    e = torch.randn(b, d, generator=g)
    labels = torch.randperm(b, generator=g) // 4
    reference = getattr(R, miner, None)
    if reference is None:
        print(f"{miner}: this build's reference has no miner spec: not checked")
    else:
        e0, y0 = e[:256], labels[:256]
        args = (SEMI_HARD_MARGIN, metric, 1) if miner == "semi_hard" else (metric,)
        got = list(zip(*(t.tolist() for t in _miner_call(miner, e0, y0, metric)()), strict=True))
        if got != reference(e0, y0, *args):
            raise SystemExit(f"{miner} disagrees with the reference on 256 rows")
    return _time_calls(_miner_call(miner, e, labels, metric), repeats, warmup)


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
    for name, miner, b, d, metric in MINER_CASES:
        if not args.case or args.case not in name:  # seconds per call: only when asked for by name
            continue
        results[name] = _time_miner(miner, b, d, metric, args.repeats, args.warmup)
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

    header = f"{'case':<44} {'median us':>10} {'p10 us':>9} {'p90 us':>9}"
    if baseline:
        header += f" {'base us':>9} {'speedup':>8}"
    print(f"cpu isa {report['cpu_isa']}, torch {report['torch']}, threads {args.threads}, {args.repeats} calls")
    print(header)
    for name, r in results.items():
        line = f"{name:<44} {r['median_us']:>10.1f} {r['p10_us']:>9.1f} {r['p90_us']:>9.1f}"
        if baseline and name in baseline:
            base = baseline[name]["median_us"]
            line += f" {base:>9.1f} {base / r['median_us']:>7.2f}x"
        print(line)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
