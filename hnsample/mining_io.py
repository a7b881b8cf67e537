"""Inputs of the mining pipeline: embedding matrices that stay on disk (memory-mapped .npy), positives
given as id lists or qrels TSV files, and the id files that map qrels ids to rows. The checkpoint
directory lives in :mod:`hnsample.checkpoint`, the result files in :mod:`hnsample.result_files`."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._ext import FLOAT_DTYPES, as_tensor, to_int64

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------------
# Embedding matrices


def load_npy(name: str, path: PathLike, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` of a .npy file (no pickles), every failure a ValueError naming ``name`` and the file:
    a missing, truncated or garbage file, or one holding a pickled object array."""
    try:
        data = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{name} file {str(path)!r} is not a readable .npy array: {e}") from None
    if not isinstance(data, np.ndarray):  # an .npz archive under a .npy name
        data.close()
        raise ValueError(f"{name} file {str(path)!r} is not a .npy array (it is an .npz archive)")
    return data


class MatrixSource:
    """A (rows, d) embedding matrix read in row ranges: a torch tensor, a numpy array, or a .npy file
    opened with ``np.load(mmap_mode="r")`` so that only the rows asked for are ever read from disk.

    ``rows(i0, i1)`` returns a CPU (or the tensor's own device) torch view without copying when the
    data allows it; ``take(ids)`` gathers arbitrary rows (a fancy-index read of just those rows).
    """

    def __init__(self, name: str, data: Any):
        self.name = name
        self.path: Path | None = None
        if isinstance(data, (str, os.PathLike)):
            self.path = Path(data)
            if self.path.suffix != ".npy":
                raise ValueError(f"{name} path must name a .npy file, got {str(data)!r}")
            if not self.path.is_file():
                raise ValueError(f"{name} file does not exist: {str(data)!r}")
            data = load_npy(name, self.path, mmap_mode="r")
        if isinstance(data, np.ndarray):
            # Big-endian (and other non-native) arrays are accepted: rows are converted as they are read.
            native = data.dtype.newbyteorder("=")
            if native not in (np.float16, np.float32, np.float64):
                raise TypeError(f"{name} must hold float16, float32 or float64 values, got {data.dtype}")
            self.torch_dtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                                np.dtype(np.float64): torch.float64}[native]
        elif isinstance(data, torch.Tensor):
            if data.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {data.dtype}")
            self.torch_dtype = data.dtype
            data = data.detach()
        else:
            raise TypeError(f"{name} must be a torch.Tensor, numpy.ndarray or a path to a .npy file, "
                            f"got {type(data).__name__}")
        if data.ndim != 2:
            raise ValueError(f"{name} must be 2-D (rows, d), got shape {tuple(data.shape)}")
        self.data = data
        self.shape: tuple[int, int] = (int(data.shape[0]), int(data.shape[1]))

    @property
    def device(self) -> torch.device:
        return self.data.device if isinstance(self.data, torch.Tensor) else torch.device("cpu")

    def _as_torch(self, a: np.ndarray) -> torch.Tensor:
        # torch holds only native byte order and non-negative strides: such rows are copied (one shard
        # at a time, so a memory-mapped file is still never read whole).
        if not a.dtype.isnative:
            a = a.astype(a.dtype.newbyteorder("="))
        elif any(st < 0 for st in a.strides):
            a = np.ascontiguousarray(a)
        with warnings.catch_warnings():
            # A read-only memory map cannot be written through the tensor; nothing here writes to it.
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(a)

    def rows(self, i0: int, i1: int) -> torch.Tensor:
        """Rows [i0, i1): a view when possible (memory-mapped pages are read on first touch)."""
        if isinstance(self.data, torch.Tensor):
            return self.data[i0:i1]
        return self._as_torch(self.data[i0:i1])

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ids (any shape of int64 ids in range) as a tensor of shape ids.shape + (d,)."""
        flat = ids.reshape(-1)
        if isinstance(self.data, torch.Tensor):
            out = self.data[flat.to(self.data.device)]
        else:
            out = self._as_torch(np.ascontiguousarray(self.data[flat.cpu().numpy()]))
        return out.reshape(*ids.shape, self.shape[1])

    def fingerprint(self) -> dict[str, Any]:
        """Identifies the data for the checkpoint manifest without reading it whole: the shape, dtype
        and a SHA-256 of up to 64 evenly spaced rows. Deliberately not the path or mtime, so that a copied
        or moved file still resumes; a change confined to rows outside the sample goes unnoticed."""
        n = self.shape[0]
        pick = np.unique(np.linspace(0, max(n - 1, 0), num=min(n, 64)).astype(np.int64))
        sample = self.take(torch.from_numpy(pick)).to(torch.float64).cpu().numpy()
        return {"shape": list(self.shape), "dtype": str(self.torch_dtype).replace("torch.", ""),
                "sample_sha256": hashlib.sha256(sample.tobytes()).hexdigest()}


# ----------------------------------------------------------------------------------------------------
# Ids, qrels and positives


def read_text(name: str, p: Path) -> str:
    """A UTF-8 text file's contents without a leading byte-order mark; ValueError naming ``name`` and
    the file when it is not UTF-8."""
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name} file {str(p)!r} is not UTF-8 text: {e}") from None


def read_ids(name: str, ids: Any) -> list[str]:
    """String ids, one per row: a sequence, or a UTF-8 text file with one id per line (a byte-order
    mark is dropped, line i is the id of row i). A blank line before the last id raises ValueError
    naming the line, since skipping it would shift every later id onto the wrong row; blank lines after
    the last id are ignored."""
    if isinstance(ids, (str, os.PathLike)):
        p = Path(ids)
        if not p.is_file():
            raise ValueError(f"{name} file does not exist: {str(ids)!r}")
        lines = read_text(name, p).splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                raise ValueError(f"{name} file {str(ids)!r} line {lineno} is blank; every line before the "
                                 "last id must hold the id of its row")
        return lines
    if isinstance(ids, (np.ndarray, torch.Tensor)):
        return [str(x) for x in ids.tolist()]
    if isinstance(ids, Sequence):
        return [str(x) for x in ids]
    raise TypeError(f"{name} must be a sequence of ids or a path to an id file, got {type(ids).__name__}")


def _id_map(name: str, ids: list[str] | None, n: int) -> dict[str, int]:
    if ids is None:
        return {str(i): i for i in range(n)}
    if len(ids) != n:
        raise ValueError(f"{name} must have one id per row ({n}), got {len(ids)}")
    out: dict[str, int] = {}
    for i, x in enumerate(ids):
        if x in out:
            raise ValueError(f"{name} has a duplicate id {x!r} (rows {out[x]} and {i})")
        out[x] = i
    return out


def check_id_list(name: str, ids: list[str], n: int) -> list[str]:
    """ids, after checking that there is one per row and none twice (ValueError naming ``name``)."""
    _id_map(name, ids, n)
    return ids


def read_qrels(path: PathLike, num_queries: int, num_corpus: int, query_ids: list[str] | None = None,
               corpus_ids: list[str] | None = None) -> list[list[int]]:
    """Positives from a qrels TSV file, as a list (one per query row) of corpus row ids.

    Accepted line layouts (tab-separated, or separated by spaces on a line without a tab, as TREC
    qrels often are): ``query_id doc_id``; ``query_id doc_id score`` (BEIR; rows
    with score <= 0 are not positives); ``query_id iteration doc_id relevance`` (TREC; relevance <= 0
    skipped). The file is UTF-8 (a byte-order mark is dropped); blank lines are skipped. The first line
    is a header (and skipped) when, by its content, it is no data line: its score column is a word
    that is not a number and its ids are no known ids (BEIR's ``query-id corpus-id score``). Ids are
    mapped to rows through ``query_ids`` / ``corpus_ids`` (the string id of each row; default: the row
    number). Every other problem raises ValueError naming the file and the line: an id that maps to no
    row, an empty or non-numeric score, a NaN or infinite score, a wrong number of columns.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"positives file does not exist: {str(path)!r}")
    qmap = _id_map("query_ids", query_ids, num_queries)
    cmap = _id_map("corpus_ids", corpus_ids, num_corpus)
    out: list[list[int]] = [[] for _ in range(num_queries)]
    where = f"positives file {str(path)!r}"
    for lineno, line in enumerate(read_text("positives", p).splitlines(), 1):
        if not line.strip():
            continue
        # Tab-separated; a line without a tab is split at runs of spaces (TREC's "qid 0 docid rel").
        cols = line.split("\t") if "\t" in line else line.split()
        if len(cols) == 2:
            qid, did, rel = cols[0], cols[1], None
        elif len(cols) == 3:
            qid, did, rel = cols
        elif len(cols) == 4:
            qid, _, did, rel = cols
        else:
            raise ValueError(f"{where} line {lineno}: expected 2-4 tab- or space-separated columns, got {len(cols)}")
        if rel is not None:
            try:
                relevance = float(rel)
            except ValueError:
                if lineno == 1 and rel.strip() and qid not in qmap and did not in cmap:
                    continue  # header
                what = "is empty" if not rel.strip() else "is not a number"
                raise ValueError(f"{where} line {lineno}: relevance {rel!r} {what}") from None
            if not math.isfinite(relevance):
                raise ValueError(f"{where} line {lineno}: relevance {rel!r} is not a finite number")
            if relevance <= 0:
                continue
        if qid not in qmap:
            raise ValueError(f"{where} line {lineno}: unknown query id {qid!r}")
        if did not in cmap:
            raise ValueError(f"{where} line {lineno}: unknown corpus id {did!r}")
        row = out[qmap[qid]]
        if cmap[did] not in row:
            row.append(cmap[did])
    return out


