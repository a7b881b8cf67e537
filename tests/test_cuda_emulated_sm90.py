"""The sm_90a wgmma fused score kernel (csrc/cuda/topk_fused_sm90.cu), its own source, run on the CPU by
the emulator of tests/cuda_emu in its sm_90 mode, against exact scores (torch on the CPU).

The emulator's sm_90 device (``configure(sm90=True)``: device 1, compute capability 9.0, a few SMs)
runs the kernel's mbarrier ring, its bulk tensor copies (tensor maps from the emulated
cuTensorMapEncodeTiled, 128-byte swizzle, zero fill past the edges) and its wgmma.mma_async from
shared-memory descriptors into the warpgroup accumulator fragment, all written from the PTX ISA. A
wgmma computes when its group is waited for and poisons its accumulators until then; a bulk copy lands
when issued or at the first failed poll of its barrier (or, slowed, once due); warpgroup collectives
need all 128 threads; a block may not end with copies in flight.
Small-integer inputs make every product and every fp32 sum exact, so the kept lists must equal the
exact scores in bounds bit for bit. Skips where the emulator cannot be built.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import zlib
from pathlib import Path

import pytest
import torch

import hnsample
from hnsample import _C, settings
from hnsample.engine import SelectionState


def _sibling(name: str):
    """A test module of this directory (the suite imports by path: --import-mode=importlib)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_base = _sibling("test_cuda_emulated")
emu = _base.emu  # the fixture: the _cuda_emu module, built once per source tree
CODES, DRIVER, int_matrix, row_bounds_between = _base.CODES, _base.DRIVER, _base.int_matrix, _base.row_bounds_between

SMS = 2  # emulated SMs: few, so the persistent CTAs walk several tiles each
WGMMA = [_C.FusedKernel.wgmma, _C.FusedKernel.wgmma_256x128, _C.FusedKernel.wgmma_128x256]
KERNELS = list(zip(WGMMA, ["128x128", "256x128", "128x256"], strict=True))


@pytest.fixture
def sm90(emu):
    """The emulator with the compute capability 9.0 device current; back to the 8.0 one after."""
    emu.configure(sm90=True, sm90_sms=SMS)
    yield emu
    emu.configure()


def wgmma_launch(emu, q, c, lo, hi, cap, kernel, *, row_scale=None, col_scale=None, lists=True):
    """One emulated fused launch with FusedBlock.kernel = kernel; returns (per-row dict col -> score,
    or None without lists, counts)."""
    kept, counts, _, _ = _base.fused_launch(emu, q, c, lo, hi, cap, row_scale=row_scale, col_scale=col_scale,
                                            kernel=kernel, lists=lists)
    return kept, counts


def assert_kept_exactly(kept, counts, s, lo, hi):
    """The lists hold exactly {(j, s_ij): lo_i <= s_ij <= hi_i} and the counts their sizes."""
    for i in range(s.shape[0]):
        want = ((s[i] >= lo[i]) & (s[i] <= hi[i])).nonzero().flatten().tolist()
        assert sorted(kept[i]) == want, f"row {i}"
        assert all(kept[i][j] == float(s[i, j]) for j in want), f"row {i}"
        assert int(counts[i]) == len(want), f"row {i}"


def test_sm90_device_and_occupancy(emu):
    emu.configure()
    assert emu.current_device() == 0 and not emu.topk_fused_wgmma_available(0)
    assert emu.topk_fused_wgmma_ctas_per_sm(0, _C.FusedKernel.wgmma) == 0
    emu.configure(sm90=True, sm90_sms=SMS)
    try:
        assert emu.current_device() == 1 and emu.topk_fused_wgmma_available(1)
        # 99 KiB CTAs: two per SM of 228 KiB; the 256-row and 256-column shapes: one
        assert [emu.topk_fused_wgmma_ctas_per_sm(1, k) for k in WGMMA] == [2, 1, 1]
        for kernel in (_C.FusedKernel(5), _C.FusedKernel.mma, _C.FusedKernel.auto):
            with pytest.raises(RuntimeError, match="kernel must be one of the wgmma kernels"):
                emu.topk_fused_wgmma_ctas_per_sm(1, kernel)
    finally:
        emu.configure()


