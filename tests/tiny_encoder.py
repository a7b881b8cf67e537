"""A stand-in for a SentenceTransformer in loss tests: deterministic, fast, same call contract."""

from __future__ import annotations

import torch


class BagEncoder(torch.nn.Module):
    """Maps {"input_ids": (n, L)} to {"sentence_embedding": (n, 16)} like a SentenceTransformer."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.EmbeddingBag(50, 16)

    def forward(self, features):
        return {"sentence_embedding": self.emb(features["input_ids"])}
