"""What the CUDA fused path computes, for tests that compare it with a selection over exact scores
(tests/test_topk_cuda.py on the GPU and with emulated launches, tests/test_cuda_emulated.py on the
kernels' own source)."""

from __future__ import annotations

import torch

from hnsample.ops import topk_cuda


def exact_fused_scores(q: torch.Tensor, c: torch.Tensor, metric: str) -> torch.Tensor:
    """The fused path's scores. fp32 inputs: the rescoring's value (the dot product in float64 times
    the scales, rounded once). 16-bit inputs: the kernels' value, exact for small integers (the fp32
    sum of exact products, then times each cosine scale in fp32, as the epilogue does)."""
    s = q.double() @ c.double().T
    if metric != "cosine":
        return s.float()
    rs, cs = topk_cuda.cosine_scale(q), topk_cuda.cosine_scale(c)
    if q.dtype == torch.float32:
        return (s * rs.double()[:, None] * cs.double()[None, :]).float()
    return s.float() * rs[:, None] * cs[None, :]


class ExactGemm(topk_cuda.ScoreGemm):
    """The two-pass path's score blocks with exact_fused_scores' values, so the fused path's seed and
    its fused chunks agree bit for bit with the expected matrix (on either device)."""

    def __init__(self, queries, metric):  # no device probe: the CPU build of torch has no CUDA
        self.metric, self.raw, self.out_dtype = metric, queries, torch.float32

    def operand(self, x):
        return x, None

    def scores(self, i0, i1, c, c_scale, out):
        out.copy_(exact_fused_scores(self.raw[i0:i1], c, self.metric))
