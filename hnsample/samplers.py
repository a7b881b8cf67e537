"""Batch samplers that decide which items meet in a batch (and so become each other's in-batch negatives).

Every sampler here is a ``torch.utils.data.Sampler`` yielding lists of dataset indices, is seeded and
deterministic (the batches of an epoch are a pure function of ``seed``, the epoch set by
:meth:`set_epoch` and the sampler's data), and is DDP-aware:

* each rank builds the same global list of batches for the epoch and keeps every ``world_size``-th one
  starting at ``rank``, so the ranks' batches are disjoint;
* the global list is cut to a multiple of ``world_size`` (at most ``world_size - 1`` batches are left out,
  different ones each epoch when ``shuffle`` is on), so every rank yields the same number of batches and
  no rank waits forever in a collective.

``rank``/``world_size`` default to ``torch.distributed``'s when a process group is initialized, else 0/1.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from ._ext import as_tensor, check_int, nonfinite_rows, rows_text, to_int64
from .ops.topk import topk_similarity

__all__ = [
    "ClusterBatchSampler",
    "MPerClassBatchSampler",
    "NeighbourBatchSampler",
    "NoDuplicatesBatchSampler",
    "pack_batches",
]

_GOLDEN = 0x9E3779B97F4A7C15


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose stream depends on (seed, epoch) only."""
    return torch.Generator().manual_seed((seed + epoch * _GOLDEN) % (1 << 63))


def _distributed_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialized else 1
    world_size = check_int("world_size", world_size, 1)
    if rank is None:
        rank = torch.distributed.get_rank() if initialized else 0
    rank = check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return rank, world_size


def _item_keys(name: str, keys: Any, n: int | None = None) -> list[tuple[int, ...]]:
    """Per-item key tuples, each key mapped to a dense int.

    Accepts a sequence of hashables (one key per item) or of tuples/lists of hashables (several keys
    per item, e.g. the query and the positive text), or an integer tensor/array of shape (N,) or (N, m)
    where -1 is padding in the 2-D case.
    """
    if isinstance(keys, (torch.Tensor, np.ndarray)):
        t = as_tensor(name, keys)
        if t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer keys, got {t.dtype}")
        t = to_int64(name, t)
        if t.ndim == 1:
            rows = [(k,) for k in t.tolist()]
        elif t.ndim == 2:
            rows = [tuple(k for k in row if k != -1) for row in t.tolist()]
        else:
            raise ValueError(f"{name} must have shape (N,) or (N, m), got {tuple(t.shape)}")
    elif isinstance(keys, Sequence) and not isinstance(keys, (str, bytes)):
        rows = []
        for item in keys:
            if isinstance(item, (tuple, list)):
                rows.append(tuple(item))
            elif isinstance(item, Hashable):
                rows.append((item,))
            else:
                raise TypeError(f"{name} must hold hashable keys or tuples of them, got "
                                f"{type(item).__name__}")
    else:
        raise TypeError(f"{name} must be a sequence, torch.Tensor or numpy.ndarray, got "
                        f"{type(keys).__name__}")
    if n is not None and len(rows) != n:
        raise ValueError(f"{name} must have one entry per item ({n}), got {len(rows)}")
    code: dict[Any, int] = {}
    try:
        return [tuple(dict.fromkeys(code.setdefault(k, len(code)) for k in row)) for row in rows]
    except TypeError as err:
        raise TypeError(f"{name} must hold hashable keys: {err}") from None


def pack_batches(
    order: Sequence[int], batch_size: int, item_keys: Sequence[tuple[int, ...]] | None = None
) -> list[list[int]]:
    """Packs items, in the given order, into batches of at most ``batch_size`` so that no key occurs
    twice in a batch.

    Rule: item t goes to the first batch that is not yet full and comes after every batch already
    holding one of its keys. Items with no key repeats fill batches strictly in order; a repeated key is
    pushed to a later batch. Time O(sum of keys * alpha(N)): a union-find over batch indices points each
    batch to the first non-full batch at or after it, and each key remembers the last batch it went to.
    The result may contain partial batches (where keys forced items apart, and at the end).
    """
    batches: list[list[int]] = []
    parent: list[int] = []  # parent[b] == b: batch b has room
    last: dict[int, int] = {}

    def first_open(b: int) -> int:
        root = b
        while root < len(parent) and parent[root] != root:
            root = parent[root]
        while b < len(parent) and parent[b] != b:
            parent[b], b = root, parent[b]
        return root

    for item in order:
        keys = item_keys[item] if item_keys is not None else ()
        start = 0
        for k in keys:
            start = max(start, last.get(k, -1) + 1)
        b = first_open(start)
        if b == len(batches):
            batches.append([])
            parent.append(b)
        batches[b].append(item)
        for k in keys:
            last[k] = b
        if len(batches[b]) == batch_size:
            parent[b] = b + 1
    return batches


