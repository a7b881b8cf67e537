"""Texts around mining: the normalized form that finds duplicates of a positive's text, and text files
(TSV or JSONL) that give the query and corpus texts of a run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .mining_io import PathLike, read_text


def normalize_text(text: str) -> str:
    """The form two texts are compared in to find duplicates: whitespace runs collapsed to one space,
    leading and trailing whitespace dropped, case folded (``str.casefold``)."""
    return " ".join(text.split()).casefold()


def positive_duplicates(positives: Sequence[Sequence[int]], corpus: Sequence[str]) -> list[list[int]]:
    """For each query, the corpus rows whose normalized text (:func:`normalize_text`) equals that of one
    of its positives, the positives themselves left out: candidates that are the positive written again
    (other spacing or case), which no score margin reliably removes."""
    keys = list(map(normalize_text, corpus))
    wanted = {keys[j] for row in positives for j in row if j >= 0}
    groups: dict[str, list[int]] = {}
    for j, key in enumerate(keys):
        if key in wanted:
            groups.setdefault(key, []).append(j)
    out = []
    for row in positives:
        own = {j for j in row if j >= 0}
        dups = {d for j in own for d in groups[keys[j]] if d not in own}
        out.append(sorted(dups))
    return out


def read_texts(name: str, path: PathLike) -> tuple[list[str] | None, list[str]]:
    """(ids or None, texts) of a text file, one entry per line:

    * ``.jsonl``: one JSON object per line with a ``"text"`` and an id in ``"_id"`` or ``"id"`` (BEIR's
      corpus.jsonl / queries.jsonl; other fields such as ``"title"`` are ignored);
    * anything else is read as TSV: ``id<TAB>text`` (split at the first tab; MS MARCO's collection.tsv and
      queries.tsv), or, when no line holds a tab, one text per line without ids.

    UTF-8, a byte-order mark dropped, blank lines skipped; no header line. Every problem is a ValueError
    naming ``name``, the file and the line: invalid JSON, a record without text or id, a text that is
    not a string, a TSV line without a tab in a file whose other lines have one, an id given twice."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{name} file does not exist: {str(path)!r}")
    where = f"{name} file {str(path)!r}"
    lines = [(n, line) for n, line in enumerate(read_text(name, p).splitlines(), 1) if line.strip()]
    ids: list[str] | None = []
    texts: list[str] = []
    if p.suffix.lower() == ".jsonl":
        for n, line in lines:
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where} line {n} is not valid JSON ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{where} line {n}: expected an object with a string \"text\"")
            key = obj.get("_id", obj.get("id"))
            if key is None or isinstance(key, (dict, list, bool)):
                raise ValueError(f"{where} line {n}: expected an \"_id\" or \"id\" (a string or a number)")
            ids.append(str(key))
            texts.append(obj["text"])
    elif not any("\t" in line for _, line in lines):
        ids = None
        texts = [line for _, line in lines]
    else:
        for n, line in lines:
            if "\t" not in line:
                raise ValueError(f"{where} line {n}: expected id<TAB>text (the file's other lines have a tab)")
            key, text = line.split("\t", 1)
            ids.append(key)
            texts.append(text)
    if ids is not None:
        seen: dict[str, int] = {}
        for row, key in enumerate(ids):
            if key in seen:
                raise ValueError(f"{where}: id {key!r} appears twice (entries {seen[key] + 1} and {row + 1})")
            seen[key] = row
    return ids, texts


def texts_for_rows(name: str, path: PathLike, row_ids: list[str] | None, rows: int) -> tuple[list[str], list[str] | None]:
    """(texts in row order, ids of the rows) from a text file (:func:`read_texts`). With ``row_ids`` (the
    run's id of each row) texts are placed by id, and every row needs one; without, the file's entries
    are the rows in order (its ids, if any, become the rows' ids) and their number must equal ``rows``."""
    ids, texts = read_texts(name, path)
    if row_ids is not None:
        if ids is None:
            raise ValueError(f"{name} file {str(path)!r} has no ids, so it cannot be matched to the rows' ids; "
                             "write it as id<TAB>text or JSONL with \"_id\"")
        by_id = dict(zip(ids, texts, strict=True))
        missing = [r for r in row_ids if r not in by_id]
        if missing:
            raise ValueError(f"{name} file {str(path)!r} has no text for ids {missing[:5]} "
                             f"({len(missing)} of {len(row_ids)} rows)")
        return [by_id[r] for r in row_ids], row_ids
    if len(texts) != rows:
        raise ValueError(f"{name} file {str(path)!r} holds {len(texts)} texts, but there are {rows} rows")
    return texts, ids
