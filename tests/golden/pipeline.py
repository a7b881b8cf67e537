"""Golden entries of the pipelines built on the ops: mine_hard_negatives (tensors and .npy files),
DynamicNegativeMiner, NegativeQueue, batch_hard / semi_hard / triplet_margin_loss, mix_hard_negatives
and MoCHi."""

from __future__ import annotations

import numpy as np
import torch

import hnsample

from .corpus import Context, Data, Field, close, entry, exact, ids_tensor, tensor, tolerance_for
from .topk import ranked_ids, scale, score_matrix, sim_inputs

# ----------------------------------------------------------------------------------------------------
# mine_hard_negatives


def mined_fields(res: hnsample.MinedNegatives, prefix: str = "") -> dict[str, Field]:
    out = {f"{prefix}indices": exact(res.indices), f"{prefix}scores": exact(res.scores),
           f"{prefix}positive_scores": exact(res.positive_scores), f"{prefix}positives": exact(res.positives)}
    if res.filter_counts is not None:
        keys = list(res.filter_counts)
        out[f"{prefix}filter_count_names"] = exact(np.array(keys))
        out[f"{prefix}filter_counts"] = exact(np.array([res.filter_counts[k] for k in keys], dtype=np.int64))
    if res.eligible is not None:
        out[f"{prefix}eligible"] = exact(res.eligible)
    return out


QUIET = dict(device="cpu", progress=False, verbose=False)


def _mining_inputs(data: Data, metric: str, b: int = 11, n: int = 53):
    q, c = sim_inputs(data, b, n, metric)
    pos = data.ids(b, 3, n, pad=0.3)
    pos[:, 0] = ranked_ids(score_matrix(q, c, metric), 0.15)  # every row has a positive, most a strong one
    return q, c, pos


def _mining_entries() -> None:
    for qb, cs in ((None, None), (4, 7), (1, 100), (11, 1)):

        @entry(f"mine_hard_negatives/batches_q{qb}_c{cs}")
        def _(ctx: Context, qb=qb, cs=cs):
            # the same runs for every batching (inputs keyed by a shared name): all must agree
            d = Data("mine_hard_negatives/batches", ctx.data.tier)
            out = {}
            for metric in ("cosine", "dot"):
                q, c, pos = _mining_inputs(d, metric)
                b, n = q.shape[0], c.shape[0]
                exc = d.ids(b, 2, n)
                ql, cl = d.integers(0, 3, b), d.integers(0, 3, n)
                u = scale(metric)
                res = hnsample.mine_hard_negatives(
                    q, c, ids_tensor(pos), num_negatives=6, metric=metric, exclude=ids_tensor(exc),
                    query_labels=ids_tensor(ql), candidate_labels=ids_tensor(cl), absolute_margin=u / 4,
                    relative_margin=0.25, min_score=-2 * u, max_score=3 * u, skip_top=1, filter_statistics=True,
                    query_batch_size=qb, corpus_shard_size=cs, block_size=37, **QUIET)
                out |= mined_fields(res, f"{metric}_top_")
                res = hnsample.mine_hard_negatives(
                    q, c, ids_tensor(pos), num_negatives=4, metric=metric, sampling="softmax", temperature=u,
                    seed=2024, pool=15, filter_statistics=True, query_batch_size=qb, corpus_shard_size=cs,
                    **QUIET)
                out |= mined_fields(res, f"{metric}_softmax_")
            return out


_mining_entries()


@entry("mine_hard_negatives/npy_files")
def _(ctx: Context):
    d = ctx.data
    q, c, pos = _mining_inputs(d, "cosine")
    qp, cp = ctx.workdir / "queries.npy", ctx.workdir / "corpus.npy"
    np.save(qp, q.numpy())
    np.save(cp, c.numpy())
    ragged = [[int(j) for j in row if j >= 0] for row in pos]  # a list of lists
    out = {}
    kw = dict(num_negatives=5, absolute_margin=0.0, filter_statistics=True, **QUIET)
    out |= mined_fields(hnsample.mine_hard_negatives(str(qp), str(cp), ragged, **kw), "files_")
    out |= mined_fields(hnsample.mine_hard_negatives(q, c, ragged, **kw), "tensors_")
    out |= mined_fields(hnsample.mine_hard_negatives(
        qp, cp, ragged, query_batch_size=3, corpus_shard_size=8, sampling="uniform", seed=5, pool=9,
        num_negatives=4, **QUIET), "files_uniform_")
    out |= mined_fields(hnsample.mine_hard_negatives(q.numpy(), c.numpy(), pos, num_negatives=4, metric="dot",
                                                     **QUIET), "numpy_dot_")
    return out


