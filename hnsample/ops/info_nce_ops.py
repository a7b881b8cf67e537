"""The torch.library ops behind :func:`hnsample.info_nce` (one kernel per backend, fakes, autograd).

* ``hnsample::info_nce_stats``: per-row log-sum-exp statistics of the negatives (and per-column ones for
  the symmetric loss); its backward is the op ``hnsample::info_nce_stats_backward`` (the blocks are
  recomputed).
* ``hnsample::info_nce_stats_fused``: the same statistics and, for a scalar loss, the gradients during
  the forward pass (3 GEMM-equivalents instead of 4). Its backward hands the stored gradients over (or
  scales them) when the upstream gradient is the one it assumed, else recomputes them exactly
  (``hnsample::info_nce_fused_backward``).

Tensors are positional (autograd registration needs them so), scalars keyword-only. The block passes are
in :mod:`.info_nce_blocks`, the loss math in :mod:`.info_nce_math`.
"""

from __future__ import annotations

import torch

from .._ext import device_guard
from ..engine import compute_dtype, registry
from .info_nce_blocks import RULE_TENSORS, PairRules, backward_pass, forward_pass, fused_pass, fused_rows
from .info_nce_math import add_positive_grads, closed_form_grads, lse_value, upstream_pairs, upstream_scale

_RULES = ("Tensor positive_ids, Tensor? positive_doc_ids, Tensor? doc_ids, Tensor? query_labels, "
          "Tensor? doc_labels, Tensor? upper, Tensor? guide_queries, Tensor? guide_docs, Tensor? guide_upper")
_SCALARS = "float hardness_alpha, float hcl_beta, float positive_margin"
_NO_RULE_GRADS = (None,) * len(RULE_TENSORS)

torch.library.define(
    "hnsample::info_nce_stats",
    f"(Tensor queries, Tensor docs, Tensor temperature, {_RULES}, *, {_SCALARS}, bool symmetric, "
    "int block_size) -> (Tensor, Tensor, Tensor, Tensor)")
torch.library.define(
    "hnsample::info_nce_stats_backward",
    f"(Tensor grad_s1, Tensor grad_s0, Tensor grad_col, Tensor s1, Tensor s0, Tensor col, Tensor queries, "
    f"Tensor docs, Tensor temperature, {_RULES}, *, {_SCALARS}, bool symmetric, int block_size) "
    "-> (Tensor, Tensor, Tensor)")
