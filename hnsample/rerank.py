"""Denoising with a reranker: hard negatives chosen by a cross-encoder's scores of a bi-encoder's exact
shortlist, and selection from any per-row candidate lists a reranker scored.

:func:`rerank_hard_negatives` takes the exact top C candidates of each query by the bi-encoder (positives
and excluded ids never among them), has the cross-encoder score every (query, candidate) pair and every
(query, positive) pair in batches, measures the margins from the cross-encoder's positive scores, and
selects with :func:`hnsample.topk_from_candidates`. A query that comes up short gets the next candidates
(the top 2C, 4C, ... by the bi-encoder, only the new ones scored) until it is full, the corpus is
exhausted or ``max_candidates`` is reached. :func:`select_from_candidate_lists` is the selection alone,
for scores a user's reranker wrote to a file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .engine import SelectionState, build_selection, draw_seed
from .mining import FILTERS, MinedNegatives, check_margin_rows, mine_hard_negatives
from .mining_io import positives_tensor
from .ops.candidates import count_candidate_filters, listed_positions, topk_from_candidates

SCORE_CHUNK = 4096  # (query, text) pairs per call of the reranker, between progress updates


def score_pairs(cross_encoder: Any, pairs: Sequence[tuple[str, str]], *, batch_size: int = 32, pool: Any = None,
                progress: bool = True, desc: str = "Rescoring with the cross-encoder") -> np.ndarray:
    """One float32 score per (query, text) pair: ``cross_encoder.predict(pairs, batch_size=...)`` for a
    sentence-transformers CrossEncoder (or anything with ``predict``), else ``cross_encoder(pairs)``,
    called on chunks of :data:`SCORE_CHUNK` pairs under a progress bar. ValueError unless it returns one
    number per pair."""
    out = np.empty(len(pairs), dtype=np.float32)
    bar = None
    if progress and len(pairs):
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pairs), unit="pair", desc=desc, dynamic_ncols=True)
        except ImportError:
            bar = None
    try:
        for start in range(0, len(pairs), SCORE_CHUNK):
            chunk = list(pairs[start:start + SCORE_CHUNK])
            if hasattr(cross_encoder, "predict"):
                extra = {} if pool is None else {"pool": pool}
                got = cross_encoder.predict(chunk, batch_size=batch_size, convert_to_numpy=True,
                                            show_progress_bar=False, **extra)
            elif callable(cross_encoder):
                got = cross_encoder(chunk)
            else:
                raise TypeError(f"cross_encoder must be a CrossEncoder (with predict) or a callable pairs -> scores, "
                                f"got {type(cross_encoder).__name__}")
            if isinstance(got, torch.Tensor):
                got = got.detach().to(torch.float32).cpu().numpy()
            got = np.asarray(got, dtype=np.float32)
            if got.ndim == 2 and got.shape[1] == 1:
                got = got[:, 0]
            if got.shape != (len(chunk),):
                raise ValueError(f"cross_encoder must return one score per pair, shape ({len(chunk)},), got "
                                 f"{got.shape} (a model with several labels needs a head with one)")
            out[start:start + len(chunk)] = got
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return out


def _pair_matrix(positives: torch.Tensor, queries: Sequence[str], corpus: Sequence[str], scorer) -> torch.Tensor:
    """(B, P) float32 scores of the valid (query, positive) pairs by `scorer`, NaN at padding."""
    rows, cols = torch.nonzero(positives >= 0, as_tuple=True)
    out = torch.full(positives.shape, math.nan, dtype=torch.float32)
    if rows.numel():
        vals = scorer([(queries[i], corpus[j]) for i, j in zip(rows.tolist(), positives[rows, cols].tolist(),
                                                                  strict=True)])
        out[rows, cols] = torch.from_numpy(vals)
    return out


def _row_minimum(pair: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """p_i: the minimum pair score over the row's valid positives (NaN if one is NaN or there is none)."""
    valid = positives >= 0
    p = torch.where(valid, pair, torch.full_like(pair, math.inf)).amin(dim=1) if pair.shape[1] else \
        torch.full((pair.shape[0],), math.nan)
    p = torch.where((pair.isnan() & valid).any(dim=1) | ~valid.any(dim=1), torch.full_like(p, math.nan), p)
    return p


