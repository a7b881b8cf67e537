"""A screening product at the edge of its certificate, for the tests of everything that screens."""

from __future__ import annotations

import torch

from hnsample import _reference as R


class NoisyProduct:
    """A screening product whose S^ is the canonical score plus an error anywhere inside (`inside` <= 1)
    the product's proven bound without its relative term: a GEMM at the edge of its certificate. With
    shrink < 1 the kernels are shown the bound times shrink while the noise keeps the full bound, so they
    trust S^ more than they may (the tests' own control: then selections change)."""

    def __init__(self, base, metric: str, inside: float, seed: int, shrink: float = 1.0):
        self.base, self.metric, self.inside, self.shrink = base, metric, inside, shrink
        self.rel, self.out_dtype = base.rel * shrink, base.out_dtype
        self.gen = torch.Generator().manual_seed(seed)

    def __getattr__(self, name):  # the rest (the canonical rounding factor, ...) is the base product's
        return getattr(self.base, name)

    def operand(self, x, query_side):
        op = self.base.operand(x, query_side)
        if query_side:  # every term of w has exactly one query factor or is a column floor
            op.first = op.first * self.shrink
            op.second = None if op.second is None else op.second * self.shrink
            op.floor = None if op.floor is None else op.floor * self.shrink
        elif op.floor is not None:
            op.floor = op.floor * self.shrink
        return op

    def scores(self, q, c, out):
        exact = R.similarity(q.raw, c.raw, self.metric).double()
        w = q.first[:, None] * c.first[None, :]
        if q.second is not None:
            w = w + q.second[:, None] * c.second[None, :]
        if q.floor is not None:
            w = w + q.floor[:, None]
        if c.floor is not None:
            w = w + c.floor[None, :]
        w = torch.nan_to_num(w / self.shrink, posinf=0.0)
        t = torch.rand(exact.shape, generator=self.gen, dtype=torch.float64) * 2 - 1
        t = torch.where(torch.rand(exact.shape, generator=self.gen) < 0.5, t.sign(), t)  # half at the edges
        noisy = exact + self.inside * t * w
        s32 = noisy.float()
        # Rounded toward the canonical score, so the float32 S^ stays within inside * w of it.
        back = torch.where((s32.double() - exact).abs() > (noisy - exact).abs(),
                           torch.nextafter(s32, exact.float()), s32)
        out.copy_(torch.where(exact.isfinite(), back, exact.float()))
