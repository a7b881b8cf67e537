"""Score blocks: the one loop that produces the (B, N) score matrix block by block, with a pluggable
product, and the generic selection driver built on it.

Every op that needs scores gets them from :func:`score_blocks`: ``topk_similarity`` and mining (through
:func:`select_blocks`), the filter statistics, the dynamic miner, InfoNCE's passes and the CUDA driver.
Candidates are the outer loop (each candidate block is prepared once), query rows the inner one; one
score buffer is reused, so extra memory is one block and one prepared candidate block, never B x N.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import torch

from .. import settings as _settings
from .certify import PRODUCTS, SCREENED_DTYPES, canonical_pair_scores
from .selection import ScreenedPass, SelectionState, build_selection, kernels_for

# Rows of the positive-pair helpers hold at most this many gathered elements at a time.
PAIR_CHUNK = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores accumulate in float32 (float64 for float64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def prepare_rows(x: torch.Tensor, metric: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows in `dtype` (default: x's compute dtype), unit-normalized for cosine (a zero row stays zero)."""
    x = x.to(dtype or compute_dtype(x.dtype))
    if metric == "cosine":
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        x = x / torch.where(norm > 0, norm, torch.ones_like(norm))
    return x


def block_shape(rows: int, cols: int, block_size: int) -> tuple[int, int]:
    """Row and column extent of a score block holding at most block_size elements (at most 1024 rows,
    so a candidate block is as wide as the budget allows)."""
    br = max(1, min(rows, 1024, block_size))
    bc = max(1, min(cols, block_size // br))
    return br, bc


# ----------------------------------------------------------------------------------------------------
# Products


@dataclasses.dataclass
class Operand:
    """Rows ready for a product, and the per-row factor it applies after the GEMM (None: none)."""

    rows: torch.Tensor
    scale: torch.Tensor | None = None

    def __getitem__(self, sl: slice) -> Operand:
        return Operand(self.rows[sl], None if self.scale is None else self.scale[sl])


class MatmulProduct:
    """s = q c^T by torch.matmul in the compute dtype of `dtype` (float32, float64 for float64), both
    operands converted to it first (16-bit inputs exactly), cosine rows normalized after that."""

    def __init__(self, dtype: torch.dtype, metric: str):
        self.metric = metric
        self.out_dtype = compute_dtype(dtype)

    def operand(self, x: torch.Tensor, query_side: bool = False) -> Operand:
        return Operand(prepare_rows(x, self.metric, self.out_dtype))

    def scores(self, q: Operand, c: Operand, out: torch.Tensor) -> None:
        torch.matmul(q.rows, c.rows.T, out=out)


class MixedPrecisionProduct:
    """16-bit inputs on the GPU: torch.mm(q, c^T, out_dtype=float32) (tensor cores, fp32 accumulation,
    scores never rounded to 16 bits). Cosine scores are s_ij = (acc_ij * 1/|q_i|) * 1/|c_j| in fp32 (norms
    in fp32; zero vectors score 0), which equals the product of normalized fp32 rows up to fp32 rounding.

    scales_in_select: False (default): ``scores`` writes s, multiplying the raw block by the operands'
    scales (two elementwise passes over it). True: ``scores`` writes the raw products acc and leaves the
    scales on the operands (``Operand.scale``) for the consumer to apply in that order -- the CUDA
    select launcher does, in its compare (``CudaKernels.select_block``), giving the same s bit for bit.
    Only a consumer that applies them may ask for that."""

    out_dtype = torch.float32

    def __init__(self, metric: str, scales_in_select: bool = False):
        self.metric = metric
        self.scales_in_select = scales_in_select

    def operand(self, x: torch.Tensor, query_side: bool = False) -> Operand:
        return Operand(x.contiguous(), cosine_scale(x) if self.metric == "cosine" else None)

    def scores(self, q: Operand, c: Operand, out: torch.Tensor) -> None:
        self.matmul(q.rows, c.rows, out)
        if c.scale is not None and not self.scales_in_select:
            out.mul_(q.scale[:, None]).mul_(c.scale[None, :])

    @staticmethod
    def matmul(q: torch.Tensor, c: torch.Tensor, out: torch.Tensor) -> None:
        """out = q c^T accumulated in fp32 (out: fp32)."""
        torch.mm(q, c.T, out_dtype=torch.float32, out=out)


def product_for(x: torch.Tensor, metric: str, kernels: Any = None, scales_in_select: bool = False
                ) -> MatmulProduct | MixedPrecisionProduct:
    """The product today's engine uses for inputs like x: the mixed-precision GEMM for 16-bit inputs
    on a GPU whose torch supports it (``scales_in_select`` passed on), else torch.matmul in the compute
    dtype (which normalizes cosine rows first: no scales)."""
    half = x.dtype in (torch.float16, torch.bfloat16)
    if half and x.device.type == "cuda":
        kernels = kernels if kernels is not None else kernels_for(x.device)
        if kernels.mm_out_dtype_supported(x.device, x.dtype):
            return MixedPrecisionProduct(metric, scales_in_select)
    return MatmulProduct(x.dtype, metric)


def screen_product(dtype: torch.dtype, metric: str, dim: int, device: torch.device, kernels: Any = None) -> Any:
    """The screening product for inputs of this dtype on this device (its kernels: default the
    registered backend's): settings.screen_product, or with "auto" the fastest by a one-time timed probe
    on the CPU (cached per dtype); on CUDA "auto" is the 16-bit tensor-core GEMM ("mixed") for 16-bit
    inputs where torch has it, else "fp32"."""
    kernels = kernels if kernels is not None else kernels_for(device)
    choice = _settings.current().screen_product
    half = dtype in (torch.float16, torch.bfloat16)
    if kernels.cuda:
        if choice == "bf16":
            raise ValueError('settings.screen_product="bf16" is a CPU product; on CUDA use "auto", "fp32" or "mixed"')
        if choice == "auto":
            choice = "mixed" if half and kernels.mm_out_dtype_supported(device, dtype) else "fp32"
    elif choice == "auto":
        choice = probe_fastest(device.type, dtype)
    if choice == "mixed" and not half:
        choice = "fp32"  # float32 inputs have no 16-bit product: "mixed" means "fp32" for them
    return PRODUCTS[choice](dtype, metric, dim, device, kernels)


@cache
def probe_fastest(device_type: str, dtype: torch.dtype) -> str:
    """The name of the fastest screening product on this machine for inputs of `dtype`, by
    :func:`probe_times` (once per process). Only the CPU offers a choice today."""
    if device_type != "cpu":
        return "fp32"
    return min(probe_times(dtype), key=lambda kv: kv[1])[0]


def probe_times(dtype: torch.dtype, rows: int = 64, cols: int = 4096, dim: int = 128,
                k: int = 16) -> list[tuple[str, float]]:
    """(name, seconds) of a small screened selection with every product: the GEMM, the screening and the
    canonical rescorings its bound leaves (a coarser bound is faster to compute but leaves more), best of
    two after a warm-up, on random data. ``hnsample bench`` shows it."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, dim, generator=g).to(dtype)
    c = torch.randn(cols, dim, generator=g).to(dtype)
    sel = build_selection(rows, cols, torch.device("cpu"), k)
    out = []
    fastest = math.inf
    for name, cls in PRODUCTS.items():
        if name == "mixed":  # a GPU product (16-bit tensor cores); on the CPU it is the fp32 GEMM again
            continue
        product = cls(dtype, "dot", dim, torch.device("cpu"))
        best = warm = math.inf
        for attempt in range(3):
            if attempt == 1 and warm > 4 * fastest:  # far behind already: no need to time it closely
                best = warm
                break
            state = SelectionState(sel, rows, torch.device("cpu"))
            t0 = time.perf_counter()
            with ScreenedPass(state) as screened:
                for blk in score_blocks(q, c, product, rows, 1024):
                    screened.offer(blk, blk.j0)
            elapsed = time.perf_counter() - t0
            if attempt:
                best = min(best, elapsed)
            else:
                warm = elapsed
        fastest = min(fastest, best)
        out.append((name, best))
    return out


NORM_ROWS = 1 << 13  # rows per norm computation (temporaries of this many rows)


def cosine_scale(x: torch.Tensor) -> torch.Tensor:
    """1 / |x_i| per row with the norm taken in fp32 (NORM_ROWS rows at a time), 0 for zero rows."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for i in range(0, x.shape[0], NORM_ROWS):
        norm = torch.linalg.vector_norm(x[i:i + NORM_ROWS].float(), dim=1)
        out[i:i + NORM_ROWS] = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))
    return out