@pytest.mark.parametrize("mode,message", [(0, "exited"), (1, "does not exist"), (2, "while 64 threads"),
                                          (3, "without a wgmma.fence"), (4, "without a bound"),
                                          (5, "more arrivals than its count")],
                         ids=["exited_thread", "missing_warp", "mismatched", "no_fence", "unbounded_poll",
                              "surplus_arrival"])
def test_emulator_sm90_faults_instead_of_hanging(emu, mode, message):
    with pytest.raises(emu.KernelFault, match=message):
        emu.selftest_sm90_faults(mode)


# (rows, cols, d): ragged in every direction; d = 8 and 40 leave most of the only K step zero-filled,
# 136 takes three K steps (a ragged third); with 2 SMs every shape has more tiles than CTAs, so the
# 3- and 4-stage rings wrap across tiles and their phases flip many times.
SHAPES = [(37, 515, 8), (200, 300, 40), (130, 400, 64), (300, 260, 136)]


def check_lists(emu, q, c, kernel, gen) -> torch.Tensor:
    """Launches `kernel` over q, c with row bounds cutting inside each row's exact scores and checks
    the lists against them; returns the counts."""
    s = (q.double() @ c.double().T).float()
    assert torch.equal(s, q.float() @ c.float().T)  # exact: torch.mm agrees
    lo, hi = row_bounds_between(s, gen)
    kept, counts = wgmma_launch(emu, q, c, lo, hi, c.shape[0], kernel)
    assert_kept_exactly(kept, counts, s, lo, hi)
    return counts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{b}x{n}x{d}" for b, n, d in SHAPES])
@pytest.mark.parametrize("kernel,kname", KERNELS, ids=[k[1] for k in KERNELS])
def test_wgmma_keeps_exactly_the_scores_in_bounds(sm90, dtype, shape, kernel, kname):
    b, n, d = shape
    gen = torch.Generator().manual_seed(zlib.crc32(f"{shape}/{int(kernel)}/{dtype}".encode()))
    q, c = int_matrix(b, d, gen).to(dtype), int_matrix(n, d, gen).to(dtype)
    counts = check_lists(sm90, q, c, kernel, gen)
    assert int(counts[0]) == n and int(counts[1]) == 0 and int(counts[2]) == 0
    assert not sm90.topk_fused_wgmma_stalled(1)


def check_scaled_lists(emu, kernel, gen, b: int, n: int, d: int) -> None:
    """acc * row scale, then * column scale, in fp32: what the epilogue computes with scales; the
    column scales differ per column, so one staged for the wrong column or tile shows."""
    q, c = int_matrix(b, d, gen).to(torch.float16), int_matrix(n, d, gen).to(torch.float16)
    rs, cs = torch.rand(b, generator=gen) + 0.5, torch.rand(n, generator=gen) + 0.5
    s = ((q.double() @ c.double().T).float() * rs[:, None]) * cs[None, :]
    lo, hi = row_bounds_between(s, gen)
    kept, counts = wgmma_launch(emu, q, c, lo, hi, n, kernel, row_scale=rs, col_scale=cs)
    assert_kept_exactly(kept, counts, s, lo, hi)


@pytest.mark.parametrize("kernel,kname", KERNELS, ids=[k[1] for k in KERNELS])
def test_wgmma_scales_and_cosine(sm90, kernel, kname):
    check_scaled_lists(sm90, kernel, torch.Generator().manual_seed(31 + int(kernel)), 140, 300, 72)


SCHEDULES = [("warps_ascending", True), ("warps_descending", True), ("warps_ascending", False),
             ("warps_descending", False), ("round_robin", True)]


@pytest.mark.parametrize("schedule,immediate", SCHEDULES,
                         ids=[f"{s}-{'immediate' if i else 'deferred'}" for s, i in SCHEDULES])
