"""Certified screening products: GEMMs whose distance to the canonical scores has a proven bound.

The canonical score (csrc/canonical.h) is what a selection ranks; a screening product computes an
approximate block S^ fast (fp32 GEMM, or bf16 GEMM on CPUs with fast bf16) together with per-row and
per-column factors of the bound

    |S^_ij - s_ij| <= w_ij = a_i b_j + e_i f_j + g_i + h_j + rel |S^_ij|

(query operands carry a, e, g; candidate operands b, f, h). The kernels drop a candidate only when its
interval [S^ - w, S^ + w] cannot enter the selection, and rescore the rest canonically. The proof of
each bound is in docs/certified.md; the functions here compute it, rounded up.

float64 inputs are not screened: their scores are the float64 GEMM's, as before.

Every function here runs on the device of its inputs through that device's kernels (``kernels``: a
:class:`~hnsample.engine.selection.CpuKernels` or ``CudaKernels``; default: the registered backend's), and
the CPU and CUDA kernels compute the same canonical bits.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .. import _C
from .._ext import dtype_code
from .selection import kernels_for

U32 = 2.0**-24  # unit roundoff of float32
U_BF16 = 2.0**-8  # of bfloat16 (8 significant bits)
# Per-element relative error assumed for a GPU GEMM's float32 accumulation: tensor cores align the terms
# of each multi-term addition to the largest exponent and truncate (no round-to-nearest), and cuBLAS may
# pick any order or split; with at least 23 fraction bits kept after alignment, d (1 + 1/k) 2^-23 <=
# d 2^-22 covers groups of any size k (docs/certified.md, "On the GPU"; an assumption, not a spec).
U_GPU_ACC = 2.0**-22
SAFETY = 1 + 2.0**-20  # rounds every computed bound up past the float64 roundings of computing it
SUBNORMAL = 2.0**-126  # smallest normal float32: what flushing a subnormal can lose
SCREENED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def gamma(n: int, u: float) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of an n-term float dot product, any order."""
    return n * u / (1 - n * u)


def _kernels(x: torch.Tensor, kernels: Any) -> Any:
    return kernels if kernels is not None else kernels_for(x.device)


def canonical_norms(x: torch.Tensor, kernels: Any = None) -> torch.Tensor:
    """N_i = sqrt(D(x_i, x_i)) in float64, on x's device, for rows of a float32/16-bit tensor with unit
    column stride (as :func:`raw_rows` returns them)."""
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    if x.shape[0]:
        k = _kernels(x, kernels)
        k.module.canonical_norms(x.data_ptr(), dtype_code(x), x.shape[0], x.shape[1], x.stride(0), out.data_ptr(),
                                 k.threads(), k.cuda, k.stream(x))
    return out


def raw_rows(x: torch.Tensor) -> torch.Tensor:
    """x with rows of unit column stride that do not overlap, in element-aligned storage, for the
    canonical rescoring (a copy only when x is not already so)."""
    if (x.shape[1] > 1 and x.stride(1) != 1) or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        x = x.contiguous()
    if x.numel() and x.data_ptr() % x.element_size():
        x = x.clone()
    return x


def fp32_gemm_input_unit(device: torch.device) -> float:
    """Relative rounding of the inputs that torch's float32 GEMM may apply on this device: 0 for IEEE
    float32, else that of the reduced format torch was told it may use (TF32 on CUDA, bfloat16 or TF32
    through oneDNN on the CPU). The screening bound adds (2u + u^2) for it."""
    if device.type == "cuda":
        return 2.0**-10 if torch.backends.cuda.matmul.allow_tf32 else 0.0
    reduced = torch.get_float32_matmul_precision() != "highest"
    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    precision = getattr(mkldnn, "fp32_precision", "none") if mkldnn is not None else "none"
    if reduced or precision not in ("none", "ieee"):
        return U_BF16
    return 0.0


