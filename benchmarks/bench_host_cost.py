"""Host (Python) time per score block of the CUDA two-pass loop, measured without a GPU.

    python benchmarks/bench_host_cost.py                     # the device check's main plan, N scaled down
    python benchmarks/bench_host_cost.py --n 1000000 --runs 5 --profile

``CudaDriver.run_two_pass`` runs on CPU tensors with launchers that do nothing (``NullLaunchers``: the
select and merge entry points return at once) and a product whose ``scores`` does nothing
(``NullProduct``), on a device described by the H200's facts (132 SMs, 60 MiB of L2). Everything the
driver does per block in Python is therefore timed -- the block loop of ``score_blocks``, the block's
views and operands, the launcher's argument marshalling -- and nothing else: no GEMM, no kernel, no
cosine norms (``NullProduct.operand`` slices precomputed scales; on a GPU the norms of a candidate
block are a handful of torch launches per candidate block, not per score block).

The plan is ``plan_blocks``' for B queries x N candidates (default the main shape's B = 8192, with N =
200,000 instead of 1M: the per-block cost does not depend on N, the block count does), printed with
the block count of the full N. ``cosine`` passes the per-row and per-column scales with every block, as
the 16-bit cosine path does. Per-block time = median over --runs calls of (the call's CPU time / blocks):
the thread's CPU time, not wall time, so that other processes on a shared machine do not count (the
wall-clock median is printed beside it; min and max are of the CPU time).

What a GPU adds per block and this cannot measure: torch.mm's own host launch (about 5 to 10 us), the
pybind11 call into the select launcher and its CUDA launch (a few us), and torch's current-stream lookup
wherever it is made per block.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import time

import torch

from hnsample import _C, settings
from hnsample.engine import CudaKernels, DeviceFacts, Operand, SelectionState, build_selection
from hnsample.engine.cuda import CudaDriver, plan_blocks

H200 = DeviceFacts(multiprocessors=132, l2_bytes=60 << 20)


class NullLaunchers:
    """The launcher entry points the two-pass loop calls, doing nothing but counting select launches."""

    def __init__(self):
        self.selects = 0

    def topk_select_block_segments(self, *args):
        self.selects += 1

    def topk_merge(self, *args):
        pass


class NullKernels(CudaKernels):
    """CudaKernels over NullLaunchers on CPU tensors: stream 0, the device facts given."""

    def __init__(self, facts: DeviceFacts):
        super().__init__(NullLaunchers())
        self.facts = facts

    def stream(self, t: torch.Tensor) -> int:
        return 0

    def device_facts(self, device: torch.device) -> DeviceFacts:
        return self.facts


class NullProduct:
    """A 16-bit product whose scores do nothing. Cosine: operands carry slices of precomputed scales
    (no norm computed), left for the select kernel to apply (``scales_in_select``)."""

    out_dtype = torch.float32
    scales_in_select = True

    def __init__(self, queries: torch.Tensor, metric: str, col_scale: torch.Tensor | None):
        self.metric, self.col_scale = metric, col_scale
        self.row_scale = torch.ones(queries.shape[0]) if metric == "cosine" else None

    def operand(self, x: torch.Tensor, query_side: bool = False) -> Operand:
        if self.metric != "cosine":
            return Operand(x)
        return Operand(x, self.row_scale if query_side else self.col_scale[: x.shape[0]])

    def scores(self, q: Operand, c: Operand, out: torch.Tensor) -> None:
        pass


def time_calls(b: int, n: int, d: int, k: int, metric: str, runs: int, profile: bool) -> dict:
    q = torch.zeros(b, d, dtype=torch.bfloat16)
    c = torch.zeros(n, d, dtype=torch.bfloat16)
    col_scale = torch.ones(n)
    kernels = NullKernels(H200)
    driver = CudaDriver(kernels=kernels, product=lambda queries, m: NullProduct(queries, m, col_scale))
    sel = build_selection(b, n, q.device, k)
    state = SelectionState(sel, b, q.device, kernels=kernels)
    block_size = settings.current().cuda_block_size
    driver.run_two_pass(q, c, state, metric, block_size, 0)  # warm-up
    per_block, wall = [], []
    for _ in range(runs):
        kernels.module.selects = 0
        t0, c0 = time.perf_counter(), time.thread_time()
        driver.run_two_pass(q, c, state, metric, block_size, 0)
        cpu, elapsed = time.thread_time() - c0, time.perf_counter() - t0
        per_block.append(cpu / kernels.module.selects)
        wall.append(elapsed / kernels.module.selects)
    blocks = kernels.module.selects
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        driver.run_two_pass(q, c, state, metric, block_size, 0)
        prof.disable()
        print(f"--- profile, {metric}, one call of {blocks} blocks ---")
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    return {"blocks": blocks, "per_block_us": statistics.median(per_block) * 1e6,
            "min_us": min(per_block) * 1e6, "max_us": max(per_block) * 1e6,
            "wall_median_us": statistics.median(wall) * 1e6}


def launcher_call_us(b: int, k: int, calls: int = 20_000) -> float:
    """CPU time of one pybind11 call into a compiled launcher with the select launch's arguments and an
    empty block (hnsample._C.topk_select_block on the CPU: argument conversion, the parameter checks, the
    GIL release, no kernel), median of 7 batches: what the real select launch costs the host before its
    cudaLaunchKernel."""
    state = SelectionState(build_selection(b, 1, torch.device("cpu"), k), b, torch.device("cpu"))
    buf = torch.zeros(16)
    args = (state.params, buf.data_ptr(), 0, 0, 0, 0, 1, 0, 0, False, 0, 1)
    fn = _C.topk_select_block
    times = []
    for _ in range(7):
        c0 = time.thread_time()
        for _ in range(calls):
            fn(*args)
        times.append((time.thread_time() - c0) / calls)
    return statistics.median(times) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--b", type=int, default=8192)
    parser.add_argument("--n", type=int, default=200_000, help="candidates timed (the full N is --full-n)")
    parser.add_argument("--full-n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=8, help="row width of the (unread) inputs: no effect on the plan")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one call per metric")
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_host_cost.json"))
    args = parser.parse_args()

    torch.set_num_threads(1)
    state_row_bytes = (args.k * 16) + 16
    plan = plan_blocks(args.b, args.full_n, settings.current().cuda_block_size, H200.multiprocessors,
                       H200.l2_bytes, state_row_bytes)
    full_blocks = -(-args.b // plan.block_rows) * -(-args.full_n // plan.block_cols)
    results = {m: time_calls(args.b, args.n, args.d, args.k, m, args.runs, args.profile) for m in ("dot", "cosine")}
    launcher_us = launcher_call_us(args.b, args.k)
    report = {
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "python": platform.python_version(), "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "plan": {"block_rows": plan.block_rows, "block_cols": plan.block_cols, "segments": plan.segments,
                 "blocks_full_n": full_blocks},
        "metrics": results, "launcher_call_us": launcher_us,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)

    print(f"plan for B={args.b}, N={args.full_n} on 132 SMs / 60 MiB L2: blocks of {plan.block_rows} x "
          f"{plan.block_cols}, {plan.segments} segment(s), {full_blocks} blocks per call")
    print(f"{'metric':<8} {'blocks timed':>12} {'host us/block':>14} {'min':>7} {'max':>7} {'wall':>7} "
          f"{'x full blocks, ms':>18}")
    for m, r in results.items():
        print(f"{m:<8} {r['blocks']:>12} {r['per_block_us']:>14.2f} {r['min_us']:>7.2f} {r['max_us']:>7.2f} "
              f"{r['wall_median_us']:>7.2f} {r['per_block_us'] * full_blocks / 1000:>18.2f}")
    print(f"a compiled launcher's pybind11 call (empty block, no kernel): {launcher_us:.2f} us")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