@entry("mine_hard_negatives/options")
def _(ctx: Context):
    d = ctx.data
    q, c, pos = _mining_inputs(d, "dot", b=9, n=31)
    b = q.shape[0]
    ps = tensor(d.integers(-12, 12, b).astype(np.float64))
    out = {}
    out |= mined_fields(hnsample.mine_hard_negatives(q, c, ids_tensor(pos), num_negatives=5, metric="dot",
                                                     positive_scores=ps, absolute_margin=1.0,
                                                     filter_statistics=True, **QUIET), "positive_scores_")
    out |= mined_fields(hnsample.mine_hard_negatives(q, c, None, num_negatives=40, metric="dot",
                                                     filter_statistics=True, **QUIET), "no_positives_k_gt_n_")
    out |= mined_fields(hnsample.mine_hard_negatives(q, c, ids_tensor(pos), num_negatives=3, metric="dot",
                                                     sampling="uniform", generator=torch.Generator().manual_seed(3),
                                                     **QUIET), "generator_")
    out |= mined_fields(hnsample.mine_hard_negatives(q, c, ids_tensor(pos), num_negatives=3, metric="dot",
                                                     skip_top=40, filter_statistics=True, **QUIET), "skip_past_")
    return out


# ----------------------------------------------------------------------------------------------------
# DynamicNegativeMiner


def dynamic_fields(res: hnsample.DynamicNegatives, prefix: str) -> dict[str, Field]:
    return {f"{prefix}ids": exact(res.ids), f"{prefix}scores": exact(res.scores),
            f"{prefix}embeddings": exact(res.embeddings)}


@entry("dynamic_miner/tensor_dot")
def _(ctx: Context):
    d = ctx.data
    b, n = 7, 40
    q, docs = sim_inputs(d, b, n, "dot")
    labels = ids_tensor(d.integers(0, 3, n))
    pos, exc = ids_tensor(d.ids(b, 2, n)), ids_tensor(d.ids(b, 2, n))
    out = {}
    for chunk_rows in (1 << 16, 6):
        miner = hnsample.DynamicNegativeMiner(docs, metric="dot", document_labels=labels, chunk_rows=chunk_rows,
                                              block_size=11)
        out |= dynamic_fields(miner.mine(q, pos, 4, random=3, exclude=exc, seed=17), f"chunks{chunk_rows}_")
        out |= dynamic_fields(miner.mine(q, pos, 3, random=2, query_labels=ids_tensor(d.integers(0, 3, b)),
                                         absolute_margin=0.0, skip_top=1, seed=18), f"chunks{chunk_rows}_labels_")
    miner = hnsample.DynamicNegativeMiner(docs[:6], metric="dot")
    out |= dynamic_fields(miner.mine(q, pos.clamp_max(5), 2, random=10, seed=19), "few_documents_")
    out |= dynamic_fields(miner.mine(q, None, 3, sampling="softmax", temperature=4.0,
                                     generator=torch.Generator().manual_seed(20), random=1), "softmax_generator_")
    return out


@entry("dynamic_miner/npy_cosine")
def _(ctx: Context):
    d = ctx.data
    b, n = 6, 33
    q, docs = sim_inputs(d, b, n, "cosine")
    path = ctx.workdir / "documents.npy"
    np.save(path, docs.numpy())
    pos = ids_tensor(d.ids(b, 2, n))
    miner = hnsample.DynamicNegativeMiner(path, metric="cosine", chunk_rows=8)
    out = dynamic_fields(miner.mine(q, pos, 5, random=2, relative_margin=0.0, seed=3), "file_")
    out |= dynamic_fields(miner.mine(q.to(torch.float64), pos, 3, random=1, pool=6, sampling="uniform", seed=4),
                          "file_f64_")
    tensor_miner = hnsample.DynamicNegativeMiner(docs, metric="cosine")
    out |= dynamic_fields(tensor_miner.mine(q, pos, 5, random=2, relative_margin=0.0, seed=3), "tensor_")
    return out


