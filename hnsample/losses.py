"""Contrastive loss modules built on :func:`hnsample.info_nce`: a plain ``nn.Module`` and a
sentence-transformers-compatible loss that takes a SentenceTransformer model the way
``MultipleNegativesRankingLoss`` does."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .engine import compute_dtype
from .grad_cache import grad_cache, mini_batches
from .ops.directions import check_controls, directional_info_nce
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
    """``info_nce`` as a module. ``temperature`` is a float (kept as the Python float given); with
    ``learnable_temperature=True`` it becomes a parameter (CLIP-style) stored as ``log_temperature`` so
    it stays positive, and the loss uses ``tau = exp(log_temperature)``. Every other keyword is an
    ``info_nce`` option."""

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
        self._fixed_temperature = float(temperature)

    @property
    def temperature(self) -> torch.Tensor | float:
        """The learnable temperature as a tensor, or the fixed one as the float it was given as."""
        return self.log_temperature.exp() if self.learnable_temperature else self._fixed_temperature

    def forward(self, queries: torch.Tensor, docs: torch.Tensor, **pair_arguments: Any) -> torch.Tensor:
        """pair_arguments: positive_ids, doc_ids, query_labels, doc_labels, guide_queries, guide_docs."""
        return info_nce(queries, docs, temperature=self.temperature, **pair_arguments, **self.options)

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
    without the (B, M) score matrix. ``temperature`` or sentence-transformers' ``scale`` (not both,
    unless they agree); 0.05 (scale 20) by default. ``gather_across_devices=True`` (sentence-transformers'
    name) is ``gather=True``: under torch.distributed every rank's docs are candidates for the local
    anchors, as in MultipleNegativesRankingLoss(gather_across_devices=True).

    MultipleNegativesRankingLoss's controls, with its names and formulas: ``directions`` (any of
    "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"; "query_to_doc" required),
    ``partition_mode`` ("joint" or "per_direction"; per_direction refuses query_to_query and doc_to_doc, as
    there), ``hardness_mode`` ("in_batch_negatives", "hard_negatives", "all_negatives") with
    ``hardness_strength``. Where info_nce has the same formula the fused op runs:
    ``directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"`` is ``symmetric=True``,
    ``hardness_mode="all_negatives", hardness_strength=a`` is ``hardness_alpha=a``. Every other combination
    runs :func:`hnsample.ops.directions.directional_info_nce` (also memory-flat: one score block at a time);
    it takes no info_nce options beside the temperature (a false-negative mask, a guide, ...: ValueError).

    ``in_batch_negatives=False``: each anchor's candidates are its own positive and its own hard negatives
    only (:func:`own_candidates_info_nce`; ``hardness_mode`` "hard_negatives" and "all_negatives" are then
    the same); supports the temperature, hardness and ``positive_margin``.

    ``mini_batch_size``: GradCache (:func:`hnsample.grad_cache`): every column is embedded in mini-batches
    of that many texts, first without autograd, then again during ``backward`` with the first pass's RNG
    state, so the encoder's activation memory is that of one mini-batch whatever the batch size. Loss
    and gradients are those of ``CachedMultipleNegativesRankingLoss(model, scale, mini_batch_size=...)``
    (and of the uncached loss with the same mini-batch calls). The trainer's ``loss.backward()`` runs the
    second pass; under DistributedDataParallel the gradients are reduced once, after the last mini-batch.
    ``MatryoshkaLoss`` wraps the cached loss as it wraps CachedMultipleNegativesRankingLoss (through
    ``uses_gradient_cache`` and ``calculate_loss``, sentence-transformers' gradient-cache protocol; the
    temperature must then be fixed).

    ``guide``: an optional SentenceTransformer (or any module with the same call contract) run under
    no_grad (in mini-batches when ``mini_batch_size`` is set) whose cosine scores drive GIST masking
    (``guide_margin``). ``labels`` from the data collator are ignored, as in
    MultipleNegativesRankingLoss. sentence-transformers itself is not imported: the model only has to
    map a features dict to ``{"sentence_embedding": ...}``."""

    def __init__(
        self,
        model: nn.Module,
        temperature: float | None = None,
        *,
        scale: float | None = None,
        mini_batch_size: int | None = None,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        in_batch_negatives: bool = True,
        guide: nn.Module | None = None,
        learnable_temperature: bool = False,
        **options: Any,
    ):
        super().__init__()
        if gather_across_devices:
            options["gather"] = True
        if not isinstance(in_batch_negatives, bool):
            raise TypeError(f"in_batch_negatives must be a bool, got {type(in_batch_negatives).__name__}")
        if not in_batch_negatives and hardness_mode == "hard_negatives":
            hardness_mode = "all_negatives"  # the row's own hard negatives are all its negatives
        self.directional = _directional_controls(directions, partition_mode, hardness_mode, hardness_strength)
        if self.directional is None:
            options.update(_st_controls(tuple(directions), hardness_mode, hardness_strength))
        else:
            extra = sorted(set(options) - {"gather"}) + (["guide"] if guide else [])
            if extra:
                raise ValueError(f"directions={tuple(directions)}, partition_mode={partition_mode!r}, "
                                 f"hardness_mode={hardness_mode!r} run directional_info_nce, which takes no "
                                 f"{', '.join(extra)}")
            if not in_batch_negatives:
                raise ValueError("in_batch_negatives=False supports directions=('query_to_doc',) and "
                                 "hardness_mode None, 'hard_negatives' or 'all_negatives' only")
        if not in_batch_negatives:
            extra = sorted(set(options) - {"hardness_alpha", "positive_margin"}) + (["guide"] if guide else [])
            if extra:
                raise ValueError(f"in_batch_negatives=False supports temperature, hardness and positive_margin "
                                 f"only, got {', '.join(extra)}")
        self.in_batch_negatives = in_batch_negatives
        if not callable(model):
            raise TypeError(
                f"model must be a SentenceTransformer (callable module), got {type(model).__name__}"
            )
        temperature = _temperature_from(temperature, scale)
        if mini_batch_size is not None:
            mini_batches(torch.zeros(1), mini_batch_size)  # validates it
        self.model = model
        self.guide = guide
        self.mini_batch_size = mini_batch_size
        self.loss = InfoNCELoss(temperature, learnable_temperature=learnable_temperature, **options)

    @property
    def temperature(self) -> float:
        return float(self.loss.temperature)

    @property
    def scale(self) -> float:
        return 1.0 / self.temperature

    @staticmethod
    def _embed(model: nn.Module, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.normalize(model(features)["sentence_embedding"], dim=-1)

    def _guide_embeddings(self, features: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        size = self.mini_batch_size
        with torch.no_grad():
            if size is None:
                return [self._embed(self.guide, f) for f in features]
            return [torch.cat([self._embed(self.guide, mb) for mb in mini_batches(f, size)]) for f in features]

    def forward(
        self, sentence_features: Iterable[dict[str, torch.Tensor]], labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(f"sentence_features needs an anchor and a positive column, got {len(features)}")
        extra: dict[str, torch.Tensor] = {}
        if self.guide is not None:
            g = self._guide_embeddings(features)
            extra = {"guide_queries": g[0], "guide_docs": torch.cat(g[1:], dim=0)}

        if not self.in_batch_negatives and len(features) < 3:
            raise ValueError("in_batch_negatives=False needs hard-negative columns (anchor, positive, negative_1, ...)")

        def loss_fn(*raw: torch.Tensor) -> torch.Tensor:
            return self._loss(raw, extra)

        if self.mini_batch_size is None:
            return loss_fn(*(self._raw_embedding(f) for f in features))
        if "calculate_loss" in self.__dict__:
            # MatryoshkaLoss decorated calculate_loss (sentence-transformers' gradient-cache protocol): the
            # decorator backpropagates each truncation's loss into the cached embeddings itself.
            if isinstance(self.loss.temperature, torch.Tensor) and self.loss.temperature.requires_grad:
                raise TypeError("MatryoshkaLoss around the cached SentenceTransformerInfoNCELoss needs a fixed "
                                "temperature (learnable_temperature=False)")
            if extra:
                raise TypeError("MatryoshkaLoss around the cached SentenceTransformerInfoNCELoss takes no guide")
            loss_fn = self._decorated_loss
        ddp = self.model if isinstance(self.model, DistributedDataParallel) else None
        return grad_cache(loss_fn, self._raw_embedding, features, mini_batch_size=self.mini_batch_size,
                          distributed_model=ddp)

    def _raw_embedding(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(features)["sentence_embedding"]

    def _loss(self, raw: Sequence[torch.Tensor], extra: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of the model's raw embeddings, one tensor per column (normalized here: cosine)."""
        queries, *docs = (torch.nn.functional.normalize(e, dim=-1) for e in raw)
        if not self.in_batch_negatives:
            return own_candidates_info_nce(queries, docs, temperature=self.loss.temperature, **self.loss.options)
        if self.directional is not None:
            return directional_info_nce(queries, docs, temperature=self.loss.temperature,
                                        gather=bool(self.loss.options.get("gather", False)), **self.directional)
        return self.loss(queries, torch.cat(docs, dim=0), **extra)

    @property
    def uses_gradient_cache(self) -> bool:
        """sentence-transformers' flag for losses that cache embedding gradients (MatryoshkaLoss reads it)."""
        return self.mini_batch_size is not None

    def calculate_loss(self, reps: list[list[torch.Tensor]], with_backward: bool = False) -> torch.Tensor:
        """sentence-transformers' gradient-cache protocol, which MatryoshkaLoss decorates: the loss of the raw
        embeddings ``reps`` (per column, its mini-batches' embeddings). ``with_backward=True`` backpropagates
        the loss into ``reps``' ``.grad`` (only there) and returns it detached."""
        loss = self._loss([torch.cat(list(col)) if len(col) > 1 else col[0] for col in reps], {})
        if with_backward:
            leaves = [r for col in reps for r in col if r.requires_grad]
            if leaves:
                torch.autograd.backward(loss, inputs=leaves)
            loss = loss.detach()
        return loss

    def _decorated_loss(self, *raw: torch.Tensor) -> torch.Tensor:
        """grad_cache's loss through the (decorated) calculate_loss: the gradients it leaves in the cached
        embeddings become the backward of the returned loss."""
        if not torch.is_grad_enabled():
            return self.calculate_loss([[e] for e in raw])
        reps = [[e.detach().requires_grad_(True)] for e in raw]
        value = self.calculate_loss(reps, with_backward=True)
        grads = [r[0].grad if r[0].grad is not None else torch.zeros_like(r[0]) for r in reps]
        return _KnownGradients.apply(value, len(raw), *raw, *grads)

    def get_config_dict(self) -> dict[str, Any]:
        """What sentence-transformers writes into a model card."""
        config: dict[str, Any] = {"temperature": self.temperature}
        if self.mini_batch_size is not None:
            config["mini_batch_size"] = self.mini_batch_size
        return {**config, **(self.directional or {}), **self.loss.options}


class _KnownGradients(torch.autograd.Function):
    """Returns ``value``; its backward hands ``g * grads[k]`` to ``inputs[k]`` (gradients computed already)."""

    @staticmethod
    def forward(ctx, value, n, *inputs_and_grads):
        ctx.save_for_backward(*inputs_and_grads[n:])
        return value.detach().clone()

    @staticmethod
    def backward(ctx, g):
        return (None, None, *(g * gr for gr in ctx.saved_tensors), *(None for _ in ctx.saved_tensors))


def own_candidates_info_nce(queries: torch.Tensor, candidates: list[torch.Tensor], *,
                            temperature: float | torch.Tensor = 0.05, hardness_alpha: float = 0.0,
                            positive_margin: float = 0.0) -> torch.Tensor:
    r"""InfoNCE without in-batch negatives: row i's candidates are ``candidates[0][i]`` (its positive) and
    ``candidates[j][i]`` for j >= 1 (its hard negatives). With ``s_ij = q_i . c_j[i]``,
    ``l_i0 = (s_i0 - positive_margin) / tau`` and ``l_ij = s_ij / tau + hardness_alpha * stopgrad(s_ij)``,
    the loss is ``mean_i (-l_i0 + log sum_j exp(l_ij))``: ``info_nce`` of each row against its own
    candidates. It needs the B x n pair scores only."""
    if len(candidates) < 2:
        raise ValueError(f"own_candidates_info_nce needs a positive and at least one negative column, "
                         f"got {len(candidates)} column(s)")
    ct = compute_dtype(queries.dtype)
    s = torch.stack([(queries.to(ct) * c.to(ct)).sum(dim=-1) for c in candidates], dim=1)  # (B, n)
    tau = temperature.to(ct) if isinstance(temperature, torch.Tensor) else float(temperature)
    logits = torch.cat([(s[:, :1] - positive_margin) / tau, s[:, 1:] / tau + hardness_alpha * s[:, 1:].detach()],
                       dim=1)
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def _directional_controls(directions: Any, partition_mode: Any, hardness_mode: Any,
                          hardness_strength: Any) -> dict[str, Any] | None:
    """The controls for directional_info_nce, or None where the fused info_nce has the same formula."""
    directions, hardness_strength = check_controls(directions, partition_mode, hardness_mode, hardness_strength)
    if not hardness_strength > 0:
        hardness_mode = None  # no effect, as in sentence-transformers
    hard = hardness_mode is not None
    if directions == ("query_to_doc",) and hardness_mode in (None, "all_negatives"):
        return None
    if sorted(directions) == ["doc_to_query", "query_to_doc"] and partition_mode == "per_direction" and not hard:
        return None
    return {"directions": directions, "partition_mode": partition_mode, "hardness_mode": hardness_mode,
            "hardness_strength": float(hardness_strength)}


def _st_controls(directions: tuple[str, ...], hardness_mode: str | None, hardness_strength: float) -> dict[str, Any]:
    """MultipleNegativesRankingLoss's names -> info_nce options, for the combinations _directional_controls
    leaves to the fused op (query_to_doc alone, with all_negatives hardness or none; query_to_doc and
    doc_to_query per direction without hardness)."""
    out: dict[str, Any] = {}
    if len(directions) == 2:
        out["symmetric"] = True
    if hardness_mode == "all_negatives":
        out["hardness_alpha"] = float(hardness_strength)
    return out


def _temperature_from(temperature: float | None, scale: float | None) -> float:
    for name, v in (("temperature", temperature), ("scale", scale)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or not v > 0):
            raise ValueError(f"{name} must be a finite float > 0, got {v!r}")
    if scale is None:
        return 0.05 if temperature is None else float(temperature)
    if temperature is not None and not math.isclose(float(temperature) * float(scale), 1.0, rel_tol=1e-9):
        raise ValueError(f"temperature ({temperature}) and scale ({scale}) disagree: scale = 1 / temperature; "
                         "give one of them")
    return 1.0 / float(scale)
