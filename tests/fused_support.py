"""The CUDA driver on the CPU, for tests: what the fused path computes (compared with a selection over
exact scores in tests/test_topk_cuda.py on the GPU and with emulated launches, and in
tests/test_cuda_emulated*.py on the kernels' own source), the exact product both paths are given, and
the kernels object that runs a launcher module (the emulator's ``_cuda_emu`` or a Python emulation of
``hnsample._C``'s CUDA launchers) on CPU tensors.
"""

from __future__ import annotations

import collections
import ctypes
from typing import Any

import torch

from hnsample.engine import CudaKernels, DeviceFacts, MixedPrecisionProduct, Operand
from hnsample.engine.blocks import cosine_scale


def exact_fused_scores(q: torch.Tensor, c: torch.Tensor, metric: str) -> torch.Tensor:
    """The fused path's scores. fp32 inputs: the rescoring's value (the dot product in float64 times
    the scales, rounded once). 16-bit inputs: the kernels' value, exact for small integers (the fp32
    sum of exact products, then times each cosine scale in fp32, as the epilogue does)."""
    s = q.double() @ c.double().T
    if metric != "cosine":
        return s.float()
    rs, cs = cosine_scale(q), cosine_scale(c)
    if q.dtype == torch.float32:
        return (s * rs.double()[:, None] * cs.double()[None, :]).float()
    return s.float() * rs[:, None] * cs[None, :]


class ExactGemm:
    """A product (hnsample.engine.blocks) whose score blocks are exact_fused_scores' values, so the fused
    path's seed and its fused chunks agree bit for bit with the expected matrix (on either device).
    The class is the driver's product factory: ``CudaDriver(product=ExactGemm)``."""

    out_dtype = torch.float32

    def __init__(self, queries: torch.Tensor, metric: str):
        self.metric = metric

    def operand(self, x: torch.Tensor, query_side: bool = False) -> Operand:
        return Operand(x)

    def scores(self, q: Operand, c: Operand, out: torch.Tensor) -> None:
        out.copy_(exact_fused_scores(q.rows, c.rows, self.metric))


class HostMixedPrecisionProduct(MixedPrecisionProduct):
    """MixedPrecisionProduct on CPU tensors (torch has no CPU mm with out_dtype): the 16-bit rows are
    converted to fp32 (exactly) and multiplied by torch.mm in fp32, which for small integers is the
    exact sum the tensor cores' fp32 accumulation gives. Everything else -- the operands' cosine scales,
    whether ``scores`` applies them -- is the product's own code."""

    @staticmethod
    def matmul(q: torch.Tensor, c: torch.Tensor, out: torch.Tensor) -> None:
        torch.mm(q.float(), c.float().T, out=out)


def host_view(ptr: int, dtype: torch.dtype, rows: int, cols: int, row_stride: int,
              col_stride: int = 1) -> torch.Tensor:
    """A tensor over the CPU memory at `ptr` (what a kernel sees through a launch's pointer and strides)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    span = (rows - 1) * row_stride + (cols - 1) * col_stride + 1 if rows and cols else 0
    buf = (ctypes.c_uint8 * max(span * itemsize, itemsize)).from_address(ptr)
    return torch.frombuffer(buf, dtype=dtype)[:span].as_strided((rows, cols), (row_stride, col_stride))


class CountingModule:
    """A launcher module that counts, by name, every call made through it to `module`'s functions."""

    def __init__(self, module: Any, calls: collections.Counter | None = None):
        self.module = module
        self.calls = calls if calls is not None else collections.Counter()

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.module, name)
        if not callable(fn) or isinstance(fn, type):
            return fn

        def call(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return call


HOST_DEVICE = DeviceFacts(multiprocessors=4, l2_bytes=1 << 20)


class HostKernels(CudaKernels):
    """The CUDA kernels of `module` (launchers with hnsample._C's signatures) run on CPU tensors: stream 0,
    a device of `facts` (multiprocessors, L2 bytes), and torch.mm(out_dtype=...) as `mm_out_dtype` says."""

    def __init__(self, module: Any, facts: DeviceFacts = HOST_DEVICE, mm_out_dtype: bool = False):
        super().__init__(module)
        self.facts, self.mm_out_dtype = facts, mm_out_dtype

    def stream(self, t: torch.Tensor) -> int:
        return 0

    def device_facts(self, device: torch.device) -> DeviceFacts:
        return self.facts

    def mm_out_dtype_supported(self, device: torch.device, dtype: torch.dtype) -> bool:
        return self.mm_out_dtype