def select_from_candidate_lists(
    candidate_ids: torch.Tensor, scores: torch.Tensor, positives: Any, *, num_negatives: int, num_corpus: int,
    exclude: Any = None, positive_scores: torch.Tensor | None = None, positive_pair_scores: torch.Tensor | None = None,
    absolute_margin: float | None = None, relative_margin: float | None = None, min_score: float | None = None,
    max_score: float | None = None, skip_top: int = 0, pool: int | None = None, sampling: str = "top",
    temperature: float = 1.0, seed: int | None = None, filter_statistics: bool = False,
    params: dict[str, Any] | None = None,
) -> MinedNegatives:
    """The negatives :func:`hnsample.topk_from_candidates` selects from per-row candidate lists, as a
    :class:`MinedNegatives`. p_i: ``positive_scores`` if given, else the minimum of
    ``positive_pair_scores`` over the row's positives, else the lists' scores of the positives (see
    topk_from_candidates). ``filter_statistics`` counts, over the listed candidates (not the corpus),
    what each filter removed."""
    b = candidate_ids.shape[0]
    pos = positives_tensor("positives", positives, b, num_corpus)
    exc = positives_tensor("exclude", exclude, b, num_corpus)
    if positive_scores is None and positive_pair_scores is not None and pos is not None:
        positive_scores = _row_minimum(positive_pair_scores, pos)
    check_margin_rows(absolute_margin, relative_margin, pos, positive_scores)
    kw = dict(positives=pos, exclude=exc, positive_scores=positive_scores, absolute_margin=absolute_margin,
              relative_margin=relative_margin, min_score=min_score, max_score=max_score, skip_top=skip_top,
              pool=pool, sampling=sampling, temperature=temperature, seed=seed)
    out = topk_from_candidates(candidate_ids, scores, num_negatives, num_candidates=num_corpus, **kw)
    if positive_scores is None and pos is not None and pos.shape[1]:
        cols, found = listed_positions(candidate_ids, pos)
        pair = torch.where(found, scores.gather(1, cols).to(torch.float32), torch.tensor(math.nan))
        positive_pair_scores = pair if positive_pair_scores is None else positive_pair_scores
        positive_scores = _row_minimum(pair, pos)
    width = 0 if pos is None else pos.shape[1]
    result = MinedNegatives(
        indices=out.indices, scores=out.scores.to(torch.float32),
        positive_scores=(positive_scores.to(torch.float32) if positive_scores is not None
                         else torch.full((b,), math.nan)),
        positives=pos if pos is not None else torch.empty((b, 0), dtype=torch.int64),
        positive_pair_scores=(positive_pair_scores if positive_pair_scores is not None
                              else torch.full((b, width), math.nan)),
        params=dict(params or {}, num_negatives=num_negatives, num_corpus=num_corpus, num_queries=b,
                    absolute_margin=absolute_margin, relative_margin=relative_margin, min_score=min_score,
                    max_score=max_score, skip_top=skip_top, pool=pool, sampling=sampling,
                    temperature=temperature if sampling == "softmax" else None, seed=seed),
    )
    if filter_statistics:
        _count_listed(result, candidate_ids, scores, pos, exc, kw, num_corpus)
    return result


def _count_listed(result: MinedNegatives, ids: torch.Tensor, scores: torch.Tensor, pos: torch.Tensor | None,
                  exc: torch.Tensor | None, kw: dict[str, Any], n: int) -> None:
    """result.filter_counts over the listed candidates, by the kernels' rule; banned ids split into
    positives and exclude (an id in both counts as a positive)."""
    b = ids.shape[0]
    sel = build_selection(b, n, ids.device, result.num_negatives, **{**kw, "seed": kw["seed"] or 0},
                          positive_values=lambda p: scores.gather(1, listed_positions(ids, p)[0]))
    state = SelectionState(sel, b, ids.device)
    counts = torch.zeros((b, 6), dtype=torch.int64)
    count_candidate_filters(state, ids, scores, 0, n, counts)
    listed_positive = torch.zeros(b, dtype=torch.int64)
    if pos is not None and pos.shape[1]:
        listed_positive = listed_positions(ids, pos)[1].sum(dim=1)
    table = torch.cat([listed_positive[:, None], (counts[:, 0] - listed_positive)[:, None], counts[:, 1:]], dim=1)
    listed = (ids >= 0).sum(dim=1)
    eligible = listed - table.sum(dim=1)
    result.eligible = eligible
    result.filter_counts = {name: int(table[:, i].sum()) for i, name in enumerate(FILTERS)}
    result.filter_counts["eligible"] = int(eligible.sum())
    result.filter_counts["skip_top"] = int(eligible.clamp(max=int(kw["skip_top"])).sum())
    result.params["filter_statistics"] = "listed candidates"
    result.params["num_listed"] = int(listed.sum())