# ----------------------------------------------------------------------------------------------------
# The block loop


@dataclasses.dataclass
class Block:
    """One block of scores: rows [i0, i0 + rows) of the queries against candidates [j0, j0 + cols).

    ``scores`` is a view into a buffer the next block overwrites; ``queries`` / ``candidates`` are the
    prepared operands it was computed from; ``guide`` the guide scores of the same pairs, when asked;
    ``rel``: None for exact scores, else they are a screening product's approximations (engine.certify)
    and this is the relative part of its error bound."""

    i0: int
    j0: int
    scores: torch.Tensor
    queries: Any
    candidates: Any
    guide: torch.Tensor | None = None
    rel: float | None = None


def score_blocks(
    queries: torch.Tensor, candidates: torch.Tensor, product: Any, block_rows: int, block_cols: int, *,
    guide: tuple[torch.Tensor, torch.Tensor, Any] | None = None, packed: bool = False,
) -> Iterator[Block]:
    """Yields the (B, N) scores of ``product`` as blocks of at most block_rows x block_cols, candidate
    blocks outer, query rows inner. guide = (guide_queries, guide_candidates, guide_product) adds the
    guide scores of the same pairs. packed: a partial block is a contiguous (rows, cols) matrix
    (cuBLAS-friendly) instead of a view with the full block's row stride."""
    if candidates.dtype != queries.dtype or candidates.device != queries.device:
        # The product and the kernels read both operands in the queries' dtype: a mismatch would read
        # past the end of a 16-bit candidate block.
        raise TypeError(f"candidates must have the dtype and device of queries ({queries.dtype}, {queries.device}), "
                        f"got {candidates.dtype}, {candidates.device}")
    b, n = queries.shape[0], candidates.shape[0]
    if b == 0 or n == 0:
        return
    br, bc = min(block_rows, b), min(block_cols, n)
    q = product.operand(queries, True)
    buf = torch.empty(br * bc, dtype=product.out_dtype, device=queries.device)
    gq = gbuf = None
    if guide is not None:
        gq = guide[2].operand(guide[0], True)
        gbuf = torch.empty(br * bc, dtype=guide[2].out_dtype, device=queries.device)
    rows = [(i0, min(b, i0 + br)) for i0 in range(0, b, br)]

    def view(flat: torch.Tensor, r: int, c: int) -> torch.Tensor:
        return flat[: r * c].view(r, c) if packed else flat.view(br, bc)[:r, :c]

    rel = getattr(product, "rel", None)
    # Views and row slices are made once, not per block: each costs microseconds of host time.
    full = [view(buf, i1 - i0, bc) for i0, i1 in rows]
    q_rows = [q[i0:i1] for i0, i1 in rows]
    gfull = [view(gbuf, i1 - i0, bc) for i0, i1 in rows] if gbuf is not None else None
    gq_rows = [gq[i0:i1] for i0, i1 in rows] if gq is not None else None
    for j0 in range(0, n, bc):
        j1 = min(n, j0 + bc)
        c = product.operand(candidates[j0:j1], False)
        gc = guide[2].operand(guide[1][j0:j1], False) if guide is not None else None
        for r, (i0, i1) in enumerate(rows):
            out = full[r] if j1 - j0 == bc else view(buf, i1 - i0, j1 - j0)
            product.scores(q_rows[r], c, out)
            gout = None
            if gbuf is not None:
                gout = gfull[r] if j1 - j0 == bc else view(gbuf, i1 - i0, j1 - j0)
                guide[2].scores(gq_rows[r], gc, gout)
            yield Block(i0, j0, out, q_rows[r], c, gout, rel)


