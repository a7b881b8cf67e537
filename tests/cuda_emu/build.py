"""Builds ``_cuda_emu``: hnsample's CUDA kernel sources compiled as C++ for the CPU emulator of this
directory (see cuda_runtime.h), with the launcher bindings of emu_bindings.cpp.

``load()`` compiles the translation units in parallel with g++ (-O1) into a cache directory keyed by
a hash of every input, so an unchanged tree is built once (about 10 s on two cores), and imports the
module. Each .cu file stays its own translation unit, as under nvcc: their anonymous namespaces reuse
names (kThreads, load, store) that would collide in one. ``python
tests/cuda_emu/build.py`` builds and prints where the module is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# The kernels that run on the emulator, each with the extra flags of its translation unit: the wgmma
# kernel's device code exists only under the sm_90a feature macro (as in nvcc's sm_90a pass).
KERNELS = {"topk_select.cu": [], "topk_screen.cu": [], "topk_fused.cu": [], "info_nce.cu": [],
           "topk_fused_sm90.cu": ["-D__CUDA_ARCH_FEAT_SM90_ALL"]}
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-DHNSAMPLE_CUDA_EMU", "-DHNSAMPLE_WITH_CUDA", "-Wall",
         "-Wno-unknown-pragmas", "-Wno-unused-parameter", "-Wno-unused-function"]


class Unavailable(RuntimeError):
    """The emulator cannot be built here (no g++, no kernel sources or no pybind11 headers)."""


def sources() -> list[Path]:
    """The translation units: the emulator's runtime, bindings and self-test kernels, then the CUDA
    kernel sources."""
    kernels = [ROOT / "csrc" / "cuda" / name for name in KERNELS]
    missing = [str(p) for p in kernels if not p.is_file()]
    if missing:
        raise Unavailable(f"kernel sources not found: {missing}")
    return [HERE / "emu_runtime.cpp", HERE / "emu_bindings.cpp", HERE / "emu_selftest.cu", *kernels]


def _include_dirs() -> list[str]:
    try:
        import pybind11
    except ImportError as e:  # pragma: no cover - pybind11 is a build requirement
        raise Unavailable("pybind11 is not installed") from e
    return [str(HERE), str(ROOT / "csrc"), pybind11.get_include(), sysconfig.get_paths()["include"]]


def _digest(compiler: str, includes: list[str]) -> str:
    h = hashlib.sha256()
    h.update(" ".join([compiler, *FLAGS, *includes, sys.version, repr(sorted(KERNELS.items()))]).encode())
    watched = sorted({*sources(), *HERE.glob("*.h"), *(ROOT / "csrc").rglob("*.h"),
                      *(ROOT / "csrc").rglob("*.cuh")})
    for path in watched:
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def build(cache: Path | None = None) -> Path:
    """Compiles (or finds in the cache) the module and returns the path of its shared library."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise Unavailable("no C++ compiler (g++) on PATH")
    includes = _include_dirs()
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    out_dir = (cache or Path(tempfile.gettempdir()) / "hnsample_cuda_emu") / _digest(compiler, includes)
    target = out_dir / f"_cuda_emu{suffix}"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out_dir))
    inc = [f"-I{d}" for d in includes]
    jobs, objects = [], []
    for src in sources():
        obj = work / (src.name + ".o")
        objects.append(obj)
        cmd = [compiler, *FLAGS, *KERNELS.get(src.name, []), *inc, "-x", "c++", "-c", str(src), "-o", str(obj)]
        jobs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    errors = []
    for cmd, proc in jobs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            errors.append(f"$ {' '.join(cmd)}\n{out}")
    if errors:
        raise RuntimeError("building the CUDA emulator failed:\n" + "\n".join(errors))
    tmp_target = work / target.name
    link = [compiler, "-shared", "-o", str(tmp_target), *map(str, objects)]
    proc = subprocess.run(link, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"linking the CUDA emulator failed:\n$ {' '.join(link)}\n{proc.stderr}")
    os.replace(tmp_target, target)  # atomic: a concurrent build never sees half a library
    shutil.rmtree(work, ignore_errors=True)
    return target


def load(cache: Path | None = None) -> ModuleType:
    """Builds if needed and imports ``_cuda_emu``."""
    path = build(cache)
    spec = importlib.util.spec_from_file_location("_cuda_emu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    print(build())
