"""The CPU kernels' worker pool (csrc/cpu/thread_pool.cpp), tested in C++: tests/cpp/thread_pool_test.cpp
is compiled with the pool's source and run plainly, under ThreadSanitizer and under AddressSanitizer +
UndefinedBehaviorSanitizer (chunk boundaries, exceptions, concurrent and nested callers, fork, a refused
thread start). Skips when g++ or the C++ sources are missing (a wheel's test run), and a sanitizer
variant when the compiler cannot build it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_SOURCE = Path(__file__).resolve().parent / "cpp" / "thread_pool_test.cpp"
POOL_SOURCE = ROOT / "csrc" / "cpu" / "thread_pool.cpp"

VARIANTS = {
    "plain": ["-O2"],
    "tsan": ["-O1", "-g", "-fsanitize=thread"],
    "asan-ubsan": ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                   "-fno-omit-frame-pointer"],
}
SANITIZER_OPTIONS = {
    "TSAN_OPTIONS": "halt_on_error=1:second_deadlock_stack=1",
    "ASAN_OPTIONS": "halt_on_error=1:detect_leaks=1",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
}


def _clean_env() -> dict[str, str]:
    """The environment without preloaded sanitizer runtimes (the sanitizer lane of .ci/run preloads them
    into Python; the compiler and the test binary bring their own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", *SANITIZER_OPTIONS)}
    env.update(SANITIZER_OPTIONS)
    return env


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_thread_pool_in_cpp(variant, tmp_path):
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None or not POOL_SOURCE.is_file() or not TEST_SOURCE.is_file():
        pytest.skip("needs g++ and the C++ sources of a checkout")
    binary = tmp_path / f"thread_pool_test_{variant}"
    cmd = [compiler, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-pthread", *VARIANTS[variant],
           f"-I{ROOT / 'csrc'}", str(TEST_SOURCE), str(POOL_SOURCE), "-o", str(binary)]
    build = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env())
    if build.returncode != 0:
        if variant != "plain" and "sanitize" in build.stderr:
            pytest.skip(f"the compiler cannot build the {variant} variant: {build.stderr[-300:]}")
        raise AssertionError(f"$ {' '.join(cmd)}\n{build.stderr}")
    run = subprocess.run([str(binary)], capture_output=True, text=True, env=_clean_env(), timeout=600)
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr[-6000:]}"
    assert run.stdout.strip().endswith("all passed"), run.stdout