@pytest.mark.parametrize("kernel,kname", KERNELS[:2], ids=[k[1] for k in KERNELS[:2]])
def test_wgmma_under_schedule_extremes(emu, schedule, immediate, kernel, kname):
    # The producer warp running ahead of the consumers (or behind them), copies landing when issued
    # or as late as a waiter could tell: a missing or wrong-parity wait, or a stage released before
    # its wgmma has read it, changes the lists under one of these.
    gen = torch.Generator().manual_seed(40 + int(kernel))
    b, n, d = 150, 290, 136
    q, c = int_matrix(b, d, gen).to(torch.bfloat16), int_matrix(n, d, gen).to(torch.bfloat16)
    emu.configure(schedule, immediate, sm90=True, sm90_sms=SMS)
    try:
        check_lists(emu, q, c, kernel, gen)
    finally:
        emu.configure()


@pytest.mark.parametrize("schedule", ["warps_ascending", "warps_descending"])
@pytest.mark.parametrize("kernel,kname", [KERNELS[0], KERNELS[2]], ids=[KERNELS[0][1], KERNELS[2][1]])
def test_wgmma_column_scales_under_schedule_extremes(emu, schedule, kernel, kname):
    # Each warpgroup stages every tile's column scales into one of two shared buffers with copies that
    # land when issued here: one warp running ahead into its next tiles while its siblings still filter
    # the current one must not overwrite the scales they read (one SM: each CTA walks 5 or 6 tiles).
    emu.configure(schedule, True, sm90=True, sm90_sms=1)
    try:
        check_scaled_lists(emu, kernel, torch.Generator().manual_seed(50 + int(kernel)), 200, 520, 24)
    finally:
        emu.configure()


@pytest.mark.parametrize("immediate", [True, False], ids=["immediate", "deferred"])
def test_wgmma_long_k_many_phases(emu, immediate):
    # 16 K steps per tile and two tiles per CTA: every stage of the ring goes round about ten times,
    # so a barrier count off by one (an arrival carried into the next phase each round) adds up to a
    # whole phase and the producer refills a stage still in use.
    gen = torch.Generator().manual_seed(9)
    b, n, d = 200, 300, 1000
    q, c = int_matrix(b, d, gen, -2, 3).to(torch.bfloat16), int_matrix(n, d, gen, -2, 3).to(torch.bfloat16)
    emu.configure("warps_descending", immediate, sm90=True, sm90_sms=SMS)
    try:
        check_lists(emu, q, c, _C.FusedKernel.wgmma, gen)
    finally:
        emu.configure()


@pytest.mark.parametrize("d,pad", [(48, 16), (13, 3)], ids=["d48", "d13"])
def test_wgmma_strided_rows(sm90, d, pad):
    # Views into wider matrices: row strides of whole 16 bytes, past d (d = 13: rows of 26 bytes).
    gen = torch.Generator().manual_seed(5 + d)
    b, n = 70, 200
    qw, cw = int_matrix(b, d + pad, gen).to(torch.bfloat16), int_matrix(n, d + pad + 8, gen).to(torch.bfloat16)
    check_lists(sm90, qw[:, :d], cw[:, 8:8 + d], _C.FusedKernel.wgmma, gen)


@pytest.mark.parametrize("kernel,kname", KERNELS, ids=[k[1] for k in KERNELS])
def test_wgmma_list_overflow_is_counted(sm90, kernel, kname):
    _base.check_list_overflow(sm90, kernel)


@pytest.mark.parametrize("kernel,kname", KERNELS, ids=[k[1] for k in KERNELS])
def test_wgmma_appends_one_atomic_per_warp_and_row(sm90, kernel, kname):
    # A consumer warp holds all the tile's columns of its 16 rows, the four lanes of a quad a quarter
    # each: one atomicAdd per row and tile with a survivor (one per survivor before).
    span = 256 if kernel == _C.FusedKernel.wgmma_128x256 else 128
    _base.check_one_atomic_per_warp_and_row(sm90, kernel, span, torch.bfloat16, (150, 300, 40))