def padded_id_rows(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """(len(rows), longest row) int64 CPU tensor of integer id rows, padded with -1."""
    lens = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    width = int(lens.max()) if len(rows) else 0
    out = np.full((len(rows), width), -1, dtype=np.int64)
    out[np.arange(width) < lens[:, None]] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64,
                                                        count=int(lens.sum()))
    return torch.from_numpy(out)


def positives_tensor(name: str, positives: Any, rows: int, n: int) -> torch.Tensor | None:
    """(rows, P) int64 CPU tensor from a tensor/array of ids (-1 = padding; 1-D means one per row) or
    a list of lists of ids (ragged rows padded with -1). Ids must lie in [0, n)."""
    if positives is None:
        return None
    if isinstance(positives, np.ndarray):
        positives = as_tensor(name, positives)
    if isinstance(positives, torch.Tensor):
        t = positives.detach().cpu()
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name} must hold integer ids, got {t.dtype}")
        if t.ndim == 1:
            t = t.unsqueeze(1)
        t = to_int64(name, t)
    elif isinstance(positives, Sequence) and not isinstance(positives, str):
        lists = []
        for r in positives:
            if isinstance(r, (int, np.integer)) and not isinstance(r, bool):
                if not -1 <= int(r) < n:
                    raise ValueError(f"{name} must hold corpus ids in [0, {n}) or -1 for padding")
                lists.append([int(r)])
            elif isinstance(r, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(r, str):
                vals = r.tolist() if isinstance(r, (np.ndarray, torch.Tensor)) else list(r)
                if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in vals):
                    raise TypeError(f"{name} must hold integer ids")
                vals = [int(v) for v in vals]
                if any(v < -1 or v >= n for v in vals):
                    raise ValueError(f"{name} must hold corpus ids in [0, {n}) or -1 for padding")
                lists.append(vals)
            else:
                raise TypeError(f"{name} rows must be lists of integer ids, got {type(r).__name__}")
        t = padded_id_rows(lists)
    else:
        raise TypeError(f"{name} must be a tensor/array of ids, a list of lists or a qrels path, "
                        f"got {type(positives).__name__}")
    if t.ndim != 2 or t.shape[0] != rows:
        raise ValueError(f"{name} must have one row per query: shape ({rows}, P), got {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < -1 or int(t.max()) >= n):
        raise ValueError(f"{name} must hold corpus ids in [0, {n}) or -1 for padding")
    return t.contiguous()


def tensor_digest(t: torch.Tensor | None) -> str | None:
    """SHA-256 of a tensor's shape, dtype and values (None for None)."""
    if t is None:
        return None
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_candidate_scores(path: PathLike, num_queries: int, num_corpus: int, query_ids: list[str] | None = None,
                          corpus_ids: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query candidate lists with a reranker's scores, as (candidate_ids (B, C) int64 padded with -1,
    scores (B, C) float32), C the longest list. Accepted files:

    * ``.npz`` with ``candidate_ids`` (B, C) integers (-1 = padding) and ``scores`` (B, C) floats;
    * ``.jsonl``: one object per query, ``{"query": id, "candidates": [ids], "scores": [floats]}``;
    * any other name is read as text lines, tab- or space-separated: ``query_id doc_id score``, or a
      TREC run ``query_id Q0 doc_id rank score tag``.

    Ids are mapped to rows through ``query_ids`` / ``corpus_ids`` (default: the row number). ValueError
    naming the file and the line for an unknown id, a candidate listed twice for a query, a score that
    is not a finite number, or a wrong number of columns."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"candidate scores file does not exist: {str(path)!r}")
    where = f"candidate scores file {str(path)!r}"
    qmap = _id_map("query_ids", query_ids, num_queries)
    cmap = _id_map("corpus_ids", corpus_ids, num_corpus)
    if p.suffix.lower() == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                ids, scores = np.asarray(z["candidate_ids"]), np.asarray(z["scores"])
        except (ValueError, OSError, EOFError, KeyError) as e:
            raise ValueError(f"{where} is not an .npz with candidate_ids and scores ({type(e).__name__}: {e})") from None
        if ids.dtype.kind not in "iu" or scores.dtype.kind != "f" or ids.shape != scores.shape or ids.ndim != 2:
            raise ValueError(f"{where}: candidate_ids must be (B, C) integers and scores (B, C) floats, got "
                             f"{ids.dtype} {ids.shape} and {scores.dtype} {scores.shape}")
        if ids.shape[0] != num_queries:
            raise ValueError(f"{where} holds {ids.shape[0]} rows, but there are {num_queries} queries")
        if ids.size and (ids.min() < -1 or ids.max() >= num_corpus):
            raise ValueError(f"{where}: candidate_ids must lie in [0, {num_corpus}) or be -1")
        return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(scores.astype(np.float32))
    lists: list[dict[int, float]] = [{} for _ in range(num_queries)]

    def add(q: Any, d: Any, score: Any, line: int) -> None:
        q, d = str(q), str(d)
        if q not in qmap:
            raise ValueError(f"{where} line {line}: unknown query id {q!r}")
        if d not in cmap:
            raise ValueError(f"{where} line {line}: unknown corpus id {d!r}")
        try:
            value = float(score)
        except (TypeError, ValueError):
            raise ValueError(f"{where} line {line}: score {score!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{where} line {line}: score {score!r} is not a finite number")
        row = lists[qmap[q]]
        if cmap[d] in row:
            raise ValueError(f"{where} line {line}: corpus id {d!r} is listed twice for query {q!r}")
        row[cmap[d]] = value

    for lineno, line in enumerate(read_text("candidate scores", p).splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix.lower() == ".jsonl":
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where} line {lineno} is not valid JSON ({e})") from None
            if (not isinstance(obj, dict) or "query" not in obj or not isinstance(obj.get("candidates"), list)
                    or not isinstance(obj.get("scores"), list) or len(obj["candidates"]) != len(obj["scores"])):
                raise ValueError(f"{where} line {lineno}: expected {{\"query\", \"candidates\": [...], "
                                 "\"scores\": [...]}} with as many scores as candidates")
            for d, sc in zip(obj["candidates"], obj["scores"], strict=True):
                add(obj["query"], d, sc, lineno)
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        if len(cols) == 3:
            add(cols[0], cols[1], cols[2], lineno)
        elif len(cols) == 6:
            add(cols[0], cols[2], cols[4], lineno)
        else:
            raise ValueError(f"{where} line {lineno}: expected 'query_id doc_id score' or a TREC run line "
                             f"(6 columns), got {len(cols)} columns")
    width = max((len(r) for r in lists), default=0)
    ids_t = torch.full((num_queries, width), -1, dtype=torch.int64)
    scores_t = torch.full((num_queries, width), math.nan, dtype=torch.float32)
    for i, row in enumerate(lists):
        if row:
            ids_t[i, :len(row)] = torch.tensor(list(row), dtype=torch.int64)
            scores_t[i, :len(row)] = torch.tensor(list(row.values()), dtype=torch.float32)
    return ids_t, scores_t
