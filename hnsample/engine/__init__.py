"""The selection engine every op runs on.

* :mod:`.selection`: what a selection is (:func:`build_selection`, :class:`Selection`), the running
  per-row state the kernels merge into (:class:`SelectionState`) and the kernels of each device type.
* :mod:`.blocks`: :func:`score_blocks`, the one loop that produces score blocks with a pluggable
  product, and :func:`select_blocks`, the generic selection driver built on it.
* :mod:`.cuda`: the CUDA driver (two-pass and fused paths).
* :mod:`.backends` / :mod:`.registry`: which kernels and driver serve which device type.

These are internal interfaces: the public API is :mod:`hnsample`.
"""

from . import backends, registry
from .backends import CpuBackend, CudaBackend, run_selection
from .blocks import (
    Block,
    MatmulProduct,
    MixedPrecisionProduct,
    Operand,
    block_shape,
    compute_dtype,
    pair_similarities,
    prepare_rows,
    product_for,
    score_blocks,
    select_blocks,
    selection_pair_scores,
)
from .selection import (
    METRICS,
    SAMPLINGS,
    CpuKernels,
    CudaKernels,
    DeviceFacts,
    Selection,
    SelectionState,
    build_selection,
    draw_seed,
    kernels_for,
    margin_bound,
    positive_score,
)


def backend_for(device) -> object:
    """The backend serving a device (its kernels and selection driver)."""
    return registry.get(device.type)


__all__ = [
    "METRICS", "SAMPLINGS", "Block", "CpuBackend", "CpuKernels", "CudaBackend", "CudaKernels", "DeviceFacts",
    "MatmulProduct", "MixedPrecisionProduct", "Operand", "Selection", "SelectionState", "backend_for", "backends",
    "block_shape", "build_selection", "compute_dtype", "draw_seed", "kernels_for", "margin_bound",
    "pair_similarities", "positive_score", "prepare_rows", "product_for", "registry", "run_selection",
    "score_blocks", "select_blocks", "selection_pair_scores",
]
