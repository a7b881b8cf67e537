"""Where a certified CPU selection spends its time (docs/certified.md): the screening product (GEMM and
operands), the bulk scan of each score block, and the rest of the screen (exact bounds, the block-local
pre-selection, canonical rescoring and the exact offers), against the bare blocked GEMM of the same
blocks. CPU time of one thread (``time.process_time``), so other jobs on a shared machine inflate it
little.

    python benchmarks/bench_screen_share.py -B 4096 -N 200000 -d 384 -k 64

The scan alone is measured by offering every block a second time to a state whose ``min_score`` no
score can reach: the bulk test then rejects every score and nothing is rescored. That second read finds
the block in cache; ``--scan-first`` swaps the order (the scan-only pass reads it first), so the two runs
bracket the scan's share. The survivors' deferred rescoring at the end of the pass (docs/certified.md) is
part of the screen; ``--no-defer`` rescores them in their blocks instead.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import hnsample
from hnsample.engine import SelectionState, build_selection
from hnsample.engine import selection as selection_module
from hnsample.engine.blocks import block_shape, score_blocks, screen_product
from hnsample.engine.certify import canonical_pair_scores
from hnsample.engine.selection import ScreenedPass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-B", type=int, default=4096)
    ap.add_argument("-N", type=int, default=200_000)
    ap.add_argument("-d", type=int, default=384)
    ap.add_argument("-k", type=int, default=64)
    ap.add_argument("--product", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--no-defer", action="store_true",
                    help="rescore survivors in their block (no deferred rescoring), for comparison")
    ap.add_argument("--scan-first", action="store_true",
                    help="time the scan-only pass before the screen, so it reads each block first (the screen "
                         "then finds it in cache): bounds the scan's share from the other side")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.no_defer:
        selection_module.DEFER_MAX_BYTES = 0
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(a.B, a.d, generator=g), torch.randn(a.N, a.d, generator=g)
    pos = torch.randint(0, a.N, (a.B, 1), generator=g)

    def positive_values(p: torch.Tensor) -> torch.Tensor:
        return canonical_pair_scores(q, c.__getitem__, p, "dot").double()

    def selection(**kw):
        args = dict(positives=None, exclude=None, query_labels=None, candidate_labels=None, positive_scores=None,
                    absolute_margin=None, relative_margin=None, min_score=None, max_score=None, skip_top=0, pool=None,
                    sampling="top", temperature=1.0, generator=None, seed=None, positive_values=None)
        args.update(kw)
        return build_selection(a.B, a.N, q.device, a.k, **args)

    state = SelectionState(selection(positives=pos, relative_margin=0.05, positive_values=positive_values), a.B,
                           q.device)
    state.rescored = torch.zeros(a.B, dtype=torch.int64)
    scan_only = SelectionState(selection(min_score=1e30), a.B, q.device)
    with hnsample.settings.override(screen_product=a.product):
        product = screen_product(torch.float32, "dot", a.d, q.device)
    block = a.block_size or hnsample.settings.current().block_size_for("cpu")
    br, bc = block_shape(a.B, a.N, block)
    t_product = t_screen = t_scan = 0.0
    blocks = score_blocks(q, c, product, br, bc)
    screened = ScreenedPass(state)
    while True:
        t0 = time.process_time()
        blk = next(blocks, None)
        t1 = time.process_time()
        if blk is None:
            break
        if a.scan_first:  # the scan-only pass reads the block first, from wherever the GEMM left it
            scan_only.offer_screened(blk, blk.j0)
            t2 = time.process_time()
            screened.offer(blk, blk.j0)
            t_product, t_scan, t_screen = t_product + t1 - t0, t_scan + t2 - t1, t_screen + time.process_time() - t2
            continue
        screened.offer(blk, blk.j0)
        t2 = time.process_time()
        scan_only.offer_screened(blk, blk.j0)
        t_product, t_screen, t_scan = t_product + t1 - t0, t_screen + t2 - t1, t_scan + time.process_time() - t2
    t0 = time.process_time()
    screened.finish()  # the deferred rescoring of every row's waiting survivors
    t_flush = time.process_time() - t0
    t_screen += t_flush
    buf = torch.empty(br, bc)
    t0 = time.process_time()
    for j0 in range(0, a.N, bc):
        cb = c[j0:j0 + bc]
        for i0 in range(0, a.B, br):
            torch.matmul(q[i0:i0 + br], cb.T, out=buf[: min(br, a.B - i0), : cb.shape[0]])
    t_bare = time.process_time() - t0
    r = state.rescored.double()
    total = t_product + t_screen
    out = {"B": a.B, "N": a.N, "d": a.d, "k": a.k, "product": a.product, "block": [br, bc],
           "bare_gemm_s": t_bare, "product_s": t_product, "screen_s": t_screen, "scan_s": t_scan,
           "rest_of_screen_s": t_screen - t_scan, "flush_s": t_flush, "deferred": screened.active,
           "scan_first": a.scan_first,
           "total_s": total, "rescored_mean": float(r.mean()),
           "rescored_p99": float(r.quantile(0.99))}
    print(f"B={a.B} N={a.N} d={a.d} k={a.k} product={a.product} blocks {br}x{bc}, one thread, CPU time")
    print(f"bare blocked GEMM            {t_bare:8.3f} s")
    print(f"certified selection          {total:8.3f} s  ({total / t_bare:.3f}x the bare GEMM)")
    print(f"  product (GEMM + operands)  {t_product:8.3f} s")
    print(f"  screen                     {t_screen:8.3f} s  ({t_screen / total:.1%} of the selection)")
    print(f"    bulk scan                {t_scan:8.3f} s  ({t_scan / total:.1%})")
    print(f"    bounds, pre-selection, canonical rescoring, offers {t_screen - t_scan:8.3f} s "
          f"({(t_screen - t_scan) / total:.1%}); rescored per row: mean {r.mean():.1f}, p99 {r.quantile(0.99):.0f}")
    print(f"      of which the deferred rescoring at the end {t_flush:8.3f} s ({t_flush / total:.1%})"
          if screened.active else "      (no deferred rescoring)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
