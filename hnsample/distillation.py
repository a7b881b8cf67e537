"""Distillation from teacher scores over (query, positive, negative_1..k) rows: MarginMSE and listwise KL,
as functions of embeddings and as sentence-transformers losses (optionally cached with
:func:`hnsample.grad_cache`). Both need only the B x (1 + k) pair scores, never a B x M matrix, so with
``mini_batch_size`` the whole step is memory-flat: one mini-batch of encoder activations."""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .grad_cache import grad_cache, mini_batches


def _pair_scores(queries: torch.Tensor, candidates: list[torch.Tensor]) -> torch.Tensor:
    """(B, n): s_ij = queries[i] . candidates[j][i]."""
    for j, c in enumerate(candidates):
        if c.shape != queries.shape:
            raise ValueError(f"candidate column {j} must have the shape of queries {tuple(queries.shape)}, "
                             f"got {tuple(c.shape)}")
    return torch.stack([(queries * c).sum(dim=-1) for c in candidates], dim=1)


def margin_mse(queries: torch.Tensor, positives: torch.Tensor | list[torch.Tensor], negatives: list[torch.Tensor],
               teacher: torch.Tensor) -> torch.Tensor:
    r"""MarginMSE (Hofstätter et al.): with ``s_ip = q_i . p_p[i]`` for each positive column p and
    ``s_ij = q_i . n_j[i]``,

        loss = mean over valid (i, p, j) of ((s_ip - s_ij) - t_ipj)^2

    ``positives``: one column (a tensor), or a list of P columns for multi-positive rows, each pair with
    its own teacher score (e.g. mining's ``positive_pair_scores``), so each positive gets its own margin.
    ``teacher``: one positive column: the teacher's margins ``t`` (B,) for one negative column or (B, k),
    or its scores (B, 1 + k) of [positive, negatives], turned into ``t_ij = T_i0 - T_ij``. P columns:
    scores (B, P + k) of [positives, negatives] (``t_ipj = T_ip - T_i,P+j``) or margins (B, P, k). A NaN
    teacher score of a positive (or NaN margins) marks a padded pair: it is left out of the mean (a row
    with fewer positives than P); every row needs at least one. No gradient reaches ``teacher``. With one
    positive column: equal to sentence-transformers' ``MarginMSELoss`` (dot-product scores); with P: the
    mean of that loss over the valid (query, positive) pairs, weighted by their count of negatives."""
    if not negatives:
        raise ValueError("margin_mse needs at least one negative column")
    pos = [positives] if isinstance(positives, torch.Tensor) else list(positives)
    if not pos:
        raise ValueError("margin_mse needs at least one positive column")
    b, k, n_pos = queries.shape[0], len(negatives), len(pos)
    t = torch.as_tensor(teacher).detach().to(device=queries.device)
    if t.shape == (b, k + n_pos):
        t = t[:, :n_pos, None] - t[:, None, n_pos:]
    elif n_pos == 1 and t.shape == (b,):
        t = t[:, None, None]
    elif n_pos == 1 and t.shape == (b, k):
        t = t[:, None, :]
    if t.shape != (b, n_pos, k):
        forms = (f"({b},{' ' if k == 1 else ''}) margins, ({b}, {k}) margins or ({b}, {k + 1}) scores" if n_pos == 1
                 else f"({b}, {n_pos + k}) scores of [positives, negatives] or ({b}, {n_pos}, {k}) margins")
        raise ValueError(f"teacher must have shape {forms}, got {tuple(t.shape)}")
    scores = _pair_scores(queries, [*pos, *negatives])
    margins = scores[:, :n_pos, None] - scores[:, None, n_pos:]  # (B, P, k)
    if n_pos == 1:
        return ((margins - t.to(margins.dtype)) ** 2).mean()
    valid = ~t.isnan()
    if not bool(valid.any(dim=(1, 2)).all()):
        raise ValueError("teacher: every row needs at least one positive with a teacher score (NaN marks padding)")
    err = torch.where(valid, margins - torch.nan_to_num(t.to(margins.dtype)), 0.0)
    return (err**2).sum() / valid.sum()


def listwise_kl(queries: torch.Tensor, candidates: list[torch.Tensor], teacher_scores: torch.Tensor, *,
                student_temperature: float = 1.0, teacher_temperature: float = 1.0) -> torch.Tensor:
    r"""Listwise distillation: with student scores ``s_ij = q_i . c_j[i]`` over the candidate columns
    [positive, negatives] and teacher scores ``T`` (B, n),

        P_i = softmax(T_i / teacher_temperature),  log Q_i = log_softmax(s_i / student_temperature)
        loss = student_temperature^2 * (1 / B) * sum_i sum_j P_ij (log P_ij - log Q_ij)

    (KL(P || Q) averaged over rows, scaled as in Hinton et al.). No gradient reaches ``teacher_scores``.
    Equal to sentence-transformers' ``DistillKLDivLoss`` (dot-product scores)."""
    _check_temperatures(student_temperature=student_temperature, teacher_temperature=teacher_temperature)
    b, n = queries.shape[0], len(candidates)
    if n < 2:
        raise ValueError(f"listwise_kl needs at least 2 candidate columns (a softmax over one is constant), got {n}")
    t = torch.as_tensor(teacher_scores).detach().to(device=queries.device)
    if t.shape != (b, n):
        raise ValueError(f"teacher_scores must have shape ({b}, {n}), got {tuple(t.shape)}")
    log_q = torch.log_softmax(_pair_scores(queries, candidates) / student_temperature, dim=1)
    p = torch.softmax(t.to(log_q.dtype) / teacher_temperature, dim=1)
    kl = torch.special.xlogy(p, p) - p * log_q
    return kl.sum() / b * student_temperature**2