# ----------------------------------------------------------------------------------------------------
# NegativeQueue


def queue_fields(res: hnsample.QueueNegatives, prefix: str) -> dict[str, Field]:
    return {f"{prefix}{name}": exact(getattr(res, name)) for name in res._fields}


@entry("negative_queue/labels_dot")
def _(ctx: Context):
    d = ctx.data
    queue = hnsample.NegativeQueue(12, 8, with_labels=True)
    out = {}
    for step, rows in enumerate((5, 5, 4, 15)):  # wraps around, then one batch larger than the capacity
        e, _ = sim_inputs(d, rows, 1, "dot", d=8)
        queue.enqueue(e, ids=ids_tensor(d.integers(0, 9, rows)), labels=ids_tensor(d.integers(0, 2, rows)))
        if step == 1:
            out |= {f"after2_{k}": exact(v) for k, v in queue.state_dict().items()}
    out |= {f"state_{k}": exact(v) for k, v in queue.state_dict().items()}
    q, _ = sim_inputs(d, 5, 1, "dot", d=8)
    q.requires_grad_(True)
    qids = ids_tensor(d.ids(5, 2, 9))
    res = queue.mine(q, 4, query_ids=qids, query_labels=ids_tensor(d.integers(0, 2, 5)))
    (g,) = torch.autograd.grad(res.scores, (q,), grad_outputs=tensor(d.integers(-2, 2, (5, 4)).astype(np.float64)))
    out |= queue_fields(res, "labels_") | {"labels_grad_queries": exact(g)}
    out |= queue_fields(queue.mine(q, 6, query_ids=qids[:, 0].clone(), exclude=torch.tensor([[0], [1], [-1], [2], [3]]),
                                   positive_scores=torch.full((5,), 2.0), absolute_margin=0.0), "filters_")
    return out


@entry("negative_queue/cosine_sampling")
def _(ctx: Context):
    d = ctx.data
    queue = hnsample.NegativeQueue(16, 16, dtype=torch.float64)
    out = {}
    e, _ = sim_inputs(d, 10, 1, "cosine")
    queue.enqueue(e.to(torch.float32))  # ids default to -1
    q, _ = sim_inputs(d, 4, 1, "cosine", torch.float64)
    out |= queue_fields(queue.mine(q, 5, metric="cosine", query_ids=torch.tensor([-1, 0, 1, 2])), "partial_")
    out |= queue_fields(queue.mine(q, 3, metric="cosine", sampling="uniform", seed=8), "uniform_")
    empty = hnsample.NegativeQueue(4, 16)
    out |= queue_fields(empty.mine(q.to(torch.float32), 2), "empty_")
    return out


# ----------------------------------------------------------------------------------------------------
# Miners and the triplet loss (float64: the loss's mean/sqrt/normalization rounding is libm- and
# order-dependent, so losses and gradients are compared with the float64 tolerance)


