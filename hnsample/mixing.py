"""Hard negative mixing (MoCHi, Kalantidis et al. 2020): synthetic negatives made from convex
combinations of a query's hardest negatives, and of the query with them."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from ._ext import as_tensor, check_int, nonfinite_rows, rows_text
from .ops.topk import topk_from_scores, topk_similarity

__all__ = ["MoCHi", "MixedNegatives", "mix_hard_negatives"]


class MixedNegatives(NamedTuple):
    """Synthetic negatives and their recipe, M = n_mix + n_query_mix per query.

    embeddings: (B, M, d) unit vectors h_m, detached, in the query's dtype.
    first: (B, M) int64 index into the query's negatives of the vector weighted by ``weight``, or -1
        for the query itself (the last n_query_mix columns).
    second: (B, M) int64 index into the query's negatives of the vector weighted by 1 - ``weight``.
    weight: (B, M) float32 mixing coefficient (alpha for the first n_mix columns, beta after).
    """

    embeddings: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor
    weight: torch.Tensor


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def _generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator | None:
    if seed is not None:
        return torch.Generator().manual_seed(check_int("seed", seed) % (1 << 63))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be on the CPU (draws run on the CPU), got {generator.device}")
    return generator


def mix_hard_negatives(
    query: Any, negatives: Any, n_hard: int, n_mix: int, n_query_mix: int = 0, *, metric: str = "cosine",
    generator: torch.Generator | None = None, seed: int | None = None,
) -> MixedNegatives:
    """MoCHi's synthetic hard negatives.

    For query q (B, d) and its negatives (K, d) shared by all queries (a MoCo queue) or (B, K, d) per
    query, with q^ = q / |q| and n^ = n / |n|:

    * H = the ``n_hard`` hardest negatives of each query, ranked by the raw s = q . n ("dot") or by
      cosine (default), found with
      ``topk_similarity`` / ``topk_from_scores`` (ties to the lower index);
    * for m < n_mix: h_m = normalize(alpha n^_i + (1 - alpha) n^_j), i, j two distinct members of H
      drawn uniformly (i = j only when n_hard = 1), alpha ~ U(0, 1);
    * for the next n_query_mix: h = normalize(beta q^ + (1 - beta) n^_j), j uniform in H,
      beta ~ U(0, 0.5), so the query's contribution stays below the negative's.

    The draws are made on the CPU from ``generator`` (or ``torch.Generator().manual_seed(seed)``; torch's
    default generator when both are None) in this order: i (B, n_mix), the offset of j from i,
    alpha, j (B, n_query_mix), beta; so results are reproducible across devices. The output carries no
    gradient (MoCHi treats synthetic negatives as constants).

    Non-finite values: a negative holding NaN or inf is never one of H (with "dot" it would score
    +-inf and mix into a NaN vector); a query row holding NaN or inf, or one left with fewer than
    ``n_hard`` usable negatives, raises ValueError naming the rows.
    """
    q = as_tensor("query", query)
    neg = as_tensor("negatives", negatives)
    if q.ndim != 2 or not q.is_floating_point():
        raise ValueError(f"query must be a float tensor of shape (B, d), got {q.dtype} {tuple(q.shape)}")
    if neg.ndim not in (2, 3) or not neg.is_floating_point():
        raise ValueError(f"negatives must be a float tensor of shape (K, d) or (B, K, d), got {neg.dtype} "
                         f"{tuple(neg.shape)}")
    b, d = q.shape
    if neg.shape[-1] != d or (neg.ndim == 3 and neg.shape[0] != b):
        raise ValueError(f"negatives must have shape (K, {d}) or ({b}, K, {d}), got {tuple(neg.shape)}")
    if neg.device != q.device:
        raise ValueError(f"negatives must be on {q.device}, got {neg.device}")
    if metric not in ("cosine", "dot"):
        raise ValueError(f"metric must be 'cosine' or 'dot', got {metric!r}")
    n_hard = check_int("n_hard", n_hard, 1)
    n_mix = check_int("n_mix", n_mix, 0)
    n_query_mix = check_int("n_query_mix", n_query_mix, 0)
    k = neg.shape[-2]
    if n_hard > k:
        raise ValueError(f"n_hard must be <= the number of negatives ({k}), got {n_hard}")
    gen = _generator(generator, seed)
    bad = nonfinite_rows(q.detach())
    if bad.numel():
        raise ValueError(f"query must be finite: {rows_text(bad, b)} hold NaN or inf")

    with torch.no_grad():
        q, neg = q.detach(), neg.detach()
        usable = neg.isfinite().all(dim=-1)  # (K,) or (B, K)
        if neg.ndim == 2:
            # NaN rows score NaN under either metric, and NaN is never selected.
            ranked = torch.where(usable[:, None], neg, torch.full_like(neg, math.nan))
            hard = topk_similarity(q, ranked.to(q.dtype), n_hard, metric=metric).indices
        else:
            ct = torch.float64 if q.dtype == torch.float64 else torch.float32
            qs, ns = q.to(ct), neg.to(ct)
            if metric == "cosine":
                qs, ns = _unit(qs), _unit(ns)
            s = torch.einsum("bd,bkd->bk", qs, ns)
            hard = topk_from_scores(torch.where(usable, s, torch.full_like(s, math.nan)), n_hard).indices
        short = torch.nonzero((hard < 0).any(dim=1)).reshape(-1).cpu()
        if short.numel():
            raise ValueError(f"negatives must give every query at least n_hard={n_hard} finite negatives "
                             f"with a non-NaN score; query {rows_text(short, b)} have fewer")
        i = torch.randint(0, n_hard, (b, n_mix), generator=gen)
        offset = torch.randint(1, n_hard, (b, n_mix), generator=gen) if n_hard > 1 else torch.zeros_like(i)
        alpha = torch.rand((b, n_mix), generator=gen)
        jq = torch.randint(0, n_hard, (b, n_query_mix), generator=gen)
        beta = 0.5 * torch.rand((b, n_query_mix), generator=gen)
        j = (i + offset) % n_hard
        dev = q.device
        hard_first = torch.gather(hard, 1, i.to(dev))
        hard_second = torch.cat([torch.gather(hard, 1, j.to(dev)), torch.gather(hard, 1, jq.to(dev))], dim=1)
        weight = torch.cat([alpha, beta], dim=1).to(dev)

        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        qn = _unit(q.to(ct))
        nn_ = _unit(neg.to(ct))
        rows = torch.arange(b, device=dev).unsqueeze(1)
        pick = (lambda idx: nn_[idx]) if neg.ndim == 2 else (lambda idx: nn_[rows, idx])
        a_vec = torch.cat([pick(hard_first), qn.unsqueeze(1).expand(b, n_query_mix, d)], dim=1)
        w = weight.to(ct).unsqueeze(-1)
        mixed = _unit(w * a_vec + (1 - w) * pick(hard_second))
        query_marker = torch.full((b, n_query_mix), -1, dtype=torch.int64, device=dev)
        first = torch.cat([hard_first, query_marker], dim=1)
    return MixedNegatives(mixed.to(q.dtype), first, hard_second, weight)


class MoCHi:
    """Stateful MoCHi: holds the mixing sizes and a seeded generator, so a training run's synthetic
    negatives are reproducible from ``seed`` (and resumable via :meth:`state_dict`).

    ``mixer(query, negatives)`` is :func:`mix_hard_negatives`; :meth:`logits` builds MoCo's logits with
    the synthetic negatives appended: [q^ . k+, q^ . n^_1..K, q^ . h_1..M] / temperature, whose
    cross-entropy against target 0 is the MoCHi loss.
    """

    def __init__(self, n_hard: int, n_mix: int, n_query_mix: int = 0, *, metric: str = "cosine",
                 seed: int = 0):
        self.n_hard = check_int("n_hard", n_hard, 1)
        self.n_mix = check_int("n_mix", n_mix, 0)
        self.n_query_mix = check_int("n_query_mix", n_query_mix, 0)
        if metric not in ("cosine", "dot"):
            raise ValueError(f"metric must be 'cosine' or 'dot', got {metric!r}")
        self.metric = metric
        self.generator = torch.Generator().manual_seed(check_int("seed", seed) % (1 << 63))

    def __call__(self, query: torch.Tensor, negatives: torch.Tensor) -> MixedNegatives:
        return mix_hard_negatives(query, negatives, self.n_hard, self.n_mix, self.n_query_mix,
                                  metric=self.metric, generator=self.generator)

    def logits(self, query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
               temperature: float = 0.07) -> torch.Tensor:
        """(B, 1 + K + M) logits; column 0 is the positive. Gradients flow to ``query`` and
        ``positive`` and not to the negatives (queue entries and synthetic ones are constants)."""
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
        if positive.shape != query.shape:
            raise ValueError(f"positive must have shape {tuple(query.shape)}, got {tuple(positive.shape)}")
        mixed = self(query, negatives).embeddings
        qn = _unit(query)
        neg = _unit(negatives.detach())
        neg_logits = qn @ neg.T if neg.ndim == 2 else torch.einsum("bd,bkd->bk", qn, neg)
        pos = (qn * _unit(positive)).sum(-1, keepdim=True)
        synth = torch.einsum("bd,bmd->bm", qn, mixed.to(qn.dtype))
        return torch.cat([pos, neg_logits, synth], dim=1) / temperature

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
