"""Corpus-scale hard-negative mining: :func:`mine_hard_negatives` streams a (possibly memory-mapped)
corpus through the selection engine (:mod:`hnsample.engine`, the semantics of
:func:`hnsample.topk_similarity`), query batch by query batch,
shard by shard, on one or several devices and across torch.distributed ranks, with resumable
checkpoints. The result is a :class:`MinedNegatives`."""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import settings as _settings
from ._ext import as_tensor, check_int, has_cuda, rows_text
from .checkpoint import CheckpointDir
from .engine import (
    METRICS,
    SAMPLINGS,
    SelectionState,
    backend_for,
    build_selection,
    draw_seed,
    positive_score,
    selection_pair_scores,
)
from .mining_io import (
    MatrixSource,
    PathLike,
    check_id_list,
    positives_tensor,
    read_ids,
    read_qrels,
    tensor_digest,
)
from .result_files import load_result, save_result

# Per-row counters of the filter statistics, in attribution order (a candidate is counted under the
# first filter it fails).
FILTERS = ("positives", "exclude", "labels", "nan", "min_score", "max_score", "margin")
_SCAN_FILTERS = FILTERS[2:]  # counted while scanning score blocks (the id filters are counted from ids)
ST_FORMATS = ("triplet", "n-tuple", "labeled-pair", "labeled-list")
# The softmax temperature when none is given: suits cosine scores in [-1, 1], whose hard negatives lie
# within a few hundredths of each other (at T = 1 the softmax over them would be nearly uniform).
DEFAULT_TEMPERATURE = 0.05


def resolve_temperature(sampling: str, temperature: float | None, metric: str) -> float:
    """The softmax temperature to use: ``temperature`` if given, else :data:`DEFAULT_TEMPERATURE` (with a
    warning for ``metric="dot"``, whose scores have no fixed scale). Irrelevant to the other samplings
    (1.0 is returned for them)."""
    if temperature is not None:
        return temperature
    if sampling != "softmax":
        return 1.0
    if metric == "dot":
        warnings.warn(f"softmax sampling without a temperature: using {DEFAULT_TEMPERATURE}, which suits cosine "
                      "scores in [-1, 1]; dot products have no fixed scale, so pass temperature= explicitly",
                      UserWarning, stacklevel=3)
    return DEFAULT_TEMPERATURE


