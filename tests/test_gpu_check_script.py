"""The device check script's own logic (shapes, correctness checks, table, JSON), on tiny CPU shapes:
device time is short, so the script must not fail on its first run for a reason the CPU shows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_smoke_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "--reps", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    shapes = [r["shape"] for r in data["results"]]
    assert shapes == [s[0] for s in mod.SMOKE_SHAPES]
    assert all(r["check"]["ok"] for r in data["results"])
    cosine = data["results"][shapes.index("smoke_cosine")]
    assert cosine["check"]["recall"] == 1.0
    out = capsys.readouterr().out
    assert "x matmul" in out and "smoke_cosine" in out
