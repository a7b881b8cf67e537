"""The golden corpus: a fixed, named set of calls of hnsample's public API and what each returns.

Written against ``import hnsample`` only, so it outlives any re-layering of the package internals. Each
entry ``"<group>/<case>"`` is a function of a :class:`Context` returning named output arrays
(:class:`Field`); the entries live in this package's modules by API area (importing the package
registers them all), ``record.py`` stores their outputs in ``golden.npz`` and ``tests/test_golden.py``
replays them.

Two input tiers, same calls:

* ``portable`` (the committed golden file): inputs whose arithmetic is exact in any summation order, so
  float outputs can be compared bit for bit on any x86 machine, thread count or BLAS kernel. Dot
  products use small-integer vectors (every product and partial sum is an exact float32 integer);
  cosine uses rows of k entries +-1 or +-2 with k in {1, 4, 16}, so |x| is a power of two and x / |x|,
  the scores and their gradients are exact dyadic rationals. Score matrices are drawn from a set of
  dyadic values (exact in float16 and bfloat16) plus NaN and +-inf. Ties are everywhere on purpose.
  Outputs that pass through exp/log/sqrt of libm or a non-exact reduction (InfoNCE losses and
  gradients, normalized mixtures, mean reductions) carry a stated tolerance instead (:func:`close`).
* ``full``: ordinary random floats in the same calls; not portable (BLAS rounding depends on the CPU and
  thread count), so it is only recorded and compared on one machine, bit for bit, to see what a change
  touched.

Random inputs come from a counter-based SplitMix64 stream keyed by the entry name (not numpy's or
torch's generators), so every entry's inputs are a pure function of its name, whatever the library
versions and whichever other entries exist. Sampling seeds and torch generators used *by the API* are
part of the recorded behaviour.
"""

from __future__ import annotations

import math
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hnsample

TIERS = ("portable", "full")
FLOAT32_EPS = float(np.finfo(np.float32).eps)


# ----------------------------------------------------------------------------------------------------
# Fields and their comparison


@dataclass
class Field:
    """One recorded output array. ``rtol is None``: exact (integers equal; floats bit for bit, where
    every NaN equals every NaN and +0 equals -0, the only differences a correct change of summation
    order can make on exact data). Else close: NaN and +-inf at the same places, and every finite value
    within ``rtol * |want| + atol_rel * max |want|``."""

    value: np.ndarray
    rtol: float | None = None
    atol_rel: float = 0.0


def to_numpy(x: Any) -> np.ndarray:
    """A detached CPU numpy copy; bfloat16 widens to float32 (exactly)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.to(torch.float32)
        return x.numpy().copy()
    return np.array(x)


def exact(x: Any) -> Field:
    return Field(to_numpy(x))


def close(x: Any, rtol: float, atol_rel: float | None = None) -> Field:
    return Field(to_numpy(x), rtol, rtol if atol_rel is None else atol_rel)


def tolerance_for(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol_rel) for outputs through libm or an order-dependent reduction: 1e-12 in float64
    (libm differs by an ulp or two, reductions by a few ulps of the largest term); in float32 a few
    ulps of each value plus 32 ulps of the largest (a sum of up to a few dozen rounded terms)."""
    if dtype == torch.float64:
        return 1e-12, 1e-12
    return 4 * FLOAT32_EPS, 32 * FLOAT32_EPS


def _float_bits(a: np.ndarray) -> np.ndarray:
    a = np.where(a == 0, np.zeros((), a.dtype), a)  # -0 -> +0
    a = np.where(np.isnan(a), np.full((), np.nan, a.dtype), a)  # one NaN pattern
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _allowed(field: Field, want: np.ndarray) -> np.ndarray:
    finite = np.isfinite(want)
    scale = float(np.abs(want[finite]).max()) if finite.any() else 0.0
    return field.rtol * np.abs(want) + field.atol_rel * scale


