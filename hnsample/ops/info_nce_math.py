"""InfoNCE's loss math on the statistics the block passes produce: the row losses (differentiable),
their closed-form derivatives for the fused forward+gradient pass, the log-sum-exp of a statistic, and
the positive-pair scores and their gradients (gathered in chunks, never (B, M)). The formulas are those
of :func:`hnsample.info_nce`'s docstring and ``hnsample._reference.info_nce``."""

from __future__ import annotations

import math

import torch

from ..engine import pair_similarities
from ..engine.blocks import PAIR_CHUNK


def pair_scores(queries: torch.Tensor, docs: torch.Tensor, idx: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    """(B, P) scores q_i . d_idx[i, p] in dtype ct (idx valid ids), gathered chunk by chunk."""
    if docs.shape[0] == 0:  # every positive id is padding
        return torch.zeros(idx.shape, dtype=ct, device=queries.device)
    return pair_similarities(queries, docs.__getitem__, idx, "dot", out_dtype=ct)


def lse_value(m: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """m + log z, and -inf for an empty statistic (z = 0); a NaN statistic stays NaN."""
    return torch.where(z == 0, -math.inf, m + torch.log(torch.where(z == 0, 1.0, z)))


def upstream_scale(grad: torch.Tensor, assumed: torch.Tensor) -> torch.Tensor | None:
    """c with grad == c * assumed (to float64 rounding), or None when grad is not such a multiple."""
    denom = (assumed * assumed).sum()
    c = (grad * assumed).sum() / denom if bool(denom > 0) else grad.new_zeros(())
    err = (grad - c * assumed).abs().max() if grad.numel() else grad.new_zeros(())
    return c if bool(err <= 1e-9 * grad.abs().max() + 1e-300) else None


def upstream_pairs(grad_s1, g1, grad_s0, g0, grad_spos, gpos, hcl_beta: float):
    """The upstream gradients of the fused op's differentiable outputs and the ones it assumed, flat.
    S0 matters only with HCL weights (otherwise the kernels ignore its gradient)."""
    grads = [grad_s1, grad_spos.reshape(-1)] + ([grad_s0] if hcl_beta != 0.0 else [])
    assumed = [g1, gpos.reshape(-1)] + ([g0] if hcl_beta != 0.0 else [])
    return torch.cat(grads).to(torch.float64), torch.cat(assumed)


def min_positive(values: torch.Tensor, valid: torch.Tensor, margin: float) -> torch.Tensor:
    """min over a row's valid positives of values, minus margin; +inf for a row without positives."""
    v = torch.where(valid, values.to(torch.float64), math.inf).amin(dim=1)
    return torch.where(valid.any(dim=1), v - margin, math.inf)


def closed_form_grads(
    s_pos: torch.Tensor,
    valid: torch.Tensor,
    tau: torch.Tensor,
    s1: torch.Tensor,
    s0: torch.Tensor,
    count: torch.Tensor,
    positive_margin: float,
    tau_plus: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Derivatives of the non-symmetric row loss of row_losses, in closed form: (d row_i / d S1_i,
    d row_i / d l_iq). d / d S0_i is minus the first (S1, S0 enter only through log R = S1 - S0 + log n).
    With n_v = |P(i)|, A_ip = logaddexp(Pos_i, logNg_ip), sigma_ip = exp(logNg_ip - A_ip) and
    pi_iq = softmax_q(l_iq) over the row's positives:

        d row_i / d S1_i = (1 / n_v) sum_p sigma_ip * dlogNg_ip / dlogR_i
        d row_i / d l_iq = (1 / n_v) (pi_iq sum_p (1 - sigma_ip) + sigma_iq * dlogNg_iq / dl_iq - 1)

    dlogNg / dlogR = 1 and dlogNg / dl = 0 for tau_plus = 0; on the debiased branch 1 / (1 - e^t) and
    e^t / (e^t - 1); on the floor both 0 (the floor's own tau-dependence is left to autograd).
    """
    has_pos = valid.any(dim=1)
    has_neg = count > 0
    l_pos = (s_pos.to(torch.float64) - positive_margin) / tau
    l_valid = torch.where(valid, l_pos, -math.inf)
    pos_lse = torch.where(has_pos, torch.logsumexp(l_valid, dim=1), 0.0)
    log_n = torch.log(torch.where(has_neg, count, 1.0))
    log_r = torch.where(has_neg, torch.where(has_neg, s1, 0.0) - torch.where(has_neg, s0, 0.0) + log_n, 0.0)
    log_ng = log_r.unsqueeze(1).expand_as(l_pos)
    slope_r = torch.ones_like(l_pos)
    slope_l = torch.zeros_like(l_pos)
    if tau_plus > 0.0:
        floor = (log_n - 1.0 / tau).unsqueeze(1)
        t = math.log(tau_plus) + log_n.unsqueeze(1) + l_pos - log_r.unsqueeze(1)
        ok = t < 0
        t_safe = torch.where(ok, t, -1.0)
        debiased = log_r.unsqueeze(1) + torch.log1p(-torch.exp(t_safe)) - math.log1p(-tau_plus)
        on_debiased = ok & (debiased >= floor)
        log_ng = torch.where(on_debiased, debiased, floor)
        slope_r = torch.where(on_debiased, 1.0 / -torch.expm1(t_safe), 0.0)
        slope_l = torch.where(on_debiased, torch.exp(t_safe) / torch.expm1(t_safe), 0.0)
    sigma = torch.exp(log_ng - torch.logaddexp(pos_lse.unsqueeze(1), log_ng))
    sigma = torch.where(valid & has_neg.unsqueeze(1), sigma, 0.0)
    n_valid = valid.sum(dim=1).clamp_min(1)
    g_s1 = torch.where(has_pos, (sigma * slope_r).sum(dim=1) / n_valid, 0.0)
    pi = torch.where(valid, torch.exp(l_valid - pos_lse.unsqueeze(1)), 0.0)
    keep = torch.where(valid, 1.0 - sigma, 0.0).sum(dim=1, keepdim=True)
    g_l = torch.where(valid, (pi * keep + sigma * slope_l - 1.0) / n_valid.unsqueeze(1), 0.0)
    return g_s1, g_l


def row_losses(
    s_pos: torch.Tensor,
    valid: torch.Tensor,
    tau: torch.Tensor,
    s1: torch.Tensor,
    s0: torch.Tensor,
    count: torch.Tensor,
    col: torch.Tensor,
    idx: torch.Tensor,
    positive_margin: float,
    tau_plus: float,
    symmetric: bool,
) -> torch.Tensor:
    """(B,) row losses from the positive scores and the negative statistics (float64, differentiable in
    s_pos, tau, s1, s0 and col). Every branch that is not taken is fed finite values so that no NaN
    reaches the gradients of masked rows."""
    has_pos = valid.any(dim=1)
    has_neg = count > 0
    l_pos = (s_pos.to(torch.float64) - positive_margin) / tau
    pos_lse = torch.logsumexp(torch.where(valid, l_pos, -math.inf), dim=1)
    pos_lse = torch.where(has_pos, pos_lse, 0.0)
    log_n = torch.log(torch.where(has_neg, count, 1.0))
    # log R_i = S1 - S0 + log n_i, where S1 = log sum exp((1+beta) l), S0 = log sum exp(beta l).
    log_r = torch.where(
        has_neg, torch.where(has_neg, s1, 0.0) - torch.where(has_neg, s0, 0.0) + log_n, -math.inf
    )
    log_ng = log_r.unsqueeze(1).expand_as(l_pos)
    if tau_plus > 0.0:
        floor = torch.where(has_neg, log_n - 1.0 / tau, -math.inf).unsqueeze(1)
        # R - tau_plus n e^{l_ip} = R (1 - e^t) with t = log(tau_plus n) + l_ip - log R.
        t = math.log(tau_plus) + log_n.unsqueeze(1) + l_pos - torch.where(has_neg, log_r, 0.0).unsqueeze(1)
        ok = (t < 0) & has_neg.unsqueeze(1)
        t_safe = torch.where(ok, t, -1.0)
        debiased = (
            torch.where(has_neg, log_r, 0.0).unsqueeze(1)
            + torch.log1p(-torch.exp(t_safe))
            - math.log1p(-tau_plus)
        )
        log_ng = torch.where(
            ok, torch.maximum(debiased, torch.where(has_neg.unsqueeze(1), floor, 0.0)), floor
        )
    log_ng = torch.where(has_pos.unsqueeze(1), log_ng, 0.0)
    per_pos = torch.logaddexp(pos_lse.unsqueeze(1), log_ng) - l_pos
    n_valid = valid.sum(dim=1).clamp_min(1)
    rows = torch.where(valid, per_pos, 0.0).sum(dim=1) / n_valid
    if symmetric:
        col_lse = col[idx]
        back = torch.where(valid, torch.where(valid, col_lse, 0.0) - l_pos, 0.0).sum(dim=1) / n_valid
        rows = 0.5 * (rows + back)
    return rows


def add_positive_grads(
    queries: torch.Tensor,
    docs: torch.Tensor,
    idx: torch.Tensor,
    grad: torch.Tensor,
    grad_q: torch.Tensor | None,
    grad_d: torch.Tensor | None,
) -> None:
    """Accumulates the gradients of the (B, P) positive scores q_i . d_idx[i, p] (upstream grad, in the
    dtype of grad_q / grad_d) into grad_q (B, d) and grad_d (M, d), gathering rows chunk by chunk."""
    b, n_pos = idx.shape
    dim = docs.shape[1]
    ct = grad.dtype
    if docs.shape[0] == 0:
        return  # every positive id is padding
    step = max(1, PAIR_CHUNK // max(1, n_pos * dim))
    for i0 in range(0, b, step):
        sl = idx[i0 : i0 + step]
        g = grad[i0 : i0 + step]
        if grad_q is not None:
            rows = docs[sl.reshape(-1)].reshape(sl.shape[0], n_pos, dim).to(ct)
            grad_q[i0 : i0 + step] += torch.einsum("bp,bpd->bd", g, rows)
        if grad_d is not None:
            contrib = g.unsqueeze(2) * queries[i0 : i0 + step].to(ct).unsqueeze(1)
            grad_d.index_add_(0, sl.reshape(-1), contrib.reshape(-1, dim))


class PositiveScores(torch.autograd.Function):
    """pair_scores with autograd that keeps no (B, P, d) gathered rows alive: the backward gathers
    again in chunks, so the extra memory of the positive terms is just their gradients."""

    @staticmethod
    def forward(ctx, queries, docs, idx, ct):
        ctx.save_for_backward(queries, docs, idx)
        ctx.ct = ct
        return pair_scores(queries, docs, idx, ct)

    @staticmethod
    def backward(ctx, grad):
        queries, docs, idx = ctx.saved_tensors
        ct = ctx.ct
        gq = torch.zeros(queries.shape, dtype=ct, device=queries.device) if ctx.needs_input_grad[0] else None
        gd = torch.zeros(docs.shape, dtype=ct, device=docs.device) if ctx.needs_input_grad[1] else None
        add_positive_grads(queries, docs, idx, grad.to(ct), gq, gd)
        gq = gq.to(queries.dtype) if gq is not None else None
        gd = gd.to(docs.dtype) if gd is not None else None
        return gq, gd, None, None


