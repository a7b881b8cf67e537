"""ADORE / STAR-style training of a query encoder against a fixed, memory-mapped document index,
re-mining hard negatives with the current encoder at every step (DynamicNegativeMiner).

Documents are embedded once by a frozen encoder and saved as a .npy file; the miner memory-maps it.
Each step: encode the batch's queries, mine 8 hard + 8 random negatives per query (the positive
excluded), train with InfoNCE. Recall@1 over the whole index goes up.
Runs on the CPU in a few seconds: python examples/dynamic_negatives.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from local_loss import info_nce

import hnsample


def recall_at_1(encoder: torch.nn.Module, queries: torch.Tensor, positives: torch.Tensor,
                miner: hnsample.DynamicNegativeMiner) -> float:
    with torch.no_grad():
        # The best non-excluded document is the top hard negative when nothing is excluded.
        top = miner.mine(encoder(queries), None, 1, seed=0)
    return (top.ids[:, 0] == positives).float().mean().item()


def main() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n_docs, raw, dim = 2000, 32, 24
    doc_raw = torch.randn(n_docs, raw, generator=g)
    doc_encoder = torch.nn.Linear(raw, dim).requires_grad_(False)
    positives = torch.randint(0, n_docs, (512,), generator=g)
    queries = doc_raw[positives] + 0.5 * torch.randn(512, raw, generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "documents.npy"
        np.save(path, doc_encoder(doc_raw).numpy())
        miner = hnsample.DynamicNegativeMiner(path, metric="cosine", chunk_rows=1024)
        query_encoder = torch.nn.Linear(raw, dim)
        optimizer = torch.optim.Adam(query_encoder.parameters(), lr=1e-2)
        sampler = hnsample.NoDuplicatesBatchSampler(positives, 64, seed=0)  # one query per document
        before = recall_at_1(query_encoder, queries, positives, miner)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            for step, batch in enumerate(sampler):
                q = query_encoder(queries[batch])
                pos = positives[batch]
                mined = miner.mine(q.detach(), pos, 8, random=8, seed=epoch * 1000 + step)
                pos_emb = torch.from_numpy(np.load(path, mmap_mode="r")[pos.numpy()])
                loss = info_nce(q, pos_emb, mined.embeddings, temperature=0.05)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            print(f"epoch {epoch}: last loss {loss.item():.4f}")
        after = recall_at_1(query_encoder, queries, positives, miner)
    print(f"recall@1 over {n_docs} documents: {before:.3f} -> {after:.3f}")
    assert after > before, "training with dynamically mined negatives should improve recall"


if __name__ == "__main__":
    main()