def tolerance_used(field: Field, got: np.ndarray) -> float:
    """max |got - want| / allowed over the finite values of a close field (0 for exact fields): how
    much of its tolerance a run that passes uses."""
    want = field.value.reshape(-1)
    g = got.reshape(-1)
    both = np.isfinite(want) & np.isfinite(g)
    if field.rtol is None or not both.any():
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.abs(g[both] - want[both]) / _allowed(field, want)[both]
    return float(np.nan_to_num(ratio, nan=0.0, posinf=math.inf).max())


def compare(field: Field, got: np.ndarray, *, bits: bool = False) -> str | None:
    """None when ``got`` matches the recorded ``field.value`` under the field's rule (``bits=True``:
    exact whatever the field's rule); else a one-line description of the first difference."""
    want = field.value
    if got.dtype != want.dtype:
        return f"dtype {got.dtype} != recorded {want.dtype}"
    if got.shape != want.shape:
        return f"shape {got.shape} != recorded {want.shape}"
    if want.dtype.kind != "f":
        bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1)) if got.size else []
        if len(bad) == 0:
            return None
        i = int(bad[0])
        return (f"{len(bad)} of {want.size} elements differ; first at {_where(want, i)}: "
                f"{got.reshape(-1)[i].item()!r} != recorded {want.reshape(-1)[i].item()!r}")
    g, w = got.reshape(-1), want.reshape(-1)
    if field.rtol is None or bits:
        bad = np.flatnonzero(_float_bits(g) != _float_bits(w))
    else:
        special = ~np.isfinite(w) | ~np.isfinite(g)
        same_special = (np.isnan(g) & np.isnan(w)) | (g == w)
        with np.errstate(invalid="ignore"):
            ok = np.where(special, same_special, np.abs(g - w) <= _allowed(field, w))
        bad = np.flatnonzero(~ok)
    if len(bad) == 0:
        return None
    i = int(bad[0])
    finite = np.isfinite(g) & np.isfinite(w)
    worst = float(np.abs(g[finite] - w[finite]).max()) if finite.any() else math.nan
    return (f"{len(bad)} of {want.size} values differ (max |diff| {worst:.3g}); first at {_where(want, i)}: "
            f"{g[i].item()!r} != recorded {w[i].item()!r}")


def _where(a: np.ndarray, flat: int) -> str:
    return str([int(i) for i in np.unravel_index(flat, a.shape)]) if a.ndim else "()"


# ----------------------------------------------------------------------------------------------------
# Inputs


