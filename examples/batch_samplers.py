"""Which items share a batch decides how hard the in-batch negatives are. This compares random
batches with ClusterBatchSampler (TAS-Balanced / NGAME) and NeighbourBatchSampler (Sample4Geo) batches
by how often an item meets its nearest neighbour in its batch, and shows NoDuplicatesBatchSampler in a
DataLoader.
Runs on the CPU in a few seconds: python examples/batch_samplers.py
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

import hnsample


def nearest_in_batch(x: torch.Tensor, batches: list[list[int]]) -> float:
    """Fraction of batched items whose nearest other item is in the same batch."""
    nearest = hnsample.topk_similarity(x, x, 1, metric="cosine", exclude=torch.arange(len(x)).unsqueeze(1))
    batch_of = torch.full((len(x),), -1)
    for i, b in enumerate(batches):
        batch_of[b] = i
    placed = batch_of >= 0
    return (batch_of[nearest.indices[:, 0]] == batch_of)[placed].float().mean().item()


def main() -> None:
    g = torch.Generator().manual_seed(0)
    topics = torch.randn(40, 32, generator=g)
    topic_of = torch.randint(0, 40, (2000,), generator=g)
    x = topics[topic_of] + 0.7 * torch.randn(2000, 32, generator=g)

    random_batches = torch.randperm(2000, generator=g).view(-1, 50).tolist()
    cluster = hnsample.ClusterBatchSampler(x, 50, n_clusters=40, seed=0)
    neighbour = hnsample.NeighbourBatchSampler.from_embeddings(x, 50, 9, seed=0)
    compared = {"random": random_batches, "cluster": list(cluster), "neighbour": list(neighbour)}
    for name, batches in compared.items():
        share = nearest_in_batch(x, batches)
        print(f"{name + ' batches:':18} nearest neighbour in the batch for {share:.1%}")

    # Between epochs the encoder changes: recluster / remine with the new embeddings.
    x_next = x + 0.1 * torch.randn(x.shape, generator=g)
    cluster.recluster(x_next)
    neighbour.remine(x_next)
    cluster.set_epoch(1)
    neighbour.set_epoch(1)
    share = nearest_in_batch(x_next, list(cluster))
    print(f"after recluster:   nearest neighbour in the batch for {share:.1%}")

    # Duplicated texts never share a batch (they would be false in-batch negatives).
    texts = [f"doc {i % 700}" for i in range(2000)]
    sampler = hnsample.NoDuplicatesBatchSampler(texts, 64, seed=0, drop_last=True)
    loader = DataLoader(TensorDataset(torch.arange(2000)), batch_sampler=sampler)
    worst = max(64 - len({texts[i] for i in batch[0].tolist()}) for batch in loader)
    print(f"NoDuplicatesBatchSampler: {len(sampler)} batches of 64, duplicated texts per batch: {worst}")
    assert worst == 0


if __name__ == "__main__":
    main()
