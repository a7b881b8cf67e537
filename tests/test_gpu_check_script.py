"""The device check script's own logic (shapes, correctness checks, table, JSON), on tiny CPU shapes:
device time is short, so the script must not fail on its first run for a reason the CPU shows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from fused_support import HostKernels

from hnsample import settings
from hnsample.engine import CudaBackend, registry
from hnsample.engine.cuda import CudaDriver

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_smoke_run(tmp_path, capsys):
    mod = _script()
    assert mod.main(["--smoke", "--reps", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    shapes = [r["shape"] for r in data["results"]]
    assert shapes == [s[0] for s in mod.SMOKE_SHAPES]
    assert all(r["check"]["ok"] for r in data["results"])
    cosine = data["results"][shapes.index("smoke_cosine")]
    assert cosine["check"]["recall"] == 1.0
    (nce,) = data["info_nce"]
    assert nce["shape"] == "nce_smoke" and nce["check"]["ok"] and nce["hnsample_grad_rel_err"] < 1e-5
    out = capsys.readouterr().out
    assert "x matmul" in out and "smoke_cosine" in out


def test_gpu_check_fused_path_helpers():
    # What the device run does around its fused rows, on the CPU: the settings each fused kernel runs
    # under, and the question whether the fused path takes a shape at all, asked of the driver that
    # serves the inputs' device (here an emulated one whose device has the fused kernels).
    mod = _script()
    before = settings.current()
    for name, want in [("mma", ("fused", "mma", 0)), ("mma_2stage", ("fused", "mma", 2)),
                       ("wgmma", ("fused", "wgmma", 0))]:
        with mod.fused_path(name):
            cfg = settings.current()
            assert (cfg.cuda_path, cfg.cuda_fused_kernel, cfg.cuda_fused_stages) == want
    assert settings.current() == before
    assert mod.fused_kernels() == ["mma", "mma_2stage"]  # no wgmma without a device
    launchers = SimpleNamespace(topk_fused_supported=lambda device: True)
    q, c = torch.zeros(8, 64, dtype=torch.bfloat16), torch.zeros(100, 64, dtype=torch.bfloat16)
    with registry.use("cpu", CudaBackend(CudaDriver(kernels=HostKernels(launchers)))):
        assert mod.fused_applies(q, c, 8, {})
        assert mod.fused_applies(q, c, 8, {"metric": "cosine", "skip_top": 2, "pool": 20, "sampling": "uniform",
                                           "seed": 1})
        assert mod.fused_applies(q.float(), c.float(), 8, {"positives": 1, "relative_margin": 0.05})
        assert not mod.fused_applies(q, c, 8, {"sampling": "softmax", "seed": 1})  # stream mode
        assert not mod.fused_applies(q[:, :40], c[:, :40], 8, {})  # d not a multiple of 32
        assert not mod.fused_applies(q.double(), c.double(), 8, {})
