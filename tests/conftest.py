"""Shared fixtures. Tests import the *installed* hnsample (the compiled _C lives there), so the
source checkout is taken off sys.path even under ``python -m pytest``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]
# Helper modules shared by test files (fused_support.py); tests/ holds no package that could shadow one.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import hnsample  # noqa: E402

if Path(hnsample.__file__).resolve().parent == _ROOT / "hnsample":  # pragma: no cover
    raise RuntimeError("tests must run against the installed hnsample: pip install '.[test]' first")

DEVICES = ["cpu"] + (["cuda"] if hnsample.has_cuda() else [])
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device and hnsample built with CUDA")
    if not hnsample.has_cuda():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(scope="session")
def make_selection():
    """hnsample.ops.topk.build_selection with every filter off and sampling="top" unless overridden:
    make_selection(rows, n, k, device=cpu, **overrides) -> Selection."""
    from hnsample.engine import build_selection

    def make(rows: int, n: int, k: int, device: torch.device | None = None, **overrides):
        args = dict(
            positives=None, exclude=None, query_labels=None, candidate_labels=None, positive_scores=None,
            absolute_margin=None, relative_margin=None, min_score=None, max_score=None, skip_top=0, pool=None,
            sampling="top", temperature=1.0, generator=None, seed=None, positive_values=None,
        )
        args.update(overrides)
        return build_selection(rows, n, device or torch.device("cpu"), k, **args)

    return make