torch.library.define(
    "hnsample::info_nce_stats_fused",
    f"(Tensor queries, Tensor docs, Tensor temperature, {_RULES}, Tensor positive_scores, *, {_SCALARS}, "
    "int block_size, float tau_plus, float row_weight) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
torch.library.define(
    "hnsample::info_nce_fused_backward",
    f"(Tensor grad_s1, Tensor grad_s0, Tensor grad_spos, Tensor s1, Tensor s0, Tensor col, Tensor grad_q, "
    f"Tensor grad_d, Tensor grad_t, Tensor g1, Tensor g0, Tensor gpos, Tensor queries, Tensor docs, "
    f"Tensor temperature, {_RULES}, *, {_SCALARS}, bool symmetric, int block_size) -> (Tensor, Tensor, Tensor)")


def _statistics(row_stats: torch.Tensor, hcl_beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S1, S0, count) from (rows, 5) running statistics: S1 = log sum exp((1+beta) l), S0 = log sum
    exp(beta l) (log count without HCL)."""
    count = row_stats[:, 4].clone()
    s1 = lse_value(row_stats[:, 0], row_stats[:, 1])
    s0 = lse_value(row_stats[:, 2], row_stats[:, 3]) if hcl_beta != 0.0 else torch.log(count)
    return s1, s0, count


# ----------------------------------------------------------------------------------------------------
# Kernels per backend


def _stats_kernel(device_type: str):
    def kernel(queries, docs, temperature, *tensors, hardness_alpha, hcl_beta, positive_margin, symmetric,
               block_size):
        rules = PairRules.from_op(temperature, tensors, hardness_alpha, hcl_beta, positive_margin, symmetric)
        with torch.no_grad(), device_guard(queries):
            row_stats, col_stats = forward_pass(queries, docs, rules, block_size, registry.get(device_type).kernels)
        s1, s0, count = _statistics(row_stats, hcl_beta)
        return s1, s0, count, lse_value(col_stats[:, 0], col_stats[:, 1])
    return kernel


def _stats_backward_kernel(device_type: str):
    def kernel(grad_s1, grad_s0, grad_col, s1, s0, col, queries, docs, temperature, *tensors, hardness_alpha,
               hcl_beta, positive_margin, symmetric, block_size):
        rules = PairRules.from_op(temperature, tensors, hardness_alpha, hcl_beta, positive_margin, symmetric)
        row_coef = torch.stack([grad_s1, s1, grad_s0, s0], dim=1).to(torch.float64).contiguous()
        col_coef = torch.stack([grad_col, col], dim=1).to(torch.float64).contiguous()
        with torch.no_grad(), device_guard(queries):
            grad_q, grad_d, tau_acc = backward_pass(queries, docs, rules, block_size,
                                                    registry.get(device_type).kernels, row_coef, col_coef)
        # dL/dtau = sum_ij c_ij dl_ij/dtau with dl_ij/dtau = -u_ij / tau.
        grad_t = (-tau_acc.sum() / temperature.to(torch.float64)).to(temperature.dtype).reshape(temperature.shape)
        return grad_q.to(queries.dtype), grad_d.to(docs.dtype), grad_t
    return kernel


def _fused_kernel(device_type: str):
    def kernel(queries, docs, temperature, *rest, hardness_alpha, hcl_beta, positive_margin, block_size, tau_plus,
               row_weight):
        *tensors, positive_scores = rest
        rules = PairRules.from_op(temperature, tuple(tensors), hardness_alpha, hcl_beta, positive_margin, False)
        b, m = queries.shape[0], docs.shape[0]
        ct = compute_dtype(queries.dtype)
        valid = rules.positive_ids >= 0
        tau = temperature.detach().to(torch.float64)
        grad_pos = torch.zeros(positive_scores.shape, dtype=torch.float64, device=queries.device)

        def coefficients(i0: int, i1: int, stats: torch.Tensor) -> torch.Tensor:
            # The rows' statistics are final: differentiate their (scalar-weighted) losses.
            s1, s0, cnt = _statistics(stats, hcl_beta)
            g1, g_l = closed_form_grads(positive_scores[i0:i1], valid[i0:i1], tau, s1, s0, cnt, positive_margin,
                                        tau_plus)
            g1 = g1 * row_weight
            grad_pos[i0:i1] = g_l * (row_weight / tau)
            return torch.stack([g1, s1, -g1, s0], dim=1)

        with torch.no_grad(), device_guard(queries):
            row_stats, row_coef, tau_acc, grad_q, grad_d = fused_pass(
                queries, docs, rules, max(1, fused_rows(b, m, block_size)), registry.get(device_type).kernels,
                coefficients)
            # The positive terms' gradients for the same unit upstream (the positive scores are an output).
            add_positive_grads(queries, docs, rules.positive_ids.clamp_min(0), grad_pos.to(ct), grad_q, grad_d)
        s1, s0, count = _statistics(row_stats, hcl_beta)
        grad_t = (-tau_acc.sum() / tau).to(temperature.dtype).reshape(temperature.shape)
        return (s1, s0, count, s1.new_empty(0), grad_q.to(queries.dtype), grad_d.to(docs.dtype), grad_t,
                row_coef[:, 0].clone(), row_coef[:, 2].clone(), positive_scores.clone(), grad_pos)
    return kernel


def _fused_backward_kernel(grad_s1, grad_s0, grad_spos, s1, s0, col, grad_q, grad_d, grad_t, g1, g0, gpos, queries,
                           docs, temperature, *tensors, **scalars):
    # An op of its own so that the value-dependent choice below stays out of traced graphs.
    grads, assumed = upstream_pairs(grad_s1, g1, grad_s0, g0, grad_spos, gpos, scalars["hcl_beta"])
    c = upstream_scale(grads, assumed)
    if c is not None:
        return (c * grad_q).to(grad_q.dtype), (c * grad_d).to(grad_d.dtype), (c * grad_t).to(grad_t.dtype)
    gq, gd, gt = torch.ops.hnsample.info_nce_stats_backward(
        grad_s1, grad_s0, torch.zeros_like(col), s1, s0, col, queries, docs, temperature, *tensors, **scalars)
    ct = compute_dtype(queries.dtype)
    pq = torch.zeros(queries.shape, dtype=ct, device=queries.device)
    pd = torch.zeros(docs.shape, dtype=ct, device=docs.device)
    add_positive_grads(queries, docs, tensors[0].clamp_min(0), grad_spos.to(ct), pq, pd)
    return (gq.to(ct) + pq).to(queries.dtype), (gd.to(ct) + pd).to(docs.dtype), gt


for _device_type in ("cpu", "cuda"):
    torch.library.register_kernel("hnsample::info_nce_stats", _device_type, _stats_kernel(_device_type))
    torch.library.register_kernel("hnsample::info_nce_stats_backward", _device_type,
                                  _stats_backward_kernel(_device_type))
    torch.library.register_kernel("hnsample::info_nce_stats_fused", _device_type, _fused_kernel(_device_type))
    torch.library.register_kernel("hnsample::info_nce_fused_backward", _device_type, _fused_backward_kernel)


# ----------------------------------------------------------------------------------------------------
# Fakes


@torch.library.register_fake("hnsample::info_nce_stats")
def _(queries, docs, temperature, *tensors, symmetric, **_):
    b, m = queries.shape[0], docs.shape[0]
    row = queries.new_empty((b,), dtype=torch.float64)
    return row, row.new_empty((b,)), row.new_empty((b,)), row.new_empty((m if symmetric else 0,))


@torch.library.register_fake("hnsample::info_nce_stats_backward")
def _(grad_s1, grad_s0, grad_col, s1, s0, col, queries, docs, temperature, *tensors, **_):
    return torch.empty_like(queries), torch.empty_like(docs), torch.empty_like(temperature)


@torch.library.register_fake("hnsample::info_nce_stats_fused")
def _(queries, docs, temperature, *rest, **_):
    positive_scores = rest[-1]
    row = queries.new_empty((queries.shape[0],), dtype=torch.float64)
    return (row, row.new_empty(row.shape), row.new_empty(row.shape), row.new_empty((0,)), torch.empty_like(queries),
            torch.empty_like(docs), torch.empty_like(temperature), row.new_empty(row.shape),
            row.new_empty(row.shape), torch.empty_like(positive_scores), torch.empty_like(positive_scores))


@torch.library.register_fake("hnsample::info_nce_fused_backward")
def _(grad_s1, grad_s0, grad_spos, s1, s0, col, grad_q, grad_d, grad_t, *rest, **_):
    return torch.empty_like(grad_q), torch.empty_like(grad_d), torch.empty_like(grad_t)


# ----------------------------------------------------------------------------------------------------
# Autograd


def _stats_setup(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(*inputs, output[0], output[1], output[3])
    ctx.scalars = keyword_only_inputs


def _stats_backward(ctx, grad_s1, grad_s0, _grad_count, grad_col):
    *inputs, s1, s0, col = ctx.saved_tensors
    grad_s1 = torch.zeros_like(s1) if grad_s1 is None else grad_s1
    grad_s0 = torch.zeros_like(s0) if grad_s0 is None else grad_s0
    grad_col = torch.zeros_like(col) if grad_col is None else grad_col
    gq, gd, gt = torch.ops.hnsample.info_nce_stats_backward(grad_s1, grad_s0, grad_col, s1, s0, col, *inputs,
                                                            **ctx.scalars)
    return gq, gd, gt, *_NO_RULE_GRADS


torch.library.register_autograd("hnsample::info_nce_stats", _stats_backward, setup_context=_stats_setup)


def _fused_setup(ctx, inputs, keyword_only_inputs, output):
    *stats_inputs, _positive_scores = inputs
    ctx.save_for_backward(*stats_inputs, output[0], output[1], output[3], *output[4:9], output[10])
    ctx.num_inputs = len(stats_inputs)
    ctx.scalars = {k: keyword_only_inputs[k] for k in ("hardness_alpha", "hcl_beta", "positive_margin",
                                                         "block_size")}


def _fused_backward(ctx, grad_s1, grad_s0, _grad_count, _grad_col, _gq, _gd, _gt, _g1, _g0, grad_spos, _gpos):
    saved = ctx.saved_tensors
    n = ctx.num_inputs
    inputs, (s1, s0, col) = saved[:n], saved[n:n + 3]
    grad_q, grad_d, grad_t, g1, g0, gpos = saved[n + 3:]
    grad_s1 = torch.zeros_like(s1) if grad_s1 is None else grad_s1
    grad_s0 = torch.zeros_like(s0) if grad_s0 is None else grad_s0
    grad_spos = torch.zeros_like(gpos) if grad_spos is None else grad_spos
    real = all(type(t) is torch.Tensor for t in (grad_s1, grad_s0, grad_spos, g1))  # not tracing
    if real and not torch.compiler.is_compiling():
        grads, assumed = upstream_pairs(grad_s1, g1, grad_s0, g0, grad_spos, gpos, ctx.scalars["hcl_beta"])
        if bool(((grads - assumed).abs() <= 1e-12 * assumed.abs() + 1e-300).all()):
            # loss.backward() on the loss itself: hand the stored gradients over without a scaled copy,
            # which would double the gradient memory at its peak.
            return grad_q, grad_d, grad_t, *_NO_RULE_GRADS, None
    gq, gd, gt = torch.ops.hnsample.info_nce_fused_backward(
        grad_s1, grad_s0, grad_spos, s1, s0, col, grad_q, grad_d, grad_t, g1, g0, gpos, *inputs, symmetric=False,
        **ctx.scalars)
    return gq, gd, gt, *_NO_RULE_GRADS, None


torch.library.register_autograd("hnsample::info_nce_stats_fused", _fused_backward, setup_context=_fused_setup)
