"""MoCo-style training with a NegativeQueue and MoCHi synthetic hard negatives.

Each step: encode two noisy views of a batch of items (query encoder, momentum key encoder); mine the
hardest queue entries for each query (its own item id excluded, so an older copy of the same item is
never a negative); mix MoCHi negatives from them; train with InfoNCE over in-batch keys + mined +
synthetic negatives; enqueue the keys with their ids.
Runs on the CPU in a few seconds: python examples/moco_queue_mochi.py
"""

from __future__ import annotations

import copy

import torch
from local_loss import info_nce

import hnsample


def view(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x + 0.6 * torch.randn(x.shape, generator=generator)


def retrieval_accuracy(encoder: torch.nn.Module, x: torch.Tensor, generator: torch.Generator) -> float:
    """How often a noisy view's nearest clean item is the item itself."""
    with torch.no_grad():
        q, d = encoder(view(x, generator)), encoder(x)
    top = hnsample.topk_similarity(q, d, 1, metric="cosine")
    return (top.indices[:, 0] == torch.arange(len(x))).float().mean().item()


def main() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    items = torch.randn(384, 24, generator=g)
    encoder = torch.nn.Sequential(torch.nn.Linear(24, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    key_encoder = copy.deepcopy(encoder).requires_grad_(False)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=3e-3)
    queue = hnsample.NegativeQueue(capacity=256, dim=16)
    mochi = hnsample.MoCHi(n_hard=16, n_mix=8, n_query_mix=4, seed=0)
    sampler = hnsample.NoDuplicatesBatchSampler(list(range(len(items))), 32, seed=0)
    before = retrieval_accuracy(encoder, items, torch.Generator().manual_seed(9))
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for step, batch in enumerate(sampler):
            ids = torch.tensor(batch)
            q = encoder(view(items[ids], g))
            with torch.no_grad():
                k = key_encoder(view(items[ids], g))
            negatives = [k.new_zeros(len(batch), 0, 16)]
            if len(queue) >= 32:
                mined = queue.mine(q.detach(), 16, query_ids=ids, metric="cosine")
                negatives.append(mined.embeddings)
                negatives.append(mochi(q.detach(), queue.contents()[0]).embeddings)
            loss = info_nce(q, k, torch.cat(negatives, dim=1), temperature=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # momentum update of the key encoder, as in MoCo
                for pk, pq in zip(key_encoder.parameters(), encoder.parameters(), strict=True):
                    pk.mul_(0.9).add_(pq, alpha=0.1)
            queue.enqueue(k, ids=ids)
            if step == 0:
                print(f"epoch {epoch}: loss {loss.item():.4f}, queue holds {len(queue)}")
    after = retrieval_accuracy(encoder, items, torch.Generator().manual_seed(9))
    print(f"view -> item retrieval accuracy: {before:.3f} -> {after:.3f}")
    assert after > before, "contrastive training should improve retrieval"


if __name__ == "__main__":
    main()