class _DistributedBatchSampler(Sampler[list[int]], ABC):
    """Shared epoch/seed/rank handling. Subclasses build the global batches of one epoch."""

    def __init__(self, batch_size: int, drop_last: bool, shuffle: bool, seed: int,
                 rank: int | None, world_size: int | None):
        self.batch_size = check_int("batch_size", batch_size, 1)
        if not isinstance(drop_last, bool):
            raise TypeError(f"drop_last must be a bool, got {type(drop_last).__name__}")
        if not isinstance(shuffle, bool):
            raise TypeError(f"shuffle must be a bool, got {type(shuffle).__name__}")
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.seed = check_int("seed", seed)
        self.rank, self.world_size = _distributed_defaults(rank, world_size)
        self.epoch = 0
        self._version = 0  # bumped whenever the data the batches depend on changes
        self._cache: tuple[tuple[int, int], list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose batches the next ``iter`` yields (call it on every rank)."""
        self.epoch = check_int("epoch", epoch, 0)

    @abstractmethod
    def _epoch_batches(self, generator: torch.Generator) -> list[list[int]]:
        """All ranks' batches of the epoch, before the final shuffle and the rank split."""

    def global_batches(self) -> list[list[int]]:
        """Every rank's batches of the current epoch, in global order (rank r takes entries r, r + W, ...)."""
        key = (self.epoch, self._version)
        if self._cache is None or self._cache[0] != key:
            g = _epoch_generator(self.seed, self.epoch)
            batches = self._epoch_batches(g)
            if self.drop_last:
                batches = [b for b in batches if len(b) == self.batch_size]
            batches = [b for b in batches if b]
            if self.shuffle:
                batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
            batches = batches[: len(batches) - len(batches) % self.world_size]
            self._cache = (key, batches)
        return self._cache[1]

    def __iter__(self) -> Iterator[list[int]]:
        yield from (list(b) for b in self.global_batches()[self.rank :: self.world_size])

    def __len__(self) -> int:
        return len(self.global_batches()) // self.world_size

    def _order(self, n: int, generator: torch.Generator) -> list[int]:
        return torch.randperm(n, generator=generator).tolist() if self.shuffle else list(range(n))


class NoDuplicatesBatchSampler(_DistributedBatchSampler):
    """Batches in which no key (id or text) appears twice, so no in-batch "negative" is a copy of an
    anchor or positive.

    Each item has one key or several (e.g. ``(query_text, positive_text)``); two items conflict when they
    share any key. Per epoch the items are visited in a seeded random order and packed by
    :func:`pack_batches`: an item joins the first non-full batch after every batch that already holds one
    of its keys. Every item appears exactly once per epoch (minus partial batches when ``drop_last``, and
    the DDP remainder). Linear time, O(total keys * alpha(N)), unlike the rescanning loop of
    sentence-transformers' sampler, which is quadratic when one key is frequent.

    Args:
        keys: N keys, or N tuples of keys, or an int tensor/array (N,) or (N, m) (-1 = padding).
        batch_size: items per batch.
        drop_last: drop batches with fewer than ``batch_size`` items (duplicates can force a few).
        shuffle: visit items (and yield batches) in a seeded random order; else in index order.
        seed, rank, world_size: see the module docstring.
    """

    def __init__(self, keys: Any, batch_size: int, *, drop_last: bool = False, shuffle: bool = True,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None):
        super().__init__(batch_size, drop_last, shuffle, seed, rank, world_size)
        self.item_keys = _item_keys("keys", keys)
        distinct = len({k for row in self.item_keys for k in row})
        self._no_repeats = distinct == sum(len(row) for row in self.item_keys)

    def _epoch_batches(self, generator: torch.Generator) -> list[list[int]]:
        order = self._order(len(self.item_keys), generator)
        if self._no_repeats:
            # No key repeats: pack_batches would fill batches strictly in order, so cut the order.
            return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return pack_batches(order, self.batch_size, self.item_keys)


class MPerClassBatchSampler(_DistributedBatchSampler):
    """Batches of ``batch_size // m`` distinct labels with exactly ``m`` items each (the P x K sampling
    that batch-hard and semi-hard mining need).

    Per epoch, each label c with n_c >= m items is shuffled and cut into ceil(n_c / m) groups of m
    consecutive items of its permutation, wrapping around to its start for the last group (so every such
    item appears at least once per epoch and no item twice in a group). Labels with fewer than m items
    are never sampled. The groups are shuffled and packed so that no label appears twice in a batch
    (:func:`pack_batches` with the label as key); a batch with fewer than ``batch_size // m`` labels is
    partial (dropped when ``drop_last``).

    Unlike pytorch-metric-learning's ``MPerClassSampler`` (which draws labels with replacement for a
    fixed ``length_before_new_iter``), an epoch here is one pass over the items. Because of the
    wrap-around, an item of a label whose size is not a multiple of m can appear in two batches of an
    epoch (never twice in one); under DDP the ranks' batches are distinct, and their items are disjoint
    when every label's size is a multiple of m.
    """

    def __init__(self, labels: Any, m: int, batch_size: int, *, drop_last: bool = True, shuffle: bool = True,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None):
        super().__init__(batch_size, drop_last, shuffle, seed, rank, world_size)
        self.m = check_int("m", m, 1)
        if self.batch_size % self.m:
            raise ValueError(f"batch_size must be a multiple of m={self.m}, got {self.batch_size}")
        lab = as_tensor("labels", labels)
        if lab.dtype.is_floating_point or lab.is_complex() or lab.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {lab.dtype}")
        if lab.ndim != 1:
            raise ValueError(f"labels must have shape (N,), got {tuple(lab.shape)}")
        lab = to_int64("labels", lab.cpu())
        order = torch.argsort(lab, stable=True)
        values, counts = torch.unique_consecutive(lab[order], return_counts=True)
        members = torch.split(order, counts.tolist())
        self.classes = [(int(v), idx) for v, idx in zip(values.tolist(), members, strict=True)
                        if idx.numel() >= self.m]
        if not self.classes:
            raise ValueError(f"labels must have at least one label with m={self.m} or more items")

    def _epoch_batches(self, generator: torch.Generator) -> list[list[int]]:
        groups: list[list[int]] = []
        group_label: list[tuple[int]] = []
        for c, (_, idx) in enumerate(self.classes):
            n = idx.numel()
            perm = idx[torch.randperm(n, generator=generator)] if self.shuffle else idx
            n_groups = -(-n // self.m)
            pos = torch.arange(n_groups * self.m) % n
            for chunk in perm[pos].view(n_groups, self.m).tolist():
                groups.append(chunk)
                group_label.append((c,))
        packed = pack_batches(self._order(len(groups), generator), self.batch_size // self.m, group_label)
        return [[i for g in batch for i in groups[g]] for batch in packed]


def _as_embeddings(name: str, x: Any) -> torch.Tensor:
    t = as_tensor(name, x)
    if t.ndim != 2:
        raise ValueError(f"{name} must have shape (N, d), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    return t.detach()


def _pow2_scale(*ts: torch.Tensor) -> float:
    """A power of two that brings the largest |value| of the tensors below 1 when it exceeds 2**20, else
    1. Scaling by it changes no ranking and no rounding (outside the subnormal range), and keeps |c|^2,
    norms and cluster sums from overflowing float32 for large embeddings."""
    peak = max((float(t.abs().max()) for t in ts if t.numel()), default=0.0)
    return 2.0 ** -math.frexp(peak)[1] if peak > 2.0**20 else 1.0


def kmeans(
    embeddings: torch.Tensor, centroids: torch.Tensor, iterations: int, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations from the given centroids; returns (centroids (K, d), assignment (N,) int64).

    Assignment: a(x) = argmax_c x . c^ with c^ = c / |c| ("cosine": spherical k-means), or
    argmin_c |x - c|^2 = argmax_c (x . c - |c|^2 / 2) ("euclidean"), computed exactly with
    ``topk_similarity(k=1)`` on [x, 1] and [c, -|c|^2 / 2]; ties go to the lower cluster index.
    Update: c = mean of its members (normalized for "cosine"); an empty cluster keeps its centroid.
    Stops early when the assignment no longer changes. Arithmetic in float32 (float64 for float64), on
    inputs divided by a power of two when they exceed 2**20 in magnitude (no overflow of |c|^2).

    Raises ValueError naming the rows when ``embeddings`` holds a NaN or inf: such a point has no
    nearest centroid, and one of them would make every centroid it joins NaN.
    """
    bad = nonfinite_rows(embeddings)
    if bad.numel():
        raise ValueError(f"embeddings must be finite to be clustered: {rows_text(bad, embeddings.shape[0])} "
                         "hold NaN or inf")
    ct = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    x = embeddings.to(ct)
    c = centroids.to(device=x.device, dtype=ct).clone()
    scale = 1.0
    if metric == "cosine":
        x = x * _pow2_scale(x)  # only directions matter; the scale keeps |x| from overflowing
        x = x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(ct).tiny)
    else:
        scale = _pow2_scale(x, c)
        x, c = x * scale, c * scale
        x_aug = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    assign = None
    for _ in range(max(1, iterations)):
        if metric == "cosine":
            new = topk_similarity(x, c * _pow2_scale(c), 1, metric="cosine").indices[:, 0]
        else:
            c_aug = torch.cat([c, -0.5 * (c * c).sum(1, keepdim=True)], dim=1)
            new = topk_similarity(x_aug, c_aug, 1).indices[:, 0]
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=c.shape[0]).to(ct).unsqueeze(1)
        filled = counts[:, 0] > 0
        mean = sums / counts.clamp_min(1)
        if metric == "cosine":
            norm = mean.norm(dim=1, keepdim=True)
            filled &= norm[:, 0] > 0
            mean = mean / norm.clamp_min(torch.finfo(ct).tiny)
        c = torch.where(filled.unsqueeze(1), mean, c)
    return c / scale, assign


class ClusterBatchSampler(_DistributedBatchSampler):
    """Topic-aware batches (TAS-Balanced, NGAME): items are clustered by embedding and each batch is
    drawn from one cluster, or from a few nearby clusters.

    Clustering: k-means (:func:`kmeans`; assignment by ``topk_similarity`` with k=1) with ``n_clusters``
    centroids (default round(N / batch_size), so a typical cluster fills about one batch), initialized
    from ``n_clusters`` distinct items drawn with ``seed``. :meth:`recluster` re-runs it from the current
    centroids with fresh embeddings (call it between epochs as the encoder changes).

    Batches of an epoch (every item exactly once): each cluster's members are shuffled and cut into
    full batches; the remainders (< batch_size items each) are laid out cluster after cluster along a
    nearest-centroid chain (start at the first cluster with a remainder, go to the most similar unvisited
    centroid, found with ``topk_similarity``) and cut into batches, so a batch mixes only neighbouring
    clusters. Balanced: a large cluster yields several single-cluster batches, a small one shares a batch
    with its neighbours, and at most one batch per epoch is partial. The batch order is shuffled.

    Embeddings holding NaN or inf (in the constructor or :meth:`recluster`) raise ValueError naming the
    argument and the rows: a non-finite point has no nearest centroid, and clustering around it would
    make every batch it touches arbitrary. The sampler is left unchanged when :meth:`recluster` raises.
    """

    def __init__(self, embeddings: Any, batch_size: int, *, n_clusters: int | None = None,
                 metric: str = "cosine", iterations: int = 10, drop_last: bool = False, shuffle: bool = True,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None):
        super().__init__(batch_size, drop_last, shuffle, seed, rank, world_size)
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
        self.metric = metric
        self.iterations = check_int("iterations", iterations, 1)
        x = _as_embeddings("embeddings", embeddings)
        self.num_items = x.shape[0]
        if self.num_items == 0:
            raise ValueError("embeddings must hold at least one item")
        k = max(1, round(self.num_items / self.batch_size)) if n_clusters is None else n_clusters
        self.n_clusters = check_int("n_clusters", k, 1)
        if self.n_clusters > self.num_items:
            raise ValueError(f"n_clusters must be <= the number of items ({self.num_items}), "
                             f"got {self.n_clusters}")
        g = torch.Generator().manual_seed(self.seed % (1 << 63))
        init = torch.randperm(self.num_items, generator=g)[: self.n_clusters].to(x.device)
        self.centroids = x[init].clone()
        self.recluster(x)

    def recluster(self, embeddings: Any) -> None:
        """Re-runs k-means on new embeddings of the same N items, warm-started from the current centroids."""
        x = _as_embeddings("embeddings", embeddings)
        if x.shape[0] != self.num_items:
            raise ValueError(f"embeddings must have {self.num_items} rows, got {x.shape[0]}")
        if x.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"embeddings must have dimension {self.centroids.shape[1]}, got {x.shape[1]}")
        self.centroids, assign = kmeans(x, self.centroids, self.iterations, self.metric)
        self.assignments = assign.cpu()
        self._chain = self._centroid_chain()
        self._version += 1

    def _centroid_chain(self) -> list[int]:
        """Clusters in nearest-unvisited-neighbour order (walks each cluster's 32 nearest centroids, then
        falls back to the lowest unvisited index)."""
        k = self.n_clusters
        width = min(k - 1, 32)
        near = []
        if width > 0:
            self_id = torch.arange(k, device=self.centroids.device).unsqueeze(1)
            metric = "cosine" if self.metric == "cosine" else "dot"
            c = self.centroids * _pow2_scale(self.centroids)
            if self.metric == "euclidean":
                c_q = torch.cat([c, torch.ones_like(c[:, :1])], dim=1)
                c_c = torch.cat([c, -0.5 * (c * c).sum(1, keepdim=True)], dim=1)
            else:
                c_q = c_c = c
            near = topk_similarity(c_q, c_c, width, metric=metric, exclude=self_id).indices.cpu().tolist()
        visited = [False] * k
        chain, cursor, current = [], 0, 0
        for _ in range(k):
            chain.append(current)
            visited[current] = True
            nxt = next((j for j in (near[current] if near else ()) if j >= 0 and not visited[j]), None)
            if nxt is None:
                while cursor < k and visited[cursor]:
                    cursor += 1
                nxt = cursor
            current = nxt
        return chain

    def _epoch_batches(self, generator: torch.Generator) -> list[list[int]]:
        order = torch.argsort(self.assignments, stable=True)
        counts = torch.bincount(self.assignments, minlength=self.n_clusters).tolist()
        members = torch.split(order, counts)
        batches: list[list[int]] = []
        remainder: list[int] = []
        for c in self._chain:
            idx = members[c]
            if self.shuffle:
                idx = idx[torch.randperm(idx.numel(), generator=generator)]
            idx = idx.tolist()
            full = len(idx) - len(idx) % self.batch_size
            batches.extend(idx[i : i + self.batch_size] for i in range(0, full, self.batch_size))
            remainder.extend(idx[full:])
        batches.extend(remainder[i : i + self.batch_size] for i in range(0, len(remainder), self.batch_size))
        return batches


class NeighbourBatchSampler(_DistributedBatchSampler):
    """Batches in which items meet their nearest neighbours as in-batch negatives (Sample4Geo).

    Per epoch the items are visited in a seeded random order; an item not yet placed starts a group,
    followed by its first ``neighbours_per_item`` neighbours not yet placed (Sample4Geo's rule) and, with
    ``grow=True`` (default), by their neighbours in breadth-first order until the group holds
    ``batch_size`` items or no unplaced neighbour is left, so a batch is a connected neighbourhood
    rather than several small ones. The groups, laid end to end,
    are packed by :func:`pack_batches` with ``keys``: no two items in a batch share a key (pass each
    item's positive id so a positive never appears twice in a batch). Each item appears exactly once per
    epoch; a group is split only at a batch boundary or where a key clash pushes a member later.

    ``neighbours`` is (N, L) item indices (-1 = padding), e.g. from the previous epoch's embeddings;
    :meth:`from_embeddings` / :meth:`remine` mine them with ``topk_similarity`` (self excluded, and
    neighbours sharing the item's key excluded when keys are one int per item). An item whose embedding
    holds NaN or inf gets no neighbours and is no item's neighbour; it is still batched once per epoch.
    """

    def __init__(self, neighbours: Any, batch_size: int, *, keys: Any = None,
                 neighbours_per_item: int | None = None, grow: bool = True, drop_last: bool = False,
                 shuffle: bool = True, seed: int = 0, rank: int | None = None, world_size: int | None = None):
        super().__init__(batch_size, drop_last, shuffle, seed, rank, world_size)
        if not isinstance(grow, bool):
            raise TypeError(f"grow must be a bool, got {type(grow).__name__}")
        self.grow = grow
        self.neighbours_per_item = (None if neighbours_per_item is None
                                    else check_int("neighbours_per_item", neighbours_per_item, 0))
        self.update_neighbours(neighbours)
        self.item_keys = None if keys is None else _item_keys("keys", keys, self.num_items)
        self._keys_arg = keys

    def update_neighbours(self, neighbours: Any) -> None:
        """Replaces the neighbour lists ((N, L) int, -1 = padding); takes effect from the next iteration."""
        nb = as_tensor("neighbours", neighbours)
        if nb.dtype.is_floating_point or nb.is_complex() or nb.dtype == torch.bool:
            raise TypeError(f"neighbours must be an integer tensor, got {nb.dtype}")
        nb = to_int64("neighbours", nb)
        if nb.ndim != 2:
            raise ValueError(f"neighbours must have shape (N, L), got {tuple(nb.shape)}")
        n = nb.shape[0]
        if getattr(self, "num_items", n) != n:
            raise ValueError(f"neighbours must have {self.num_items} rows, got {n}")
        if nb.numel() and (int(nb.min()) < -1 or int(nb.max()) >= n):
            raise ValueError(f"neighbours must hold item indices in [0, {n}) or -1 for padding")
        self.num_items = n
        width = nb.shape[1]
        if self.neighbours_per_item is not None:
            width = min(width, self.neighbours_per_item)
        self.neighbours = nb[:, :width].to("cpu", torch.int64).tolist()
        self._version += 1

    @staticmethod
    def mine_neighbours(embeddings: Any, n_neighbours: int, keys: Any = None,
                        metric: str = "cosine") -> torch.Tensor:
        """(N, n_neighbours) nearest items of each item (-1 padded), self excluded; when ``keys`` is an
        int tensor/array (N,), items sharing the item's key are excluded too. A row holding NaN or inf
        gets only padding and is in no row's list (with "dot" it would otherwise score +-inf)."""
        x = _as_embeddings("embeddings", embeddings)
        x = torch.where(x.isfinite().all(dim=1, keepdim=True), x, torch.full_like(x, math.nan))
        n_neighbours = check_int("n_neighbours", n_neighbours, 0)
        self_id = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
        labels = None
        if isinstance(keys, (torch.Tensor, np.ndarray)) and as_tensor("keys", keys).ndim == 1:
            labels = as_tensor("keys", keys).to(x.device)
        return topk_similarity(x, x, n_neighbours, metric=metric, exclude=self_id,
                               query_labels=labels, candidate_labels=labels).indices.cpu()

    @classmethod
    def from_embeddings(cls, embeddings: Any, batch_size: int, n_neighbours: int, *, keys: Any = None,
                        metric: str = "cosine", **kwargs: Any) -> NeighbourBatchSampler:
        """A sampler over neighbour lists mined from ``embeddings`` (see :meth:`mine_neighbours`)."""
        nb = cls.mine_neighbours(embeddings, n_neighbours, keys, metric)
        return cls(nb, batch_size, keys=keys, **kwargs)

    def remine(self, embeddings: Any, n_neighbours: int | None = None, metric: str = "cosine") -> None:
        """Mines fresh neighbour lists from new embeddings of the same N items."""
        width = len(self.neighbours[0]) if n_neighbours is None and self.neighbours else (n_neighbours or 0)
        self.update_neighbours(self.mine_neighbours(embeddings, width, self._keys_arg, metric))

    def _epoch_batches(self, generator: torch.Generator) -> list[list[int]]:
        placed = [False] * self.num_items
        sequence: list[int] = []
        for seed_item in self._order(self.num_items, generator):
            if placed[seed_item]:
                continue
            placed[seed_item] = True
            group = [seed_item]
            head = 0
            # Breadth-first: the seed's neighbours, then theirs, until the group could fill a batch.
            while head < len(group) and len(group) < self.batch_size:
                for j in self.neighbours[group[head]]:
                    if j >= 0 and not placed[j] and len(group) < self.batch_size:
                        placed[j] = True
                        group.append(j)
                head += 1
                if not self.grow:
                    break
            sequence.extend(group)
        return pack_batches(sequence, self.batch_size, self.item_keys)
