"""Result files of :class:`hnsample.MinedNegatives`: .npz, .jsonl (one object per query) and .parquet,
written atomically and read back with every row placed by its query id and checked.

The .jsonl and .parquet files are plain tables that ``datasets.load_dataset("json" | "parquet")`` and
pandas read as they are: one record per query, ``query`` (its string id, or its row number when the run
had no ids), ``negatives`` (the found negatives' ids, best first, no padding), ``scores``,
``positive_score`` (p_i, the margins' reference), ``positives`` and ``positive_pair_scores`` (each
positive's own score). The metadata (parameters, filter counts, the id lists that map ids back to rows)
lives in the parquet schema's metadata, or for .jsonl in a sidecar ``<file>.meta.json``."""

from __future__ import annotations

import json
import math
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import atomic_write
from .mining_io import PathLike


def _json_float(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


def check_result_path(path: PathLike) -> None:
    """ValueError unless ``path`` can receive a result: a .parquet (with pyarrow installed), .jsonl or
    .npz name that is not a directory. Cheap, so a long job can check its output before it starts."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext not in (".parquet", ".jsonl", ".npz"):
        raise ValueError(f"path must end in .parquet, .jsonl or .npz, got {str(path)!r}")
    if ext == ".parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise ValueError(
                "saving to .parquet needs pyarrow (pip install pyarrow); use .npz or .jsonl") from None
    if p.is_dir():
        raise ValueError(f"path {str(path)!r} is a directory")


def meta_path(path: PathLike) -> Path:
    """The metadata sidecar of a .jsonl result file: ``<file>.meta.json``."""
    p = Path(path)
    return p.with_name(p.name + ".meta.json")


def _records(arrays: dict[str, np.ndarray], query_ids: list[str] | None,
             corpus_ids: list[str] | None) -> dict[str, list]:
    """The per-query columns of a .jsonl / .parquet file (found negatives and valid positives only)."""
    idx, sc, pos = arrays["indices"], arrays["scores"], arrays["positives"]
    pair = arrays.get("positive_pair_scores")
    b = idx.shape[0]

    def cid(j: int) -> Any:
        return corpus_ids[j] if corpus_ids is not None else j

    cols: dict[str, list] = {"query": [], "negatives": [], "scores": [], "positive_score": [], "positives": [],
                             "positive_pair_scores": []}
    for i in range(b):
        found = idx[i] >= 0
        valid = pos[i] >= 0
        cols["query"].append(query_ids[i] if query_ids is not None else i)
        cols["negatives"].append([cid(j) for j in idx[i][found].tolist()])
        cols["scores"].append([_json_float(v) for v in sc[i][found].tolist()])
        cols["positive_score"].append(_json_float(float(arrays["positive_scores"][i])))
        cols["positives"].append([cid(j) for j in pos[i][valid].tolist()])
        cols["positive_pair_scores"].append(
            [None] * int(valid.sum()) if pair is None else [_json_float(v) for v in pair[i][valid].tolist()])
    return cols


def save_result(path: PathLike, arrays: dict[str, np.ndarray], meta: dict[str, Any],
                query_ids: list[str] | None = None, corpus_ids: list[str] | None = None) -> None:
    """Writes the result arrays (indices (B, k), scores (B, k), positive_scores (B,), positives (B, P),
    optionally positive_pair_scores (B, P) and eligible (B,)) by extension, atomically:

    * .npz: every array, meta as JSON, the id lists as string arrays;
    * .jsonl: one object per query (see the module docstring; non-finite scores as null), nothing else,
      so it loads as a table; meta and the id lists in the sidecar :func:`meta_path`;
    * .parquet (pyarrow): the same columns, meta and id lists in the schema metadata.

    With ``query_ids`` / ``corpus_ids`` the records name queries and documents by them."""
    check_result_path(path)
    p = Path(path)
    ext = p.suffix.lower()
    full_meta = dict(meta, query_ids=query_ids, corpus_ids=corpus_ids)
    if ext == ".npz":
        ids = {name: np.array(v, dtype=str) for name, v in (("query_ids", query_ids), ("corpus_ids", corpus_ids))
               if v is not None}
        atomic_write(p, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **arrays, **ids))
        return
    cols = _records(arrays, query_ids, corpus_ids)
    if ext == ".jsonl":
        def write(f):
            keys = list(cols)
            for row in zip(*(cols[key] for key in keys), strict=True):
                f.write((json.dumps(dict(zip(keys, row, strict=True))) + "\n").encode())
        data = json.dumps(full_meta).encode()
        atomic_write(meta_path(p), lambda f: f.write(data))
        atomic_write(p, write)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    id_type = pa.string() if corpus_ids is not None else pa.int64()
    table = pa.table({
        "query": pa.array(cols["query"], type=pa.string() if query_ids is not None else pa.int64()),
        "negatives": pa.array(cols["negatives"], type=pa.list_(id_type)),
        "scores": pa.array(cols["scores"], type=pa.list_(pa.float32())),
        "positive_score": pa.array(cols["positive_score"], type=pa.float32()),
        "positives": pa.array(cols["positives"], type=pa.list_(id_type)),
        "positive_pair_scores": pa.array(cols["positive_pair_scores"], type=pa.list_(pa.float32())),
    }).replace_schema_metadata({"hnsample": json.dumps(full_meta)})
    atomic_write(p, lambda f: pq.write_table(table, f))


_RECORD_KEYS = ("query", "negatives", "scores", "positive_score", "positives")


def _id_lookup(meta: dict[str, Any], key: str) -> dict[str, int] | None:
    ids = meta.get(key)
    if ids is None:
        return None
    if not isinstance(ids, list) or any(not isinstance(x, str) for x in ids):
        raise ValueError(f"metadata {key} must be a list of strings")
    return {x: i for i, x in enumerate(ids)}


def _rows_from_ids(records: list[dict[str, Any]], where: list[str], meta: dict[str, Any]) -> None:
    """Replaces, in place, string ids by rows through the metadata's id lists (ValueError naming the
    record for an unknown id, or for string ids without the lists)."""
    qmap, cmap = _id_lookup(meta, "query_ids"), _id_lookup(meta, "corpus_ids")

    def to_row(value: Any, lookup: dict[str, int] | None, what: str, w: str) -> Any:
        if not isinstance(value, str):
            return value
        if lookup is None:
            raise ValueError(f"{w}: {what} {value!r} is a string id but the metadata holds no id list to map it "
                             "to a row (for .jsonl: the .meta.json file beside it)")
        if value not in lookup:
            raise ValueError(f"{w}: {what} {value!r} is not a known id")
        return lookup[value]

    for rec, w in zip(records, where, strict=True):
        if "query" in rec:
            rec["query"] = to_row(rec["query"], qmap, "query", w)
        for key in ("negatives", "positives"):
            if isinstance(rec.get(key), list):
                rec[key] = [to_row(v, cmap, "corpus id", w) for v in rec[key]]


def _row(vals: Any, width: int, kind: str, what: str) -> np.ndarray:
    """One record's list as a padded row: ids (int64, padded with -1; every entry an int) or scores
    (float32, padded with -inf; None for a non-finite score)."""
    if not isinstance(vals, list):
        raise ValueError(f"{what} is not a list")
    if len(vals) > width:
        raise ValueError(f"{what} has {len(vals)} entries, more than the {width} of the file")
    if kind == "ids":
        if any(isinstance(v, bool) or not isinstance(v, int) for v in vals):
            raise ValueError(f"{what} holds a value that is not an integer id")
        out = np.full(width, -1, dtype=np.int64)
        out[: len(vals)] = vals
        return out
    if any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in vals):
        raise ValueError(f"{what} holds a value that is not a number")
    out = np.full(width, -np.inf, dtype=np.float32)
    out[: len(vals)] = [-np.inf if v is None else v for v in vals]
    return out


def _from_records(records: list[dict[str, Any]], where: list[str], num_queries: int | None, k: int | None
                  ) -> dict[str, np.ndarray]:
    """The result arrays from per-query records, row q taken from the record whose ``query`` is q. Raises
    ValueError (without the file's name) naming the record for a missing, repeated or bad query id and
    for a malformed field."""
    b = len(records) if num_queries is None else num_queries
    at: list[int | None] = [None] * b
    for i, rec in enumerate(records):
        missing = [key for key in _RECORD_KEYS if key not in rec]
        if missing:
            raise ValueError(f"{where[i]} has no field {missing[0]!r}")
        q = rec["query"]
        if isinstance(q, bool) or not isinstance(q, int):
            raise ValueError(f"{where[i]}: query {q!r} is not an integer")
        if not 0 <= q < b:
            raise ValueError(f"{where[i]}: query {q} is outside [0, {b}) ({b} queries)")
        if at[q] is not None:
            raise ValueError(f"{where[i]}: query {q} appears twice (also {where[at[q]]})")
        at[q] = i
    absent = [q for q, i in enumerate(at) if i is None]
    if absent:
        raise ValueError(f"no record for queries {absent[:10]}{' ...' if len(absent) > 10 else ''} "
                         f"({len(absent)} of {b})")
    if k is None:
        k = max((len(r["negatives"]) for r in records if isinstance(r["negatives"], list)), default=0)
    width_p = max((len(r["positives"]) for r in records if isinstance(r["positives"], list)), default=0)
    arrays = {"indices": np.full((b, k), -1, dtype=np.int64), "scores": np.full((b, k), -np.inf, np.float32),
              "positive_scores": np.full((b,), np.nan, np.float32),
              "positives": np.full((b, width_p), -1, dtype=np.int64)}
    with_pairs = bool(records) and all(isinstance(r.get("positive_pair_scores"), list) for r in records)
    if with_pairs:
        arrays["positive_pair_scores"] = np.full((b, width_p), np.nan, np.float32)
    for q, i in enumerate(at):
        rec, w = records[i], where[i]
        arrays["indices"][q] = _row(rec["negatives"], k, "ids", f"{w}: negatives")
        if not isinstance(rec["scores"], list) or len(rec["scores"]) != len(rec["negatives"]):
            raise ValueError(f"{w}: scores must be a list as long as negatives")
        arrays["scores"][q] = _row(rec["scores"], k, "scores", f"{w}: scores")
        arrays["positives"][q] = _row(rec["positives"], width_p, "ids", f"{w}: positives")
        if with_pairs:
            if len(rec["positive_pair_scores"]) != len(rec["positives"]):
                raise ValueError(f"{w}: positive_pair_scores must be a list as long as positives")
            pair = _row(rec["positive_pair_scores"], width_p, "scores", f"{w}: positive_pair_scores")
            arrays["positive_pair_scores"][q] = np.where(np.isneginf(pair), np.nan, pair)
        ps = rec["positive_score"]
        if ps is not None and (isinstance(ps, bool) or not isinstance(ps, (int, float))):
            raise ValueError(f"{w}: positive_score {ps!r} is not a number")
        arrays["positive_scores"][q] = np.nan if ps is None else ps
    return arrays


def _check_result(arrays: dict[str, np.ndarray], meta: dict[str, Any], num_queries: int | None,
                  k: int | None) -> None:
    """Raises ValueError (without the file's name) when the arrays do not make one consistent result."""
    for name in ("indices", "scores", "positive_scores", "positives"):
        if name not in arrays:
            raise ValueError(f"holds no {name!r} array")
    idx, sc, ps, pos = arrays["indices"], arrays["scores"], arrays["positive_scores"], arrays["positives"]
    if idx.ndim != 2 or idx.dtype.kind not in "iu":
        raise ValueError(f"indices must be a 2-D integer array, got {idx.dtype} of shape {idx.shape}")
    b = idx.shape[0]
    if num_queries is not None and b != num_queries:
        raise ValueError(f"holds {b} rows but its metadata says {num_queries} queries")
    if k is not None and idx.shape[1] != k:
        raise ValueError(f"holds {idx.shape[1]} negatives per row but its metadata says {k}")
    if sc.shape != idx.shape or sc.dtype.kind != "f":
        raise ValueError(f"scores must be a float array of shape {idx.shape}, got {sc.dtype} of shape {sc.shape}")
    if ps.shape != (b,) or ps.dtype.kind != "f":
        raise ValueError(f"positive_scores must be a float array of shape ({b},), got {ps.dtype} of shape "
                         f"{ps.shape}")
    if pos.ndim != 2 or pos.shape[0] != b or pos.dtype.kind not in "iu":
        raise ValueError(f"positives must be an integer array of shape ({b}, P), got {pos.dtype} of shape "
                         f"{pos.shape}")
    if "eligible" in arrays and (arrays["eligible"].shape != (b,) or arrays["eligible"].dtype.kind not in "iu"):
        raise ValueError(f"eligible must be an integer array of shape ({b},)")
    pair = arrays.get("positive_pair_scores")
    if pair is not None and (pair.shape != pos.shape or pair.dtype.kind != "f"):
        raise ValueError(f"positive_pair_scores must be a float array of the shape of positives {pos.shape}, got "
                         f"{pair.dtype} of shape {pair.shape}")
    params = meta.get("params")
    n = params.get("num_corpus") if isinstance(params, dict) else None
    bound = n if isinstance(n, int) and not isinstance(n, bool) else 1 << 63
    for name, ids in (("indices", idx), ("positives", pos)):
        if ids.size and (int(ids.min()) < -1 or int(ids.max()) >= bound):
            raise ValueError(f"{name} hold ids outside [-1, {bound})"
                             + (f" (num_corpus {n})" if bound == n else " (int64)"))


def _meta_count(meta: dict[str, Any], key: str) -> int | None:
    """meta[key] (or, for num_queries, meta["params"]["num_queries"]) as an int >= 0, None if absent."""
    v = meta.get(key)
    if v is None and key == "num_queries" and isinstance(meta.get("params"), dict):
        v = meta["params"].get("num_queries")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"metadata {key} must be an int >= 0, got {v!r}")
    return v


def load_result(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reads a file written by :func:`save_result`: (arrays, meta). Rows of .jsonl and .parquet files
    are placed by their ``query`` field; see :meth:`hnsample.MinedNegatives.load` for what is checked.
    Every problem is a ValueError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"path does not exist: {str(path)!r}")
    ext = p.suffix.lower()
    if ext not in (".npz", ".jsonl", ".parquet"):
        raise ValueError(f"path must end in .parquet, .jsonl or .npz, got {str(path)!r}")
    try:
        arrays, meta = _read_result(p, ext)
    except ValueError as e:
        raise ValueError(f"result file {str(path)!r}: {e}") from None
    return arrays, meta


def _read_result(p: Path, ext: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if ext == ".npz":
        try:
            z = np.load(p, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            with z:
                arrays = {k: z[k] for k in z.files if k not in ("meta", "query_ids", "corpus_ids")}
                meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
                if isinstance(meta, dict):
                    for key in ("query_ids", "corpus_ids"):
                        if key in z.files:
                            meta[key] = [str(x) for x in z[key].tolist()]
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f"cannot be read ({type(e).__name__}: {e})") from None
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a JSON object")
        _check_result(arrays, meta, _meta_count(meta, "num_queries"), _meta_count(meta, "num_negatives"))
        return arrays, meta
    if ext == ".jsonl":
        meta: dict[str, Any] = {}
        side = meta_path(p)
        if side.is_file():
            try:
                meta = json.loads(side.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"its metadata file {str(side)!r} is not valid JSON ({e})") from None
            if not isinstance(meta, dict):
                raise ValueError(f"its metadata file {str(side)!r} is not a JSON object")
        records, where = [], []
        try:
            text = p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"is not UTF-8 text ({e})") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"line {lineno} is not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"line {lineno} is not a JSON object")
            if "meta" in obj and "query" not in obj:  # files of earlier versions: meta in the first line
                if not isinstance(obj["meta"], dict):
                    raise ValueError(f"line {lineno}: meta is not a JSON object")
                meta = obj["meta"]
            else:
                records.append(obj)
                where.append(f"line {lineno}")
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("loading .parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(p)
            raw = (table.schema.metadata or {}).get(b"hnsample")
            meta = json.loads(raw) if raw else {}
        except (ValueError, OSError) as e:  # pyarrow's errors derive from these
            raise ValueError(f"cannot be read ({type(e).__name__}: {e})") from None
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a JSON object")
        cols = table.to_pydict()
        absent = [key for key in _RECORD_KEYS if key not in cols]
        if absent:
            raise ValueError(f"has no column {absent[0]!r}")
        keys = [key for key in (*_RECORD_KEYS, "positive_pair_scores") if key in cols]
        records = [{key: cols[key][i] for key in keys} for i in range(table.num_rows)]
        where = [f"row {i}" for i in range(table.num_rows)]
    num_queries, k = _meta_count(meta, "num_queries"), _meta_count(meta, "num_negatives")
    _rows_from_ids(records, where, meta)
    arrays = _from_records(records, where, num_queries, k)
    _check_result(arrays, meta, num_queries, k)
    return arrays, meta