@dataclasses.dataclass
class ScreenOperand:
    """Rows of one side of a screening product: ``rows`` go into the GEMM, ``raw`` are the inputs the
    canonical rescoring reads, ``norms`` their canonical norms (cosine), and the side's error factors
    (``first``: a or b, ``second``: e or f, ``floor``: g or h; float64, None for 0)."""

    rows: torch.Tensor
    raw: torch.Tensor
    norms: torch.Tensor | None
    first: torch.Tensor
    second: torch.Tensor | None
    floor: torch.Tensor | None
    inv: torch.Tensor | None = None  # float32 1/N the product scales the GEMM's rows / columns by, if any
    _maxima: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    def __getitem__(self, sl: slice) -> ScreenOperand:
        def cut(t):
            return None if t is None else t[sl]

        return ScreenOperand(self.rows[sl], self.raw[sl], cut(self.norms), self.first[sl], cut(self.second),
                             cut(self.floor), cut(self.inv))

    def maxima(self) -> torch.Tensor:
        """float64 [3] on the operand's device: the largest first, second and floor factors (0 for absent
        ones, NaN entries ignored): the column maxima the CUDA screen kernel widens its bulk test by."""
        if self._maxima is None:
            parts = [t.nan_to_num(nan=0.0).amax() if t is not None and t.numel() else torch.zeros(
                (), dtype=torch.float64, device=self.first.device) for t in (self.first, self.second, self.floor)]
            self._maxima = torch.stack(parts).clamp_min(0.0).contiguous()
        return self._maxima

    @property
    def scale(self) -> None:  # the Operand interface of engine.blocks (no post-GEMM factor)
        return None


class Fp32Screen:
    """S^ = float32 GEMM of the inputs converted to float32 (exact for 16-bit inputs); for cosine, of the
    rows scaled by float32(1 / N). Bound (docs/certified.md, "float32 GEMM"), with u the input rounding
    the GEMM may apply (0 for IEEE float32, see fp32_gemm_input_unit) and r the canonical rounding:

        dot:     w = kappa |q| |c| + 2^-126 (sqrt(d) (|q| + |c|) + 3 d) + 2^-148,
                 kappa = gamma_d (1 + 2u + u^2) + (2u + u^2) + r
        cosine:  w = gamma_d (1 + eps)^2 (1 + 2u + u^2) + (2u + u^2) + 2 eps + eps^2 + r_cos + the floor
                 with |q|, |c| <= 1 + eps, eps = 2^-22 + u

    gamma_d = d v / (1 - d v) with v = 2^-24 for a CPU GEMM and U_GPU_ACC for a GPU GEMM (``kernels``
    of a CUDA device: cuda kernels also do the canonical work on the device).
    """

    name = "fp32"
    rel = 0.0
    out_dtype = torch.float32

    def __init__(self, dtype: torch.dtype, metric: str, dim: int, device: torch.device, kernels: Any = None):
        self.metric, self.dim = metric, dim
        self.kernels = kernels if kernels is not None else kernels_for(device)
        u_in = self.input_unit(device)
        self.input_error = 2 * u_in + u_in * u_in
        self.gamma = gamma(dim, U_GPU_ACC if self.kernels.cuda else U32) * (1 + self.input_error)
        self.eps = 2.0**-22 + u_in  # relative error of a normalized float32 element (docs/certified.md)
        self.unit_bound = 1 + self.eps
        self.rounding = _C.canonical_rounding_factor(dim)
        lanes = math.ceil(dim / 8)
        self.cos_rest = self.input_error + 2 * self.eps + self.eps**2 + U32 + (3 * lanes + 16) * 2.0**-53

    def input_unit(self, device: torch.device) -> float:
        return fp32_gemm_input_unit(device)

    def _floor(self, bounds: torch.Tensor) -> torch.Tensor:
        # Half of the subnormal terms on each side: 2^-126 (sqrt(d) |x| + 1.5 d) + 2^-149.
        return (SUBNORMAL * (math.sqrt(self.dim) * bounds + 1.5 * self.dim) + 2.0**-149) * SAFETY

    def _rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(raw rows, float32 GEMM rows, canonical norms for cosine, upper bounds of the GEMM rows' norms)."""
        raw = raw_rows(x)
        norms = canonical_norms(raw, self.kernels)
        if self.metric == "cosine":
            inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms)).float()
            # Beyond 2^126, float32(1 / N) is subnormal and the relative bound eps fails: such rows get an
            # infinite bound (their candidates are always rescored). Below 2^-128, 1 / N overflows and
            # S^ is not finite, which the kernels rescore anyway.
            bounds = torch.where(norms > 2.0**126, math.inf, self.unit_bound).to(torch.float64)
            return raw, raw.float() * inv[:, None], norms, bounds
        return raw, self._gemm_rows(raw), None, norms * SAFETY  # |x| <= N (1 + 2^-20) for d < 2^30

    def _gemm_rows(self, raw: torch.Tensor) -> torch.Tensor:
        """The rows the GEMM reads for "dot": float32 (exact for 16-bit inputs)."""
        return raw.float()

    def operand(self, x: torch.Tensor, query_side: bool) -> ScreenOperand:
        raw, rows, norms, bounds = self._rows(x)
        if self.metric == "cosine":
            kappa = (self.gamma * self.unit_bound**2 + self.cos_rest) * SAFETY
            first = torch.where(bounds.isinf(), math.inf, kappa if query_side else 1.0).to(torch.float64)
        else:
            first = bounds * ((self.gamma + self.input_error + self.rounding) * SAFETY) if query_side else bounds
        return ScreenOperand(rows, raw, norms, first, None, self._floor(bounds))

    def scores(self, q: ScreenOperand, c: ScreenOperand, out: torch.Tensor) -> None:
        torch.matmul(q.rows, c.rows.T, out=out)


