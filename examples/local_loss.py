"""The examples' contrastive loss, kept in one function so it can be swapped for a library op."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None,
             temperature: float = 0.05) -> torch.Tensor:
    """InfoNCE over cosine similarities: query i's positive is positives[i]; every other positive in the
    batch and every row of ``negatives`` ((M, d) shared or (B, M, d) per query) is a negative.

    loss = mean_i -log( exp(s_ii / t) / (sum_j exp(s_ij / t) + sum_m exp(s_im / t)) )
    """
    q = F.normalize(queries, dim=-1)
    logits = q @ F.normalize(positives, dim=-1).T
    if negatives is not None:
        n = F.normalize(negatives, dim=-1)
        extra = q @ n.T if n.ndim == 2 else torch.einsum("bd,bmd->bm", q, n)
        logits = torch.cat([logits, extra], dim=1)
    target = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits / temperature, target)