@pytest.mark.parametrize("kernel,kname", KERNELS, ids=[k[1] for k in KERNELS])
def test_wgmma_closed_rows_take_no_appends(sm90, kernel, kname):
    _base.check_closed_rows_take_no_appends(sm90, kernel, 256 if kernel == _C.FusedKernel.wgmma_128x256 else 128)


def test_wgmma_only_lane_0_reads_the_timer(emu):
    # Slow copies keep the consumer warps in the slow path of their full-barrier waits for many rounds.
    # Every lane polls its own mbarrier.try_wait there (its acquire of the stage), but only lane 0 of a
    # warp reads %globaltimer (and the global stall flag) to decide when to give up; the producer is a
    # lane 0 too. The emulator counts the timer reads per lane; the lists stay exact.
    gen = torch.Generator().manual_seed(21)
    b, n, d = 150, 290, 136
    q, c = int_matrix(b, d, gen).to(torch.bfloat16), int_matrix(n, d, gen).to(torch.bfloat16)
    emu.configure(sm90=True, sm90_sms=SMS, bulk_delay_us=2000)  # about 100 failed polls a stage
    try:
        emu.topk_fused_wgmma_clear_stall(1)
        emu.reset_counters()
        check_lists(emu, q, c, _C.FusedKernel.wgmma, gen)
        reads = emu.timer_reads()
        assert reads[0] > 0 and reads[1:] == [0] * 31
        assert not emu.topk_fused_wgmma_stalled(1)
    finally:
        emu.configure()


def test_wgmma_kernel_field_errors(emu):
    gen = torch.Generator().manual_seed(3)
    q = int_matrix(8, 40, gen).to(torch.bfloat16)
    lo, hi = torch.zeros(8), torch.zeros(8)
    emu.configure()  # the compute capability 8.0 device: no wgmma
    with pytest.raises(RuntimeError, match="cannot run it"):
        wgmma_launch(emu, q, q, lo, hi, 4, _C.FusedKernel.wgmma)
    with pytest.raises(RuntimeError, match="multiple of 32"):  # auto takes mma.sync there
        wgmma_launch(emu, q, q, lo, hi, 4, _C.FusedKernel.auto)
    emu.configure(sm90=True, sm90_sms=SMS)
    try:
        with pytest.raises(_C.ParamError, match="fused kernel code 5 is unknown"):
            wgmma_launch(emu, q, q, lo, hi, 4, _C.FusedKernel(5))
        with pytest.raises(RuntimeError, match="needs bf16/fp16 inputs"):  # base 2 bytes past 16
            shifted = int_matrix(8, 48, gen).to(torch.bfloat16)
            wgmma_launch(emu, shifted[:, 1:41], q, lo, hi, 4, _C.FusedKernel.wgmma_256x128)
        with pytest.raises(RuntimeError, match="needs bf16/fp16 inputs"):  # rows 2 bytes apart from 16
            wide = int_matrix(8, 41, gen).to(torch.bfloat16)
            wgmma_launch(emu, wide[:, :40], q, lo, hi, 4, _C.FusedKernel.wgmma_128x256)
    finally:
        emu.configure()


def test_auto_dispatch_takes_wgmma_on_sm90(sm90):
    # d = 40 is no multiple of 32, which only the mma.sync kernel needs: auto runs it through wgmma.
    gen = torch.Generator().manual_seed(4)
    b, n, d = 90, 150, 40
    check_lists(sm90, int_matrix(b, d, gen).to(torch.bfloat16), int_matrix(n, d, gen).to(torch.bfloat16),
                _C.FusedKernel.auto, gen)


