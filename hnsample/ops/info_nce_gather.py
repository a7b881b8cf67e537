"""InfoNCE across torch.distributed ranks (``gather=True``): every rank's docs serve as candidates for
the local queries, with gradients flowing back to each rank's own docs, and the symmetric loss's
per-column statistics merged over the queries of every rank."""

from __future__ import annotations

import math

import torch


def gather_with_grad(tensors: list[torch.Tensor], what: str) -> tuple[list[torch.Tensor], int]:
    """Each tensor concatenated over the ranks in rank order, keeping its gradient (the backward of
    all_gather sums each rank's contribution back to its owner), and this rank's row offset in them.
    Every rank must pass the same number of rows (checked once, on the first tensor; `what` names them)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("gather=True needs an initialized torch.distributed process group")
    from torch.distributed.nn.functional import all_gather as all_gather_with_grad

    rows = tensors[0].shape[0]
    sizes = _plain(torch.tensor([rows], device=tensors[0].device))
    if bool((sizes != rows).any()):
        raise ValueError(f"gather=True needs the same number of {what} on every rank, got {sizes.tolist()}")
    gathered = [torch.cat(all_gather_with_grad(t.contiguous()), dim=0) for t in tensors]
    return gathered, dist.get_rank() * rows


def _plain(t: torch.Tensor | None) -> torch.Tensor | None:
    """t concatenated over the ranks, without gradient."""
    if t is None:
        return None
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def gather_docs(docs, positive_ids, doc_ids, doc_labels, guide_docs):
    """Concatenates the doc-side tensors of every rank (docs keep their gradient) and shifts positive ids
    to the concatenated numbering."""
    (all_docs,), offset = gather_with_grad([docs], "docs")
    positive_ids = torch.where(positive_ids >= 0, positive_ids + offset, positive_ids)
    return all_docs, positive_ids, _plain(doc_ids), _plain(doc_labels), _plain(guide_docs)


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