def _miner_batch(data: Data, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    e, _ = sim_inputs(data, 16, 1, "cosine" if metric == "cosine" else "dot", torch.float64, d=16)
    e[5] = e[2]  # duplicates: ties between positives and negatives
    e[9] = e[2]
    labels = ids_tensor(data.integers(0, 3, 16))
    labels[15] = 7  # a singleton label: no positive, the anchor is dropped
    return e, labels


def triplet_fields(t: hnsample.Triplets, prefix: str) -> dict[str, Field]:
    return {f"{prefix}anchors": exact(t.anchors), f"{prefix}positives": exact(t.positives),
            f"{prefix}negatives": exact(t.negatives)}


def _miner_entries() -> None:
    for metric in ("cosine", "dot", "euclidean"):

        @entry(f"miners/{metric}")
        def _(ctx: Context, metric=metric):
            e, labels = _miner_batch(ctx.data, metric)
            u = 0.5 if metric == "cosine" else 4.0
            tol = tolerance_for(torch.float64)
            out = {}
            hard = hnsample.batch_hard(e, labels, metric=metric)
            out |= triplet_fields(hard, "batch_hard_")
            mined = {"batch_hard": hard}
            for per_pair in (1, 3, None):
                t = hnsample.semi_hard(e, labels, u, metric=metric, negatives_per_pair=per_pair)
                out |= triplet_fields(t, f"semi_hard_{per_pair}_")
                mined[f"semi_hard_{per_pair}"] = t
            for name, t in mined.items():
                for reduction in ("mean", "mean_nonzero", "sum", "none"):
                    x = e.clone().requires_grad_(True)
                    loss = hnsample.triplet_margin_loss(x, t, u / 2, metric=metric, reduction=reduction)
                    (g,) = torch.autograd.grad(loss.sum(), (x,))
                    out[f"loss_{name}_{reduction}"] = close(loss, *tol)
                    out[f"grad_{name}_{reduction}"] = close(g, *tol)
            return out


_miner_entries()


# ----------------------------------------------------------------------------------------------------
# Hard negative mixing


def mixed_fields(res: hnsample.MixedNegatives, prefix: str, dtype: torch.dtype) -> dict[str, Field]:
    # first/second/weight are exact (ids and torch's CPU draws); the embeddings are normalized mixtures
    return {f"{prefix}embeddings": close(res.embeddings, *tolerance_for(dtype)), f"{prefix}first": exact(res.first),
            f"{prefix}second": exact(res.second), f"{prefix}weight": exact(res.weight)}


@entry("mixing/mix_hard_negatives")
def _(ctx: Context):
    d = ctx.data
    out = {}
    for dtype, tag in ((torch.float32, "f32"), (torch.float64, "f64")):
        q, neg = sim_inputs(d, 5, 12, "cosine", dtype)
        out |= mixed_fields(hnsample.mix_hard_negatives(q, neg, 4, 6, 2, seed=3), f"shared_{tag}_", dtype)
        qd, negd = sim_inputs(d, 5, 12, "dot", dtype)
        # per-query negatives: pairs repeated three times (ties), nudged by small integers
        nudge = tensor(d.dot_rows(5 * 6, 16, -1, 1), dtype).reshape(5, 6, 16)
        per_query = negd[:10].reshape(5, 2, 16).repeat(1, 3, 1) + nudge
        out |= mixed_fields(hnsample.mix_hard_negatives(qd, per_query, 3, 4, 1, metric="dot",
                                                        generator=torch.Generator().manual_seed(4)),
                            f"per_query_dot_{tag}_", dtype)
        out |= mixed_fields(hnsample.mix_hard_negatives(q, neg, 1, 3, 0, seed=5), f"one_hard_{tag}_", dtype)
    return out


@entry("mixing/mochi")
def _(ctx: Context):
    d = ctx.data
    q, neg = sim_inputs(d, 4, 10, "cosine")
    pos, _ = sim_inputs(d, 4, 1, "cosine")
    mochi = hnsample.MoCHi(3, 4, 2, seed=11)
    tol = tolerance_for(torch.float32)
    out = {}
    out |= mixed_fields(mochi(q, neg), "call1_", torch.float32)
    state = mochi.state_dict()
    out |= mixed_fields(mochi(q, neg), "call2_", torch.float32)  # the generator moved on
    mochi.load_state_dict(state)
    out |= mixed_fields(mochi(q, neg), "call2_replayed_", torch.float32)
    qg = q.clone().requires_grad_(True)
    logits = mochi.logits(qg, pos, neg, temperature=0.1)
    (g,) = torch.autograd.grad(logits, (qg,), grad_outputs=tensor(d.integers(-1, 1, tuple(logits.shape)).astype(np.float64)))
    out |= {"logits": close(logits, *tol), "logits_grad_query": close(g, *tol)}
    return out
