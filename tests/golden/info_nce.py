"""Golden entries of info_nce (and InfoNCELoss): loss values and gradients for every option, every
reduction, and both execution paths (fused forward+gradient, and the two-pass recomputation).

Scores are exact (dyadic inputs), so every masking decision is portable; the losses and gradients go
through exp/log and are compared with tolerance_for(dtype)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import hnsample

from .corpus import Context, Data, close, entry, exact, ids_tensor, tensor, tolerance_for

B, M, D = 6, 14, 8
# block_size per path: rows of M docs fit a block (fused, for a scalar loss that needs gradients), or
# fewer than B rows fit one (two-pass, blocks of 5 elements: many partial blocks).
PATHS = {"fused": 4096, "two_pass": 5}


def multi_positive_ids(data: Data, b: int, m: int, p: int) -> np.ndarray:
    """(b, p) distinct doc ids per row, some -1 padding, every row with at least one positive."""
    out = np.stack([data.permutation(m)[:p] for _ in range(b)])
    out[:, 1:][data.uniform((b, p - 1)) < 0.35] = -1
    return out


def options(case: str, data: Data, dtype: torch.dtype) -> dict[str, Any]:
    """The info_nce keyword arguments of a case (inputs drawn from the entry's stream)."""
    mp = ids_tensor(multi_positive_ids(data, B, M, 3))
    doc_ids = data.integers(0, M - 4, M)
    doc_ids[B : B + 3] = doc_ids[:3]  # docs B..B+2 duplicate the positives of rows 0..2
    labels_q, labels_d = ids_tensor(data.integers(0, 2, B)), ids_tensor(data.integers(0, 2, M))
    guide_q = tensor(data.dot_rows(B, 4, -2, 2), dtype)
    guide_d = tensor(data.dot_rows(M, 4, -2, 2), dtype)
    cases: dict[str, dict[str, Any]] = {
        "default": {},
        "default_temperature": {"temperature": 0.05},
        "multi_positive": {"positive_ids": mp},
        "no_positive_row": {"positive_ids": torch.tensor([[0, -1], [-1, -1], [2, 7], [3, -1], [-1, -1], [5, 1]])},
        "doc_ids": {"doc_ids": ids_tensor(doc_ids)},
        "doc_ids_multi": {"doc_ids": ids_tensor(doc_ids), "positive_ids": mp},
        "labels": {"query_labels": labels_q, "doc_labels": labels_d},
        "labels_mask_all": {"query_labels": torch.zeros(B, dtype=torch.int64),
                            "doc_labels": torch.tensor([1] * B + [0] * (M - B))},
        "fn_margin": {"false_negative_margin": 0.25},
        "fn_relative": {"false_negative_relative_margin": 0.5},
        "fn_both": {"false_negative_margin": -0.5, "false_negative_relative_margin": 0.25, "positive_ids": mp},
        "guide": {"guide_queries": guide_q, "guide_docs": guide_d, "guide_margin": 1.0},
        "hcl": {"hcl_beta": 0.5},
        "tau_plus": {"tau_plus": 0.1},
        "tau_plus_floor": {"tau_plus": 0.9, "positive_ids": mp},
        "hardness": {"hardness_alpha": 0.5},
        "positive_margin": {"positive_margin": 0.25},
        "symmetric": {"symmetric": True},
        "symmetric_masked": {"symmetric": True, "positive_ids": mp, "doc_ids": ids_tensor(doc_ids),
                             "false_negative_margin": 0.5},
        "temperature_tensor": {"temperature": torch.tensor(0.25, dtype=torch.float64, requires_grad=True)},
        "combined": {"positive_ids": mp, "doc_ids": ids_tensor(doc_ids), "query_labels": labels_q,
                     "doc_labels": labels_d, "false_negative_margin": 1.0, "false_negative_relative_margin": 0.5,
                     "guide_queries": guide_q, "guide_docs": guide_d, "guide_margin": 2.0, "hcl_beta": 0.25,
                     "tau_plus": 0.05, "hardness_alpha": 0.25, "positive_margin": 0.125,
                     "temperature": torch.tensor(0.5, dtype=torch.float32, requires_grad=True)},
    }
    kw = cases[case]
    kw.setdefault("temperature", 0.25)
    return kw


CASES = ("default", "default_temperature", "multi_positive", "no_positive_row", "doc_ids", "doc_ids_multi",
         "labels", "labels_mask_all", "fn_margin", "fn_relative", "fn_both", "guide", "hcl", "tau_plus",
         "tau_plus_floor", "hardness", "positive_margin", "symmetric", "symmetric_masked", "temperature_tensor",
         "combined")
FLOAT32_CASES = ("default", "multi_positive", "symmetric_masked", "combined")


def _run(ctx: Context, case: str, dtype: torch.dtype) -> dict:
    d = ctx.data
    q0, d0 = tensor(d.dyadic_rows(B, D), dtype), tensor(d.dyadic_rows(M, D), dtype)
    kw = options(case, d, dtype)
    weights = tensor(d.integers(-2, 3, B).astype(np.float64), dtype)
    tol = tolerance_for(dtype)
    out = {}
    reductions = ("mean", "sum", "none")
    for reduction in reductions:
        for path, block_size in PATHS.items():
            if path == "fused" and (reduction == "none" or kw.get("symmetric")):
                continue  # the fused path does not apply
            q, docs = q0.clone().requires_grad_(True), d0.clone().requires_grad_(True)
            tau = kw["temperature"]
            leaves = [q, docs] + ([tau] if isinstance(tau, torch.Tensor) else [])
            loss = hnsample.info_nce(q, docs, reduction=reduction, block_size=block_size, **kw)
            grads = torch.autograd.grad(loss, leaves, grad_outputs=weights if reduction == "none" else None)
            tag = f"{reduction}_{path}_"
            out[tag + "loss"] = close(loss, *tol)
            out[tag + "grad_queries"] = close(grads[0], *tol)
            out[tag + "grad_docs"] = close(grads[1], *tol)
            if len(grads) == 3:
                out[tag + "grad_temperature"] = close(grads[2], *tolerance_for(tau.dtype))
    with torch.no_grad():  # no gradient wanted: the two-pass forward alone
        out["nograd_loss"] = close(hnsample.info_nce(q0, d0, **kw), *tol)
    return out


def _entries() -> None:
    for case in CASES:
        for dt_name, dtype in (("f64", torch.float64), ("f32", torch.float32)):
            if dtype == torch.float32 and case not in FLOAT32_CASES:
                continue
            entry(f"info_nce/{case}_{dt_name}")(lambda ctx, case=case, dtype=dtype: _run(ctx, case, dtype))


_entries()


@entry("info_nce/module_learnable_temperature")
def _(ctx: Context):
    d = ctx.data
    q = tensor(d.dyadic_rows(B, D)).requires_grad_(True)
    docs = tensor(d.dyadic_rows(M, D)).requires_grad_(True)
    tol = tolerance_for(torch.float32)
    out = {}
    for path, block_size in PATHS.items():
        loss_fn = hnsample.InfoNCELoss(0.25, learnable_temperature=True, hcl_beta=0.5, block_size=block_size)
        loss = loss_fn(q, docs, positive_ids=torch.arange(B))
        gq, gd, gt = torch.autograd.grad(loss, (q, docs, loss_fn.log_temperature))
        out |= {f"{path}_loss": close(loss, *tol), f"{path}_grad_queries": close(gq, *tol),
                f"{path}_grad_docs": close(gd, *tol), f"{path}_grad_log_temperature": close(gt, *tol)}
    fixed = hnsample.InfoNCELoss(0.5, symmetric=True)
    out["fixed_symmetric_loss"] = close(fixed(q, docs), *tol)
    out["fixed_temperature"] = exact(fixed.temperature)
    return out
