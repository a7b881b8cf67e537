"""Times the same calls on several installed builds of hnsample, side by side, in one run.

    python benchmarks/compare_builds.py --build old=/tmp/site_old --build new=/tmp/site_new --rounds 5

Each --build is a directory holding an installed hnsample (``pip install --target DIR .``); "installed"
names the one this interpreter imports. Every round runs each build once, in its own subprocess (one torch
thread, CPU time by ``time.process_time``, so other jobs on a shared machine do not inflate it), builds
interleaved so slow drift of the machine hits all of them alike. Cases:

* ``topk``     topk_similarity, B=1024, N=100,000, d=384, k=64, fp32, one positive per row excluded and a
               relative margin of 0.05;
* ``topk_plain`` the same without filters;
* ``info_nce`` info_nce forward + backward, B = M = 2048, d=384, fp32, in-batch negatives.

Prints the median seconds per case and build and the ratio to the first build.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CASE_CODE = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
import hnsample
g = torch.Generator().manual_seed(0)
q, c = torch.randn(1024, 384, generator=g), torch.randn(100_000, 384, generator=g)
pos = torch.randint(0, c.shape[0], (1024, 1), generator=g)
a = torch.randn(2048, 384, generator=g).requires_grad_()
b = torch.randn(2048, 384, generator=g).requires_grad_()


def info_nce():
    loss = hnsample.info_nce(a, b)
    loss.backward()


cases = {
    "topk": lambda: hnsample.topk_similarity(q, c, 64, positives=pos, relative_margin=0.05),
    "topk_plain": lambda: hnsample.topk_similarity(q, c, 64),
    "info_nce": info_nce,
}
out = {}
for name, fn in cases.items():
    fn()  # warm-up: lazy set-up is not what is measured
    t0 = time.process_time()
    fn()
    out[name] = time.process_time() - t0
print(json.dumps(out))
"""


def run_once(site: str | None) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if site is not None:
        env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", CASE_CODE], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir(), check=False)
    if proc.returncode != 0:
        raise SystemExit(f"build at {site or 'installed'} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="append", default=[], metavar="LABEL=DIR",
                    help="an installed build; DIR 'installed' means this interpreter's own hnsample")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None, help="write every time to this file")
    args = ap.parse_args(argv)
    builds = []
    for spec in args.build:
        label, sep, path = spec.partition("=")
        if not sep or not label:
            ap.error(f"--build takes LABEL=DIR, got {spec!r}")
        builds.append((label, None if path == "installed" else path))
    if len(builds) < 1:
        ap.error("give at least one --build")
    times: dict[str, dict[str, list[float]]] = {label: {} for label, _ in builds}
    for r in range(args.rounds):
        for label, site in builds:
            for case, t in run_once(site).items():
                times[label].setdefault(case, []).append(t)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    first = builds[0][0]
    cases = list(times[first])
    print(f"median CPU seconds over {args.rounds} rounds, one thread; ratio = build / {first}")
    print(f"{'case':<12}" + "".join(f"{label:>14}{'ratio':>8}" for label, _ in builds))
    for case in cases:
        base = statistics.median(times[first][case])
        row = f"{case:<12}"
        for label, _ in builds:
            m = statistics.median(times[label][case])
            row += f"{m:>14.3f}{m / base:>8.2f}"
        print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(times, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
