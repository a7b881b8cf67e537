"""Hostile inputs for the tests: values that break arithmetic and memory layouts a caller can hand the
ops without a copy. Shared by tests/test_fuzz.py and tests/test_misaligned_inputs.py.

Values: each row of a matrix is given a kind (a NaN or an inf entry, all zeros, an exact duplicate of an
earlier row, an earlier row moved by one ulp, a norm near 1e30 or 1e-30, subnormal entries). The scales
are powers of two, so integer-valued rows keep exact dot products in every dtype that holds them.
Layouts: column-major, a strided slice of a larger buffer filled with decoys (a kernel that reads past
the view finds them and returns them), stride-0 broadcasts of one row or one column, data misaligned for
its dtype, and numpy arrays that are big-endian or have negative strides (which the ops convert).
"""

from __future__ import annotations

import math

import numpy as np
import torch

ROW_KINDS = ("nan", "inf", "-inf", "zero", "duplicate", "ulp", "huge", "tiny", "subnormal")
FINITE_ROW_KINDS = ("zero", "duplicate", "ulp", "huge", "tiny", "subnormal")
LAYOUTS = ("contiguous", "column_major", "strided", "broadcast_row", "broadcast_column", "misaligned",
           "numpy_big_endian", "numpy_negative_strides")
# A decoy value for the bytes around a strided view: finite in every float dtype and larger than any
# score of the data, so a read outside the view would be selected and show.
DECOY = 1000.0
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}
# A scale that makes unit-size values subnormal in each dtype.
_SUBNORMAL = {torch.float64: 2.0**-1060, torch.float32: 2.0**-140, torch.float16: 2.0**-20,
              torch.bfloat16: 2.0**-130}


def misaligned(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of t whose data starts `offset` bytes past a 64-byte boundary (not aligned for
    t's dtype when 0 < offset < itemsize). The numpy buffer it lives in is kept alive by the tensor."""
    nbytes = t.numel() * t.element_size()
    raw = np.zeros(nbytes + 128, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    out = torch.from_numpy(raw[start : start + nbytes]).view(t.dtype).view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 64 == offset
    torch.testing.assert_close(out, t, rtol=0, atol=0, equal_nan=True)
    return out


def hostile_matrix(rng: np.random.Generator, kinds: list[str | None], d: int, dtype: torch.dtype,
                   base: str = "normal") -> torch.Tensor:
    """(len(kinds), d) contiguous values of `dtype`: `base` "ints" (small integers: many exact ties and
    exact dot products), "eighths" (multiples of 1/8 in [-1/2, 1/2]: exact dot products of small size)
    or "normal", with row i turned into kinds[i] (None: left as it is)."""
    rows = len(kinds)
    if base == "ints":
        x = rng.integers(-3, 4, size=(rows, d)).astype(np.float64)
    elif base == "eighths":
        x = rng.integers(-4, 5, size=(rows, d)).astype(np.float64) / 8
    else:
        x = rng.standard_normal((rows, d))
    t = torch.from_numpy(x)
    for i, kind in enumerate(kinds):
        col = int(rng.integers(d))
        if kind in ("nan", "inf", "-inf"):
            t[i, col] = float(kind)
        elif kind == "zero":
            t[i] = 0.0
        elif kind == "huge":
            t[i] *= 2.0**100  # 1.3e30
        elif kind == "tiny":
            t[i] *= 2.0**-100  # 7.9e-31
        elif kind == "subnormal":
            t[i] *= _SUBNORMAL[dtype]
    t = t.to(dtype)
    for i, kind in enumerate(kinds):
        if kind in ("duplicate", "ulp") and i > 0:
            t[i] = t[int(rng.integers(i))]
            col = int(rng.integers(d))
            if kind == "ulp" and bool(t[i, col].isfinite()):
                # The next representable magnitude (0 becomes the smallest subnormal).
                t[i].view(_BITS[dtype])[col] += 1
    return t


def lay_out(t: torch.Tensor, layout: str, rng: np.random.Generator) -> torch.Tensor | np.ndarray:
    """`t` (2-D, contiguous) in `layout`. The broadcasts repeat one row or one column of t (stride 0), so
    their values differ from t's: compare against :func:`values_of` of the result, not against t. numpy
    layouts of a dtype numpy lacks (bfloat16) fall back to a strided view."""
    rows, cols = t.shape
    if layout in ("numpy_big_endian", "numpy_negative_strides") and t.dtype != torch.bfloat16:
        a = t.numpy()
        if layout == "numpy_big_endian":
            return a.astype(a.dtype.newbyteorder(">"))
        return np.ascontiguousarray(a[::-1, ::-1])[::-1, ::-1]
    if layout == "column_major":
        return t.T.contiguous().T
    if layout == "broadcast_row" and rows > 0:
        return t[int(rng.integers(rows))].expand(rows, cols)
    if layout == "broadcast_column" and cols > 0:
        j = int(rng.integers(cols))
        return t[:, j : j + 1].expand(rows, cols)
    if layout == "misaligned" and t.numel():
        return misaligned(t, int(rng.integers(1, t.element_size())))
    if layout == "contiguous":
        return t.clone()
    sr, sc, r0, c0 = (int(v) for v in rng.integers(1, 4, size=4))
    decoy = DECOY if t.is_floating_point() else -7
    buf = torch.full((r0 + rows * sr + 1, c0 + cols * sc + 1), decoy, dtype=t.dtype)
    view = buf[r0 : r0 + rows * sr : sr, c0 : c0 + cols * sc : sc]
    view.copy_(t)
    return view


def values_of(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A contiguous native torch copy of what x holds (the reference's input)."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.array(x, dtype=x.dtype.newbyteorder("=")))
    return x.contiguous().clone()


def finite_or_nan(x: torch.Tensor) -> torch.Tensor:
    """x with every row that holds a NaN or an inf replaced by NaN."""
    return torch.where(x.isfinite().all(dim=1, keepdim=True), x, torch.full_like(x, math.nan))
