"""A drop-in for ``sentence_transformers.util.mine_hard_negatives``::

    from hnsample.sentence_transformers import mine_hard_negatives   # instead of sentence_transformers.util

Same signature, same meaning, the same ``datasets.Dataset`` back. Where sentence-transformers' candidate
window covers the whole corpus (``range_max + max positives per query + 1 >= corpus size``) the rows are
its rows; elsewhere hnsample's are exact: the window ``[range_min, range_max)`` is taken over *all*
eligible candidates of the corpus, so a query never comes up short because its candidates were cut
before filtering. See docs/mining.md for every difference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .encoding import Encoder, encode_texts, is_sentence_transformer, model_identity
from .mining import DEFAULT_TEMPERATURE, ST_FORMATS
from .mining import mine_hard_negatives as _mine
from .mining_io import padded_id_rows
from .rerank import rerank_hard_negatives
from .texts import positive_duplicates

logger = logging.getLogger(__name__)

SAMPLING_STRATEGIES = {"top": "top", "random": "uniform", "softmax": "softmax"}


def _texts(name: str, values: Any) -> list[str]:
    if not isinstance(values, (list, tuple, str)):
        # A datasets Column iterated goes row by row through the dataset's formatter (100x slower than
        # reading the column at once, which a full slice does); a plain iterable has no slice.
        try:
            values = values[:]
        except (TypeError, KeyError, IndexError, AttributeError):
            pass
    out = list(values)
    bad = next((i for i, v in enumerate(out) if not isinstance(v, str)), None)
    if bad is not None:
        raise TypeError(f"{name} must hold strings, got {type(out[bad]).__name__} at row {bad}")
    return out


def _check_metric(model: Any) -> None:
    """Embeddings are L2-normalized as sentence-transformers' mining does, so "cosine" and "dot" are
    the same score; other similarity functions are not what the selection computes."""
    name = getattr(model, "similarity_fn_name", None) or "cosine"
    if str(name) not in ("cosine", "dot", "SimilarityFunction.COSINE", "SimilarityFunction.DOT_PRODUCT"):
        raise ValueError(f"model.similarity_fn_name is {name!r}; hnsample mines by cosine (the dot product of the "
                         "normalized embeddings), so set model.similarity_fn_name = 'cosine' to mine with it")


def mine_hard_negatives(
    dataset: Any,
    model: Any,
    anchor_column_name: str | None = None,
    positive_column_name: str | None = None,
    corpus: Sequence[str] | None = None,
    cross_encoder: Any = None,
    range_min: int = 0,
    range_max: int | None = None,
    max_score: float | None = None,
    min_score: float | None = None,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    num_negatives: int = 3,
    sampling_strategy: str = "top",
    query_prompt_name: str | None = None,
    query_prompt: str | None = None,
    corpus_prompt_name: str | None = None,
    corpus_prompt: str | None = None,
    include_positives: bool = False,
    output_format: str = "triplet",
    output_scores: bool = False,
    batch_size: int = 32,
    faiss_batch_size: int = 16384,
    use_faiss: bool = False,
    use_multi_process: list[str] | bool = False,
    verbose: bool = True,
    cache_folder: str | None = None,
    as_triplets: bool | None = None,
    margin: float | None = None,
    *,
    temperature: float | None = None,
    seed: int | None = None,
    exclude_positive_duplicates: bool = True,
    cache_key: str | None = None,
    max_rescored_candidates: int | None = None,
    device: Any = "auto",
) -> Any:
    """Adds hard negatives to a dataset of (anchor, positive) texts, with sentence-transformers'
    arguments and meaning (see ``sentence_transformers.util.mine_hard_negatives``); the returned
    ``datasets.Dataset`` has its columns and row order in all four ``output_format`` layouts.

    What is the same: the corpus is ``corpus`` + the positive column, de-duplicated by exact text in that
    order; duplicate anchors are one query with several positives; a query's own text and its positives
    are never negatives (unless ``include_positives``); embeddings are L2-normalized (so cosine and dot
    are one score); margins measure from the query's lowest positive score; ``range_min`` skips that many
    eligible candidates and ``range_max`` bounds the window (its default is sentence-transformers':
    ``range_min + num_negatives + max positives``, with ``10 * num_negatives`` when a margin or
    ``max_score`` is set); ``sampling_strategy="random"`` draws uniformly from the window; the same
    errors for ``num_negatives < 1`` and a window that cannot hold ``num_negatives``; the same
    deprecations (``as_triplets``, ``margin``).

    What differs, and why:

    * Exact and never short: filters apply to every candidate of the corpus, not to a fixed top
      ``range_max + max_positives + 1`` list, so the window is always filled when the corpus has enough
      eligible candidates. (Equal rows where sentence-transformers' list already covers the corpus.)
    * Duplicates of a positive's text (same text up to whitespace and case) are never negatives
      (``exclude_positive_duplicates=False`` restores sentence-transformers' behaviour).
    * ``cross_encoder`` (a CrossEncoder, or any callable ``[(query, text), ...] -> scores``): the exact
      top ``range_max + max_positives + 1`` candidates by the bi-encoder (positives excluded before the
      cut, not after), and (query, positive) pairs, scored in batches; margins, ``min_score`` /
      ``max_score`` and the ranking use its scores; a query left short gets the next candidates (2x,
      4x, ... by the bi-encoder, only the new ones scored) until full, or up to
      ``max_rescored_candidates`` per query.
    * ``sampling_strategy="random"`` draws with hnsample's seeded noise (``seed=``) instead of Python's
      ``random``; ``"softmax"`` (P ~ exp(score / temperature), ``temperature`` default 0.05) is added.
    * ``cache_folder``: keyed on the model's identity (architecture, prompts, a digest of the weights;
      ``cache_key=`` for a plain callable), the prompt and the texts; an interrupted encoding resumes.
    * ``model`` may be any callable ``list[str] -> (n, d)`` embeddings (``batch_size`` texts per call).
    * ``use_faiss`` / ``faiss_batch_size``: accepted; the search is hnsample's exact one, with
      ``faiss_batch_size`` queries per batch. ``use_multi_process``: passed to the sentence-transformers
      model's (and cross-encoder's) encode pool; an error for a plain callable.
    * An anchor/positive column name that is not in the dataset is a ValueError (sentence-transformers
      silently takes the first/second column instead); ``model.similarity_fn_name`` other than cosine
      or dot is a ValueError.

    hnsample-only keyword arguments: ``temperature``, ``seed`` (sampling), ``exclude_positive_duplicates``,
    ``cache_key``, ``max_rescored_candidates``, ``device`` (where the selection runs: "auto", "cpu",
    "cuda", a list).
    """
    try:
        from datasets import Dataset  # noqa: F401
    except ImportError:
        raise ImportError("mine_hard_negatives needs the datasets package: pip install datasets") from None
    if not hasattr(dataset, "column_names") or not hasattr(dataset, "__len__"):
        raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty. Please provide a non-empty dataset.")
    if faiss_batch_size <= 0:
        raise ValueError(f"faiss_batch_size must be a positive integer, got {faiss_batch_size}.")
    columns = list(dataset.column_names)
    for name, value in (("anchor_column_name", anchor_column_name), ("positive_column_name", positive_column_name)):
        if value is not None and value not in columns:
            raise ValueError(f"{name} {value!r} is not a column of the dataset (columns: {columns})")
    if anchor_column_name is None:
        anchor_column_name = columns[0]
    if positive_column_name is None:
        if len(columns) < 2:
            raise ValueError("Dataset must contain at least two columns to select the positive column automatically.")
        positive_column_name = columns[1]
    if as_triplets is not None:
        output_format = "triplet" if as_triplets else "n-tuple"
        logger.warning("The `as_triplets` parameter is deprecated. Use the `output_format` parameter instead. "
                       f"Setting `output_format` to `{output_format}`.")
    if include_positives and output_format != "n-tuple":
        logger.warning('When using `include_positives=True`, `output_format` will be set to `"n-tuple"` to ensure '
                       "that the ranking order is preserved.")
        output_format = "n-tuple"
    if output_format == "n-tuple-scores":
        output_format, output_scores = "n-tuple", True
    if output_format not in ST_FORMATS:
        raise ValueError(f"Invalid output_format: {output_format}. Must be one of 'triplet', 'n-tuple', "
                         "'labeled-pair', or 'labeled-list'.")
    if margin is not None:
        absolute_margin = margin
        logger.warning("The `margin` parameter is deprecated. Use the `absolute_margin` and/or `relative_margin` "
                       f"parameter instead. Setting `absolute_margin` to `{absolute_margin}`.")
    if sampling_strategy not in SAMPLING_STRATEGIES:
        raise ValueError(f"sampling_strategy must be one of {list(SAMPLING_STRATEGIES)}, got {sampling_strategy!r}")
    if sampling_strategy != "softmax" and temperature is not None:
        raise ValueError(f"temperature applies to sampling_strategy='softmax' only, not {sampling_strategy!r}")
    if not isinstance(num_negatives, int) or isinstance(num_negatives, bool) or num_negatives < 1:
        raise ValueError(f"num_negatives must be at least 1, got num_negatives={num_negatives}.")
    if use_multi_process and not is_sentence_transformer(model):
        raise ValueError("use_multi_process needs a sentence-transformers model (a plain callable encoder has no "
                         "process pool)")
    if is_sentence_transformer(model):
        _check_metric(model)

    queries_all = _texts(f"column {anchor_column_name!r}", dataset[anchor_column_name])
    positives_all = _texts(f"column {positive_column_name!r}", dataset[positive_column_name])
    per_query: dict[str, int] = {}
    for qt in queries_all:
        per_query[qt] = per_query.get(qt, 0) + 1
    max_positives = max(per_query.values())
    filters = (absolute_margin is not None or relative_margin is not None or max_score is not None
               or (cross_encoder is not None and min_score is not None))
    if range_max is None:
        range_max = range_min + num_negatives * (10 if filters else 1) + max_positives
        if verbose:
            print(f"Setting range_max to {range_max} based on the provided parameters.")
    if range_min < 0:
        raise ValueError(f"range_min must be non-negative, got range_min={range_min}.")
    if range_min >= range_max:
        raise ValueError(f"range_min must be smaller than range_max, got range_min={range_min} and "
                         f"range_max={range_max}.")
    if num_negatives > range_max - range_min:
        raise ValueError(f"Cannot mine {num_negatives} negatives per query: only {range_max - range_min} candidates "
                         f"remain after skipping the first range_min={range_min} of range_max={range_max}. Consider "
                         "decreasing num_negatives or range_min, or increasing range_max.")

    texts = _texts("corpus", corpus) if corpus is not None else []
    corpus_texts = list(dict.fromkeys(texts + positives_all))
    corpus_row = {t: i for i, t in enumerate(corpus_texts)}
    queries = list(dict.fromkeys(queries_all))
    query_row = {t: i for i, t in enumerate(queries)}
    if verbose and len(queries) != len(queries_all):
        print(f"Found {len(queries)} unique queries out of {len(queries_all)} total queries.")
    positives: list[list[int]] = [[] for _ in queries]
    own_text = [corpus_row.get(t, -1) for t in queries]
    for qt, pt in zip(queries_all, positives_all, strict=True):
        row = positives[query_row[qt]]
        if corpus_row[pt] not in row:
            row.append(corpus_row[pt])
        if include_positives and qt == pt:
            own_text[query_row[qt]] = -1
    dups = positive_duplicates(positives, corpus_texts) if exclude_positive_duplicates and not include_positives \
        else [[] for _ in queries]
    exclude = [([o] if o >= 0 else []) + [d for d in dup if d != o] for o, dup in zip(own_text, dups, strict=True)]

    q_emb, c_emb = _encode(model, queries, corpus_texts, query_prompt=query_prompt,
                           query_prompt_name=query_prompt_name, corpus_prompt=corpus_prompt,
                           corpus_prompt_name=corpus_prompt_name, batch_size=batch_size,
                           use_multi_process=use_multi_process, cache_folder=cache_folder, cache_key=cache_key,
                           verbose=verbose)
    sampling = SAMPLING_STRATEGIES[sampling_strategy]
    if sampling == "softmax" and temperature is None:
        temperature = DEFAULT_TEMPERATURE
    select = dict(absolute_margin=absolute_margin, relative_margin=relative_margin, min_score=min_score,
                  max_score=max_score, skip_top=range_min, pool=range_max - range_min, sampling=sampling,
                  temperature=1.0 if temperature is None else temperature, seed=seed)
    if cross_encoder is None:
        # With include_positives the positives are candidates, so the pair scores (and the margins'
        # p_i) come from the embeddings here rather than from the selection's positives.
        pos = padded_id_rows(positives)
        pair = _pair_scores(q_emb, c_emb, pos) if include_positives else None
        result = _mine(q_emb, c_emb, None if include_positives else pos, num_negatives=num_negatives,
                       exclude=padded_id_rows(exclude), positive_scores=None if pair is None else _row_min(pair),
                       metric="dot", query_batch_size=faiss_batch_size, device=device, progress=verbose,
                       verbose=False, **select)
        if pair is not None:
            result.positive_pair_scores, result.positives = pair, pos
    else:
        ce_pool = None
        if use_multi_process and hasattr(cross_encoder, "start_multi_process_pool"):
            ce_pool = cross_encoder.start_multi_process_pool(
                target_devices=None if isinstance(use_multi_process, bool) else use_multi_process)
        try:
            result = rerank_hard_negatives(
                q_emb, c_emb, queries, corpus_texts, positives, cross_encoder, num_negatives=num_negatives,
                num_candidates=range_max + max_positives + 1, exclude=exclude, include_positives=include_positives,
                max_candidates=max_rescored_candidates, batch_size=batch_size, process_pool=ce_pool, device=device,
                progress=verbose, query_batch_size=faiss_batch_size, **select)
        finally:
            if ce_pool is not None:
                cross_encoder.stop_multi_process_pool(ce_pool)
    out = result.to_sentence_transformers(queries, corpus_texts, output_format, output_scores=output_scores,
                                          anchor_column=anchor_column_name, positive_column=positive_column_name)
    if verbose:
        print(result.summary())
    return out


def _pair_scores(q: np.ndarray, c: np.ndarray, pos: torch.Tensor) -> torch.Tensor:
    """(B, P) float32 dot products of each query with each of its positives (pos: (B, P) ids, -1 for
    padding; NaN there), the score every (query, positive) row of the output carries."""
    out = torch.full(pos.shape, float("nan"), dtype=torch.float32)
    rows, cols = torch.nonzero(pos >= 0, as_tuple=True)
    if rows.numel():
        qv = torch.from_numpy(np.asarray(q[rows.numpy()], dtype=np.float32))
        cv = torch.from_numpy(np.asarray(c[pos[rows, cols].numpy()], dtype=np.float32))
        out[rows, cols] = (qv.double() * cv.double()).sum(dim=1).to(torch.float32)
    return out


def _row_min(pair: torch.Tensor) -> torch.Tensor:
    return torch.where(pair.isnan(), torch.full_like(pair, float("inf")), pair).amin(dim=1)


def _encode(model: Any, queries: list[str], corpus: list[str], *, query_prompt, query_prompt_name, corpus_prompt,
            corpus_prompt_name, batch_size, use_multi_process, cache_folder, cache_key, verbose):
    """(query embeddings, corpus embeddings), L2-normalized float32, from the cache when it has them."""
    identity = model_identity(model, cache_key) if cache_folder is not None else None
    pool = None
    if use_multi_process:
        pool = model.start_multi_process_pool(target_devices=None if isinstance(use_multi_process, bool)
                                              else use_multi_process)
    try:
        c_enc = Encoder(model, "document", prompt=corpus_prompt, prompt_name=corpus_prompt_name,
                        batch_size=batch_size, pool=pool)
        q_enc = Encoder(model, "query", prompt=query_prompt, prompt_name=query_prompt_name, batch_size=batch_size,
                        pool=pool)
        c_emb = encode_texts(c_enc, corpus, cache_folder=cache_folder, identity=identity, progress=verbose,
                             desc="Encoding the corpus")
        q_emb = encode_texts(q_enc, queries, cache_folder=cache_folder, identity=identity, progress=verbose,
                             desc="Encoding the queries")
    finally:
        if pool is not None:
            model.stop_multi_process_pool(pool)
    if q_emb.shape[1] != c_emb.shape[1]:
        raise ValueError(f"queries and corpus were embedded in different dimensions ({q_emb.shape[1]} and "
                         f"{c_emb.shape[1]})")
    return q_emb, c_emb

