"""Smoke test of an installed hnsample wheel, run from outside the source tree by .ci/run: the
package imports from site-packages, reports no usable CUDA on a machine without a GPU, one op call
matches a plain-torch computation, and the console script answers --help."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import hnsample

SOURCE_TREE = Path(__file__).resolve().parents[1]


def main() -> int:
    where = Path(hnsample.__file__).resolve()
    assert SOURCE_TREE not in where.parents, f"imported the source tree, not the wheel: {where}"
    assert "site-packages" in where.parts, where
    cuda = hnsample.has_cuda()
    assert isinstance(cuda, bool)
    if not torch.cuda.is_available():
        assert cuda is False, "has_cuda() must be False without a usable CUDA device"

    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(7, 16, generator=g), torch.randn(50, 16, generator=g)
    pos = torch.randint(0, 50, (7, 2), generator=g)
    got = hnsample.topk_similarity(q, c, 5, positives=pos)
    s = q @ c.T
    s.scatter_(1, pos, float("-inf"))
    want = s.topk(5, dim=1)
    assert torch.equal(got.indices, want.indices), (got.indices, want.indices)
    torch.testing.assert_close(got.scores, want.values)

    script = shutil.which("hnsample", path=os.path.dirname(sys.executable))
    assert script, "the hnsample console script was not installed"
    out = subprocess.run([script, "--help"], check=True, capture_output=True, text=True).stdout
    assert "usage: hnsample" in out, out
    print(f"smoke test passed: hnsample {hnsample.__version__} from {where.parent}, has_cuda()={cuda}, "
          f"topk_similarity matches torch, `hnsample --help` works")
    return 0


if __name__ == "__main__":
    sys.exit(main())
