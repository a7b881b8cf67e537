"""Golden entries of the batch samplers: the batches of a few epochs for fixed seeds, per rank.

Batch lists are recorded flattened (``items``) with their ``lengths``. The cluster and neighbour
samplers run on portable embeddings (disjoint-support or +-1 directions), so their k-means and
neighbour decisions are exact comparisons."""

from __future__ import annotations

import numpy as np
import torch

import hnsample

from .corpus import Context, Data, Field, close, entry, exact, ids_tensor, tensor, tolerance_for
from .topk import sim_inputs


def batches_fields(sampler, prefix: str, epochs: tuple[int, ...] = (0, 1, 2)) -> dict[str, Field]:
    out = {f"{prefix}len": exact(np.array(len(sampler), dtype=np.int64))}
    for epoch in epochs:
        sampler.set_epoch(epoch)
        batches = list(sampler)
        out[f"{prefix}epoch{epoch}_items"] = exact(np.array([i for b in batches for i in b], dtype=np.int64))
        out[f"{prefix}epoch{epoch}_lengths"] = exact(np.array([len(b) for b in batches], dtype=np.int64))
    return out


@entry("samplers/no_duplicates")
def _(ctx: Context):
    d = ctx.data
    n = 40
    words = [f"text{int(v)}" for v in d.integers(0, 24, n)]  # one key per item, many repeats
    pairs = [(f"q{int(a)}", f"p{int(b)}") for a, b in zip(d.integers(0, 30, n), d.integers(0, 6, n), strict=True)]
    table = d.integers(0, 50, (n, 3))
    table[d.uniform((n, 3)) < 0.3] = -1
    unique = list(range(n))
    out = {}
    out |= batches_fields(hnsample.NoDuplicatesBatchSampler(words, 6, seed=1), "words_")
    out |= batches_fields(hnsample.NoDuplicatesBatchSampler(pairs, 8, seed=2, drop_last=True), "pairs_drop_last_")
    out |= batches_fields(hnsample.NoDuplicatesBatchSampler(ids_tensor(table), 5, seed=3), "tensor_")
    out |= batches_fields(hnsample.NoDuplicatesBatchSampler(words, 6, shuffle=False), "no_shuffle_")
    out |= batches_fields(hnsample.NoDuplicatesBatchSampler(unique, 7, seed=4), "unique_")
    for rank in range(3):
        out |= batches_fields(hnsample.NoDuplicatesBatchSampler(words, 4, seed=5, rank=rank, world_size=3),
                              f"rank{rank}of3_")
    return out


@entry("samplers/m_per_class")
def _(ctx: Context):
    d = ctx.data
    labels = ids_tensor(d.integers(0, 7, 50))
    labels[:3] = 99  # a label with too few items for m=4 is never sampled
    out = {}
    out |= batches_fields(hnsample.MPerClassBatchSampler(labels, 2, 6, seed=1), "m2_")
    out |= batches_fields(hnsample.MPerClassBatchSampler(labels, 4, 8, seed=2, drop_last=False), "m4_keep_last_")
    out |= batches_fields(hnsample.MPerClassBatchSampler(labels, 3, 9, shuffle=False), "no_shuffle_")
    for rank in range(2):
        out |= batches_fields(hnsample.MPerClassBatchSampler(labels.numpy(), 2, 4, seed=3, rank=rank, world_size=2),
                              f"rank{rank}of2_")
    return out


def cluster_embeddings(data: Data, n: int, directions: int, d: int = 16) -> np.ndarray:
    """portable: each item is one of ``directions`` +-1 patterns on disjoint coordinate groups, scaled by
    1, 2 or 4 (cosines exact: 0 or 1; cluster means exact); full: random floats."""
    if not data.portable:
        return 2 * data.uniform((n, d)) - 1
    width = d // directions
    patterns = np.zeros((directions, d))
    for k in range(directions):
        patterns[k, k * width : (k + 1) * width] = 2 * data.integers(0, 1, width) - 1
    which = data.integers(0, directions - 1, n)
    return patterns[which] * (2.0 ** data.integers(0, 2, n))[:, None]


@entry("samplers/cluster")
def _(ctx: Context):
    d = ctx.data
    out = {}
    tol = tolerance_for(torch.float32)
    for metric in ("cosine", "euclidean"):
        x = tensor(cluster_embeddings(d, 37, 4))
        s = hnsample.ClusterBatchSampler(x, 4, n_clusters=4, metric=metric, seed=6)
        out |= {f"{metric}_assignments": exact(s.assignments), f"{metric}_centroids": close(s.centroids, *tol)}
        out |= batches_fields(s, f"{metric}_")
        s.recluster(tensor(cluster_embeddings(d, 37, 4)))
        out |= {f"{metric}_reclustered_assignments": exact(s.assignments)}
        out |= batches_fields(s, f"{metric}_reclustered_", epochs=(0, 1))
    x = tensor(cluster_embeddings(d, 30, 2))
    out |= batches_fields(hnsample.ClusterBatchSampler(x, 5, seed=7, shuffle=False), "default_clusters_no_shuffle_")
    out |= batches_fields(hnsample.ClusterBatchSampler(x, 4, n_clusters=3, seed=8, drop_last=True, rank=1,
                                                       world_size=2), "rank1of2_")
    return out


@entry("samplers/neighbour")
def _(ctx: Context):
    d = ctx.data
    n = 30
    nb = d.integers(0, n - 1, (n, 4))
    nb[d.uniform((n, 4)) < 0.2] = -1
    keys = ids_tensor(d.integers(0, 12, n))
    out = {}
    out |= batches_fields(hnsample.NeighbourBatchSampler(ids_tensor(nb), 6, seed=1), "grow_")
    out |= batches_fields(hnsample.NeighbourBatchSampler(ids_tensor(nb), 6, grow=False, neighbours_per_item=2,
                                                         seed=2), "no_grow_")
    out |= batches_fields(hnsample.NeighbourBatchSampler(ids_tensor(nb), 5, keys=keys, seed=3), "keys_")
    for rank in range(2):
        out |= batches_fields(hnsample.NeighbourBatchSampler(ids_tensor(nb), 4, seed=4, rank=rank, world_size=2,
                                                             drop_last=True), f"rank{rank}of2_")
    emb, _ = sim_inputs(d, n, 1, "cosine")
    mined = hnsample.NeighbourBatchSampler.mine_neighbours(emb, 5, keys=keys)
    out["mined_neighbours"] = exact(mined)
    out["mined_neighbours_dot"] = exact(hnsample.NeighbourBatchSampler.mine_neighbours(emb, 3, metric="dot"))
    s = hnsample.NeighbourBatchSampler.from_embeddings(emb, 6, 4, keys=keys, seed=5)
    out |= batches_fields(s, "from_embeddings_")
    s.remine(sim_inputs(d, n, 1, "cosine")[0])
    out |= {"remined_neighbours": exact(np.array(s.neighbours, dtype=np.int64))}
    out |= batches_fields(s, "remined_", epochs=(0, 1))
    return out

