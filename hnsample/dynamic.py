"""Re-mining hard negatives every training step against a fixed document index (ADORE, STAR): the
document embeddings stay fixed, the query encoder moves, and each batch's negatives come from the
current queries."""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch

from ._ext import as_tensor, check_int, check_labels
from .engine import SelectionState, backend_for, build_selection, selection_pair_scores

__all__ = ["DynamicNegativeMiner", "DynamicNegatives"]

_FILTER_DEFAULTS: dict[str, Any] = {
    "positive_scores": None, "absolute_margin": None, "relative_margin": None, "min_score": None,
    "max_score": None, "skip_top": 0, "pool": None, "sampling": "top", "temperature": 1.0,
}


def _host_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing a (possibly read-only, memory-mapped) array's memory; it is only ever read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(a))


class DynamicNegatives(NamedTuple):
    """Per query: k hard negatives (columns [0, k), best first) then r random ones (columns [k, k + r)).

    ids: (B, k + r) int64 document ids, -1 for padding (fewer eligible documents than asked).
    embeddings: (B, k + r, d) document embeddings in the queries' dtype and device (zeros for padding).
    scores: (B, k + r) detached similarities (float32; float64 for float64 queries), -inf for padding.

    Mask padded entries (ids == -1) before using ``embeddings`` as negatives in a loss.
    """

    ids: torch.Tensor
    embeddings: torch.Tensor
    scores: torch.Tensor


