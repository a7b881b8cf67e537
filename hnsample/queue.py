"""A MoCo-style FIFO queue of detached embeddings with their ids and labels, and hard-negative mining
from it with the filters of :func:`hnsample.topk_similarity`."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from ._ext import as_tensor, check_ids, check_int, nonfinite_rows, to_int64
from .ops.topk import topk_similarity

__all__ = ["NegativeQueue", "QueueNegatives"]


class QueueNegatives(NamedTuple):
    """Hard negatives mined from a queue, k per query, best first; padding where fewer are eligible.

    A zero padding vector still scores 0 in a dot-product loss, so drop or mask padded entries with
    ``valid`` before using ``embeddings`` as extra negatives (there is none while k <= the number of
    eligible entries).

    embeddings: (B, k, d) queue entries (zeros for padding), detached.
    ids, labels: (B, k) int64 stored ids / labels of the entries (-1 for padding or unknown).
    scores: (B, k) similarities (-inf for padding); differentiable with respect to the queries.
    slots: (B, k) int64 queue slots (-1 for padding).
    valid: (B, k) bool, False for padding.
    """

    embeddings: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    slots: torch.Tensor
    valid: torch.Tensor


def _gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (rank order) of each rank's (n_r, ...) tensor; n_r may differ."""
    dist = torch.distributed
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    padded = t.new_zeros((max(counts),) + tuple(t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


class NegativeQueue(torch.nn.Module):
    """FIFO of the last ``capacity`` enqueued embeddings, with int64 ids and (optional) labels.

    The state lives in buffers (``queue``, ``ids``, ``labels``, ``pointer``, ``size``), so ``.to(device)``
    and ``state_dict()`` carry it. Slot ``pointer`` is the next to overwrite; after E >= capacity enqueued
    rows the queue holds exactly the last ``capacity`` of them. Entries are stored detached in ``dtype``.

    Under ``torch.distributed`` :meth:`enqueue` first gathers every rank's rows (rank order), so all ranks
    hold the same queue, as in MoCo's ``concat_all_gather``; ranks may enqueue different row counts.
    """

    def __init__(self, capacity: int, dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, with_labels: bool = False):
        super().__init__()
        capacity = check_int("capacity", capacity, 1)
        dim = check_int("dim", dim, 1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.with_labels = bool(with_labels)
        self.register_buffer("queue", torch.zeros((capacity, dim), dtype=dtype, device=device))
        self.register_buffer("ids", torch.full((capacity,), -1, dtype=torch.int64, device=device))
        self.register_buffer("labels", torch.full((capacity,), -1, dtype=torch.int64, device=device))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("size", torch.zeros((), dtype=torch.int64, device=device))

    @property
    def capacity(self) -> int:
        return self.queue.shape[0]

    def __len__(self) -> int:
        return int(self.size)

    def contents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embeddings (n, d), ids (n,), labels (n,)) of the filled slots, in slot order."""
        n = len(self)
        return self.queue[:n], self.ids[:n], self.labels[:n]

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, ids: Any = None, labels: Any = None, *,
                gather: bool | None = None) -> None:
        """Appends rows (detached), overwriting the oldest. ``ids`` (n,) int64 (default -1: unknown);
        ``labels`` (n,) int64, required iff the queue was made ``with_labels``. ``gather`` (default: True
        when a torch.distributed process group with more than one rank is initialized) all-gathers first.
        """
        e = as_tensor("embeddings", embeddings)
        if e.ndim != 2 or e.shape[1] != self.queue.shape[1]:
            raise ValueError(f"embeddings must have shape (n, {self.queue.shape[1]}), got {tuple(e.shape)}")
        if not e.is_floating_point():
            raise TypeError(f"embeddings must be a float tensor, got {e.dtype}")
        n = e.shape[0]
        dev = self.queue.device
        e = e.detach().to(dev, self.queue.dtype)
        ids = (torch.full((n,), -1, dtype=torch.int64, device=dev) if ids is None
               else self._column("ids", ids, n))
        if self.with_labels != (labels is not None):
            raise ValueError("labels must be given exactly when the queue was created with_labels=True")
        labels = (torch.full((n,), -1, dtype=torch.int64, device=dev) if labels is None
                  else self._column("labels", labels, n))
        if gather is None:
            dist = torch.distributed
            gather = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if gather:
            e, ids, labels = _gather_rows(e), _gather_rows(ids), _gather_rows(labels)
            n = e.shape[0]
        cap = self.capacity
        if n >= cap:
            e, ids, labels = e[n - cap :], ids[n - cap :], labels[n - cap :]
            slots = (int(self.pointer) + n - cap + torch.arange(cap, device=dev)) % cap
        else:
            slots = (int(self.pointer) + torch.arange(n, device=dev)) % cap
        self.queue[slots] = e
        self.ids[slots] = ids
        self.labels[slots] = labels
        self.pointer.fill_((int(self.pointer) + n) % cap)
        self.size.fill_(min(cap, int(self.size) + n))

    def _column(self, name: str, x: Any, n: int) -> torch.Tensor:
        t = as_tensor(name, x)
        if t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
        if t.ndim != 1 or t.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
        return to_int64(name, t).to(self.queue.device)

    def slots_of(self, query_ids: torch.Tensor) -> torch.Tensor:
        """(B, P*M) queue slots holding any of each row's ids ((B, P) int64, -1 = padding), -1 padded,
        where M is the largest number of slots sharing one id. Sort + binary search: O((n + BP) log n)."""
        n = len(self)
        b = query_ids.shape[0]
        stored = self.ids[:n]
        sorted_ids, order = torch.sort(stored, stable=True)
        lo = torch.searchsorted(sorted_ids, query_ids, right=False)
        hi = torch.searchsorted(sorted_ids, query_ids, right=True)
        count = torch.where(query_ids >= 0, hi - lo, torch.zeros_like(lo))
        width = int(count.max()) if count.numel() else 0
        if width == 0 or n == 0:
            return torch.full((b, 0), -1, dtype=torch.int64, device=query_ids.device)
        offs = torch.arange(width, device=query_ids.device)
        pos = lo.unsqueeze(-1) + offs
        slots = torch.where(offs < count.unsqueeze(-1), order[pos.clamp_max(n - 1)], torch.full_like(pos, -1))
        return slots.reshape(b, -1)

    def mine(self, queries: torch.Tensor, k: int, *, query_ids: Any = None, query_labels: Any = None,
             metric: str = "dot", **filters: Any) -> QueueNegatives:
        """The k hardest queue entries for each query, with :func:`hnsample.topk_similarity` semantics.

        Entries whose stored id is one of the row's ``query_ids`` ((B,) or (B, P) int64, -1 = padding:
        the query's own id and its positives' ids) are excluded, as are entries whose stored label equals
        ``query_labels[i]`` (queue made ``with_labels``). Further keyword filters (``absolute_margin`` with
        ``positive_scores``, ``min_score``, ``sampling``, ``exclude`` as queue slots, ...) are passed to
        ``topk_similarity`` over the filled slots. Scores keep their gradient with respect to queries.
        ``metric`` defaults to "dot", as in ``topk_similarity`` (``mine_hard_negatives``, the miners and
        the samplers default to "cosine").

        Entries holding NaN or inf are never returned (with "dot" they would score +-inf), and a query
        row holding NaN or inf gets only padding.
        """
        q = as_tensor("queries", queries)
        if q.ndim != 2 or q.shape[1] != self.queue.shape[1]:
            raise ValueError(f"queries must have shape (B, {self.queue.shape[1]}), got {tuple(q.shape)}")
        if q.device != self.queue.device:
            raise ValueError(f"queries must be on the queue's device {self.queue.device}, got {q.device}")
        for banned in ("positives", "query_labels", "candidate_labels"):
            if banned in filters:
                raise TypeError(f"mine() takes query_ids/query_labels, not {banned}")
        b = q.shape[0]
        cand, stored_ids, stored_labels = self.contents()
        n = cand.shape[0]
        exclude = filters.pop("exclude", None)
        if exclude is not None:
            exclude = check_ids("exclude", exclude, b, q.device, n)
        if query_ids is not None:
            qi = as_tensor("query_ids", query_ids)
            if qi.dtype.is_floating_point or qi.is_complex() or qi.dtype == torch.bool:
                raise TypeError(f"query_ids must be an integer tensor, got {qi.dtype}")
            qi = to_int64("query_ids", qi).to(q.device)
            qi = qi.unsqueeze(1) if qi.ndim == 1 else qi
            if qi.ndim != 2 or qi.shape[0] != b:
                raise ValueError(f"query_ids must have shape ({b},) or ({b}, P), got {tuple(qi.shape)}")
            own = self.slots_of(qi)
            exclude = own if exclude is None else torch.cat([exclude, own], dim=1)
        cand_labels = None
        if query_labels is not None:
            if not self.with_labels:
                raise ValueError("query_labels needs a queue created with_labels=True")
            cand_labels = stored_labels
        # Non-finite entries are excluded by slot (no copy of the queue); a non-finite query row is
        # made all-NaN, whose scores are never selected.
        bad = nonfinite_rows(cand)
        if bad.numel():
            bad = bad.to(q.device).expand(b, -1)
            exclude = bad if exclude is None else torch.cat([exclude, bad], dim=1)
        q_ranked = torch.where(q.isfinite().all(dim=1, keepdim=True), q, torch.full_like(q, math.nan))
        top = topk_similarity(q_ranked, cand.to(q.dtype), k, metric=metric, exclude=exclude,
                              query_labels=query_labels, candidate_labels=cand_labels, **filters)
        valid = top.indices >= 0
        pad = torch.full_like(top.indices, -1)
        if n == 0:
            emb = cand.new_zeros(tuple(top.indices.shape) + (cand.shape[1],))
            return QueueNegatives(emb, pad, pad, top.scores, top.indices, valid)
        slots = top.indices.clamp_min(0)
        zero = torch.zeros((), dtype=cand.dtype, device=cand.device)
        emb = torch.where(valid.unsqueeze(-1), cand[slots], zero)
        return QueueNegatives(emb, torch.where(valid, stored_ids[slots], pad),
                              torch.where(valid, stored_labels[slots], pad), top.scores, top.indices, valid)