def check_margin_rows(absolute_margin: float | None, relative_margin: float | None, positives: torch.Tensor | None,
                      positive_scores: torch.Tensor | None) -> None:
    """A margin measures from each query's positive score: ValueError when no query has one (no
    positives, no positive_scores), and a warning naming the queries without a positive, which the
    margin cannot filter."""
    if (absolute_margin is None and relative_margin is None) or positive_scores is not None:
        return
    given = " and ".join(n for n, v in (("absolute_margin", absolute_margin), ("relative_margin", relative_margin))
                         if v is not None)
    if positives is None or positives.shape[1] == 0:
        raise ValueError(f"{given} needs a positive score to measure from: give positives (whose lowest score is "
                         "p_i) or positive_scores")
    lacking = torch.nonzero(~(positives >= 0).any(dim=1)).reshape(-1)
    if lacking.numel():
        warnings.warn(f"{given}: {rows_text(lacking, positives.shape[0]).replace('rows', 'queries', 1)} have no "
                      "positive, so no margin can filter their candidates", UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------
# Result


@dataclasses.dataclass
class MinedNegatives:
    """Hard negatives mined for B queries.

    Attributes:
        indices: (B, k) int64 corpus row ids of the negatives, best score first; -1 pads a row that came
            up short (fewer than k eligible candidates in its window).
        scores: (B, k) float32 similarity of each negative (-inf for padding).
        positive_scores: (B,) float32 p_i: ``positive_scores`` if it was given, else the minimum
            similarity over the row's positives (the score the margins are measured from); NaN for a row
            without positives.
        positives: (B, P) int64 positive corpus ids (-1 = padding), as used for masking.
        positive_pair_scores: (B, P) float32, the score of each (query, positive) pair (NaN at padding):
            what a MarginMSE-style distillation needs as the teacher's positive score, per pair. None
            when unknown (a result read from a file written without it).
        query_ids, corpus_ids: the string id of each query row / corpus row when the run had them
            (``query_ids=`` / ``corpus_ids=``): result files then name queries and documents by these
            ids instead of row numbers.
        filter_counts: when mined with ``filter_statistics=True``, the total over all rows of the
            candidates each filter removed, keyed by :data:`FILTERS` (each candidate counted once, under
            the first filter it fails in that order), plus ``"eligible"`` (candidates passing all
            filters) and ``"skip_top"`` (eligible candidates dropped by skip_top). Else None.
        eligible: (B,) int64 eligible candidates per row when filter statistics were computed, else None.
        params: the run's parameters (num_negatives, metric, filters, sampling, seed, ...).
    """

    indices: torch.Tensor
    scores: torch.Tensor
    positive_scores: torch.Tensor
    positives: torch.Tensor
    filter_counts: dict[str, int] | None = None
    eligible: torch.Tensor | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    positive_pair_scores: torch.Tensor | None = None
    query_ids: list[str] | None = None
    corpus_ids: list[str] | None = None

    @property
    def num_negatives(self) -> int:
        return int(self.indices.shape[1])

    @property
    def short_rows(self) -> torch.Tensor:
        """Row ids of the queries that got fewer than num_negatives negatives."""
        return torch.nonzero((self.indices < 0).any(dim=1)).reshape(-1)

    def score_quantiles(self) -> dict[str, dict[str, float]]:
        """count, mean, std, min, 25%, 50%, 75%, max of the (finite) positive scores, of the mined
        negatives' scores, and of the per-negative difference p_i - s_ij."""
        pos = self.positive_scores.to(torch.float64)
        neg = self.scores.to(torch.float64)
        valid = self.indices >= 0
        diff = (pos[:, None] - neg)[valid & pos[:, None].isfinite()]
        out = {}
        for name, v in (("positive", pos[pos.isfinite()]), ("negative", neg[valid]), ("difference", diff)):
            v = v[v.isfinite()]
            row = {"count": float(v.numel())}
            if v.numel():
                q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
                row.update(mean=float(v.mean()), std=float(v.std()) if v.numel() > 1 else 0.0,
                           min=float(v.min()), **{"25%": float(q[0]), "50%": float(q[1]), "75%": float(q[2])},
                           max=float(v.max()))
            out[name] = row
        return out

    def summary(self) -> str:
        """The end-of-run table: score quantiles (positives vs negatives), what each filter removed and
        the rows that came up short."""
        qs = self.score_quantiles()
        lines = [f"{'Metric':<8}{'Positive':>14}{'Negative':>14}{'Difference':>14}"]
        for key in ("count", "mean", "std", "min", "25%", "50%", "75%", "max"):
            cells = []
            for col in ("positive", "negative", "difference"):
                v = qs[col].get(key)
                cells.append("" if v is None else (f"{int(v):,}" if key == "count" else f"{v:.4f}"))
            lines.append(f"{key.capitalize():<8}" + "".join(f"{c:>14}" for c in cells))
        b, k = self.indices.shape
        n = self.params.get("num_corpus")
        if self.filter_counts is not None and n:
            total = b * n
            fc = self.filter_counts
            lines.append("")
            lines.append(f"{'Candidates':<22}{'count':>16}{'share':>10}   (of {total:,} query-candidate pairs)")
            # Every pair is counted on exactly one line: removed by its first failing filter, skipped by
            # skip_top (eligible, ranked above the window), or eligible after skip_top. The shares add up.
            rows = [(f"removed: {name}", fc.get(name, 0)) for name in FILTERS]
            rows.append(("skipped: skip_top", fc.get("skip_top", 0)))
            rows.append(("eligible after skip", fc["eligible"] - fc.get("skip_top", 0)))
            for name, c in rows:
                lines.append(f"{name:<22}{c:>16,}{c / max(total, 1):>10.2%}")
            lines.append(f"{'total':<22}{sum(c for _, c in rows):>16,}{1:>10.2%}")
        elif self.filter_counts is None:
            lines.append("")
            lines.append("Per-filter counts not computed (mine with filter_statistics=True).")
        short = self.short_rows
        found = int((self.indices >= 0).sum())
        lines.append("")
        first = f" (first: {short[:10].tolist()})" if short.numel() else ""
        lines.append(f"Negatives found: {found:,} of {b * k:,}; "
                     f"{short.numel():,} of {b:,} queries came up short{first}.")
        return "\n".join(lines)

    def __repr__(self) -> str:
        b, k = self.indices.shape
        return f"MinedNegatives(queries={b}, num_negatives={k}, short_rows={self.short_rows.numel()})"

    # -- persistence --------------------------------------------------------------------------------

    def save(self, path: PathLike) -> None:
        """Writes the result by extension: ``.parquet`` (needs pyarrow), ``.jsonl`` or ``.npz``
        (atomically), with the number of queries and negatives in its metadata so that :meth:`load` can
        check the rows it reads back."""
        arrays = {
            "indices": self.indices.cpu().numpy(),
            "scores": self.scores.cpu().numpy(),
            "positive_scores": self.positive_scores.cpu().numpy(),
            "positives": self.positives.cpu().numpy(),
        }
        if self.eligible is not None:
            arrays["eligible"] = self.eligible.cpu().numpy()
        if self.positive_pair_scores is not None:
            arrays["positive_pair_scores"] = self.positive_pair_scores.cpu().numpy().astype(np.float32)
        meta = {"params": self.params, "filter_counts": self.filter_counts,
                "num_negatives": self.num_negatives, "num_queries": int(self.indices.shape[0])}
        save_result(path, arrays, meta, query_ids=self.query_ids, corpus_ids=self.corpus_ids)

    @classmethod
    def load(cls, path: PathLike) -> MinedNegatives:
        """Reads a file written by :meth:`save` (per-row eligible counts survive only in .npz).

        Rows are placed by their ``query`` field (.jsonl, .parquet), never by their order in the file.
        ValueError naming the file for anything that does not make a consistent result: a query id
        missing, repeated, not an int or outside [0, B) (B from the file's metadata), arrays whose shapes
        disagree or with the wrong kind of values, corpus ids outside [-1, num_corpus), a row longer than
        num_negatives, an unreadable or malformed file."""
        arrays, meta = load_result(path)
        eligible = arrays.get("eligible")
        pair = arrays.get("positive_pair_scores")
        return cls(
            indices=torch.from_numpy(arrays["indices"].astype(np.int64)),
            scores=torch.from_numpy(arrays["scores"].astype(np.float32)),
            positive_scores=torch.from_numpy(arrays["positive_scores"].astype(np.float32)),
            positives=torch.from_numpy(arrays["positives"].astype(np.int64)),
            filter_counts=meta.get("filter_counts"),
            eligible=None if eligible is None else torch.from_numpy(eligible.astype(np.int64)),
            params=meta.get("params", {}),
            positive_pair_scores=None if pair is None else torch.from_numpy(pair.astype(np.float32)),
            query_ids=meta.get("query_ids"), corpus_ids=meta.get("corpus_ids"),
        )

    # -- sentence-transformers export ---------------------------------------------------------------

    def to_sentence_transformers(
        self, queries_text: Sequence[str], corpus_text: Sequence[str], format: str = "triplet", *,
        output_scores: bool = False, anchor_column: str = "anchor", positive_column: str = "positive",
    ) -> Any:
        """The dataset layouts of sentence-transformers' ``mine_hard_negatives(output_format=...)``:

        * ``"triplet"``: columns (anchor, positive, negative); one row per (query, positive, found
          negative). ``output_scores`` adds ``scores`` = [positive score, negative score].
        * ``"n-tuple"``: (anchor, positive, negative_1, ..., negative_k); one row per (query, positive),
          only for queries with all k negatives. ``scores`` = [p, s_1, ..., s_k].
        * ``"labeled-pair"``: (anchor, positive, label); per query its positives (label 1) then its
          negatives (label 0). ``output_scores`` replaces ``label`` by ``score``.
        * ``"labeled-list"``: (anchor, positive, labels) with positive = [positive text, negative texts]
          and labels [1, 0, ...]; one row per (query, positive) with at least one negative.
          ``output_scores`` replaces ``labels`` by ``scores``.

        The score of each positive is its own (query, positive) score (:attr:`positive_pair_scores`), so
        a query with several positives gets one true score per pair (p_i, the row's margin reference,
        where the pair scores are unknown). Rows come query by query, a query's positives in their
        order. Returns a ``datasets.Dataset`` when the ``datasets`` package is installed, else a dict of
        column lists.
        """
        if format not in ST_FORMATS:
            raise ValueError(f"format must be one of {list(ST_FORMATS)}, got {format!r}")
        b, k = self.indices.shape
        if len(queries_text) != b:
            raise ValueError(f"queries_text must have one text per query ({b}), got {len(queries_text)}")
        n_corpus = self.params.get("num_corpus")
        if n_corpus is not None and len(corpus_text) != n_corpus:
            raise ValueError(
                f"corpus_text must have one text per corpus row ({n_corpus}), got {len(corpus_text)}")
        idx = self.indices.tolist()
        sc = self.scores.tolist()
        ps = self.positive_scores.tolist()
        pair = (self.positive_pair_scores.tolist() if self.positive_pair_scores is not None
                else [[p] * self.positives.shape[1] for p in ps])
        # (corpus id, pair score) of each valid positive, in order
        pos = [[(j, v) for j, v in zip(r, pr, strict=True) if j >= 0]
               for r, pr in zip(self.positives.tolist(), pair, strict=True)]
        a_col, p_col = anchor_column, positive_column
        data: dict[str, list] = {a_col: [], p_col: []}
        if format == "triplet":
            data["negative"] = []
            if output_scores:
                data["scores"] = []
            for i in range(b):
                for p, pv in pos[i]:
                    for j, s in zip(idx[i], sc[i], strict=True):
                        if j < 0:
                            continue
                        data[a_col].append(queries_text[i])
                        data[p_col].append(corpus_text[p])
                        data["negative"].append(corpus_text[j])
                        if output_scores:
                            data["scores"].append([pv, s])
        elif format == "n-tuple":
            for t in range(1, k + 1):
                data[f"negative_{t}"] = []
            if output_scores:
                data["scores"] = []
            for i in range(b):
                if any(j < 0 for j in idx[i]):
                    continue
                for p, pv in pos[i]:
                    data[a_col].append(queries_text[i])
                    data[p_col].append(corpus_text[p])
                    for t, j in enumerate(idx[i], 1):
                        data[f"negative_{t}"].append(corpus_text[j])
                    if output_scores:
                        data["scores"].append([pv, *sc[i]])
        elif format == "labeled-pair":
            label_col = "score" if output_scores else "label"
            data[label_col] = []
            for i in range(b):
                for p, pv in pos[i]:
                    data[a_col].append(queries_text[i])
                    data[p_col].append(corpus_text[p])
                    data[label_col].append(pv if output_scores else 1)
                for j, s in zip(idx[i], sc[i], strict=True):
                    if j < 0:
                        continue
                    data[a_col].append(queries_text[i])
                    data[p_col].append(corpus_text[j])
                    data[label_col].append(s if output_scores else 0)
        else:
            label_col = "scores" if output_scores else "labels"
            data[label_col] = []
            for i in range(b):
                negs = [(j, s) for j, s in zip(idx[i], sc[i], strict=True) if j >= 0]
                if not negs:
                    continue
                for p, pv in pos[i]:
                    data[a_col].append(queries_text[i])
                    data[p_col].append([corpus_text[p]] + [corpus_text[j] for j, _ in negs])
                    data[label_col].append([pv] + [s for _, s in negs] if output_scores
                                           else [1] + [0] * len(negs))
        try:
            from datasets import Dataset
        except ImportError:
            return data
        return Dataset.from_dict(data)


# ----------------------------------------------------------------------------------------------------
# Devices and torch.distributed


def _dist():
    """torch.distributed when a process group is initialized, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def resolve_devices(device: Any) -> list[torch.device]:
    """"cpu", "cuda", "cuda:1", a torch.device, a list of those, or "auto" (every visible GPU, or under
    torch.distributed the rank's LOCAL_RANK GPU; the CPU when there is none). "cpu:0" is read as "cpu";
    any other CPU index raises ValueError."""
    if isinstance(device, str) and device == "auto":
        if has_cuda():
            if _dist() is not None:
                return [torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))]
            return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        return [torch.device("cpu")]
    items = list(device) if isinstance(device, (list, tuple)) else [device]
    if not items:
        raise ValueError("device must not be an empty list")
    out = []
    for d in items:
        if not isinstance(d, (str, torch.device)):
            raise TypeError(f"device must be a str, torch.device or a list of them, got {type(d).__name__}")
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise ValueError(f"device {d!r} is not a valid device string") from None
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or a CUDA device, got {d!r}")
        if dev.type == "cpu":
            # torch keeps every CPU tensor on the index-less "cpu": "cpu:0" means it, any other index
            # names nothing and would fail later as a device mismatch.
            if dev.index not in (None, 0):
                raise ValueError(f"device {str(dev)!r}: the CPU takes no device index; use 'cpu'")
            dev = torch.device("cpu")
        if dev.type == "cuda":
            if not has_cuda():
                raise ValueError(f"device {d!r} needs a CUDA device and hnsample built with CUDA")
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            if dev.index >= torch.cuda.device_count():
                raise ValueError(f"device {d!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
        out.append(dev)
    return out


class _Group:
    """The torch.distributed side of a run: rank, world size and the error-aware collectives. Without a
    process group it is a single rank and every collective is the identity."""

    def __init__(self):
        self.dist = _dist()
        self.rank = self.dist.get_rank() if self.dist else 0
        self.world = self.dist.get_world_size() if self.dist else 1
        backend = self.dist.get_backend() if self.dist else "gloo"
        # NCCL moves only CUDA tensors; gloo (and the single-process case) works on the CPU.
        self.comm_device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                            else torch.device("cpu"))

    def check(self, err: BaseException | None, stage: str) -> None:
        """Raises on every rank if any rank failed: each rank reports its error (or None) to all, so a
        failing rank makes the whole job fail with its message instead of leaving the others waiting."""
        if self.dist is None:
            if err is not None:
                raise err
            return
        msgs: list[Any] = [None] * self.world
        mine = None if err is None else f"{type(err).__name__}: {err}"
        try:
            self.dist.all_gather_object(msgs, mine)
        except Exception as e:  # a peer process died: its connection closed under the collective
            raise RuntimeError(f"mine_hard_negatives: rank {self.rank} lost contact with the other ranks "
                               f"during {stage} (a rank probably died): {e}") from e
        failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
        if failed:
            detail = "; ".join(f"rank {r}: {m}" for r, m in failed)
            raise RuntimeError(f"mine_hard_negatives failed during {stage} on {detail}") from err

    def broadcast(self, obj: Any) -> Any:
        if self.dist is None:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if self.dist is None:
            return [t]
        t = t.to(self.comm_device).contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        self.dist.all_gather(out, t)
        return out

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.dist is None:
            return t
        c = t.to(self.comm_device).contiguous()
        self.dist.all_reduce(c)
        return c.to(t.device)


def _distinct_valid(ids: torch.Tensor) -> torch.Tensor:
    """Per row, the number of distinct ids >= 0."""
    if ids.shape[1] == 0:
        return torch.zeros(ids.shape[0], dtype=torch.int64, device=ids.device)
    s = torch.sort(ids, dim=1).values
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    return ((s >= 0) & first).sum(dim=1)


class _FilterCounter:
    """Counts, per state row, the candidates each score-dependent filter removes (labels, NaN, min_score,
    max_score, margin; a candidate under the first it fails), from the same score blocks the selection
    sees, by the kernels' own eligibility rule. Banned ids are skipped: they are counted from the ids."""

    def __init__(self, state: SelectionState, rows: int, device: torch.device):
        self.state = state
        self.counts = torch.zeros((rows, len(_SCAN_FILTERS)), dtype=torch.int64, device=device)

    def __call__(self, block, col_offset: int) -> None:
        self.state.count_filters(block, col_offset, self.counts)


# ----------------------------------------------------------------------------------------------------
# The pipeline


@dataclasses.dataclass
class _Run:
    src_q: MatrixSource
    src_c: MatrixSource
    positives: torch.Tensor | None
    exclude: torch.Tensor | None
    query_labels: torch.Tensor | None
    candidate_labels: torch.Tensor | None
    positive_scores: torch.Tensor | None
    select_kwargs: dict[str, Any]
    k: int
    metric: str
    seed: int | None
    devices: list[torch.device]
    shards: list[tuple[int, int]]  # this rank's corpus shards
    block_size: int
    filter_statistics: bool
    query_ids: list[str] | None = None
    corpus_ids: list[str] | None = None


def _positive_matrix(run: _Run, q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(b, P) similarity of each query with its (clamped) positive ids, in the kernels' compute dtype."""
    return selection_pair_scores(q, lambda ids: run.src_c.take(ids.cpu()), pos.clamp_min(0), run.metric)


def _mine_batch(run: _Run, group: _Group, q0: int, q1: int) -> dict[str, Any]:
    """Mines queries [q0, q1) over this rank's shards on every device, merges the per-device and then
    the per-rank states exactly, and returns the batch's arrays (identical on every rank)."""
    b, n = q1 - q0, run.src_c.shape[0]
    primary = run.devices[0]
    q = run.src_q.rows(q0, q1).to(primary)
    pos = None if run.positives is None else run.positives[q0:q1].to(primary)
    pos_vals = _positive_matrix(run, q, pos) if pos is not None and pos.shape[1] > 0 else None

    def sl(t):
        return None if t is None else t[q0:q1].to(primary)

    sel = build_selection(
        b, n, primary, run.k, positives=pos, exclude=sl(run.exclude), query_labels=sl(run.query_labels),
        candidate_labels=None if run.candidate_labels is None else run.candidate_labels.to(primary),
        positive_scores=sl(run.positive_scores), generator=None, seed=run.seed,
        positive_values=lambda _ids: pos_vals, **run.select_kwargs,
    )
    sels = [sel] + [sel.on(d) for d in run.devices[1:]]
    states = [SelectionState(s, b, d, noise_row_offset=q0) for s, d in zip(sels, run.devices, strict=True)]
    counters = [_FilterCounter(st, b, d) if run.filter_statistics else None
                for st, d in zip(states, run.devices, strict=True)]

    def work(slot: int) -> None:
        dev = run.devices[slot]
        qd = q.to(dev)
        backend = backend_for(dev)
        for c0, c1 in run.shards[slot :: len(run.devices)]:
            c = run.src_c.rows(c0, c1).to(dev)
            backend.select(qd, c, states[slot], run.metric, run.block_size, col_offset=c0, on_block=counters[slot])

    if len({d.type for d in run.devices}) == 1 and run.devices[0].type == "cpu":
        for slot in range(len(run.devices)):  # CPU "devices" share the same cores: no point in threads
            work(slot)
    else:
        errors: list[BaseException] = []

        def guarded(slot: int) -> None:
            try:
                with torch.cuda.device(run.devices[slot]) if run.devices[slot].type == "cuda" else _null():
                    work(slot)
                    if run.devices[slot].type == "cuda":
                        torch.cuda.synchronize(run.devices[slot])
            except BaseException as e:  # re-raised in the calling thread
                errors.append(e)

        threads = [threading.Thread(target=guarded, args=(i,)) for i in range(len(run.devices))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    state = states[0]
    for other in states[1:]:
        state.merge(SelectionState(sel, b, primary, q0).load([t.to(primary) for t in other.tensors()]))
    counts = None
    if run.filter_statistics:
        counts = sum(c.counts.to(primary) for c in counters)
    return {"state": state, "sel": sel, "counts": counts, "pos": pos, "pos_vals": pos_vals, "b": b}


def _finish_batch(run: _Run, group: _Group, local: dict[str, Any], q0: int) -> dict[str, np.ndarray]:
    """Folds every rank's state for the batch into one (collectives), then finalizes. Runs on all ranks."""
    state, sel, b = local["state"], local["sel"], local["b"]
    primary = run.devices[0]
    if group.world > 1:
        gathered = [group.all_gather(t) for t in state.tensors()]
        merged = SelectionState(sel, b, primary, q0).load([g[0].to(primary) for g in gathered])
        for r in range(1, group.world):
            merged.merge(SelectionState(sel, b, primary, q0).load([g[r].to(primary) for g in gathered]))
        state = merged
    scores, indices = state.finalize()
    out = {"indices": indices.cpu().numpy(), "scores": scores.to(torch.float32).cpu().numpy()}
    # p_i for the output: given, else min over valid positives (NaN anywhere among them -> NaN); no
    # positive -> NaN.
    if run.positive_scores is not None:
        p = run.positive_scores[q0:q0 + b].to(torch.float64)
    elif local["pos_vals"] is not None:
        p, has_p = positive_score(local["pos_vals"], local["pos"] >= 0)
        p = torch.where(has_p, p, torch.full_like(p, math.nan))
    else:
        p = torch.full((b,), math.nan, dtype=torch.float64)
    out["positive_scores"] = p.to(torch.float32).cpu().numpy()
    width = 0 if local["pos"] is None else local["pos"].shape[1]
    pair = torch.full((b, width), math.nan, dtype=torch.float32)
    if local["pos_vals"] is not None:
        pair = torch.where(local["pos"].cpu() >= 0, local["pos_vals"].cpu().to(torch.float32), pair)
    out["positive_pair_scores"] = pair.numpy()
    if run.filter_statistics:
        scan = group.all_reduce_sum(local["counts"]).cpu()
        zeros = torch.zeros(b, dtype=torch.int64)
        pos_count = _distinct_valid(local["pos"].cpu()) if local["pos"] is not None else zeros
        banned_count = _distinct_valid(sel.banned.cpu()) if sel.banned is not None else zeros
        counts = torch.cat([pos_count[:, None], (banned_count - pos_count)[:, None], scan], dim=1)
        out["filter_counts"] = counts.numpy()
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="query", desc="Mining hard negatives", dynamic_ncols=True)


def _labels_tensor(name: str, x: Any, n: int) -> torch.Tensor | None:
    if x is None:
        return None
    t = as_tensor(name, x).detach().cpu()
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    return t.to(torch.int64)


def mine_hard_negatives(
    queries: Any,
    corpus: Any,
    positives: Any = None,
    *,
    num_negatives: int = 8,
    exclude: Any = None,
    query_labels: Any = None,
    candidate_labels: Any = None,
    positive_scores: Any = None,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    min_score: float | None = None,
    max_score: float | None = None,
    skip_top: int = 0,
    pool: int | None = None,
    sampling: str = "top",
    temperature: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    metric: str = "cosine",
    query_batch_size: int | None = None,
    corpus_shard_size: int | None = None,
    block_size: int | None = None,
    device: Any = "auto",
    progress: bool = True,
    checkpoint_dir: PathLike | None = None,
    filter_statistics: bool = False,
    query_ids: Any = None,
    corpus_ids: Any = None,
    verbose: bool = True,
) -> MinedNegatives:
    """For each query, the ``num_negatives`` best (or sampled) hard negatives in ``corpus``, exactly as
    :func:`hnsample.topk_similarity` defines them, streamed so that no (B, N) matrix and no whole
    memory-mapped corpus is ever in memory.

    Args:
        queries: (B, d) embeddings: torch tensor, numpy array, or a path to a .npy file (memory-mapped).
        corpus: (N, d) embeddings, same forms; a .npy path stays on disk and is read shard by shard.
            Same dtype as queries.
        positives: per-query positive corpus ids: (B, P) ids (-1 = padding), a list of lists, or a qrels
            TSV path (``query_id<TAB>doc_id``, BEIR and TREC layouts accepted) whose ids are mapped to
            rows through ``query_ids`` / ``corpus_ids`` (sequences or one-id-per-line files; default:
            the row number as a string). Positives are never returned and define p_i for the margins.
        num_negatives: k, negatives per query.
        exclude, query_labels, candidate_labels, positive_scores, absolute_margin, relative_margin,
        min_score, max_score, skip_top, pool, sampling, temperature, seed, generator: the filters and
            sampling of :func:`hnsample.topk_similarity`, with the same meaning (``exclude`` may also be a
            list of lists). A margin needs a positive score: a margin with neither positives nor
            ``positive_scores`` is a ValueError, and queries without a positive (which the margin cannot
            filter) get a warning naming them. ``temperature`` (softmax only) defaults to
            :data:`DEFAULT_TEMPERATURE` = 0.05, a temperature for cosine scores in [-1, 1]; with
            ``metric="dot"`` and no temperature a warning says so, since dot products have no fixed
            scale. The sampling noise is u(seed, global query row, global corpus id), so the
            result does not depend on batch sizes, shards, devices or ranks. With sampling and
            ``seed=None`` the seed is drawn once per run (from ``generator``), reused from the
            checkpoint manifest when resuming, and broadcast from rank 0 under torch.distributed.
        metric: "cosine" (the default here, in the miners and the samplers) or "dot" (the default of
            :func:`hnsample.topk_similarity` and the other ops, which take the scores as they are).
        query_batch_size: queries per batch (and per checkpoint file); default 16384.
        corpus_shard_size: corpus rows read (and, on a GPU, copied) at a time; default 256 MiB of rows.
        block_size: score elements per block (the score workspace is 4 * block_size bytes); default
            ``hnsample.settings`` ``block_size`` (2**22) on the CPU, ``cuda_block_size`` (2**24) on CUDA.
        device: "cpu", "cuda", "cuda:1", a list of devices (corpus shards are spread over them and the
            per-device states merged exactly) or "auto" (all GPUs; the CPU without one).
        progress: show a tqdm bar (queries/s, ETA) when tqdm is installed.
        checkpoint_dir: when given, each finished query batch is written there atomically (temp file +
            os.replace) next to a manifest of the run's parameters (input fingerprints: shape, dtype and
            a hash of 64 evenly spaced rows; digests of positives/exclude/labels; every filter, sampling
            and batching parameter). A rerun with the same parameters skips finished batches; a directory
            written with different parameters raises ValueError.
        filter_statistics: also count, exactly, how many candidates each filter removed (see
            :attr:`MinedNegatives.filter_counts`). The counts come from the same score blocks as the
            selection (no second matmul), at the price of a few elementwise passes per block.
        verbose: print the summary table (score quantiles, filter counts, short rows) at the end.

    Distributed: when torch.distributed is initialized every rank must call this with the same
    arguments; rank r mines corpus rows [r N / W, (r+1) N / W), and after each query batch the per-rank
    selection states are all-gathered and merged exactly (sampling included), so every rank returns the
    result a single process would. Only rank 0 writes checkpoints. An exception on any rank is reported
    to all ranks, which then raise RuntimeError naming the failing rank and its error.

    Memory (beyond the inputs' own storage, per device): the selection state b * c * 24 bytes (c =
    skip_top + num_negatives, or skip_top + pool when pool is set), the filter ids b * (P + E) * 8,
    positives' rows b * P * d * 4, one score block 4 * block_size, one converted corpus block
    (block_size / min(b, 1024)) * d * 4, on a GPU one corpus shard, the labels N * 8, plus the output
    B * (12 k + 8 P + 4). Here b = query_batch_size. filter_statistics adds about 12 * block_size bytes.
    Under torch.distributed, merging holds W copies of the batch's state.
    """
    group = _Group()
    err: BaseException | None = None
    run: _Run | None = None
    ckpt: CheckpointDir | None = None
    query_batch = 0
    try:
        run, query_batch = _prepare(
            queries, corpus, positives, group, num_negatives=num_negatives, exclude=exclude,
            query_labels=query_labels, candidate_labels=candidate_labels, positive_scores=positive_scores,
            absolute_margin=absolute_margin, relative_margin=relative_margin, min_score=min_score,
            max_score=max_score, skip_top=skip_top, pool=pool, sampling=sampling, temperature=temperature,
            seed=seed, generator=generator, metric=metric, query_batch_size=query_batch_size,
            corpus_shard_size=corpus_shard_size, block_size=block_size, device=device,
            checkpoint_dir=checkpoint_dir, filter_statistics=filter_statistics, query_ids=query_ids,
            corpus_ids=corpus_ids, progress=progress, verbose=verbose,
        )
    except Exception as e:
        err = e
    group.check(err, "argument validation")
    assert run is not None
    # Collectives only after every rank passed validation, so that a rank that failed early cannot
    # leave the others waiting in a broadcast it never joins.
    run.seed = group.broadcast(run.seed)
    try:
        ckpt = _open_checkpoint(run, checkpoint_dir, query_batch, group.rank)
    except Exception as e:
        err = e
    bar = None
    try:
        group.check(err, "opening checkpoint_dir")
        b_total, n = run.src_q.shape[0], run.src_c.shape[0]
        k = run.k

        n_filters = len(FILTERS) if run.filter_statistics else None
        # A finished batch is reused unless this run wants filter statistics its file does not hold
        # (written by a run without them): that batch is mined again, the same negatives plus counts.
        finished = group.broadcast(sorted(ckpt.finished(filter_columns=n_filters))
                                   if ckpt is not None and group.rank == 0 else [])
        indices = np.full((b_total, k), -1, dtype=np.int64)
        scores = np.full((b_total, k), -np.inf, dtype=np.float32)
        pos_scores = np.full((b_total,), np.nan, dtype=np.float32)
        width = 0 if run.positives is None else run.positives.shape[1]
        pair_scores = np.full((b_total, width), np.nan, dtype=np.float32)
        counts = np.zeros((b_total, len(FILTERS)), dtype=np.int64) if run.filter_statistics else None
        bar = _progress(b_total, progress and group.rank == 0)
        batches = [(i, q0, min(b_total, q0 + query_batch)) for i, q0 in enumerate(range(0, b_total, query_batch))]
        pending: BaseException | None = None
        for bi, q0, q1 in batches:
            out = None
            if bi in finished:
                try:
                    if group.rank == 0:  # every file is validated before use (ValueError naming it)
                        out = ckpt.read(bi, rows=q1 - q0, k=k, num_corpus=n, filter_columns=n_filters,
                                        positive_columns=width)
                except Exception as e:
                    pending = e
                group.check(pending, f"reading checkpoint batch {bi}")
                out = group.broadcast(out)
            else:
                local = None
                try:
                    with torch.no_grad():
                        local = _mine_batch(run, group, q0, q1)
                except Exception as e:
                    pending = pending or e
                group.check(pending, f"query batch {bi} (queries {q0}-{q1})")
                with torch.no_grad():
                    out = _finish_batch(run, group, local, q0)
                if ckpt is not None and group.rank == 0:
                    try:
                        ckpt.write(bi, out)
                    except Exception as e:  # reported to every rank at the next check
                        pending = e
            indices[q0:q1] = out["indices"]
            scores[q0:q1] = out["scores"]
            pos_scores[q0:q1] = out["positive_scores"]
            pair_scores[q0:q1] = out["positive_pair_scores"]
            if counts is not None:
                counts[q0:q1] = out["filter_counts"]
            if bar is not None:
                bar.update(q1 - q0)
        group.check(pending, "writing checkpoints")
    finally:
        if bar is not None:
            bar.close()
        if ckpt is not None:
            ckpt.close()  # releases the directory lock

    result = MinedNegatives(
        indices=torch.from_numpy(indices), scores=torch.from_numpy(scores),
        positive_scores=torch.from_numpy(pos_scores),
        positives=(run.positives if run.positives is not None
                   else torch.empty((b_total, 0), dtype=torch.int64)),
        params=dict(_params(run, n), query_batch_size=query_batch, filter_statistics=run.filter_statistics),
        positive_pair_scores=torch.from_numpy(pair_scores),
        query_ids=run.query_ids, corpus_ids=run.corpus_ids,
    )
    if counts is not None:
        removed = counts.sum(axis=1)
        eligible = n - removed
        skipped = np.minimum(eligible, run.select_kwargs["skip_top"])
        result.eligible = torch.from_numpy(eligible)
        result.filter_counts = {name: int(counts[:, i].sum()) for i, name in enumerate(FILTERS)}
        result.filter_counts["eligible"] = int(eligible.sum())
        result.filter_counts["skip_top"] = int(skipped.sum())
    if verbose and group.rank == 0:
        print(result.summary())
    return result


def _params(run: _Run, n: int) -> dict[str, Any]:
    kw = run.select_kwargs
    return {
        "num_negatives": run.k, "metric": run.metric, "num_queries": run.src_q.shape[0], "num_corpus": n,
        "absolute_margin": kw["absolute_margin"], "relative_margin": kw["relative_margin"],
        "min_score": kw["min_score"], "max_score": kw["max_score"], "skip_top": kw["skip_top"],
        "pool": kw["pool"], "sampling": kw["sampling"],
        "temperature": kw["temperature"] if kw["sampling"] == "softmax" else None, "seed": run.seed,
    }


def _prepare(queries, corpus, positives, group: _Group, *, num_negatives, exclude, query_labels,
             candidate_labels, positive_scores, absolute_margin, relative_margin, min_score, max_score,
             skip_top, pool, sampling, temperature, seed, generator, metric, query_batch_size,
             corpus_shard_size, block_size, device, checkpoint_dir, filter_statistics, query_ids, corpus_ids,
             progress, verbose):
    """Validates every argument (ValueError/TypeError naming it) and builds the run description."""
    src_q = MatrixSource("queries", queries)
    src_c = MatrixSource("corpus", corpus)
    if src_q.shape[1] != src_c.shape[1]:
        raise ValueError("queries and corpus must have the same dimension d, "
                         f"got {src_q.shape[1]} and {src_c.shape[1]}")
    if src_q.torch_dtype != src_c.torch_dtype:
        raise TypeError("queries and corpus must have the same dtype, "
                        f"got {src_q.torch_dtype} and {src_c.torch_dtype}")
    b, n = src_q.shape[0], src_c.shape[0]
    k = check_int("num_negatives", num_negatives, 0)
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"metric must be 'dot' or 'cosine', got {metric!r}")
    if not isinstance(sampling, str) or sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {sorted(SAMPLINGS)}, got {sampling!r}")
    qb = 16384 if query_batch_size is None else check_int("query_batch_size", query_batch_size, 1)
    d = src_c.shape[1]
    itemsize = torch.empty((), dtype=src_c.torch_dtype).element_size()
    shard = (max(1, (256 << 20) // max(1, d * itemsize)) if corpus_shard_size is None
             else check_int("corpus_shard_size", corpus_shard_size, 1))
    block = None if block_size is None else check_int("block_size", block_size, 1)
    flags = (("filter_statistics", filter_statistics), ("progress", progress), ("verbose", verbose))
    for name, flag in flags:
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    devices = resolve_devices(device)
    if block is None:
        block = _settings.current().block_size_for(devices[0].type)

    qids = None if query_ids is None else check_id_list("query_ids", read_ids("query_ids", query_ids), b)
    cids = None if corpus_ids is None else check_id_list("corpus_ids", read_ids("corpus_ids", corpus_ids), n)
    if isinstance(positives, (str, os.PathLike)):
        positives = read_qrels(positives, b, n, qids, cids)
    pos = positives_tensor("positives", positives, b, n)
    exc = positives_tensor("exclude", exclude, b, n)
    if (query_labels is None) != (candidate_labels is None):
        raise ValueError("query_labels and candidate_labels must be given together")
    ql = _labels_tensor("query_labels", query_labels, b)
    cl = _labels_tensor("candidate_labels", candidate_labels, n)
    ps = None
    if positive_scores is not None:
        ps = as_tensor("positive_scores", positive_scores).detach().cpu()
        if not ps.is_floating_point():
            raise TypeError(f"positive_scores must be a float tensor, got {ps.dtype}")
        if ps.ndim != 1 or ps.shape[0] != b:
            raise ValueError(f"positive_scores must have shape ({b},), got {tuple(ps.shape)}")
    temperature = resolve_temperature(sampling, temperature, metric)
    check_margin_rows(absolute_margin, relative_margin, pos, ps)
    select_kwargs = dict(
        absolute_margin=absolute_margin, relative_margin=relative_margin, min_score=min_score,
        max_score=max_score, skip_top=skip_top, pool=pool, sampling=sampling, temperature=temperature,
    )
    # Validate the filter/sampling arguments once, on an empty batch, before any work.
    build_selection(0, n, torch.device("cpu"), k, positives=None, exclude=None, query_labels=None,
                    candidate_labels=None, positive_scores=None, generator=None, seed=0,
                    positive_values=lambda _ids: None, **select_kwargs)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be a path or None, got {type(checkpoint_dir).__name__}")

    # The seed: explicit, else the checkpoint's, else drawn once (rank 0's is broadcast later).
    run_seed = None
    if sampling != "top":
        if seed is not None:
            run_seed = draw_seed(seed, None)
        else:
            stored = CheckpointDir.stored_manifest(checkpoint_dir) if checkpoint_dir is not None else None
            if stored is not None and stored.get("sampling") == sampling and stored.get("seed") is not None:
                run_seed = int(stored["seed"])
            else:
                run_seed = draw_seed(None, generator)

    # Rank r takes an equal slice of the corpus, cut into shards.
    lo, hi = group.rank * n // group.world, (group.rank + 1) * n // group.world
    shards = [(c0, min(hi, c0 + shard)) for c0 in range(lo, hi, shard)]
    run = _Run(src_q, src_c, pos, exc, ql, cl, ps, select_kwargs, k, metric, run_seed, devices, shards, block,
               filter_statistics, qids, cids)

    return run, qb


def _open_checkpoint(run: _Run, checkpoint_dir: PathLike | None, query_batch: int, rank: int
                     ) -> CheckpointDir | None:
    """The checkpoint directory, its manifest checked against (or written from, on rank 0) this run:
    every parameter that can change the result, and nothing that cannot (devices, shard sizes)."""
    if checkpoint_dir is None:
        return None
    manifest = {
        "format": 3, "queries": run.src_q.fingerprint(), "corpus": run.src_c.fingerprint(),
        **_params(run, run.src_c.shape[0]), "query_batch_size": query_batch,
        "positives": tensor_digest(run.positives), "exclude": tensor_digest(run.exclude),
        "query_labels": tensor_digest(run.query_labels),
        "candidate_labels": tensor_digest(run.candidate_labels),
        "positive_scores": tensor_digest(run.positive_scores),
    }
    return CheckpointDir(Path(checkpoint_dir), manifest, write=rank == 0)
