"""Input and output for the mining pipeline: embedding matrices that stay on disk (memory-mapped .npy),
positives given as id lists or qrels TSV files, result files (parquet / jsonl / npz) and the atomic
checkpoint directory that makes long mining jobs resumable."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._ext import FLOAT_DTYPES

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------------
# Embedding matrices


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
            try:
                data = np.load(self.path, mmap_mode="r")
            except ValueError as e:
                raise ValueError(f"{name} file {str(data)!r} is not a readable .npy array: {e}") from None
        if isinstance(data, np.ndarray):
            if data.dtype not in (np.float16, np.float32, np.float64):
                raise TypeError(f"{name} must hold float16, float32 or float64 values, got {data.dtype}")
            self.torch_dtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                                np.dtype(np.float64): torch.float64}[data.dtype]
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


def read_ids(name: str, ids: Any) -> list[str]:
    """String ids, one per row: a sequence, or a text file with one id per line."""
    if isinstance(ids, (str, os.PathLike)):
        p = Path(ids)
        if not p.is_file():
            raise ValueError(f"{name} file does not exist: {str(ids)!r}")
        return [line.rstrip("\r\n") for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
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


def read_qrels(path: PathLike, num_queries: int, num_corpus: int, query_ids: list[str] | None = None,
               corpus_ids: list[str] | None = None) -> list[list[int]]:
    """Positives from a qrels TSV file, as a list (one per query row) of corpus row ids.

    Accepted line layouts (tab-separated): ``query_id doc_id``; ``query_id doc_id score`` (BEIR; rows
    with score <= 0 are not positives); ``query_id iteration doc_id relevance`` (TREC; relevance <= 0
    skipped). A first line whose score column is not a number is a header and skipped. Ids are mapped
    to rows through ``query_ids`` / ``corpus_ids`` (the string id of each row; default: the row
    number). An id that maps to no row raises ValueError naming the line.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"positives file does not exist: {str(path)!r}")
    qmap = _id_map("query_ids", query_ids, num_queries)
    cmap = _id_map("corpus_ids", corpus_ids, num_corpus)
    out: list[list[int]] = [[] for _ in range(num_queries)]
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) == 2:
                qid, did, rel = cols[0], cols[1], None
            elif len(cols) == 3:
                qid, did, rel = cols
            elif len(cols) == 4:
                qid, _, did, rel = cols
            else:
                raise ValueError(
                    f"positives file line {lineno}: expected 2-4 tab-separated columns, got {len(cols)}")
            if rel is not None:
                try:
                    relevance = float(rel)
                except ValueError:
                    if lineno == 1:
                        continue  # header
                    raise ValueError(
                        f"positives file line {lineno}: relevance {rel!r} is not a number") from None
                if relevance <= 0:
                    continue
            if qid not in qmap:
                raise ValueError(f"positives file line {lineno}: unknown query id {qid!r}")
            if did not in cmap:
                raise ValueError(f"positives file line {lineno}: unknown corpus id {did!r}")
            row = out[qmap[qid]]
            if cmap[did] not in row:
                row.append(cmap[did])
    return out


