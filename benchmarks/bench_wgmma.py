"""The fused score kernels alone, on the device: one launch over B x N against torch.mm.

    python benchmarks/bench_wgmma.py [--b 8192 --n 1000000 --d 768] [--out DIR]

Launches FusedBlock directly (no driver, no selection state) with FusedBlock.kernel = mma (mma.sync,
128 x 128), wgmma (128 x 128, two CTAs per SM), wgmma_256x128 and wgmma_128x256 (one CTA per SM each;
csrc/topk_fused_sm90.h says why each; the values of _C.FusedKernel) on random bf16 inputs,
under two filters: "none" (lo = +inf: nothing survives, so the time is the GEMM plus the epilogue's
compare) and "seeded" (lo = each row's 64th best score over the first 65536 candidates, about
64 N / 65536 survivors per row, the list appends the driver's chunks see). Correctness first: on a
small integer case every kernel's lists must equal torch.mm's scores. Then each configuration is timed
with CUDA events (median of --reps after a warm-up) next to torch.mm(q, c.T) in bf16 (matmul-only: it
writes its B x N output, we do not). Prints TFLOP/s (2 B N d / time) and the ratio to matmul-only;
writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from hnsample import _C

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import events_time  # noqa: E402  (CUDA events, median after a warm-up)

FusedKernel = _C.FusedKernel
KERNELS = {FusedKernel.mma: "mma.sync 128x128", FusedKernel.wgmma: "wgmma 128x128",
           FusedKernel.wgmma_256x128: "wgmma 256x128", FusedKernel.wgmma_128x256: "wgmma 128x256"}
WGMMA = [FusedKernel.wgmma, FusedKernel.wgmma_256x128, FusedKernel.wgmma_128x256]
BF16 = int(_C.DType.bfloat16)  # FusedBlock.dtype


class Lists:
    """Per-row candidate lists of one fused launch (torch owns every buffer)."""

    def __init__(self, rows: int, cap: int, device: torch.device):
        self.cap = cap
        self.score = torch.empty((rows, cap), dtype=torch.float32, device=device)
        self.col = torch.empty((rows, cap), dtype=torch.int32, device=device)
        self.count = torch.zeros(rows, dtype=torch.int32, device=device)


def block(q: torch.Tensor, c: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, lists: Lists,
          kernel: FusedKernel) -> _C.FusedBlock:
    f = _C.FusedBlock()
    f.queries, f.q_stride, f.candidates, f.c_stride = q.data_ptr(), q.stride(0), c.data_ptr(), c.stride(0)
    f.dtype, f.rows, f.cols, f.dim = BF16, q.shape[0], c.shape[0], q.shape[1]
    f.row_lo, f.row_hi = lo.data_ptr(), hi.data_ptr()
    f.cand_score, f.cand_col, f.cand_count, f.cand_cap = (
        lists.score.data_ptr(), lists.col.data_ptr(), lists.count.data_ptr(), lists.cap)
    f.kernel = kernel
    return f


def launch(f: _C.FusedBlock, lists: Lists) -> None:
    lists.count.zero_()
    _C.topk_fused_scores(f, torch.cuda.current_stream().cuda_stream)


def check(kernel: FusedKernel) -> bool:
    """The kernel's lists equal torch.mm's scores on integer inputs (exact in fp32 in any order)."""
    gen = torch.Generator().manual_seed(int(kernel))
    rows, cols, d = 300, 1000, 224  # d: a multiple of 32 (mma.sync) with a partial 64-wide K step
    q = torch.randint(-8, 8, (rows, d), generator=gen).to(torch.bfloat16).cuda()
    c = torch.randint(-8, 8, (cols, d), generator=gen).to(torch.bfloat16).cuda()
    want = torch.mm(q.float(), c.float().T)
    lo, hi = torch.full((rows,), -math.inf, device="cuda"), torch.full((rows,), math.inf, device="cuda")
    lists = Lists(rows, cols, q.device)
    launch(block(q, c, lo, hi, lists, kernel), lists)
    if not torch.equal(lists.count, torch.full_like(lists.count, cols)):
        return False
    order = lists.col.argsort(dim=1)
    return bool(torch.equal(lists.col.gather(1, order).long(), torch.arange(cols, device="cuda").expand(rows, cols))
                and torch.equal(lists.score.gather(1, order), want))


ROW = "{:30s} {:7s} {:>9} {:>8} {:>9} {:>11}"


def row_text(r: dict) -> str:
    return ROW.format(r["name"], r["filter"], f"{r['ms']:.3f}", f"{r['tflops']:.1f}", f"{r['vs_matmul']:.3f}",
                      r.get("survivors", ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--b", type=int, default=8192)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check_out"))
    args = ap.parse_args(argv)
    if not (_C.built_with_cuda and torch.cuda.is_available()):
        print("bench_wgmma: needs a CUDA device and a CUDA build")
        return 1
    dev = torch.cuda.current_device()
    kernels = [FusedKernel.mma] + (WGMMA if _C.topk_fused_wgmma_available(dev) else [])
    b, n, d = args.b, args.n, args.d
    per_sm = {k.name: _C.topk_fused_wgmma_ctas_per_sm(dev, k) for k in kernels if k in WGMMA}
    print(f"device {torch.cuda.get_device_name(dev)}; wgmma available: {len(kernels) > 1}; CTAs per SM: {per_sm}")
    print(f"B={b} N={n} d={d} bf16, median of {args.reps}")
    print(ROW.format("kernel", "filter", "ms", "TFLOP/s", "x matmul", "survivors"), flush=True)
    torch.manual_seed(0)
    q = torch.randn(b, d, device="cuda").to(torch.bfloat16)
    c = torch.randn(n, d, device="cuda").to(torch.bfloat16)
    flop = 2.0 * b * n * d
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(dev), "b": b, "n": n, "d": d, "reps": args.reps,
              "ctas_per_sm": per_sm, "correct": {}, "results": []}
    t0 = time.perf_counter()

    def record(r: dict) -> None:
        # Each row is printed and saved as soon as it exists: a kernel that faults or a stage that runs out
        # of time still leaves the rows before it.
        r["tflops"] = flop / (r["ms"] * 1e-3) / 1e12
        r["vs_matmul"] = r["ms"] / mm_ms
        report["results"].append(r)
        report["seconds"] = time.perf_counter() - t0
        (out / "bench_wgmma.json").write_text(json.dumps(report, indent=1))
        print(row_text(r), flush=True)

    mm_ms = events_time(lambda: torch.mm(q, c.T), args.reps)
    record({"name": "torch.mm bf16 (matmul-only)", "filter": "-", "ms": mm_ms})
    seed = torch.mm(q, c[:65536].T).float()
    lo_seeded = seed.topk(64, dim=1).values[:, -1].contiguous()
    del seed
    hi = torch.full((b,), math.inf, device="cuda")
    filters = {"none": (torch.full((b,), math.inf, device="cuda"), 16),
               "seeded": (lo_seeded, 4 * max(64, 64 * n // 65536))}
    for kernel in kernels:
        report["correct"][kernel.name] = check(kernel)  # correctness first, each kernel right before its timing
        for fname, (lo, cap) in filters.items():
            lists = Lists(b, cap, q.device)
            f = block(q, c, lo, hi, lists, kernel)
            ms = events_time(lambda f=f, lists=lists: launch(f, lists), args.reps)
            record({"name": KERNELS[kernel], "kernel": kernel.name, "filter": fname, "ms": ms,
                    "survivors": int(lists.count.sum()), "overflowed_rows": int((lists.count > cap).sum())})
    report["stalled"] = bool(_C.topk_fused_wgmma_stalled(dev))
    (out / "bench_wgmma.json").write_text(json.dumps(report, indent=1))
    print(f"correct (lists == torch.mm): {report['correct']}; stalled: {report['stalled']}")
    return 0 if all(report["correct"].values()) and not report["stalled"] else 1


if __name__ == "__main__":
    sys.exit(main())