class Bf16Screen(Fp32Screen):
    """S^ = bfloat16 GEMM of bfloat16 copies x^ of the float32 GEMM rows x above (normalized for cosine),
    float32 accumulation, bfloat16 output. Bound (docs/certified.md, "bfloat16 GEMM"), e_x = |x - x^|:

        w = e_q |c| + |q^| (e_c + gamma_d |c^|) + (r |q| |c| or the cosine terms) + rel |S^| + the floor,
        rel = 2^-8 (1 + 2^-7).
    """

    name = "bf16"
    rel = U_BF16 * (1 + 2.0**-7)
    out_dtype = torch.bfloat16

    def input_unit(self, device: torch.device) -> float:
        return 0.0  # the rounding to bfloat16 is measured (e_x), not assumed

    def operand(self, x: torch.Tensor, query_side: bool) -> ScreenOperand:
        raw, exact, norms, bounds = self._rows(x)
        rows = exact.to(torch.bfloat16)
        # x - bf16(x) is exact in float32 (at most 16 significant bits); the norms are summed in float64
        # (canonical_norms), where tiny or huge rows neither underflow nor overflow.
        err = canonical_norms((exact - rows.float()).contiguous(), self.kernels) * SAFETY
        hat = canonical_norms(rows, self.kernels) * SAFETY
        floor = self._floor(bounds)
        if not query_side:  # b = |c|, f = e_c + gamma_d |c^|
            return ScreenOperand(rows, raw, norms, bounds, err + self.gamma * SAFETY * hat, floor)
        if self.metric == "cosine":  # a = e_q, e = |q^|, g = the cosine terms besides the GEMM's
            return ScreenOperand(rows, raw, norms, err, hat, floor + self.cos_rest * SAFETY)
        return ScreenOperand(rows, raw, norms, err + self.rounding * SAFETY * bounds, hat, floor)


class Mixed16Screen(Fp32Screen):
    """For 16-bit inputs where a 16-bit GEMM with float32 output is the fast product (a GPU's tensor
    cores): S^ = the GEMM of the raw 16-bit rows, float32 accumulation and output (``matmul``: torch.mm
    with out_dtype=float32), so the inputs are never upcast or rounded. The products of 16-bit values are
    exact in float32 (at most 22 significant bits) unless they underflow, so "dot" has the float32 GEMM's
    bound with u = 0. "cosine" scales the raw block: A = float32(float32(S^ sigma_q) sigma_c) with
    sigma_x = float32(1 / N_x) (0 for a zero row), and (docs/certified.md, "16-bit GEMM on the GPU")

        |A - s| <= rel |A| + gamma_d + r_cos + 2^-126 sqrt(d) (1/|q| + 1/|c|) + (3 d 2^-126 + 2^-148) / (|q| |c|)
                   + 2^-150 (1/|c| + 1) (1 + rel),    rel = theta / (1 - theta),
        theta = (4 * 2^-24 + 2 eta)(1 + 2^-18),  eta = (ceil(d / 8) + 5) 2^-53 (a canonical norm's error),

    r_cos = 2^-24 + (3 ceil(d/8) + 16) 2^-53 (the canonical cosine against the exact one). A row with
    N > 2^126 (sigma subnormal: the relative bound fails) gets an infinite bound; a zero row scores
    exactly 0 on both sides (bound 0)."""

    name = "mixed"

    def __init__(self, dtype: torch.dtype, metric: str, dim: int, device: torch.device, kernels: Any = None):
        super().__init__(dtype, metric, dim, device, kernels)
        eta = (math.ceil(dim / 8) + 5) * 2.0**-53
        theta = (4 * U32 + 2 * eta) * (1 + 2.0**-18)
        self.rel = theta / (1 - theta) * SAFETY if metric == "cosine" else 0.0

    def input_unit(self, device: torch.device) -> float:
        return 0.0  # 16-bit values are exact in float32; the products too (or underflow: the floor)

    def operand(self, x: torch.Tensor, query_side: bool) -> ScreenOperand:
        if self.metric != "cosine":
            return super().operand(x, query_side)
        raw = raw_rows(x)
        norms = canonical_norms(raw, self.kernels)
        zero, huge = norms == 0, norms > 2.0**126
        inv_n = torch.where(zero, 0.0, 1.0 / norms)  # float64 1/N, >= 1/|x| (1 - 2^-20)
        inv_bound = inv_n * SAFETY  # >= 1/|x|
        sqrt_d = math.sqrt(self.dim) * SUBNORMAL * SAFETY
        if query_side:  # a = gamma_d + r_cos, e = 1/|q|, g = 2^-126 sqrt(d) / |q|
            const = (self.gamma + U32 + (3 * math.ceil(self.dim / 8) + 16) * 2.0**-53) * SAFETY
            first = torch.where(huge, math.inf, torch.where(zero, 0.0, const)).to(torch.float64)
            return ScreenOperand(raw, raw, norms, first, inv_bound, sqrt_d * inv_bound, inv=inv_n.float())
        # b = 1, f = (3 d 2^-126 + 2^-148)(1/|c|), h = 2^-126 sqrt(d)/|c| + 2^-150 (1/|c| + 1)(1 + rel)
        first = torch.where(huge, math.inf, torch.where(zero, 0.0, 1.0)).to(torch.float64)
        second = (3 * self.dim * SUBNORMAL + 2.0**-148) * SAFETY * inv_bound
        floor = sqrt_d * inv_bound + 2.0**-150 * (inv_bound * (1 + U32) + 1) * (1 + self.rel) * SAFETY
        return ScreenOperand(raw, raw, norms, first, second, torch.where(zero, 0.0, floor), inv=inv_n.float())

    def _gemm_rows(self, raw: torch.Tensor) -> torch.Tensor:
        return raw  # the GEMM reads the 16-bit rows themselves (the bound is the float32 one with u = 0)

    def scores(self, q: ScreenOperand, c: ScreenOperand, out: torch.Tensor) -> None:
        self.kernels.matmul_f32(q.rows, c.rows, out)
        if q.inv is not None:
            out.mul_(q.inv[:, None]).mul_(c.inv[None, :])


