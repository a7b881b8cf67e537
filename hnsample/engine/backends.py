"""The backends: per device type, the compiled kernels and the driver that turns a selection over
(queries, candidates) into kernel launches. Importing this module registers them."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import registry
from .blocks import certified, select_blocks
from .cuda import CudaDriver
from .selection import CPU_KERNELS, CpuKernels, CudaKernels, Selection, SelectionState

OnBlock = Callable[[torch.Tensor, int, int], None]


class CpuBackend:
    """The CPU: score blocks from torch.matmul, offered to the state by the CPU kernels."""

    def __init__(self, kernels: CpuKernels | None = None):
        self.kernels = kernels if kernels is not None else CPU_KERNELS

    def select(self, queries: torch.Tensor, candidates: torch.Tensor, state: SelectionState, metric: str,
               block_size: int, col_offset: int = 0, on_block: OnBlock | None = None) -> SelectionState:
        """Offers queries x candidates (global candidate ids col_offset + j) to the state; on_block sees
        every score block after it is offered."""
        return select_blocks(queries, candidates, state, metric, block_size, col_offset, on_block)


class CudaBackend:
    """CUDA: the :class:`~hnsample.engine.cuda.CudaDriver`'s paths (its certified path for float32 / 16-bit
    inputs with settings.cuda_certified, docs/certified.md); with on_block (which must see every score
    block) the generic block loop on the CUDA kernels (certified there too)."""

    def __init__(self, driver: CudaDriver | None = None):
        self.driver = driver if driver is not None else CudaDriver()
        self.kernels: CudaKernels = self.driver.kernels

    def select(self, queries: torch.Tensor, candidates: torch.Tensor, state: SelectionState, metric: str,
               block_size: int, col_offset: int = 0, on_block: OnBlock | None = None) -> SelectionState:
        if on_block is not None:
            return select_blocks(queries, candidates, state, metric, block_size, col_offset, on_block)
        if certified(queries):
            return self.driver.run_certified(queries, candidates, state, metric, block_size, col_offset)
        return self.driver.select(queries, candidates, state, metric, block_size, col_offset)




def run_selection(queries: torch.Tensor, candidates: torch.Tensor, sel: Selection, metric: str, block_size: int, *,
                  state: SelectionState | None = None, col_offset: int = 0, on_block: OnBlock | None = None,
                  noise_row_offset: int = 0) -> SelectionState:
    """Offers queries x candidates (global candidate ids col_offset + j) to `state` (a new one of B rows
    when None) on the backend of the queries' device, and returns the state."""
    backend = registry.get(queries.device.type)
    if state is None:
        state = SelectionState(sel, queries.shape[0], queries.device, noise_row_offset, backend.kernels)
    return backend.select(queries, candidates, state, metric, block_size, col_offset, on_block)


registry.register("cpu", CpuBackend())
registry.register("cuda", CudaBackend())
