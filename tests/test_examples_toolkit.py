"""Every toolkit example runs to completion on the CPU (each asserts that its training helped)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ["batch_samplers.py", "in_batch_triplets.py", "moco_queue_mochi.py", "dynamic_negatives.py"]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script):
    # Run from the examples folder so the scripts import the installed hnsample, as a user's would.
    proc = subprocess.run([sys.executable, str(EXAMPLES / script)], cwd=EXAMPLES, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip()