def test_wgmma_lost_copies_take_the_stall_path(emu):
    # Bulk copies that never land: every bounded wait runs out (the emulated global timer advances
    # while threads poll), the kernel marks every row overflowed instead of hanging, the stall flag
    # stays set and later launches overflow at once, until it is cleared.
    gen = torch.Generator().manual_seed(6)
    b, n, d, cap = 130, 300, 64, 8
    q, c = int_matrix(b, d, gen).to(torch.bfloat16), int_matrix(n, d, gen).to(torch.bfloat16)
    lo, hi = torch.full((b,), -math.inf), torch.full((b,), math.inf)
    emu.configure(sm90=True, sm90_sms=SMS, lose_bulk_copies=True)
    try:
        emu.topk_fused_wgmma_clear_stall(1)
        _, counts = wgmma_launch(emu, q, c, lo, hi, cap, _C.FusedKernel.wgmma, lists=False)
        assert torch.all(counts == cap + 1)
        assert emu.topk_fused_wgmma_stalled(1)
        emu.configure(sm90=True, sm90_sms=SMS)
        _, counts = wgmma_launch(emu, q, c, lo, hi, cap, _C.FusedKernel.wgmma, lists=False)
        assert torch.all(counts == cap + 1)
        emu.topk_fused_wgmma_clear_stall(1)
        assert not emu.topk_fused_wgmma_stalled(1)
        _, counts = wgmma_launch(emu, q, c, lo, hi, n, _C.FusedKernel.wgmma, lists=False)
        assert torch.all(counts == n)  # lists of n slots: nothing overflows, every survivor is counted
    finally:
        emu.topk_fused_wgmma_clear_stall(1)
        emu.configure()


@pytest.mark.parametrize("d", [64, 136])
def test_wgmma_copy_landing_as_a_wait_times_out(emu, d):
    # A copy landing just after one warp's wait ran out (or saw another CTA's stall flag) and before
    # its warpgroup's other warps look: they must still agree, or the warpgroup splits across its
    # collective wgmma instructions (a hang or garbage on a GPU, a fault here). Bisects the copy delay
    # for the point where launches turn from scoring to the stall path; in every launch each row must
    # have its exact list or be marked overflowed, and a warpgroup must leave its tiles together.
    gen = torch.Generator().manual_seed(7)
    b, n = 200, 200  # 4 tiles for 2 CTAs: after a split tile each CTA has another to run
    q, c = int_matrix(b, d, gen).to(torch.bfloat16), int_matrix(n, d, gen).to(torch.bfloat16)
    s = (q.double() @ c.double().T).float()
    lo, hi = torch.full((b,), -math.inf), torch.full((b,), math.inf)

    def stalls(delay_us: float) -> bool:
        emu.configure(sm90=True, sm90_sms=1, bulk_delay_us=delay_us)
        emu.topk_fused_wgmma_clear_stall(1)
        _, counts, _, (scores, cols, _) = _base.fused_launch(emu, q, c, lo, hi, n, kernel=_C.FusedKernel.wgmma, lists=False)
        for i in range(b):
            if int(counts[i]) == n + 1:
                continue
            assert int(counts[i]) == n and sorted(cols[i].tolist()) == list(range(n)), f"row {i}"
            assert torch.equal(scores[i], s[i, cols[i].long()]), f"row {i}"
        stalled = emu.topk_fused_wgmma_stalled(1)
        assert stalled == bool((counts == n + 1).any())
        return stalled

    try:
        fast, slow = 0.9e6, 1.1e6  # the kernel's waits give up after 1 s
        assert not stalls(fast) and stalls(slow)
        while slow - fast > 1e-3:
            mid = (fast + slow) / 2
            if stalls(mid):
                slow = mid
            else:
                fast = mid
    finally:
        emu.topk_fused_wgmma_clear_stall(1)
        emu.configure()


@pytest.mark.parametrize("name,spec", DRIVER[:3], ids=[x[0] for x in DRIVER[:3]])
@pytest.mark.parametrize("fkernel", ["wgmma", "wgmma_128x256"])
@pytest.mark.parametrize("fname,dtype,metric", [("bf16", torch.bfloat16, "dot"), ("f16_cosine", torch.float16, "cosine")],
                         ids=["bf16", "f16_cosine"])
def test_fused_driver_on_emulated_wgmma(sm90, name, spec, fkernel, fname, dtype, metric):
    # CudaDriver.run_fused end to end on the emulated sm_90 device: seed through the select kernel,
    # then chunks of doubling width through the wgmma kernel (d = 40: the mma.sync kernel could not
    # take it), bounds and offers; equals the CPU op.
    _base.run_fused_driver(sm90, f"{name}/{fname}/{fkernel}", spec, dtype, metric, 40, cuda_fused_kernel=fkernel)
    assert not sm90.topk_fused_wgmma_stalled(1)


