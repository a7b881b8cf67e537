"""Standalone benchmark of the fused top-k op at the foundation issue's target shape.

    python benchmarks/bench_topk.py            # B=4096, N=200,000, d=384, k=64, fp32
    python benchmarks/bench_topk.py -N 50000   # any `hnsample bench` flag works

Checks correctness against torch naive first, then prints a table of median times, ratios to the bare
blocked matmul floor and to torch naive, and peak extra memory; writes JSON next to this file.
"""

import argparse
import os
import sys

from hnsample import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser)
    parser.set_defaults(queries=4096, candidates=200_000, json=os.path.join(os.path.dirname(__file__), "results",
                                                                             "bench_topk.json"))
    args = parser.parse_args()
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    sys.exit(bench.run(args))
