"""``hnsample demo``: mines hard negatives on a built-in synthetic corpus and shows what each filter did.

The corpus is clustered (documents around topic centres) and has planted near-duplicates: for some
queries, a second copy of the positive document (slightly perturbed) sits in the corpus under another id.
Such a copy is a false negative: mining it as a "hard negative" teaches the model to push away the right
answer. The demo mines with and without the false-negative filters and counts how many planted copies
each configuration returns.
"""

from __future__ import annotations

import argparse
import time

import torch

from .cli import positive_int
from .ops.topk import topk_similarity


def make_corpus(n_docs: int, n_queries: int, dim: int, n_topics: int, dup_fraction: float, seed: int):
    """Returns (queries, corpus, positives (B, 1), topic labels of queries and docs, duplicate_of (N,))
    where duplicate_of[j] = id of the document j copies, or -1."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_topics, dim, generator=g), dim=1)
    doc_topic = torch.randint(0, n_topics, (n_docs,), generator=g)
    corpus = centres[doc_topic] + 0.6 * torch.randn(n_docs, dim, generator=g) / dim**0.5
    positives = torch.randperm(n_docs, generator=g)[:n_queries]
    queries = corpus[positives] + 0.5 * torch.randn(n_queries, dim, generator=g) / dim**0.5
    duplicate_of = torch.full((n_docs,), -1, dtype=torch.int64)
    n_dup = int(round(dup_fraction * n_queries))
    # Overwrite random non-positive documents with near-copies of the first n_dup positives.
    is_positive = torch.zeros(n_docs, dtype=torch.bool)
    is_positive[positives] = True
    free = torch.nonzero(~is_positive).squeeze(1)
    slots = free[torch.randperm(free.numel(), generator=g)[:n_dup]]
    src = positives[:n_dup]
    corpus[slots] = corpus[src] + 0.05 * torch.randn(n_dup, dim, generator=g) / dim**0.5
    doc_topic[slots] = doc_topic[src]
    duplicate_of[slots] = src
    return queries, corpus, positives.unsqueeze(1), doc_topic[positives], doc_topic, duplicate_of


def _filter_removals(queries, corpus, positives, relative_margin, query_topic, doc_topic):
    """How many (query, candidate) pairs each filter removes on its own (full matrix: the demo is small)."""
    s = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(corpus, dim=1).T
    p = s.gather(1, positives).squeeze(1)
    margin = s > (p - p.abs() * relative_margin).unsqueeze(1)
    margin.scatter_(1, positives, False)
    same_topic = query_topic.unsqueeze(1) == doc_topic.unsqueeze(0)
    return {
        "positives (P=1)": positives.numel(),
        f"relative_margin={relative_margin}": int(margin.sum()),
        "same-topic labels": int(same_topic.sum()),
    }


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    q, c, pos, q_topic, d_topic, dup_of = make_corpus(
        args.docs, args.queries, args.dim, args.topics, args.duplicates, args.seed)
    n_dup = int((dup_of >= 0).sum())
    print(f"hnsample demo: {args.docs:,} docs x {args.dim} dims in {args.topics} topics, {args.queries:,} queries,"
          f" {n_dup} planted near-duplicates of positives (false negatives)  [{time.perf_counter() - t0:.2f}s]\n")

    print("Candidates each filter removes on its own (of "
          f"{args.queries * args.docs:,} query-candidate pairs):")
    for name, count in _filter_removals(q, c, pos, args.relative_margin, q_topic, d_topic).items():
        print(f"  {name:<28}{count:>12,}")
    print()

    k = args.k
    configs = [
        ("positives excluded", dict()),
        (f"+ relative_margin={args.relative_margin}", dict(relative_margin=args.relative_margin)),
        ("+ margin, skip_top=5, pool=50, softmax", dict(relative_margin=args.relative_margin, skip_top=5, pool=50,
                                                        sampling="softmax", temperature=0.05, seed=args.seed)),
        ("+ other topics only (labels)", dict(relative_margin=args.relative_margin, query_labels=q_topic,
                                              candidate_labels=d_topic)),
    ]
    # The first custom-op call in a process pays torch's one-time dispatcher setup; keep it out of the timings.
    topk_similarity(q[:1], c[:1], 1)
    print(f"Mining k={k} negatives per query (metric=cosine):")
    print(f"  {'configuration':<42}{'planted dups mined':>20}{'rows short':>12}{'mean score':>12}{'ms':>8}")
    shown = None
    for name, kw in configs:
        t = time.perf_counter()
        res = topk_similarity(q, c, k, metric="cosine", positives=pos, **kw)
        ms = (time.perf_counter() - t) * 1e3
        idx = res.indices
        valid = idx >= 0
        mined_dup = (dup_of[idx.clamp_min(0)] == pos) & valid
        short = int((~valid).any(dim=1).sum())
        mean = float(res.scores[valid].mean()) if valid.any() else float("nan")
        print(f"  {name:<42}{int(mined_dup.any(dim=1).sum()):>12} / {n_dup:<6}{short:>12}{mean:>12.3f}{ms:>8.1f}")
        if shown is None:
            shown = (name, res)
    print()
    # Query 0's positive has a planted copy (copies are made of the first queries' positives).
    row = 0
    before = topk_similarity(q[row : row + 1], c, 5, metric="cosine", positives=pos[row : row + 1])
    after = topk_similarity(q[row : row + 1], c, 5, metric="cosine", positives=pos[row : row + 1],
                            relative_margin=args.relative_margin)
    ps = float(torch.nn.functional.cosine_similarity(q[row], c[int(pos[row])], dim=0))
    print(f"Query {row}: positive doc {int(pos[row])} (score {ps:.3f}); top-5 mined negatives")
    for label, res in (("without margin", before), ("with margin   ", after)):
        items = []
        for s, j in zip(res.scores[0].tolist(), res.indices[0].tolist(), strict=False):
            tag = "*DUP*" if j >= 0 and int(dup_of[j]) == int(pos[row]) else ""
            items.append(f"{j}{tag}:{s:.3f}")
        print(f"  {label}  " + "  ".join(items))
    print("\n*DUP* = a planted near-copy of the query's positive: a false negative the margin filter removes.")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--docs", type=positive_int, default=50_000, help="corpus size (default 50,000)")
    p.add_argument("--queries", type=positive_int, default=2_000, help="number of queries (default 2,000)")
    p.add_argument("--dim", type=positive_int, default=128, help="embedding dimension (default 128)")
    p.add_argument("--topics", type=positive_int, default=100, help="number of topic clusters (default 100)")
    p.add_argument("--duplicates", type=float, default=0.1, help="fraction of queries whose positive is duplicated")
    p.add_argument("-k", type=positive_int, default=8, help="negatives per query (default 8)")
    p.add_argument("--relative-margin", type=float, default=0.05, help="false-negative margin (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
