"""Device check of the CUDA top-k paths: correctness first, then timings against torch.

    python benchmarks/gpu_check.py               # correctness + timing table, JSON to $OUT
    python benchmarks/gpu_check.py --memcheck    # small end-to-end case for compute-sanitizer

For every shape it times, with CUDA events after a warm-up (median of --reps runs):
  * the default call (what settings pick), then each hnsample path (two-pass; fused with each kernel
    the build and device have -- mma.sync, and wgmma on sm_90a for 16-bit inputs -- when the shape
    qualifies),
  * torch.matmul-only: q @ c.T in the input dtype (one call; the output is written, ours is not),
  * the blocked GEMM floor: the two-pass path's own GEMM calls into its L2-sized block, no selection,
  * torch naive: full matmul + masked_fill of the excluded ids + topk (where the scores fit in memory),
and prints TFLOP/s (2 B N d / time), the ratios, and the floors: 2 B N d / peak GEMM rate and
(B + N) d bytes / copy bandwidth, both measured at start on this device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import hnsample
from hnsample import _C, settings
from hnsample.engine import backend_for, build_selection, kernels_for, product_for, score_blocks
from hnsample.engine.cuda import plan_blocks

# (name, B, N, d, dtype, k, extra keywords)
SHAPES = [
    ("main", 8192, 1_000_000, 768, torch.bfloat16, 64, {}),
    ("main_filtered", 8192, 1_000_000, 768, torch.bfloat16, 64, {"positives": 1, "relative_margin": 0.05}),
    ("few_queries", 64, 1_000_000, 768, torch.bfloat16, 64, {}),
    ("mid_queries", 1024, 1_000_000, 768, torch.bfloat16, 64, {}),
    ("large_k", 4096, 200_000, 384, torch.bfloat16, 2048, {}),
    ("fp32", 4096, 200_000, 384, torch.float32, 64, {}),
    ("fp32_cosine", 4096, 200_000, 384, torch.float32, 64, {"metric": "cosine"}),
    ("bf16_cosine", 8192, 1_000_000, 768, torch.bfloat16, 64, {"metric": "cosine"}),
    ("softmax_sampling", 8192, 200_000, 768, torch.bfloat16, 64, {"sampling": "softmax", "seed": 1}),
]
# --smoke: the script's own logic on tiny fp32 shapes on the CPU (no device needed).
SMOKE_SHAPES = [("smoke", 70, 5000, 32, torch.float32, 8, {}),
                ("smoke_filtered", 70, 5000, 32, torch.float32, 8, {"positives": 1, "relative_margin": 0.05}),
                ("smoke_softmax", 30, 3000, 16, torch.float32, 8, {"sampling": "softmax", "seed": 1}),
                ("smoke_cosine", 40, 3000, 16, torch.float32, 8, {"metric": "cosine"})]
DEVICE = "cuda"
# Driver knobs swept on the main shape: (label, settings.cuda_l2_share)
KNOBS = [("l2x0.25", 0.25), ("l2x0.5", 0.5), ("l2x1.0", 1.0)]


def events_time(fn, reps: int, warmup: int = 1) -> float:
    """Median milliseconds of fn() over reps runs, timed with CUDA events after warm-up."""
    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def device_ceilings() -> dict:
    """Measured bf16 GEMM rate (8192^3, random data) and device-to-device copy bandwidth."""
    if DEVICE != "cuda":
        return {"bf16_tflops": 1.0, "copy_gbps": 10.0, "sms": 1, "l2_mb": 1.0, "name": "cpu smoke"}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = events_time(lambda: a @ b, reps=10, warmup=3)
    x = torch.empty(1 << 30, dtype=torch.float32, device="cuda").uniform_()
    y = torch.empty_like(x)
    copy_ms = events_time(lambda: y.copy_(x), reps=10, warmup=2)
    return {"bf16_tflops": 2 * 8192**3 / ms / 1e9, "copy_gbps": 2 * x.numel() * 4 / copy_ms / 1e6,
            "sms": torch.cuda.get_device_properties(0).multi_processor_count,
            "l2_mb": device_facts().l2_bytes / 2**20, "name": torch.cuda.get_device_name(0)}


def device_facts():
    """What the CUDA driver plans with on device 0 (multiprocessors, L2 bytes)."""
    device = torch.device("cuda", 0)
    return kernels_for(device).device_facts(device)


def fused_kernels() -> list[str]:
    """The fused kernels this build and device can run: values of settings.cuda_fused_kernel, and
    "mma_2stage" (mma.sync with cuda_fused_stages = 2, next to the default depth)."""
    kernels = ["mma", "mma_2stage"]
    available = getattr(_C, "topk_fused_wgmma_available", None)
    if DEVICE == "cuda" and available is not None and available(0):
        kernels.append("wgmma")
    return kernels


@contextlib.contextmanager
def fused_path(name: str) -> Iterator[None]:
    """CUDA inputs take the fused path with one of fused_kernels() for the duration of the block
    (settings.cuda_path, cuda_fused_kernel and cuda_fused_stages)."""
    kernel = "mma" if name.startswith("mma") else name
    with settings.override(cuda_path="fused", cuda_fused_kernel=kernel,
                           cuda_fused_stages=2 if name == "mma_2stage" else 0):
        yield


def fused_applies(q: torch.Tensor, c: torch.Tensor, k: int, kw: dict) -> bool:
    """Whether the fused path of the driver serving q's device takes these inputs (else it falls back to
    two-pass)."""
    sel = build_selection(q.shape[0], c.shape[0], q.device, k, skip_top=kw.get("skip_top", 0), pool=kw.get("pool"),
                          sampling=kw.get("sampling", "top"), seed=kw.get("seed"))
    capacity = _C.state_layout(sel.k, sel.skip_top, sel.pool, _C.Sampling.__members__[sel.sampling])[1]
    return backend_for(q.device).driver.fused_supported(q, c, kw.get("metric", "dot"), sel, capacity)


def upcast(x: torch.Tensor, metric: str) -> torch.Tensor:
    """fp32 rows for the reference scores, normalized for cosine."""
    x = x.float()
    return torch.nn.functional.normalize(x, dim=1) if metric == "cosine" else x


def make_inputs(b: int, n: int, d: int, dtype: torch.dtype, extra: dict, seed: int = 0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(b, d, device=DEVICE, dtype=torch.float32, generator=gen).to(dtype)
    c = torch.randn(n, d, device=DEVICE, dtype=torch.float32, generator=gen).to(dtype)
    kw = dict(extra)
    if "positives" in kw:
        kw["positives"] = torch.randint(0, n, (b, kw["positives"]), device=DEVICE, generator=gen)
    return q, c, kw


def check_rows(q, c, got: hnsample.TopK, k: int, kw: dict, rows: int = 128) -> dict:
    """Compares a sample of rows with fp32 scores of the upcast inputs (torch, no hnsample): each
    returned score must equal the recomputed one, and the returned k-th score must not be clearly
    below the reference k-th score (ties and last-bit rounding can reorder near-equal scores).

    With a relative margin the threshold p - |p| m moves with the rounding of the positive score p, so a
    candidate within ``slack = tol (1 + m)`` of it may go either way: a returned candidate must pass the
    threshold raised by the slack, and the returned k-th score is compared with the k-th of the candidates
    that pass it lowered by the slack. Padding (index -1) must carry -inf."""
    idx = torch.linspace(0, q.shape[0] - 1, min(rows, q.shape[0]), device=q.device).long()
    metric = kw.get("metric", "dot")
    q, c = upcast(q[idx], metric), upcast(c, metric)
    s = q @ c.T
    scale = s.abs().amax().clamp_min(1.0)
    tol = 2e-6 * scale * math.sqrt(q.shape[1])
    loose = strict = exact = s
    if "positives" in kw:
        pos = kw["positives"][idx]
        p = torch.gather(s, 1, pos).amin(1, keepdim=True)
        s = s.scatter(1, pos, float("-inf"))
        loose = strict = exact = s
        if "relative_margin" in kw:
            margin = kw["relative_margin"]
            thr, slack = p - p.abs() * margin, tol * (1 + margin)
            ninf = torch.full_like(s, float("-inf"))
            loose = torch.where(s <= thr + slack, s, ninf)
            strict = torch.where(s <= thr - slack, s, ninf)
            exact = torch.where(s <= thr, s, ninf)
    ref_vals = strict.topk(k, dim=1).values
    ref_idx = exact.topk(k, dim=1).indices  # recall (informative) against the threshold without slack
    gs, gj = got.scores[idx], got.indices[idx]
    pad = gj < 0
    recomputed = torch.gather(loose, 1, gj.clamp_min(0))
    diff = (recomputed - gs).abs().masked_fill(pad, 0.0)
    score_err = float(diff.max()) if diff.numel() else 0.0
    pad_ok = bool(torch.all(gs[pad] == float("-inf")))
    kth_gap = float((ref_vals[:, -1] - gs[:, -1]).max()) if k else 0.0
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(gj, ref_idx, strict=True))
    ok = score_err <= tol and kth_gap <= tol and pad_ok and not torch.isnan(gs).any()
    return {"ok": bool(ok), "max_score_err": score_err, "kth_gap": kth_gap, "recall": hits / max(1, gj.numel()),
            "tol": float(tol)}


def blocked_gemm(q, c, block_size: int) -> None:
    """The two-pass path's GEMM calls alone (its product and block plan), into one reused L2-sized block:
    the floor of two-pass."""
    sms, l2 = (device_facts().multiprocessors, device_facts().l2_bytes) if DEVICE == "cuda" else (1, 1 << 20)
    product = product_for(q, "dot")
    plan = plan_blocks(q.shape[0], c.shape[0], block_size, sms, l2, 64 * 16 + 16, product.out_dtype.itemsize)
    for _ in score_blocks(q, c, product, plan.block_rows, plan.block_cols, packed=True):
        pass


def naive(q, c, k: int, kw: dict):
    if kw.get("metric") == "cosine":
        q, c = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(c, dim=1)
    s = q @ c.T
    if "positives" in kw:
        s = s.scatter(1, kw["positives"], float("-inf"))
    return s.topk(k, dim=1)


def run_paths(name, b, n, d, dtype, k, extra, reps, ceil, results, knobs=()):
    q, c, kw = make_inputs(b, n, d, dtype, extra)
    flops = 2.0 * b * n * d
    row = {"shape": name, "B": b, "N": n, "d": d, "dtype": str(dtype).replace("torch.", ""), "k": k,
           "filters": sorted(extra), "flop": flops}
    row["floor_compute_ms"] = flops / (ceil["bf16_tflops"] * (1 if dtype != torch.float32 else 1 / 12)) / 1e9
    row["floor_memory_ms"] = (b + n) * d * q.element_size() / ceil["copy_gbps"] / 1e6
    # correctness first
    got = hnsample.topk_similarity(q, c, k, **kw)
    if extra.get("sampling", "top") == "top":
        row["check"] = check_rows(q, c, got, k, kw)
    else:
        again = hnsample.topk_similarity(q, c, k, **kw)
        row["check"] = {"ok": bool(torch.equal(got.indices, again.indices)), "deterministic": True}
    del got
    row["default_ms"] = events_time(lambda: hnsample.topk_similarity(q, c, k, **kw), reps)
    with settings.override(cuda_path="two_pass"):
        if row["check"].get("ok"):  # the default may be fused: check the two-pass path on its own too
            got = hnsample.topk_similarity(q, c, k, **kw)
            row["two_pass_check"] = (check_rows(q, c, got, k, kw) if extra.get("sampling", "top") == "top"
                                     else {"ok": True})
            del got
        row["two_pass_ms"] = events_time(lambda: hnsample.topk_similarity(q, c, k, **kw), reps)
        for label, share in knobs:
            with settings.override(cuda_l2_share=share):
                row[f"two_pass_{label}_ms"] = events_time(lambda: hnsample.topk_similarity(q, c, k, **kw), reps)
    # The certified path (settings.cuda_certified, docs/certified.md): GEMM screen + canonical rescoring
    # on the device; its bits against the CPU are the gpu tests' job, here its speed and a sanity check.
    try:
        with settings.override(cuda_certified=True):
            got = hnsample.topk_similarity(q, c, k, **kw)
            row["certified_check"] = (check_rows(q, c, got, k, kw) if extra.get("sampling", "top") == "top"
                                      else {"ok": True})
            del got
            row["certified_ms"] = events_time(lambda: hnsample.topk_similarity(q, c, k, **kw), reps)
    except (RuntimeError, ValueError) as e:  # report it, go on with the rest
        row["certified_check"] = {"ok": False, "error": str(e)[:300]}
    if DEVICE == "cuda" and fused_applies(q, c, k, kw):
        # wgmma takes 16-bit inputs only (a wgmma choice raises for fp32, as documented)
        kernels = [x for x in fused_kernels() if dtype != torch.float32 or not x.startswith("wgmma")]
        for kernel in kernels:
            try:
                with fused_path(kernel):
                    got = hnsample.topk_similarity(q, c, k, **kw)
                    row[f"fused_{kernel}_check"] = (check_rows(q, c, got, k, kw) if "sampling" not in extra
                                                    else {"ok": True})
                    del got
                    row[f"fused_{kernel}_ms"] = events_time(lambda: hnsample.topk_similarity(q, c, k, **kw), reps)
            except (RuntimeError, ValueError) as e:  # a kernel failing or refusing: report it, go on with the rest
                row[f"fused_{kernel}_check"] = {"ok": False, "error": str(e)[:300]}
    row["matmul_ms"] = events_time(lambda: q @ c.T, reps)
    block = settings.current().block_size_for(q.device.type)  # the path's own plan
    row["blocked_gemm_ms"] = events_time(lambda: blocked_gemm(q, c, block), reps)
    free = torch.cuda.mem_get_info()[0] if DEVICE == "cuda" else 1 << 30
    if b * n * q.element_size() * 2.5 < free:
        row["naive_ms"] = events_time(lambda: naive(q, c, k, kw), max(1, reps // 2))
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    results.append(row)
    print(json.dumps(row), flush=True)


def memcheck_case() -> int:
    """Small shapes through every kernel: dense and strided blocks, segments, stream mode, merge,
    finalize, from_scores; compute-sanitizer reports any out-of-bounds or misaligned access."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        q = torch.randn(33, 40, device="cuda", generator=gen).to(dtype)
        c = torch.randn(5000, 40, device="cuda", generator=gen).to(dtype)
        pos = torch.randint(0, 5000, (33, 2), device="cuda", generator=gen)
        samplings = ({}, {"sampling": "softmax", "seed": 1, "skip_top": 3},
                     {"pool": 20, "sampling": "uniform", "seed": 2})
        for kw in samplings:
            hnsample.topk_similarity(q, c, 17, positives=pos, relative_margin=0.1, **kw)
            hnsample.topk_similarity(q[:3], c, 17, **kw)  # 3 rows: the plan splits columns into segments
        s = torch.randn(50, 999, device="cuda", generator=gen).to(dtype)
        hnsample.topk_from_scores(s[1:, 3:], 9)
        hnsample.topk_from_scores(s.T, 9, sampling="uniform", seed=2)
        hnsample.topk_from_scores(s[:, ::2], 700)
    # the fused kernel, its bounds and candidate-list kernels, and an overflowing chunk
    q = torch.randn(70, 64, device="cuda", generator=gen).to(torch.bfloat16)
    c = torch.randn(20_000, 64, device="cuda", generator=gen).to(torch.bfloat16)
    steps = (torch.arange(20_000, device="cuda") // 64).float()
    rising = steps[:, None].expand(20_000, 64).to(torch.bfloat16).contiguous()
    q32 = torch.randn(70, 48, device="cuda", generator=gen)
    c32 = torch.randn(20_000, 48, device="cuda", generator=gen)
    pos32 = torch.randint(0, 20_000, (70, 1), device="cuda", generator=gen)
    with fused_path("mma"):
        hnsample.topk_similarity(q, c, 9, exclude=torch.randint(0, 20_000, (70, 3), device="cuda", generator=gen))
        hnsample.topk_similarity(torch.ones_like(q), rising, 9)
        # fp32 on tf32 with rescoring, cosine scales, ragged shapes
        hnsample.topk_similarity(q32, c32, 9, metric="cosine", positives=pos32, relative_margin=0.05)
        hnsample.topk_similarity(q32[1:], c32[:19_999], 9)
    for kernel in fused_kernels()[1:]:  # then every other fused kernel
        with fused_path(kernel):
            hnsample.topk_similarity(q, c, 9, metric="cosine")
            hnsample.topk_similarity(q[:67], c[:19_990], 9)
    torch.cuda.synchronize()
    print("memcheck case done")
    return 0


def print_table(results: list[dict], ceil: dict) -> None:
    print(f"\n{ceil['name']}: bf16 GEMM {ceil['bf16_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbps']:.0f} "
          f"GB/s, {ceil['sms']} SMs, L2 {ceil['l2_mb']:.0f} MB")
    head = ("shape", "ok", "path", "ms", "TFLOP/s", "x matmul", "x naive", "x blk-gemm", "floor ms")
    print("{:<17}{:>4} {:<16}{:>9}{:>9}{:>9}{:>9}{:>11}{:>9}".format(*head))
    for r in results:
        paths = [("default", r["default_ms"]), ("two_pass", r["two_pass_ms"])]
        paths += [(key[9:-3], r[key]) for key in r
                  if key.startswith("two_pass_") and key.endswith("_ms") and key != "two_pass_ms"]
        paths += [(key[:-3], r[key]) for key in r if key.startswith(("fused_", "certified")) and key.endswith("_ms")]
        paths += [(key[:-6] + " FAILED", math.nan) for key in r
                  if key.startswith(("fused_", "certified")) and key.endswith("_check") and key[:-6] + "_ms" not in r]
        floor = max(r["floor_compute_ms"], r["floor_memory_ms"])
        for label, ms in paths:
            naive_ratio = f"{r['naive_ms'] / ms:.2f}" if "naive_ms" in r else "-"
            key = f"{label}_check" if label.startswith(("fused", "two_pass", "certified")) else "check"
            ok = r.get(key, r.get("check", {})).get("ok")
            print("{:<17}{:>4} {:<16}{:>9.2f}{:>9.0f}{:>9.2f}{:>9}{:>11.2f}{:>9.2f}".format(
                r["shape"], "y" if ok else "N", label, ms, r["flop"] / ms / 1e9,
                ms / r["matmul_ms"], naive_ratio, ms / r["blocked_gemm_ms"], floor))
    print("x matmul = time / torch.matmul-only time (target two-pass <= 1.3, fused <= 1.0 on 'main');")
    print("x naive = naive time / time (speed-up; target fused >= 3); floor = max(compute, memory) floor.")


# InfoNCE forward + backward: (name, B = M, d, dtype); --smoke: tiny fp32 on the CPU.
NCE_SHAPES = [("nce_bf16", 16384, 768, torch.bfloat16), ("nce_fp32", 8192, 768, torch.float32)]
NCE_SMOKE = [("nce_smoke", 300, 32, torch.float32)]


def info_nce_rows(reps: int, smoke: bool) -> list[dict]:
    """hnsample.info_nce (float32 exp on and off) against torch's dense logits + cross_entropy, forward
    and backward, on unit rows at temperature 0.05: time, and the loss and gradients of each against the
    dense float64 computation of the same inputs."""
    rows = []
    for name, b, d, dtype in NCE_SMOKE if smoke else NCE_SHAPES:
        g = torch.Generator(device=DEVICE).manual_seed(5)
        q = torch.nn.functional.normalize(torch.randn(b, d, device=DEVICE, generator=g), dim=1).to(dtype)
        c = torch.nn.functional.normalize(torch.randn(b, d, device=DEVICE, generator=g), dim=1).to(dtype)
        q64, c64 = q.double().requires_grad_(True), c.double().requires_grad_(True)
        ref = torch.nn.functional.cross_entropy(q64 @ c64.T / 0.05, torch.arange(b, device=DEVICE))
        ref_g = torch.autograd.grad(ref, [q64, c64])
        labels = torch.arange(b, device=DEVICE)

        def dense(q=q, c=c, labels=labels):
            qq, cc = q.detach().requires_grad_(True), c.detach().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy((qq @ cc.T).float() / 0.05, labels)  # GEMM in the input dtype
            return loss, torch.autograd.grad(loss, [qq, cc])

        def ours(q=q, c=c):
            qq, cc = q.detach().requires_grad_(True), c.detach().requires_grad_(True)
            loss = hnsample.info_nce(qq, cc, temperature=0.05)
            return loss, torch.autograd.grad(loss, [qq, cc])

        row = {"shape": name, "B": b, "M": b, "d": d, "dtype": str(dtype).replace("torch.", "")}
        for label, fn, exp32 in (("hnsample", ours, True), ("hnsample_float64_exp", ours, False),
                                 ("torch_dense", dense, True)):
            with settings.override(info_nce_cuda_float_exp=exp32):
                loss, grads = fn()
                row[f"{label}_ms"] = events_time(fn, reps)
            err_g = max(float((gr.double() - w).abs().max() / w.abs().max()) for gr, w in zip(grads, ref_g, strict=True))
            row[f"{label}_loss_err"] = abs(float(loss) - float(ref))
            row[f"{label}_grad_rel_err"] = err_g
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        row["check"] = {"ok": all(row[f"{lbl}_grad_rel_err"] < tol and row[f"{lbl}_loss_err"] < tol
                                  for lbl in ("hnsample", "hnsample_float64_exp"))}
        rows.append(row)
        print(f"{name}: B=M={b} d={d} {row['dtype']}: hnsample {row['hnsample_ms']:.2f} ms "
              f"(float64 exp {row['hnsample_float64_exp_ms']:.2f}), torch dense {row['torch_dense_ms']:.2f} ms; "
              f"loss err {row['hnsample_loss_err']:.2e} / {row['hnsample_float64_exp_loss_err']:.2e} "
              f"(dense {row['torch_dense_loss_err']:.2e}), grad rel err {row['hnsample_grad_rel_err']:.2e} "
              f"/ {row['hnsample_float64_exp_grad_rel_err']:.2e} (dense {row['torch_dense_grad_rel_err']:.2e}); "
              f"ok {row['check']['ok']}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memcheck", action="store_true", help="run the small sanitizer case only")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny fp32 shapes on the CPU: checks the script")
    ap.add_argument("--budget-s", type=float, default=170.0, help="skip remaining shapes after this long")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check_out"))
    args = ap.parse_args(argv)
    global DEVICE
    if args.smoke:
        DEVICE = "cpu"
    elif not hnsample.has_cuda():
        print("no usable CUDA device or hnsample built without CUDA")
        return 2
    if args.memcheck:
        return memcheck_case()
    t0 = time.time()
    ceil = device_ceilings()
    results: list[dict] = []
    for i, (name, b, n, d, dtype, k, extra) in enumerate(SMOKE_SHAPES if args.smoke else SHAPES):
        if time.time() - t0 > args.budget_s:
            print(f"time budget spent: skipping {name}")
            continue
        run_paths(name, b, n, d, dtype, k, extra, args.reps, ceil, results, KNOBS if i == 0 else ())
    nce = info_nce_rows(args.reps, args.smoke)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"device": ceil, "torch": torch.__version__,
                                                    "results": results, "info_nce": nce}, indent=1))
    print_table(results, ceil)
    checks = [v["ok"] for r in results + nce for key, v in r.items() if key.endswith("check")]
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