PRODUCTS = {"fp32": Fp32Screen, "bf16": Bf16Screen, "mixed": Mixed16Screen}


def canonical_pair_scores(queries: torch.Tensor, rows_of: Any, ids: torch.Tensor, metric: str,
                          chunk: int = 1 << 22, kernels: Any = None) -> torch.Tensor:
    """(B, P) float32 canonical scores of query i with candidate rows_of(ids)[i, p] (ids valid, e.g.
    clamped), gathering at most `chunk` elements at a time, on the queries' device."""
    b, n_pos = ids.shape
    out = torch.empty((b, n_pos), dtype=torch.float32, device=queries.device)
    if b == 0 or n_pos == 0:
        return out
    d = queries.shape[1]
    step = max(1, chunk // max(1, n_pos * d))
    for i0 in range(0, b, step):
        q = raw_rows(queries[i0:i0 + step])
        sl = ids[i0:i0 + step]
        c = raw_rows(rows_of(sl.reshape(-1)).to(queries.device, queries.dtype))
        local = torch.arange(c.shape[0], dtype=torch.int64, device=queries.device).reshape(sl.shape)
        out[i0:i0 + step] = canonical_scores_at(q, c, local, metric, kernels=kernels)
    return out


def canonical_scores_at(queries: torch.Tensor, candidates: torch.Tensor, ids: torch.Tensor, metric: str,
                        q_norms: torch.Tensor | None = None, c_norms: torch.Tensor | None = None,
                        kernels: Any = None) -> torch.Tensor:
    """(R, P) float32 canonical scores ("dot" or "cosine") of query row i with candidate row ids[i, p];
    an id of -1 gives NaN. queries / candidates: rows as :func:`raw_rows` returns them, of one dtype, on
    one device (ids there too); q_norms / c_norms: their canonical norms for cosine (computed when None)."""
    rows, cols = ids.shape
    out = torch.empty((rows, cols), dtype=torch.float32, device=queries.device)
    if rows == 0 or cols == 0:
        return out
    ids = ids.contiguous()
    k = _kernels(queries, kernels)
    cosine = metric == "cosine"
    if cosine:
        q_norms = canonical_norms(queries, k) if q_norms is None else q_norms.contiguous()
        c_norms = canonical_norms(candidates, k) if c_norms is None else c_norms.contiguous()
    k.module.canonical_pairs(queries.data_ptr(), queries.stride(0), candidates.data_ptr(), candidates.stride(0),
                             dtype_code(queries), queries.shape[1], ids.data_ptr(), rows, cols,
                             q_norms.data_ptr() if cosine else 0, c_norms.data_ptr() if cosine else 0,
                             out.data_ptr(), k.threads(), k.cuda, k.stream(out))
    return out
