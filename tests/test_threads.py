"""Threading: the compiled kernels use plain std::threads and no OpenMP runtime of their own, so they
coexist with torch's OpenMP/MKL GEMMs in one process, release the GIL, and give results that do not
depend on thread counts or on other work running at the same time."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import hnsample
from hnsample import _C
from hnsample.engine import SelectionState

OPENMP_OR_TORCH = re.compile(r"lib(gomp|iomp\d*|omp|torch\w*|c10\w*)(\.|-)")


def _needed_libraries(path: str) -> list[str]:
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


@pytest.mark.skipif(
    shutil.which("readelf") is None or shutil.which("ldd") is None, reason="needs binutils and ldd"
)
def test_compiled_module_links_neither_openmp_nor_torch():
    so = _C.__file__
    needed = _needed_libraries(so)
    assert needed, "readelf found no NEEDED entries"
    assert any(lib.startswith("libc.so") for lib in needed)
    assert not [lib for lib in needed if OPENMP_OR_TORCH.match(lib)], needed
    resolved = subprocess.run(["ldd", so], capture_output=True, text=True, check=True).stdout
    names = [Path(line.split()[0]).name for line in resolved.splitlines() if line.strip()]
    assert not [lib for lib in names if OPENMP_OR_TORCH.match(lib)], resolved
    # the test would notice: torch's own CPU library does link an OpenMP runtime
    torch_cpu = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    if torch_cpu.exists():
        assert [lib for lib in _needed_libraries(str(torch_cpu)) if OPENMP_OR_TORCH.match(lib)]


def test_one_openmp_runtime_in_the_process():
    """In a fresh process (other tests may load libraries that bring their own runtime), torch plus
    hnsample running both kinds of work maps exactly the OpenMP runtime torch brought."""
    code = textwrap.dedent(
        """
        import re, torch, hnsample
        from pathlib import Path
        hnsample.topk_similarity(torch.randn(64, 8), torch.randn(500, 8), 4)
        torch.randn(200, 200) @ torch.randn(200, 200)
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if len(line.split()) >= 6}
        print(sorted({Path(p).name for p in paths if re.match(r"lib(gomp|iomp5|omp)\\b", Path(p).name)}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr
    runtimes = eval(proc.stdout.strip().splitlines()[-1])
    assert len(runtimes) == 1, runtimes  # torch brings exactly one; hnsample adds none


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    q = torch.from_numpy(rng.integers(-3, 4, (300, 16)).astype(np.float32))
    c = torch.from_numpy(rng.integers(-3, 4, (3000, 16)).astype(np.float32))
    pos = torch.from_numpy(rng.integers(0, 3000, (300, 2)))
    return q, c, pos


CONFIGS = [
    dict(),
    dict(relative_margin=0.1, skip_top=2),
    dict(sampling="softmax", seed=3, skip_top=5),
    dict(sampling="uniform", seed=4, pool=50),
]


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_results_do_not_depend_on_thread_count(restore_threads):
    q, c, pos = _problem()
    results = {}
    for threads in (1, 2, 7):
        torch.set_num_threads(threads)
        results[threads] = [
            hnsample.topk_similarity(q, c, 8, positives=pos, block_size=50_000, **kw) for kw in CONFIGS
        ]
    for threads in (2, 7):
        for a, b in zip(results[1], results[threads], strict=True):
            assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)


def test_concurrent_calls_alongside_torch_gemms(restore_threads):
    """Two Python threads call topk_similarity while a third keeps torch's OpenMP GEMMs busy; every
    result equals the serial one."""
    torch.set_num_threads(2)
    q, c, pos = _problem(1)
    serial = [hnsample.topk_similarity(q, c, 8, positives=pos, block_size=40_000, **kw) for kw in CONFIGS]
    stop = threading.Event()
    errors: list[BaseException] = []
    mismatches: list[tuple[int, int]] = []
    done: list[int] = []
    gemm_checks = []

    def gemms():
        a, b = torch.randn(256, 256, dtype=torch.float64), torch.randn(256, 256, dtype=torch.float64)
        want = a @ b
        try:
            while not stop.is_set():
                gemm_checks.append(torch.allclose(a @ b, want, rtol=0, atol=1e-12))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    def worker(offset: int):
        try:
            for it in range(6):
                i = (it + offset) % len(CONFIGS)
                got = hnsample.topk_similarity(q, c, 8, positives=pos, block_size=40_000, **CONFIGS[i])
                if not (
                    torch.equal(got.indices, serial[i].indices) and torch.equal(got.scores, serial[i].scores)
                ):
                    mismatches.append((offset, i))
                done.append(offset)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    gemm = threading.Thread(target=gemms)
    workers = [threading.Thread(target=worker, args=(o,)) for o in (0, 1)]
    gemm.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    stop.set()
    gemm.join(timeout=60)
    assert not errors, errors
    assert not any(w.is_alive() for w in workers) and not gemm.is_alive()
    assert len(done) == 12 and not mismatches, mismatches
    assert gemm_checks and all(gemm_checks)


def test_kernels_release_the_gil(restore_threads, make_selection):
    """While one kernel call runs, a pure-Python thread keeps running."""
    torch.set_num_threads(1)
    b, n = 600, 6000
    scores = torch.randn(b, n)
    sel = make_selection(b, n, 4, sampling="uniform", seed=1)
    state = SelectionState(sel, b, torch.device("cpu"))  # unbounded-pool sampling: every score is offered
    counter = [0]
    running = threading.Event()
    stop = threading.Event()

    def spin():
        running.set()
        while not stop.is_set():
            counter[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    running.wait()
    before = counter[0]
    state.offer(scores, 0, 0)  # a single call into the compiled module
    during = counter[0] - before
    stop.set()
    t.join()
    assert during > 1000, during


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs sched_getaffinity")
def test_kernels_start_no_persistent_threads():
    """std::threads are joined at the end of every call: the thread count of the process is unchanged."""

    def task_count() -> int:
        return len(os.listdir("/proc/self/task"))

    hnsample.topk_similarity(torch.randn(32, 8), torch.randn(100, 8), 2)  # warm up torch's pools
    before = task_count()
    for _ in range(3):
        hnsample.topk_from_scores(torch.randn(64, 300), 5, sampling="softmax", seed=1)
    assert task_count() <= before


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_narrower_simd_paths_give_the_same_answer(isa):
    """The run-time ISA choice can be capped; every path must select exactly what the reference does."""
    code = textwrap.dedent(
        """
        import torch, hnsample, hnsample._C as C
        from hnsample import _reference as R
        g = torch.Generator().manual_seed(3)
        q = torch.randint(-4, 5, (37, 8), generator=g).float()
        c = torch.randint(-4, 5, (1000, 8), generator=g).float()
        pos = torch.randint(-1, 1000, (37, 2), generator=g)
        kw = dict(positives=pos, absolute_margin=1.0, min_score=-20.0)
        got = hnsample.topk_similarity(q, c, 9, block_size=333, **kw)
        ref_s, ref_j = R.topk_similarity(q, c, 9, **kw)
        assert torch.equal(got.indices, ref_j), "indices differ"
        print(C.cpu_isa())
        """
    )
    env = dict(os.environ, HNSAMPLE_CPU_ISA=isa)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert proc.returncode == 0, proc.stderr
    expected = isa if isa == "scalar" or _cpu_has("avx2") else "scalar"
    assert proc.stdout.strip() == expected


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return f" {flag}" in f.read()
    except OSError:
        return False