_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN_GAMMA
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class Data:
    """The inputs of one entry: a SplitMix64 stream keyed by the entry name, shaped by the tier."""

    def __init__(self, name: str, tier: str):
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        self.tier = tier
        self._base = np.uint64(zlib.crc32(name.encode())) << np.uint64(32)
        self._count = 0

    @property
    def portable(self) -> bool:
        return self.tier == "portable"

    def bits(self, n: int) -> np.ndarray:
        with np.errstate(over="ignore"):
            idx = self._base + np.arange(self._count, self._count + n, dtype=np.uint64)
        self._count += n
        return _splitmix64(idx)

    def integers(self, lo: int, hi: int, shape: tuple[int, ...] | int) -> np.ndarray:
        """int64 in [lo, hi] (inclusive)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        n = int(np.prod(shape, dtype=np.int64))
        return (self.bits(n) % np.uint64(hi - lo + 1)).astype(np.int64).reshape(shape) + lo

    def uniform(self, shape: tuple[int, ...] | int) -> np.ndarray:
        """float64 in [0, 1)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        n = int(np.prod(shape, dtype=np.int64))
        return ((self.bits(n) >> np.uint64(11)).astype(np.float64) * 2.0**-53).reshape(shape)

    def permutation(self, n: int) -> np.ndarray:
        return np.argsort(self.bits(n), kind="stable").astype(np.int64)

    def ids(self, rows: int, cols: int, n: int, pad: float = 0.3) -> np.ndarray:
        """(rows, cols) int64 candidate ids with duplicates and -1 padding (all -1 when n == 0)."""
        out = self.integers(0, max(n, 1) - 1, (rows, cols))
        out[(self.uniform((rows, cols)) < pad) | (n == 0)] = -1
        return out

    def dot_rows(self, n: int, d: int, lo: int = -3, hi: int = 3) -> np.ndarray:
        """portable: integers in [lo, hi]; full: uniform floats in [lo, hi]."""
        if self.portable:
            return self.integers(lo, hi, (n, d)).astype(np.float64)
        return lo + (hi - lo) * self.uniform((n, d))

    def dyadic_rows(self, n: int, d: int) -> np.ndarray:
        """portable: entries in {-1, -1/2, 0, 1/2, 1}; full: uniform in [-1, 1]."""
        if self.portable:
            return self.integers(-2, 2, (n, d)).astype(np.float64) / 2
        return 2 * self.uniform((n, d)) - 1

    def unit_rows(self, n: int, d: int = 16, zero_rows: float = 0.1) -> np.ndarray:
        """Cosine data. portable: each row holds 1, 4 or 16 (<= d) entries +-1 or +-2, so its norm is a
        power of two (16 entries on half the rows), or is zero; full: uniform in [-1, 1] (the same rows zero)."""
        zero = self.uniform(n) < zero_rows
        if not self.portable:
            x = 2 * self.uniform((n, d)) - 1
            x[zero] = 0
            return x
        x = np.zeros((n, d))
        sizes = [s for s in (1, 4, 16, 16) if s <= d]  # mostly dense rows: few exact zero scores
        for i in range(n):
            if zero[i]:
                continue
            nnz = sizes[int(self.integers(0, len(sizes) - 1, 1)[0])]
            scale = float(self.integers(1, 2, 1)[0])
            cols = self.permutation(d)[:nnz]
            x[i, cols] = scale * (2 * self.integers(0, 1, nnz) - 1)
        return x

    def scores(self, shape: tuple[int, int], specials: float = 0.0) -> np.ndarray:
        """Score matrix. portable: dyadic values in [-3, 3] (steps of 1/4, exact in every float dtype,
        many ties); full: uniform in [-3, 3]. A fraction ``specials`` becomes NaN, +inf or -inf."""
        if self.portable:
            s = self.integers(-12, 12, shape).astype(np.float64) / 4
        else:
            s = 6 * self.uniform(shape) - 3
        if specials:
            hit = self.uniform(shape) < specials
            kind = self.integers(0, 2, shape)
            s[hit] = np.array([math.nan, math.inf, -math.inf])[kind[hit]]
        return s


def tensor(x: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)


def ids_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.int64)


@dataclass
class Context:
    """What an entry gets: its inputs' stream and a scratch directory for files."""

    data: Data
    workdir: Path


# ----------------------------------------------------------------------------------------------------
# Registry

Entry = Callable[[Context], dict[str, Field]]
ENTRIES: dict[str, Entry] = {}


def entry(name: str) -> Callable[[Entry], Entry]:
    if name.count("/") != 1 or name in ENTRIES:
        raise ValueError(f"bad or duplicate entry name {name!r}")

    def register(fn: Entry) -> Entry:
        ENTRIES[name] = fn
        return fn

    return register


def group_of(name: str) -> str:
    return name.split("/", 1)[0]


def select(patterns: list[str] | None) -> list[str]:
    """Entry names matching any pattern: a group name, an entry name, or a prefix ending in '*'."""
    if not patterns:
        return list(ENTRIES)
    out = []
    for name in ENTRIES:
        for p in patterns:
            if name == p or group_of(name) == p or (p.endswith("*") and name.startswith(p[:-1])):
                out.append(name)
                break
    return out


def run_entry(name: str, tier: str, workdir: Path | None = None) -> dict[str, Field]:
    """Runs one entry with its own inputs (and a fresh scratch directory unless one is given)."""
    fn = ENTRIES[name]
    torch.manual_seed(0)  # the default generator feeds calls made without seed/generator
    if workdir is not None:
        return fn(Context(Data(name, tier), workdir))
    with tempfile.TemporaryDirectory(prefix="hnsample-golden-") as tmp:
        return fn(Context(Data(name, tier), Path(tmp)))


def topk_fields(out: hnsample.TopK, prefix: str = "") -> dict[str, Field]:
    return {f"{prefix}indices": exact(out.indices), f"{prefix}scores": exact(out.scores)}