def _check_temperatures(**values: Any) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < math.inf):
            raise ValueError(f"{name} must be a finite float > 0, got {v!r}")


class _SentenceTransformerDistillation(nn.Module, abc.ABC):
    """Embeds the columns of a sentence-transformers batch (in cached mini-batches when
    ``mini_batch_size`` is set) and applies ``self._loss(embeddings, labels)``, which each loss defines."""

    def __init__(self, model: nn.Module, mini_batch_size: int | None):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be a SentenceTransformer (callable module), got {type(model).__name__}")
        if mini_batch_size is not None:
            mini_batches(torch.zeros(1), mini_batch_size)  # validates it
        self.model, self.mini_batch_size = model, mini_batch_size

    @staticmethod
    def _embed(model: nn.Module, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(features)["sentence_embedding"]

    @abc.abstractmethod
    def _loss(self, embeddings: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The loss of one batch from its column embeddings and the teacher's labels."""

    def forward(self, sentence_features: Iterable[dict[str, torch.Tensor]], labels: torch.Tensor) -> torch.Tensor:
        features = list(sentence_features)
        if labels is None:
            raise ValueError(f"{type(self).__name__} needs the teacher's scores as labels")

        def loss_fn(*embeddings: torch.Tensor) -> torch.Tensor:
            return self._loss(list(embeddings), labels)

        encode = partial(self._embed, self.model)
        if self.mini_batch_size is None:
            return loss_fn(*(encode(f) for f in features))
        ddp = self.model if isinstance(self.model, DistributedDataParallel) else None
        return grad_cache(loss_fn, encode, features, mini_batch_size=self.mini_batch_size, distributed_model=ddp)

    def get_config_dict(self) -> dict[str, Any]:
        return {} if self.mini_batch_size is None else {"mini_batch_size": self.mini_batch_size}


class SentenceTransformerMarginMSELoss(_SentenceTransformerDistillation):
    """sentence-transformers' ``MarginMSELoss`` (dot-product scores) on :func:`margin_mse`; columns
    (query, positive, negative_1, ...), labels the teacher's margins or scores. ``num_positives=P``: the
    columns are (query, positive_1..P, negative_1, ...) and the labels the teacher's scores (B, P + k) or
    margins (B, P, k), NaN for a row's missing positives (per-pair margins, see :func:`margin_mse`).
    ``mini_batch_size``: GradCache, as in ``SentenceTransformerInfoNCELoss``."""

    def __init__(self, model: nn.Module, *, num_positives: int = 1, mini_batch_size: int | None = None):
        super().__init__(model, mini_batch_size)
        if isinstance(num_positives, bool) or not isinstance(num_positives, int) or num_positives < 1:
            raise ValueError(f"num_positives must be an int >= 1, got {num_positives!r}")
        self.num_positives = num_positives

    def _loss(self, embeddings: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        p = self.num_positives
        if len(embeddings) < 2 + p:
            raise ValueError(f"sentence_features needs a query, {p} positive column(s) and negative columns, "
                             f"got {len(embeddings)} columns")
        positives = embeddings[1] if p == 1 else embeddings[1:1 + p]
        return margin_mse(embeddings[0], positives, embeddings[1 + p:], labels)

    def get_config_dict(self) -> dict[str, Any]:
        extra = {} if self.num_positives == 1 else {"num_positives": self.num_positives}
        return {**extra, **super().get_config_dict()}


class SentenceTransformerDistillKLDivLoss(_SentenceTransformerDistillation):
    """sentence-transformers' ``DistillKLDivLoss`` (dot-product scores) on :func:`listwise_kl`; columns
    (query, positive, negative_1, ...), labels the teacher's scores (B, 1 + k). ``temperature`` sets
    both temperatures unless ``student_temperature`` / ``teacher_temperature`` are given.
    ``mini_batch_size``: GradCache, as in ``SentenceTransformerInfoNCELoss``."""

    def __init__(self, model: nn.Module, temperature: float = 1.0, *, student_temperature: float | None = None,
                 teacher_temperature: float | None = None, mini_batch_size: int | None = None):
        super().__init__(model, mini_batch_size)
        self.temperature = temperature
        self.student_temperature = temperature if student_temperature is None else student_temperature
        self.teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
        _check_temperatures(temperature=temperature, student_temperature=self.student_temperature,
                            teacher_temperature=self.teacher_temperature)

    def _loss(self, embeddings: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return listwise_kl(embeddings[0], embeddings[1:], labels, student_temperature=self.student_temperature,
                           teacher_temperature=self.teacher_temperature)

    def get_config_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "student_temperature": self.student_temperature,
                "teacher_temperature": self.teacher_temperature, **super().get_config_dict()}
