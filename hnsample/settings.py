"""The tunables of hnsample in one place.

``hnsample.settings.current()`` is the process-wide :class:`Settings`; every field has a default and an
environment variable (``HNSAMPLE_<FIELD>``, upper case) read once, at import. Change them for the whole
process with :func:`configure`, or for a block of code with :func:`override` (overrides nest)::

    with hnsample.settings.override(cuda_path="two_pass", block_size=1 << 20):
        hnsample.topk_similarity(q, c, 8)

Nothing here changes a result on the CPU: the settings choose block shapes, kernels and paths whose outputs
are identical. On CUDA the two-pass and fused paths accumulate 16-bit products in different orders, so
scores within fp32 rounding of each other may order differently ("Exactness" in docs/cuda.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator
from typing import Any

CUDA_PATHS = ("auto", "two_pass", "fused")
SCREEN_PRODUCTS = ("auto", "fp32", "bf16", "mixed")
FUSED_KERNEL_NAMES = ("auto", "mma", "wgmma", "wgmma_256x128", "wgmma_128x256")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Tunables. Block sizes are counts of score elements (4 bytes each in fp32)."""

    # --- selection (topk_similarity, mining, miners) ---
    block_size: int = 1 << 22
    """Default score elements per block of the selection: 16 MB of fp32, small enough to be scanned from
    cache right after the GEMM wrote it."""
    cpu_threads: int = 0
    """Threads of the CPU kernels; 0: torch.get_num_threads() (the kernels and torch's GEMMs run one
    after the other, so sharing the budget never oversubscribes)."""
    screen_product: str = "auto"
    """The GEMM that screens float32 / 16-bit inputs before the canonical rescoring (docs/certified.md):
    "fp32", "bf16" (fast on CPUs with AMX; CPU only), "mixed" (16-bit inputs on a GPU: the 16-bit tensor
    core GEMM with float32 output; "fp32" for float32 inputs), or "auto": on the CPU the fastest by a
    one-time probe, on CUDA "mixed" for 16-bit inputs and "fp32" for float32."""
    cuda_certified: bool = False
    """Whether selections over float32 / 16-bit CUDA inputs rank canonical scores (docs/certified.md): the
    GPU GEMM screens, the CUDA screen kernel rescores the survivors canonically, and the results equal
    the CPU's bit for bit. Off (the GPU GEMM's float32 scores, the two-pass / fused paths of
    docs/cuda.md) until a device check has timed it; the kernels are tested on the CPU emulator."""
    interrupt_seconds: float = 0.25
    """A kernel call on a given score matrix (topk_from_scores) is split into row chunks of about this
    much work, so Ctrl-C is seen between chunks."""

    # --- InfoNCE ---
    info_nce_block_size_cpu: int = 1 << 24
    """Score elements per InfoNCE block on the CPU (64 MB of fp32: full rows of up to 65,536 docs for
    256-row GEMMs in the fused path)."""
    info_nce_block_size_cuda: int = 1 << 26
    info_nce_cuda_float_exp: bool = True
    """CUDA InfoNCE kernels take each pair's exp in float32 (float32 and 16-bit inputs; float64 inputs keep
    float64): on GPUs with 1/64-rate float64 the float64 exp dominates. Each log-sum-exp over n terms then
    moves by at most 2^-24 ln n + 2^-22 (about 1.1e-6 at n = 10^6; docs/losses.md)."""
    info_nce_fused_min_rows: int = 256
    """A full-row block must hold at least this many rows for InfoNCE's fused forward+gradient path:
    thinner GEMMs lose more than the saved fourth GEMM-equivalent (measured on the CPU)."""

    # --- CUDA selection (see docs/cuda.md) ---
    cuda_path: str = "auto"
    """"auto": the fused path where it applies and ``cuda_fused_auto`` is on, else two-pass;
    "two_pass" / "fused" force a path (fused falls back to two-pass for inputs it does not support)."""
    cuda_fused_auto: bool = True
    """Whether "auto" takes the fused path (for N >= 4 cuda_fused_seed_cols and a state of at most
    cuda_fused_auto_max_capacity slots): on since the H200 device check showed it correct and 1.6-2.2x
    faster than two-pass at k = 64 (benchmarks/results/gpu_check.json)."""
    cuda_fused_auto_max_capacity: int = 256
    """The largest selection state (slots per row, about k + skip_top) that "auto" sends to the fused path:
    at k = 2048 the device check measured two-pass faster (79.6 ms against 105 ms), at k = 64 fused."""
    cuda_fused_kernel: str = "auto"
    """The fused kernel: "mma" (mma.sync, sm_80+), "wgmma" (sm_90a, 128 x 128 tiles), "wgmma_256x128",
    "wgmma_128x256", or "auto": wgmma where device, build and inputs (bf16/fp16) allow it -- 256 x 128
    tiles from 256 rows, else 128 x 128 -- and mma.sync otherwise. A wgmma choice raises where wgmma is
    unavailable (fp32 inputs included)."""
    cuda_fused_stages: int = 0
    """mma.sync pipeline depth: 0 by the device's shared memory, else 2 or 4."""
    cuda_fused_seed_cols: int = 8192
    """Columns scored by the two-pass path first, to give every row a threshold; the fused path then
    takes chunks of doubling width."""
    cuda_fused_max_capacity: int = 2048
    cuda_fused_max_list_bytes: int = 1 << 30
    cuda_block_size: int = 1 << 24
    """Default score elements per block of the CUDA two-pass path (the L2 share caps it further: 7.5M on a
    60 MB L2 at share 0.5). The CPU's block_size (4M) cut B=8192 x N=1M into 1,956 blocks whose host cost
    per GEMM + select pair (about 30 us) the H200 check measured as the path's time; this gives 1,068."""
    cuda_l2_share: float = 0.5
    """Share of the L2 cache one score block may fill; the GEMM's operand tiles use the rest."""
    cuda_min_segment_cols: int = 2048
    """A column segment narrower than this spends more on its share of the state than on scanning."""
    cuda_max_segment_state_bytes: int = 1 << 30
    """Bytes the extra state copies of a segmented block may take."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            want = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool,
                                                             "str": str}[f.type]
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
                continue
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise TypeError(f"settings.{f.name} must be a {want.__name__}, got {type(value).__name__}")
        positive = ("block_size", "info_nce_block_size_cpu", "info_nce_block_size_cuda", "cuda_fused_seed_cols",
                    "cuda_fused_max_capacity", "cuda_fused_max_list_bytes", "cuda_min_segment_cols",
                    "cuda_max_segment_state_bytes", "info_nce_fused_min_rows", "cuda_fused_auto_max_capacity",
                    "cuda_block_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"settings.{name} must be >= 1, got {getattr(self, name)}")
        if self.cpu_threads < 0:
            raise ValueError(f"settings.cpu_threads must be >= 0, got {self.cpu_threads}")
        if not self.interrupt_seconds > 0:
            raise ValueError(f"settings.interrupt_seconds must be > 0, got {self.interrupt_seconds}")
        if self.screen_product not in SCREEN_PRODUCTS:
            raise ValueError(f"settings.screen_product must be one of {SCREEN_PRODUCTS}, got {self.screen_product!r}")
        if self.cuda_path not in CUDA_PATHS:
            raise ValueError(f"settings.cuda_path must be one of {CUDA_PATHS}, got {self.cuda_path!r}")
        if self.cuda_fused_kernel not in FUSED_KERNEL_NAMES:
            raise ValueError(f"settings.cuda_fused_kernel must be one of {FUSED_KERNEL_NAMES}, "
                             f"got {self.cuda_fused_kernel!r}")
        if self.cuda_fused_stages not in (0, 2, 4):
            raise ValueError(f"settings.cuda_fused_stages must be 0, 2 or 4, got {self.cuda_fused_stages}")
        if not 0 < self.cuda_l2_share <= 1:
            raise ValueError(f"settings.cuda_l2_share must be in (0, 1], got {self.cuda_l2_share}")

    def block_size_for(self, device_type: str) -> int:
        """The default block size of a selection on a device of this type ("cpu", "cuda", ...)."""
        return self.cuda_block_size if device_type == "cuda" else self.block_size

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """The defaults with every ``HNSAMPLE_<FIELD>`` environment variable applied."""
        env = os.environ if environ is None else environ
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = "HNSAMPLE_" + f.name.upper()
            if key in env:
                changes[f.name] = _parse(key, env[key], f.default)
        return cls(**changes)


def _parse(key: str, text: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if text.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if text.strip().lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text, 0)
        if isinstance(default, float):
            return float(text)
        return text.strip()
    except ValueError:
        raise ValueError(f"environment variable {key}={text!r} is not a valid {type(default).__name__}") from None


_base = Settings.from_env()
_lock = threading.Lock()


def current() -> Settings:
    """The settings in effect now."""
    return _base


def configure(**changes: Any) -> Settings:
    """Changes the process-wide settings; returns the new ones."""
    global _base
    with _lock:
        _base = dataclasses.replace(_base, **changes)
        return _base


@contextlib.contextmanager
def override(**changes: Any) -> Iterator[Settings]:
    """The settings with ``changes`` applied, process-wide, for the duration of the block; the previous
    settings come back when it ends (also on an exception)."""
    global _base
    with _lock:
        previous = _base
        _base = dataclasses.replace(previous, **changes)
        new = _base
    try:
        yield new
    finally:
        with _lock:
            _base = previous