def test_fused_driver_survives_a_wgmma_stall(emu):
    # The containment end to end: the copy engine loses every copy, so the first wgmma launch stalls and
    # overflows every row. The driver reads the stall flag (only then), warns, clears the flag, turns the
    # fused path off for the device and takes the rest of the candidates on the two-pass path: one
    # fused launch instead of every later one failing in silence, and the result is still the CPU op's.
    gen = torch.Generator().manual_seed(zlib.crc32(b"stall"))
    b, n, d, k = 40, 2600, 40, 10
    q, c = _base.int_matrix(b, d, gen).to(torch.bfloat16), _base.int_matrix(n, d, gen).to(torch.bfloat16)
    want = hnsample.topk_from_scores(_base.exact_fused_scores(q, c, "dot"), k)
    emu.configure(sm90=True, sm90_sms=SMS, lose_bulk_copies=True)
    try:
        emu.topk_fused_wgmma_clear_stall(1)
        driver, calls = _base.emulated_driver(emu, product=_base.ExactGemm)
        sel = _base.selection(_base.exact_fused_scores(q, c, "dot"), k, {})
        state = SelectionState(sel, b, q.device, kernels=driver.kernels)
        with settings.override(cuda_fused_seed_cols=300, cuda_fused_kernel="wgmma"):
            with pytest.warns(RuntimeWarning, match="stalled"):
                driver.run_fused(q, c, state, "dot", 1 << 16, 0)
            assert driver.fused_off(q.device)
            assert driver.choose_path(q, c, "dot", state) == "two_pass"  # "auto" and "fused" alike
            with settings.override(cuda_path="fused"):
                assert driver.choose_path(q, c, "dot", state) == "two_pass"
        got_s, got_j = _base.finalize(state, emu)
        assert calls["topk_fused_scores"] == 1 and calls["topk_offer_candidates"] == 0
        assert not emu.topk_fused_wgmma_stalled(1)  # cleared: other drivers' launches are not poisoned
        assert torch.equal(got_j, want.indices)
        assert torch.equal(got_s.float(), want.scores)
    finally:
        emu.topk_fused_wgmma_clear_stall(1)
        emu.configure()


def _bench_wgmma():
    """benchmarks/bench_wgmma.py as a module (it puts benchmarks/ on sys.path to import gpu_check: undone)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_wgmma.py"
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("bench_wgmma", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


@pytest.mark.parametrize("kernel", [_C.FusedKernel.mma, *WGMMA], ids=["mma", *(k[1] for k in KERNELS)])
def test_bench_wgmma_blocks_run_on_the_emulator(sm90, kernel):
    # The device benchmark's own FusedBlock and lists (benchmarks/bench_wgmma.py), launched on the
    # emulated sm_90 device: with nothing filtered, every row lists every candidate with its exact score.
    bench = _bench_wgmma()
    assert set(bench.KERNELS) == {_C.FusedKernel.mma, *WGMMA}
    gen = torch.Generator().manual_seed(int(kernel))
    b, n, d = 130, 300, 64
    q, c = int_matrix(b, d, gen).to(torch.bfloat16), int_matrix(n, d, gen).to(torch.bfloat16)
    lo, hi = torch.full((b,), -math.inf), torch.full((b,), math.inf)
    lists = bench.Lists(b, n, q.device)
    sm90.topk_fused_scores(bench.block(q, c, lo, hi, lists, kernel), 0)
    assert torch.equal(lists.count, torch.full((b,), n, dtype=torch.int32))
    order = lists.col.argsort(dim=1)
    assert torch.equal(lists.col.gather(1, order).long(), torch.arange(n).expand(b, n))
    assert torch.equal(lists.score.gather(1, order), (q.double() @ c.double().T).float())
    assert not sm90.topk_fused_wgmma_stalled(1)
