"""Loads the compiled kernels and holds the torch <-> kernel plumbing (dtype codes, raw pointers, the
CUDA device guard) and the shared argument checks every op module uses."""

from __future__ import annotations

import math
from typing import Any

import torch

from . import _C

# torch dtype -> the kernels' dtype code (csrc/common.h DType, bound as _C.DType with torch's names).
DTYPE_CODES = {getattr(torch, name): int(code) for name, code in _C.DType.__members__.items()}
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def has_cuda() -> bool:
    """True when the CUDA kernels were compiled in *and* a CUDA device is usable right now."""
    return bool(_C.built_with_cuda) and bool(_C.cuda_device_usable()) and torch.cuda.is_available()


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def ptr(t: torch.Tensor | None) -> int:
    """Data pointer of a tensor (0 for None or an empty tensor)."""
    if t is None or t.numel() == 0:
        return 0
    return t.data_ptr()


class device_guard:
    """Runs CUDA work under the tensor's device (a no-op on the CPU)."""

    def __init__(self, t: torch.Tensor):
        self.ctx = torch.cuda.device_of(t) if t.device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


# ----------------------------------------------------------------------------------------------------
# Argument checks shared by the op modules. Each raises ValueError/TypeError naming the argument.


def as_tensor(name: str, x: Any) -> torch.Tensor:
    """Accepts a torch tensor or a numpy array (shared memory, no copy)."""
    if isinstance(x, torch.Tensor):
        return x
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        np = None
    if np is not None and isinstance(x, np.ndarray):
        # torch has no negative strides and only native byte order: such arrays are copied, everything
        # else is shared.
        if not x.dtype.isnative:
            x = x.astype(x.dtype.newbyteorder("="))
        if any(st < 0 for st in x.strides):
            x = np.ascontiguousarray(x)
        try:
            return torch.from_numpy(x)
        except TypeError as e:
            raise TypeError(f"{name}: numpy dtype {x.dtype} is not supported ({e})") from None
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def check_float_matrix(name: str, t: torch.Tensor) -> None:
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")


def check_int(name: str, v: Any, minimum: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            import numpy as np

            if isinstance(v, np.integer):
                v = int(v)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(v).__name__}") from None
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return int(v)


def check_finite(name: str, v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float or None, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return float(v)


def to_int64(name: str, t: torch.Tensor) -> torch.Tensor:
    """An integer tensor as int64, refusing values that int64 cannot hold: a uint64 value >= 2**63 would
    otherwise wrap to a negative number (2**64 - 1 to the padding id -1)."""
    if t.dtype == torch.uint64 and t.numel() and bool((t.view(torch.int64) < 0).any()):
        raise ValueError(f"{name} holds values >= 2**63, which do not fit int64 (ids, labels and "
                         "padding are int64)")
    return t.to(torch.int64)


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of a 2-D float tensor holding a NaN or an inf (CPU int64)."""
    return torch.nonzero(~x.isfinite().all(dim=1)).reshape(-1).cpu()


def rows_text(rows: torch.Tensor, total: int) -> str:
    """"rows [3, 7] (2 of 10)", listing at most the first 10."""
    shown = rows[:10].tolist()
    more = ", ..." if rows.numel() > 10 else ""
    return f"rows {str(shown)[:-1]}{more}] ({rows.numel()} of {total})"


def check_ids(name: str, ids: Any, rows: int, device: torch.device, bound: int) -> torch.Tensor:
    """(rows, P) int64 ids in [-1, bound); a 1-D (rows,) tensor is read as (rows, 1)."""
    ids = as_tensor(name, ids)
    if ids.dtype in FLOAT_DTYPES or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.ndim == 1:
        ids = ids.unsqueeze(1)
    if ids.ndim != 2 or ids.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows}, P), got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name} must be on {device}, got {ids.device}")
    ids = to_int64(name, ids)
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= bound):
        raise ValueError(f"{name} must hold candidate ids in [0, {bound}) or -1 for padding")
    return ids


def check_labels(name: str, labels: Any, n: int, device: torch.device) -> torch.Tensor:
    labels = as_tensor(name, labels)
    if labels.dtype in FLOAT_DTYPES or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} must be on {device}, got {labels.device}")
    return to_int64(name, labels).contiguous()
