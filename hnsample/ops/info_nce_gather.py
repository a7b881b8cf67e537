"""InfoNCE across torch.distributed ranks (``gather=True``): every rank's docs serve as candidates for
the local queries, with gradients flowing back to each rank's own docs, and the symmetric loss's
per-column statistics merged over the queries of every rank."""

from __future__ import annotations

import math

import torch


def gather_docs(docs, positive_ids, doc_ids, doc_labels, guide_docs):
    """Concatenates the doc-side tensors of every rank (docs keep their gradient: the backward of
    all_gather sums each rank's contribution back to its owner) and shifts positive ids to the
    concatenated numbering."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("gather=True needs an initialized torch.distributed process group")
    from torch.distributed.nn.functional import all_gather as all_gather_with_grad

    world, rank = dist.get_world_size(), dist.get_rank()

    def plain(t):
        if t is None:
            return None
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=0)

    sizes = plain(torch.tensor([docs.shape[0]], device=docs.device))
    if bool((sizes != docs.shape[0]).any()):
        raise ValueError(f"gather=True needs the same number of docs on every rank, got {sizes.tolist()}")
    offset = rank * docs.shape[0]
    all_docs = torch.cat(all_gather_with_grad(docs.contiguous()), dim=0)
    positive_ids = torch.where(positive_ids >= 0, positive_ids + offset, positive_ids)
    return all_docs, positive_ids, plain(doc_ids), plain(doc_labels), plain(guide_docs)


class ColumnLogSumExpAcrossRanks(torch.autograd.Function):
    """C = log sum_r exp(C_r) over the ranks of the process group, elementwise (the per-column
    statistics of every rank's queries merged into those of all queries). Backward: the upstream
    gradient is summed over ranks (every rank's loss uses C) and scaled by dC/dC_r = exp(C_r - C)."""

    @staticmethod
    def forward(ctx, col):
        import torch.distributed as dist

        parts = [torch.empty_like(col) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, col.contiguous())
        merged = torch.logsumexp(torch.stack(parts), dim=0)
        ctx.save_for_backward(col, merged)
        return merged

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        col, merged = ctx.saved_tensors
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        share = torch.where(
            col == -math.inf, 0.0, torch.exp(col - torch.where(merged == -math.inf, 0.0, merged))
        )
        return total * share
