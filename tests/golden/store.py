"""Storage of recorded entries (one compressed .npz) and the per-entry comparison both the recorder and
the replay test use.

Layout: array ``"<group>/<case>|<field>"`` per field, plus ``"__meta__"``, a JSON string with the tier,
the library versions it was recorded with and each field's comparison rule (informational: the rule
that applies is the one the corpus code states)."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .corpus import Field, compare, tolerance_used

META = "__meta__"
SEP = "|"


@dataclass(repr=False)
class Golden:
    """A loaded golden file: tier and the recorded arrays of each entry."""

    tier: str
    entries: dict[str, dict[str, np.ndarray]]
    meta: dict

    def __repr__(self) -> str:
        return f"Golden(tier={self.tier!r}, {len(self.entries)} entries)"

    def fields(self, name: str) -> dict[str, Field]:
        """An entry's arrays with the rules they were recorded under."""
        out = {}
        for field, value in self.entries[name].items():
            rule = self.meta["rules"].get(f"{name}{SEP}{field}", "exact")
            if rule == "exact":
                out[field] = Field(value)
            else:
                kv = dict(part.split("=") for part in rule.split(","))
                out[field] = Field(value, float(kv["rtol"]), float(kv["atol_rel"]))
        return out


def save(path: str | os.PathLike, tier: str, entries: dict[str, dict[str, Field]]) -> int:
    """Writes the entries (in name order, so the file is deterministic); returns the file size."""
    arrays: dict[str, np.ndarray] = {}
    rules: dict[str, str] = {}
    for name in sorted(entries):
        for field, value in entries[name].items():
            key = f"{name}{SEP}{field}"
            arrays[key] = value.value
            rules[key] = "exact" if value.rtol is None else f"rtol={value.rtol!r},atol_rel={value.atol_rel!r}"
    meta = {"tier": tier, "torch": torch.__version__, "numpy": np.__version__, "rules": rules}
    arrays[META] = np.array(json.dumps(meta, sort_keys=True))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    data = buf.getvalue()
    tmp = Path(f"{os.fspath(path)}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(data)


def load(path: str | os.PathLike) -> Golden:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z[META]))
        entries: dict[str, dict[str, np.ndarray]] = {}
        for key in z.files:
            if key == META:
                continue
            name, field = key.split(SEP, 1)
            entries.setdefault(name, {})[field] = z[key]
    return Golden(meta["tier"], entries, meta)


def as_fields(recorded: dict[str, np.ndarray], rules_from: dict[str, Field]) -> dict[str, Field]:
    """Recorded arrays with the comparison rules the corpus states for them."""
    out = {}
    for field, value in recorded.items():
        rule = rules_from.get(field)
        out[field] = Field(value) if rule is None else Field(value, rule.rtol, rule.atol_rel)
    return out


@dataclass
class EntryDiff:
    """problems: one line per field that is missing, new or differs beyond its rule; identical: every
    field bit-identical; worst: (field, fraction of its tolerance used) of the closest call."""

    problems: list[str]
    identical: bool
    worst: tuple[str, float]


def diff_entry(recorded: dict[str, np.ndarray], current: dict[str, Field], *, bits: bool = False) -> EntryDiff:
    """Compares an entry's current outputs with its recorded arrays under the current rules
    (``bits=True``: every field bit for bit)."""
    problems = []
    worst = ("", 0.0)
    for field in sorted(set(recorded) - set(current)):
        problems.append(f"{field}: recorded but no longer produced")
    for field in sorted(set(current) - set(recorded)):
        problems.append(f"{field}: produced but not recorded")
    identical = not problems
    want = as_fields(recorded, current)
    for field in sorted(set(recorded) & set(current)):
        got = current[field].value
        msg = compare(want[field], got, bits=bits)
        if msg is not None:
            problems.append(f"{field}: {msg}")
        if compare(want[field], got, bits=True) is not None:
            identical = False
            used = tolerance_used(want[field], got)
            if used > worst[1]:
                worst = (field, used)
    return EntryDiff(problems, identical, worst)