def certified(x: torch.Tensor) -> bool:
    """Whether selections over inputs like x rank canonical scores: float32 / 16-bit inputs on the CPU,
    and on CUDA with settings.cuda_certified (docs/certified.md)."""
    if x.dtype not in SCREENED_DTYPES:
        return False
    return x.device.type == "cpu" or (x.device.type == "cuda" and _settings.current().cuda_certified)


def default_product(queries: torch.Tensor, metric: str, kernels: Any = None) -> Any:
    """The product for inputs like `queries`: a certified screening product where :func:`certified`
    (scores are canonical, engine.certify), else torch.matmul in the compute dtype (float64 for float64
    inputs)."""
    if certified(queries):
        return screen_product(queries.dtype, metric, queries.shape[1], queries.device, kernels)
    return MatmulProduct(queries.dtype, metric)


def select_blocks(
    queries: torch.Tensor, candidates: torch.Tensor, state: SelectionState, metric: str, block_size: int,
    col_offset: int = 0, on_block: Callable[[Block, int], None] | None = None, product: Any = None,
) -> SelectionState:
    """The generic selection driver: offers every score block of queries x candidates to the state
    (candidates are global ids col_offset + j). on_block(block, global_col_offset), when given, sees every
    block right after it is offered (mining counts its filter statistics there). product: how blocks are
    computed (default: default_product); a screening product's blocks are offered certified."""
    if state.sel.k == 0:
        return state
    product = product if product is not None else default_product(queries, metric, state.kernels)
    br, bc = block_shape(queries.shape[0], candidates.shape[0], block_size)
    with ScreenedPass(state) as screened:
        for blk in score_blocks(queries, candidates, product, br, bc):
            if blk.rel is not None:
                screened.offer(blk, col_offset + blk.j0)
            else:
                state.offer(blk.scores, blk.i0, col_offset + blk.j0)
            if on_block is not None:
                on_block(blk, col_offset + blk.j0)
    return state


