"""The examples' contrastive loss: hnsample.info_nce over cosine similarities, in one place."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import hnsample


def info_nce(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None,
             temperature: float = 0.05) -> torch.Tensor:
    """InfoNCE over cosine similarities: query i's positive is positives[i]; every other positive in the
    batch and every negative is a negative for every query (``negatives``: (M, d) shared, or (B, M, d)
    per query, pooled into the shared docs as sentence-transformers' MultipleNegativesRankingLoss does).

    loss = mean_i -log( exp(s_ii / t) / sum_{j in docs} exp(s_ij / t) )   (hnsample.info_nce, memory-flat)
    """
    docs = positives
    if negatives is not None:
        docs = torch.cat([positives, negatives.reshape(-1, negatives.shape[-1])], dim=0)
    return hnsample.info_nce(F.normalize(queries, dim=-1), F.normalize(docs, dim=-1), temperature=temperature)