class DynamicNegativeMiner:
    """Holds a fixed document index and mines each batch's negatives from it.

    Args:
        documents: (N, d) float embeddings: a torch tensor (any device), a numpy array, or the path of a
            ``.npy`` file, which is memory-mapped (read-only) and streamed in chunks of ``chunk_rows``.
        metric: "dot" (the default, as in :func:`hnsample.topk_similarity`) or "cosine". Note:
            ``mine_hard_negatives``, the miners and the samplers default to "cosine".
        device: where scores are computed (default: the tensor's device, else the CPU). Documents that
            are not already there are copied a chunk at a time, so a memory-mapped index larger than
            device memory works.
        document_labels: (N,) int64 labels, for ``query_labels`` filtering.
        chunk_rows: documents per streamed chunk; block_size: as in ``topk_similarity``.

    Memory per :meth:`mine`: one chunk plus one score block, never (B, N); results are exact (the
    selection state is carried across chunks).
    """

    def __init__(self, documents: Any, *, metric: str = "dot", device: torch.device | str | None = None,
                 document_labels: Any = None, chunk_rows: int = 1 << 16, block_size: int | None = None):
        if isinstance(documents, (str, os.PathLike)):
            documents = np.load(os.fspath(documents), mmap_mode="r")
        if isinstance(documents, np.ndarray):
            if documents.dtype not in (np.float16, np.float32, np.float64):
                raise TypeError(f"documents must be float16, float32 or float64, got {documents.dtype}")
            self._host: np.ndarray | None = documents
            self._tensor: torch.Tensor | None = None
            home = torch.device("cpu")
        elif isinstance(documents, torch.Tensor):
            if not documents.is_floating_point():
                raise TypeError(f"documents must be a float tensor, got {documents.dtype}")
            self._host, self._tensor = None, documents.detach()
            home = documents.device
        else:
            raise TypeError(f"documents must be a torch.Tensor, numpy.ndarray or .npy path, got "
                            f"{type(documents).__name__}")
        if documents.ndim != 2:
            raise ValueError(f"documents must have shape (N, d), got {tuple(documents.shape)}")
        if metric not in ("dot", "cosine"):
            raise ValueError(f"metric must be 'dot' or 'cosine', got {metric!r}")
        self.metric = metric
        self.num_documents, self.dim = int(documents.shape[0]), int(documents.shape[1])
        self.device = torch.device(device) if device is not None else home
        self.chunk_rows = check_int("chunk_rows", chunk_rows, 1)
        self.block_size = (1 << 24) if block_size is None else check_int("block_size", block_size, 1)
        self.labels = None
        if document_labels is not None:
            lab = as_tensor("document_labels", document_labels)
            self.labels = check_labels("document_labels", lab, self.num_documents, lab.device).to(self.device)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Document rows for a 1-D id tensor (ids >= 0), on self.device in the stored dtype."""
        if self._tensor is not None:
            return self._tensor[ids.to(self._tensor.device)].to(self.device)
        return _host_tensor(self._host[ids.cpu().numpy()]).to(self.device)

    def _chunks(self, ct: torch.dtype):
        """(offset, (n_c, d) tensor on self.device in ct) over the index: the stored tensor itself when it is
        there in ct already, else converted a chunk at a time (a float16 / bfloat16 index for float32
        queries too: the kernels read queries and candidates in one dtype)."""
        t = self._tensor
        if t is not None and t.device == self.device and t.dtype == ct:
            yield 0, self._tensor
            return
        for j0 in range(0, self.num_documents, self.chunk_rows):
            j1 = min(self.num_documents, j0 + self.chunk_rows)
            if self._tensor is not None:
                chunk = self._tensor[j0:j1]
            else:
                chunk = _host_tensor(self._host[j0:j1])
            yield j0, chunk.to(self.device, ct)

    @torch.no_grad()
    def mine(self, query_embeddings: Any, positives: Any, k: int, *, random: int = 0, exclude: Any = None,
             query_labels: Any = None, generator: torch.Generator | None = None, seed: int | None = None,
             **filters: Any) -> DynamicNegatives:
        """k hard and ``random`` random negatives per query.

        Hard: exactly ``topk_similarity(queries, documents, k, positives=positives, exclude=exclude,
        query_labels=query_labels, candidate_labels=document_labels, **filters)`` (filters: margins with
        positive_scores, min/max_score, skip_top, pool, sampling, temperature).

        Random: ``random`` distinct documents per query drawn uniformly without replacement from those
        that are not a positive, not excluded, not among the row's hard negatives and (with labels) not
        of the query's label. Score filters do not apply to them: they are meant to be the easy
        negatives of ADORE/STAR's mix. Fewer eligible documents than asked pads with -1.

        Randomness comes from ``seed`` (``torch.Generator().manual_seed(seed)``) or ``generator`` (a CPU
        generator; torch's default when None), drawn on the CPU, so it does not depend on the device.
        """
        q_in = as_tensor("query_embeddings", query_embeddings)
        if q_in.ndim != 2 or q_in.shape[1] != self.dim:
            raise ValueError(f"query_embeddings must have shape (B, {self.dim}), got {tuple(q_in.shape)}")
        if not q_in.is_floating_point():
            raise TypeError(f"query_embeddings must be a float tensor, got {q_in.dtype}")
        unknown = set(filters) - set(_FILTER_DEFAULTS)
        if unknown:
            raise TypeError(f"mine() got unexpected keyword arguments {sorted(unknown)}")
        r = check_int("random", random, 0)
        if seed is not None:
            generator = torch.Generator().manual_seed(check_int("seed", seed) % (1 << 63))
        elif generator is not None and (not isinstance(generator, torch.Generator)
                                        or generator.device.type != "cpu"):
            raise TypeError("generator must be a CPU torch.Generator or None")
        opts = {**_FILTER_DEFAULTS, **filters}
        ct = torch.float64 if q_in.dtype == torch.float64 else torch.float32
        q = q_in.detach().to(self.device, ct)  # exact for 16-bit inputs: the scores are the same
        b = q.shape[0]
        if query_labels is not None:
            if self.labels is None:
                raise ValueError("query_labels needs document_labels")
            query_labels = as_tensor("query_labels", query_labels).to(self.device)
        positives = None if positives is None else as_tensor("positives", positives).to(self.device)
        exclude = None if exclude is None else as_tensor("exclude", exclude).to(self.device)

        def positive_values(pos: torch.Tensor) -> torch.Tensor:
            return selection_pair_scores(q, self._rows, pos, self.metric)

        sel = build_selection(
            b, self.num_documents, self.device, k, positives=positives, exclude=exclude,
            query_labels=query_labels, candidate_labels=self.labels if query_labels is not None else None,
            generator=generator, seed=seed, positive_values=positive_values, **opts,
        )
        state = SelectionState(sel, b, self.device)
        backend = backend_for(self.device)
        for j0, chunk in self._chunks(ct):
            backend.select(q, chunk, state, self.metric, self.block_size, col_offset=j0)
        hard_scores, hard_ids = state.finalize()

        banned = [t for t in (sel.banned, hard_ids) if t is not None]
        rand_ids = self._draw_random(b, r, torch.cat(banned, dim=1).cpu(),
                                     None if sel.query_labels is None else sel.query_labels.cpu(), generator)
        ids = torch.cat([hard_ids, rand_ids.to(self.device)], dim=1)
        valid = ids >= 0
        emb = torch.zeros((b, ids.shape[1], self.dim), dtype=q_in.dtype, device=self.device)
        if bool(valid.any()):
            emb[valid] = self._rows(ids[valid]).to(q_in.dtype)
        rand_valid = valid[:, hard_ids.shape[1]:]
        rand_ids_dev = rand_ids.to(self.device)
        rand_scores = selection_pair_scores(q, self._rows, rand_ids_dev.clamp_min(0), self.metric).to(ct)
        rand_scores = torch.where(rand_valid, rand_scores, torch.full_like(rand_scores, -math.inf))
        scores = torch.cat([hard_scores.to(ct), rand_scores], dim=1)
        out = q_in.device
        return DynamicNegatives(ids.to(out), emb.to(out), scores.to(out))

    def _draw_random(self, b: int, r: int, banned: torch.Tensor, query_labels: torch.Tensor | None,
                     generator: torch.Generator | None) -> torch.Tensor:
        """(b, r) uniform draws without replacement from each row's eligible documents (-1 padded).

        Rounds of 2r + 16 draws per row keep the first eligible, not yet drawn ids (rejection sampling:
        each kept id is uniform over the eligible ones not yet kept); rows still short after 8 rounds
        (only when few documents are eligible) enumerate their eligible set instead.
        """
        n = self.num_documents
        out = torch.full((b, r), -1, dtype=torch.int64)
        if r == 0 or n == 0 or b == 0:
            return out
        labels = None if query_labels is None else self.labels.cpu()
        filled = torch.zeros(b, dtype=torch.int64)
        m = 2 * r + 16
        for _ in range(8):
            need = filled < r
            if not bool(need.any()):
                break
            cand = torch.randint(0, n, (b, m), generator=generator)
            taken = torch.cat([banned, out], dim=1)
            ok = ~(cand.unsqueeze(-1) == taken.unsqueeze(1)).any(-1)
            srt, perm = torch.sort(cand, dim=1, stable=True)
            dup_sorted = torch.zeros_like(srt, dtype=torch.bool)
            dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
            ok &= ~torch.zeros_like(dup_sorted).scatter_(1, perm, dup_sorted)
            if labels is not None:
                ok &= labels[cand] != query_labels.unsqueeze(1)
            ok &= need.unsqueeze(1)
            rank = ok.cumsum(1)
            take = ok & (rank <= (r - filled).unsqueeze(1))
            rows, cols = take.nonzero(as_tuple=True)
            out[rows, filled[rows] + rank[rows, cols] - 1] = cand[rows, cols]
            filled += take.sum(1)
        for i in (filled < r).nonzero(as_tuple=True)[0].tolist():
            mask = torch.ones(n, dtype=torch.bool)
            row_banned = torch.cat([banned[i], out[i]])
            mask[row_banned[row_banned >= 0]] = False
            if labels is not None:
                mask &= labels != query_labels[i]
            eligible = mask.nonzero(as_tuple=True)[0]
            extra = eligible[torch.randperm(eligible.numel(), generator=generator)[: r - int(filled[i])]]
            out[i, int(filled[i]) : int(filled[i]) + extra.numel()] = extra
        return out