def selection_pair_scores(
    queries: torch.Tensor, rows_of: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, metric: str,
) -> torch.Tensor:
    """The (B, P) scores a selection ranks for query i and candidate ids[i, p] (e.g. the positives' scores
    p_i is made of): canonical where :func:`certified`, as every score those selections rank; else the
    product's (pair_similarities)."""
    if certified(queries):
        return canonical_pair_scores(queries, rows_of, ids, metric)
    return pair_similarities(queries, rows_of, ids, metric)


def pair_similarities(
    queries: torch.Tensor, rows_of: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, metric: str,
    *, out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(B, P) scores s_{i, ids[i, p]} (ids valid, e.g. clamped) of query i with the candidate rows
    rows_of(flat ids) returns, in the compute dtype (or out_dtype), gathering at most PAIR_CHUNK elements
    at a time (never (B, N), never all (B, P, d) at once). Cosine normalizes both sides first."""
    b, n_pos = ids.shape
    ct = out_dtype or compute_dtype(queries.dtype)
    out = torch.zeros((b, n_pos), dtype=ct, device=queries.device)
    if b == 0 or n_pos == 0:
        return out
    d = queries.shape[1]
    step = max(1, PAIR_CHUNK // max(1, n_pos * d))
    for i0 in range(0, b, step):
        sl = ids[i0:i0 + step]
        q = prepare_rows(queries[i0:i0 + step], metric).to(ct)
        c = prepare_rows(rows_of(sl.reshape(-1)).to(queries.device), metric).to(ct).reshape(sl.shape[0], n_pos, d)
        out[i0:i0 + step] = torch.einsum("bd,bpd->bp", q, c)
    return out
