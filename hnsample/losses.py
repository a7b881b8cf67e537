"""Contrastive loss modules built on :func:`hnsample.info_nce`: a plain ``nn.Module`` and a
sentence-transformers-compatible loss that takes a SentenceTransformer model the way
``MultipleNegativesRankingLoss`` does."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .ops.info_nce import info_nce

# Options forwarded verbatim to info_nce.
_OPTIONS = (
    "symmetric",
    "false_negative_margin",
    "false_negative_relative_margin",
    "guide_margin",
    "hcl_beta",
    "tau_plus",
    "hardness_alpha",
    "positive_margin",
    "reduction",
    "gather",
    "block_size",
)


class InfoNCELoss(nn.Module):
    """``info_nce`` as a module. ``temperature`` is a float; with ``learnable_temperature=True`` it
    becomes a parameter (CLIP-style) stored as ``log_temperature`` so it stays positive, and the
    loss uses ``tau = exp(log_temperature)``. Every other keyword is an ``info_nce`` option."""

    def __init__(self, temperature: float = 0.05, *, learnable_temperature: bool = False, **options: Any):
        super().__init__()
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"unknown InfoNCELoss option(s): {', '.join(unknown)}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
        self.options = dict(options)
        self.learnable_temperature = bool(learnable_temperature)
        if self.learnable_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(float(temperature)).log())
        else:
            self.register_buffer("_temperature", torch.tensor(float(temperature)), persistent=False)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp() if self.learnable_temperature else self._temperature

    def forward(self, queries: torch.Tensor, docs: torch.Tensor, **pair_arguments: Any) -> torch.Tensor:
        """pair_arguments: positive_ids, doc_ids, query_labels, doc_labels, guide_queries, guide_docs."""
        tau = self.temperature if self.learnable_temperature else float(self._temperature)
        return info_nce(queries, docs, temperature=tau, **pair_arguments, **self.options)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"temperature={float(self.temperature):g}, learnable={self.learnable_temperature}" + (
            f", {opts}" if opts else ""
        )


class SentenceTransformerInfoNCELoss(nn.Module):
    """A sentence-transformers training loss: ``loss(sentence_features, labels)`` with the inputs of
    ``MultipleNegativesRankingLoss``: ``(anchor, positive)`` or ``(anchor, positive, negative_1, ...)``
    columns. Embeddings are L2-normalized (cosine similarity); the candidates are all positives then
    all negatives, column by column, and anchor i's positive is candidate i. With
    ``scale = 1 / temperature`` and no options this is exactly MultipleNegativesRankingLoss, computed
    without the (B, M) score matrix.

    ``guide``: an optional SentenceTransformer (or any module with the same call contract) run under
    no_grad whose cosine scores drive GIST masking (``guide_margin``). ``labels`` from the data
    collator are ignored, as in MultipleNegativesRankingLoss. sentence-transformers itself is not
    imported: the model only has to map a features dict to ``{"sentence_embedding": ...}``."""

    def __init__(
        self,
        model: nn.Module,
        temperature: float = 0.05,
        *,
        guide: nn.Module | None = None,
        learnable_temperature: bool = False,
        **options: Any,
    ):
        super().__init__()
        if not callable(model):
            raise TypeError(
                f"model must be a SentenceTransformer (callable module), got {type(model).__name__}"
            )
        self.model = model
        self.guide = guide
        self.loss = InfoNCELoss(temperature, learnable_temperature=learnable_temperature, **options)

    @staticmethod
    def _embed(model: nn.Module, features: Iterable[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        return [torch.nn.functional.normalize(model(f)["sentence_embedding"], dim=-1) for f in features]

    def forward(
        self, sentence_features: Iterable[dict[str, torch.Tensor]], labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(f"sentence_features needs an anchor and a positive column, got {len(features)}")
        emb = self._embed(self.model, features)
        queries, docs = emb[0], torch.cat(emb[1:], dim=0)
        extra: dict[str, torch.Tensor] = {}
        if self.guide is not None:
            with torch.no_grad():
                g = self._embed(self.guide, features)
            extra = {"guide_queries": g[0], "guide_docs": torch.cat(g[1:], dim=0)}
        return self.loss(queries, docs, **extra)

    def get_config_dict(self) -> dict[str, Any]:
        """What sentence-transformers writes into a model card."""
        return {"temperature": float(self.loss.temperature), **self.loss.options}
