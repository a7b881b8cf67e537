"""The installed package is torch-agnostic at the binary level: the compiled ``hnsample._C`` links no
libtorch/libc10 (so one wheel works with every torch version), and it loads and runs its kernels in
a process where torch cannot be imported at all."""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import json
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hnsample

# Libraries whose presence would tie the binary to one torch build (or to a shared CUDA runtime, which
# CMakeLists.txt links statically so the wheel needs only the driver).
FORBIDDEN = ("libtorch", "libc10", "libcudart.so", "libpython")


def compiled_module_path() -> Path:
    """Path of the installed _C, found without importing hnsample (so torch stays out of the way)."""
    spec = importlib.util.find_spec("hnsample")
    assert spec is not None and spec.submodule_search_locations
    for directory in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            candidate = Path(directory) / f"_C{suffix}"
            if candidate.is_file():
                return candidate
    raise AssertionError(f"no compiled _C under {list(spec.submodule_search_locations)}")


def elf_needed(path: Path) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF shared object, read from its dynamic segment
    (what ``readelf -d`` prints as NEEDED), with only the standard library."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise AssertionError(f"{path} is not a 64-bit little-endian ELF file")
    e_phoff, = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    segments = [struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * e_phentsize) for i in range(e_phnum)]
    dynamic = next(s for s in segments if s[0] == 2)  # PT_DYNAMIC
    entries = []
    for off in range(dynamic[2], dynamic[2] + dynamic[5], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:  # DT_NULL
            break
        entries.append((tag, val))
    strtab_vaddr = next(v for t, v in entries if t == 5)  # DT_STRTAB
    # The string table is addressed virtually; map it to a file offset through its PT_LOAD segment.
    load = next(s for s in segments if s[0] == 1 and s[3] <= strtab_vaddr < s[3] + s[5])
    strtab = strtab_vaddr - load[3] + load[2]
    names = []
    for tag, val in entries:
        if tag == 1:  # DT_NEEDED
            end = data.index(b"\0", strtab + val)
            names.append(data[strtab + val:end].decode())
    return names


def test_compiled_module_is_the_installed_one():
    so = compiled_module_path()
    assert Path(hnsample._C.__file__).resolve() == so.resolve()
    assert importlib.metadata.version("hnsample") == hnsample.__version__


def test_needs_no_torch_library():
    needed = elf_needed(compiled_module_path())
    assert "libc.so.6" in needed or any(n.startswith("libc.") for n in needed), needed
    assert not [n for n in needed if n.startswith(FORBIDDEN)], needed


@pytest.mark.skipif(shutil.which("readelf") is None, reason="binutils readelf is not installed")
def test_readelf_agrees():
    out = subprocess.run(["readelf", "-d", str(compiled_module_path())], check=True, capture_output=True,
                         text=True).stdout
    listed = [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]
    assert listed == elf_needed(compiled_module_path())


@pytest.mark.skipif(shutil.which("ldd") is None, reason="ldd is not installed")
def test_every_dependency_resolves_outside_torch():
    out = subprocess.run(["ldd", str(compiled_module_path())], check=True, capture_output=True,
                         text=True).stdout
    assert "not found" not in out, out
    assert "torch" not in out and "c10" not in out, out


# Loads _C by file path (hnsample/__init__ would import torch) in a process where ``import torch``
# raises, then runs one real top-k selection through the raw-pointer interface with ctypes buffers.
_NO_TORCH_SCRIPT = textwrap.dedent(
    """
    import ctypes, importlib.machinery, importlib.util, json, sys
    sys.modules["torch"] = None
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("torch was importable")
    path = sys.argv[1]
    loader = importlib.machinery.ExtensionFileLoader("hnsample._C", path)
    spec = importlib.util.spec_from_file_location("hnsample._C", path, loader=loader)
    C = importlib.util.module_from_spec(spec)
    loader.exec_module(C)
    assert "torch" not in sys.modules or sys.modules["torch"] is None

    rows, cols, k = 2, 5, 3
    scores = (ctypes.c_float * (rows * cols))(0.1, 0.9, 0.5, 0.7, 0.3,  -1.0, 2.0, 0.0, 2.5, 1.5)
    st_score = (ctypes.c_double * (rows * k))()
    st_index = (ctypes.c_int64 * (rows * k))()
    st_count = (ctypes.c_int64 * (rows * 2))()
    out_s = (ctypes.c_double * (rows * k))()
    out_j = (ctypes.c_int64 * (rows * k))()
    p = C.TopkParams()
    p.num_rows, p.k, p.capacity = rows, k, k
    p.st_score, p.st_index, p.st_count = (ctypes.addressof(a) for a in (st_score, st_index, st_count))
    C.topk_select_block(p, ctypes.addressof(scores), 0, rows, cols, cols, 1, 0, 0, False, 0, 1)
    C.topk_finalize(p, ctypes.addressof(out_s), ctypes.addressof(out_j), False, 0, 1)
    print(json.dumps({"indices": list(out_j), "scores": [round(v, 6) for v in out_s],
                      "built_with_cuda": C.built_with_cuda, "cpu_isa": C.cpu_isa()}))
    """
)


def test_compiled_module_runs_without_torch():
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH_SCRIPT, str(compiled_module_path())],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # Row 0 keeps candidates 1, 3, 2; row 1 keeps 3, 1, 4 (ids are global columns, per row).
    assert result["indices"] == [1, 3, 2, 3, 1, 4]
    assert result["scores"] == [0.9, 0.7, 0.5, 2.5, 2.0, 1.5]
    assert result["built_with_cuda"] == bool(hnsample._C.built_with_cuda)
    assert result["cpu_isa"] == hnsample._C.cpu_isa()