def rerank_hard_negatives(
    query_embeddings: Any, corpus_embeddings: Any, queries: Sequence[str], corpus: Sequence[str],
    positives: list[list[int]], cross_encoder: Any, *, num_negatives: int, num_candidates: int,
    exclude: list[list[int]] | None = None, include_positives: bool = False,
    positive_pair_scores: torch.Tensor | None = None, absolute_margin: float | None = None,
    relative_margin: float | None = None, min_score: float | None = None, max_score: float | None = None,
    skip_top: int = 0, pool: int | None = None, sampling: str = "top", temperature: float = 1.0,
    seed: int | None = None, max_candidates: int | None = None, batch_size: int = 32, process_pool: Any = None,
    device: Any = "auto", progress: bool = True, query_batch_size: int | None = None,
) -> MinedNegatives:
    """Hard negatives by a cross-encoder's scores (see the module docstring). ``positives`` are corpus
    rows per query; with ``include_positives`` they are candidates like any other (and ``exclude`` still
    applies). Embeddings are compared by dot product (pass L2-normalized ones for cosine).
    ``positive_pair_scores`` (B, P) skips scoring the (query, positive) pairs when the caller has them.
    Returns the cross-encoder's scores in ``scores``, ``positive_pair_scores`` and ``positive_scores``
    (p_i, their row minimum, the margins' reference); ``params["rescored_candidates"]`` counts the pairs
    scored."""
    b, n = len(queries), len(corpus)
    pos = positives_tensor("positives", positives, b, n)
    pos = pos if pos is not None else torch.empty((b, 0), dtype=torch.int64)
    exc = positives_tensor("exclude", exclude, b, n)
    limit = n if max_candidates is None else min(n, max_candidates)
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")

    def scorer(pairs):
        return score_pairs(cross_encoder, pairs, batch_size=batch_size, pool=process_pool, progress=progress)

    run_seed = 0 if sampling == "top" else draw_seed(seed, None)  # one seed for every round
    pair = positive_pair_scores if positive_pair_scores is not None else _pair_matrix(pos, queries, corpus, scorer)
    p = _row_minimum(pair, pos)
    banned = None if include_positives else pos
    ids = torch.full((b, 0), -1, dtype=torch.int64)
    scores = torch.full((b, 0), math.nan, dtype=torch.float32)
    active = torch.arange(b)
    width, rescored, rounds = min(num_candidates, limit), 0, 0
    while active.numel():
        rounds += 1
        found = mine_hard_negatives(
            torch.as_tensor(np.asarray(query_embeddings[active.numpy()])), corpus_embeddings,
            None if banned is None else banned[active], num_negatives=width,
            exclude=None if exc is None else exc[active], metric="dot", device=device, progress=False,
            verbose=False, query_batch_size=query_batch_size).indices
        old = ids.shape[1]
        if width > old:
            ids = torch.cat([ids, torch.full((b, width - old), -1, dtype=torch.int64)], dim=1)
            scores = torch.cat([scores, torch.full((b, width - old), math.nan, dtype=torch.float32)], dim=1)
        new = found[:, old:]
        rows, cols = torch.nonzero(new >= 0, as_tuple=True)
        vals = scorer([(queries[int(active[r])], corpus[j]) for r, j in zip(rows.tolist(), new[rows, cols].tolist(),
                                                                           strict=True)])
        rescored += rows.numel()
        ids[active, old:] = new
        scores[active[rows], old + cols] = torch.from_numpy(vals)
        result = topk_from_candidates(ids, scores, num_negatives, num_candidates=n, positives=banned, exclude=exc,
                                      positive_scores=p, absolute_margin=absolute_margin,
                                      relative_margin=relative_margin, min_score=min_score, max_score=max_score,
                                      skip_top=skip_top, pool=pool, sampling=sampling, temperature=temperature,
                                      seed=run_seed)
        short = (result.indices < 0).any(dim=1)
        exhausted = (found < 0).any(dim=1)  # the bi-encoder listed every candidate this query has
        keep = short[active] & ~exhausted
        if width >= limit:
            keep[:] = False
        active = active[keep]
        width = min(2 * width, limit)
    return MinedNegatives(
        indices=result.indices, scores=result.scores.to(torch.float32), positive_scores=p.to(torch.float32),
        positives=pos, positive_pair_scores=pair,
        params=dict(num_negatives=num_negatives, num_corpus=n, num_queries=b, metric="cross-encoder",
                    absolute_margin=absolute_margin, relative_margin=relative_margin, min_score=min_score,
                    max_score=max_score, skip_top=skip_top, pool=pool, sampling=sampling,
                    temperature=temperature if sampling == "softmax" else None,
                    seed=None if sampling == "top" else run_seed, num_candidates=num_candidates,
                    rescored_candidates=rescored, rescoring_rounds=rounds),
    )