def positives_tensor(name: str, positives: Any, rows: int, n: int) -> torch.Tensor | None:
    """(rows, P) int64 CPU tensor from a tensor/array of ids (-1 = padding; 1-D means one per row) or
    a list of lists of ids (ragged rows padded with -1). Ids must lie in [0, n)."""
    if positives is None:
        return None
    if isinstance(positives, np.ndarray):
        positives = torch.from_numpy(positives)
    if isinstance(positives, torch.Tensor):
        t = positives.detach().cpu()
        if t.dtype in FLOAT_DTYPES or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name} must hold integer ids, got {t.dtype}")
        if t.ndim == 1:
            t = t.unsqueeze(1)
        t = t.to(torch.int64)
    elif isinstance(positives, Sequence) and not isinstance(positives, str):
        lists = []
        for r in positives:
            if isinstance(r, (int, np.integer)) and not isinstance(r, bool):
                lists.append([int(r)])
            elif isinstance(r, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(r, str):
                vals = r.tolist() if isinstance(r, (np.ndarray, torch.Tensor)) else list(r)
                if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in vals):
                    raise TypeError(f"{name} must hold integer ids")
                lists.append([int(v) for v in vals])
            else:
                raise TypeError(f"{name} rows must be lists of integer ids, got {type(r).__name__}")
        width = max((len(r) for r in lists), default=0)
        t = torch.full((len(lists), width), -1, dtype=torch.int64)
        for i, r in enumerate(lists):
            if r:
                t[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
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


# ----------------------------------------------------------------------------------------------------
# Atomic file writes and the checkpoint directory


def atomic_write(path: Path, write) -> None:
    """Calls write(file_object) on a temporary file in path's directory, fsyncs it and renames it over
    path: a reader sees either the old file or the complete new one, never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class CheckpointDir:
    """A directory of finished query batches: ``manifest.json`` (the run's parameters) plus one
    ``batch_<i>.npz`` per finished batch, every file written atomically (temp file + os.replace).
    Opening a directory whose manifest differs from the run's parameters raises ValueError listing the
    differing keys; temporary files left by a killed process are ignored and never read."""

    MANIFEST = "manifest.json"

    def __init__(self, path: PathLike, manifest: dict[str, Any], write: bool = True):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"checkpoint_dir is not a directory: {str(path)!r}")
        # json round-trip so that tuples/lists and ints/floats compare as they were stored
        manifest = json.loads(json.dumps(manifest))
        mpath = self.path / self.MANIFEST
        if mpath.is_file():
            stored = json.loads(mpath.read_text(encoding="utf-8"))
            if stored != manifest:
                keys = sorted(k for k in set(stored) | set(manifest) if stored.get(k) != manifest.get(k))
                detail = "; ".join(f"{k}: stored {stored.get(k)!r}, now {manifest.get(k)!r}" for k in keys)
                raise ValueError(f"checkpoint_dir {str(path)!r} was written by a run with different "
                                 f"parameters ({detail}); use a new directory or the same parameters")
        elif write:
            data = json.dumps(manifest, indent=1, sort_keys=True).encode()
            atomic_write(mpath, lambda f: f.write(data))
        self.manifest = manifest

    @staticmethod
    def stored_manifest(path: PathLike) -> dict[str, Any] | None:
        mpath = Path(path) / CheckpointDir.MANIFEST
        if not mpath.is_file():
            return None
        return json.loads(mpath.read_text(encoding="utf-8"))

    def batch_path(self, index: int) -> Path:
        return self.path / f"batch_{index:07d}.npz"

    def finished(self) -> set[int]:
        """Indices of the batches whose files are complete (atomic renames make existence enough)."""
        out = set()
        for p in self.path.glob("batch_*.npz"):
            try:
                out.add(int(p.stem.split("_")[1]))
            except ValueError:
                continue
        return out

    def write(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        atomic_write(self.batch_path(index), lambda f: np.savez(f, **arrays))

    def read(self, index: int) -> dict[str, np.ndarray]:
        with np.load(self.batch_path(index), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------------------------------
# Result files


def _json_float(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


def save_result(path: PathLike, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Writes the result arrays (indices (B, k), scores (B, k), positive_scores (B,), positives (B, P))
    by extension: .npz (all arrays plus meta as JSON), .jsonl (one object per query:
    ``{"query", "negatives", "scores", "positive_score", "positives"}``, non-finite scores as null;
    meta in a first ``{"meta": ...}`` line) or .parquet (pyarrow; one row per query, meta in the schema
    metadata). Written atomically."""
    p = Path(path)
    ext = p.suffix.lower()
    meta_json = json.dumps(meta)
    if ext == ".npz":
        atomic_write(p, lambda f: np.savez(f, meta=np.array(meta_json), **arrays))
    elif ext == ".jsonl":
        def write(f):
            f.write((json.dumps({"meta": meta}) + "\n").encode())
            for i in range(arrays["indices"].shape[0]):
                rec = {
                    "query": i,
                    "negatives": arrays["indices"][i].tolist(),
                    "scores": [_json_float(v) for v in arrays["scores"][i].tolist()],
                    "positive_score": _json_float(float(arrays["positive_scores"][i])),
                    "positives": arrays["positives"][i].tolist(),
                }
                f.write((json.dumps(rec) + "\n").encode())
        atomic_write(p, write)
    elif ext == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(
                "saving to .parquet needs pyarrow (pip install pyarrow); use .npz or .jsonl") from None
        table = pa.table({
            "query": pa.array(np.arange(arrays["indices"].shape[0], dtype=np.int64)),
            "negatives": pa.array(list(arrays["indices"]), type=pa.list_(pa.int64())),
            "scores": pa.array(list(arrays["scores"]), type=pa.list_(pa.float32())),
            "positive_score": pa.array(arrays["positive_scores"], type=pa.float32()),
            "positives": pa.array(list(arrays["positives"]), type=pa.list_(pa.int64())),
        }).replace_schema_metadata({"hnsample": meta_json})
        atomic_write(p, lambda f: pq.write_table(table, f))
    else:
        raise ValueError(f"path must end in .parquet, .jsonl or .npz, got {str(path)!r}")


def _stack(rows: list[list[Any]], width: int, dtype, fill) -> np.ndarray:
    out = np.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = [fill if v is None else v for v in r]
    return out


def load_result(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reads a file written by :func:`save_result`: (arrays, meta)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"path does not exist: {str(path)!r}")
    ext = p.suffix.lower()
    if ext == ".npz":
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "meta"}
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        return arrays, meta
    if ext == ".jsonl":
        meta: dict[str, Any] = {}
        recs = []
        with p.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                obj = json.loads(line)
                if "meta" in obj and "query" not in obj:
                    meta = obj["meta"]
                else:
                    recs.append(obj)
        recs.sort(key=lambda r: r["query"])
        k = int(meta.get("num_negatives", max((len(r["negatives"]) for r in recs), default=0)))
        width_p = max((len(r["positives"]) for r in recs), default=0)
        arrays = {
            "indices": _stack([r["negatives"] for r in recs], k, np.int64, -1),
            "scores": _stack([r["scores"] for r in recs], k, np.float32, -np.inf),
            "positive_scores": np.array([np.nan if r["positive_score"] is None else r["positive_score"]
                                         for r in recs], dtype=np.float32),
            "positives": _stack([r["positives"] for r in recs], width_p, np.int64, -1),
        }
        return arrays, meta
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("loading .parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(p)
        raw = (table.schema.metadata or {}).get(b"hnsample")
        meta = json.loads(raw) if raw else {}
        cols = table.to_pydict()
        k = int(meta.get("num_negatives", max((len(r) for r in cols["negatives"]), default=0)))
        width_p = max((len(r) for r in cols["positives"]), default=0)
        arrays = {
            "indices": _stack(cols["negatives"], k, np.int64, -1),
            "scores": _stack(cols["scores"], k, np.float32, -np.inf),
            "positive_scores": np.array([np.nan if v is None else v for v in cols["positive_score"]],
                                        dtype=np.float32),
            "positives": _stack(cols["positives"], width_p, np.int64, -1),
        }
        return arrays, meta
    raise ValueError(f"path must end in .parquet, .jsonl or .npz, got {str(path)!r}")
