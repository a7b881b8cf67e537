"""The command line: demo, bench and --help run and say what they should."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from hnsample import cli


def _run(*argv: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "hnsample.cli", *argv], capture_output=True, text=True,
                          timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_lists_every_command():
    out = _run("--help")
    for name, _module, _help in cli.COMMANDS:
        assert name in out


def test_demo_margin_filter_removes_planted_duplicates():
    out = _run("demo", "--docs", "4000", "--queries", "200", "--dim", "32", "--topics", "10")
    assert "20 planted near-duplicates" in out
    rows = {m.group(1).strip(): (int(m.group(2)), int(m.group(3)))
            for m in re.finditer(r"^\s+(positives excluded|\+ relative_margin=0\.05)\s+(\d+) / (\d+)", out, re.M)}
    # Without the margin filter the planted copies are the hardest "negatives"; with it, none is mined.
    assert rows["positives excluded"][0] == 20
    assert rows["+ relative_margin=0.05"][0] == 0


def test_bench_small_shape_checks_correctness_first():
    out = _run("bench", "-B", "64", "-N", "3000", "-d", "16", "-k", "8", "--repeats", "1",
               "--methods", "hnsample,matmul,torch_naive")
    assert "correctness vs torch naive: 64/64 of the first rows identical" in out, out
    for method in ("hnsample", "matmul", "torch_naive"):
        assert re.search(rf"^{method}\s+\d", out, re.M), out


@pytest.mark.parametrize("argv", [["demo", "--docs", "-5"], ["bench", "-k", "x"], ["nope"]])
def test_bad_arguments_exit_with_a_usage_error(argv):
    proc = subprocess.run([sys.executable, "-m", "hnsample.cli", *argv], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr
