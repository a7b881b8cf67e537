"""Golden outputs: every entry of the corpus in tests/golden/ (calls of the public API only) must
reproduce what tests/golden/golden.npz recorded.

Float outputs are compared bit for bit where the inputs make the arithmetic exact (small-integer dot
products, power-of-two-norm cosines, dyadic score matrices), so the file holds on any x86 CPU and thread
count; values through libm (InfoNCE, normalized mixtures) use the tolerance each entry states. After a
deliberate behaviour change, re-record the affected groups with
``python tests/golden/record.py --update GROUP...`` and say why in the commit.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from golden.corpus import ENTRIES, Field, compare, run_entry  # importing golden registers every entry
from golden.store import diff_entry, load, save

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
GOLDEN_FILE = GOLDEN_DIR / "golden.npz"


@pytest.fixture(scope="module")
def recorded():
    return load(GOLDEN_FILE)


def test_golden_file_holds_the_portable_corpus(recorded):
    assert recorded.tier == "portable"
    missing = sorted(set(ENTRIES) - set(recorded.entries))
    stale = sorted(set(recorded.entries) - set(ENTRIES))
    assert not missing, f"entries not recorded (python tests/golden/record.py --update ...): {missing}"
    assert not stale, f"recorded entries the corpus no longer has: {stale}"
    assert GOLDEN_FILE.stat().st_size < 2_000_000


@pytest.mark.parametrize("name", list(ENTRIES))
def test_entry_matches_golden(name, recorded, tmp_path):
    if name not in recorded.entries:
        pytest.fail(f"{name} is not recorded: python tests/golden/record.py --update {name}")
    problems = diff_entry(recorded.entries[name], run_entry(name, "portable", tmp_path)).problems
    if problems:
        pytest.fail(f"{name} differs from its golden record:\n  " + "\n  ".join(problems), pytrace=False)


# ----------------------------------------------------------------------------------------------------
# The comparison rules themselves


def test_exact_rule_is_bitwise_up_to_zero_sign_and_nan_payload():
    want = Field(np.array([1.0, -0.0, np.nan, -np.inf, 0.1], dtype=np.float32))
    assert compare(want, np.array([1.0, 0.0, -np.nan, -np.inf, 0.1], dtype=np.float32)) is None
    one_ulp = np.array([1.0, 0.0, np.nan, -np.inf, np.nextafter(np.float32(0.1), np.float32(1))], dtype=np.float32)
    assert "1 of 5 values differ" in compare(want, one_ulp)
    assert "first at [4]" in compare(want, one_ulp)
    assert "dtype" in compare(want, want.value.astype(np.float64))
    assert "shape" in compare(want, want.value[:4])
    ids = Field(np.array([[3, 1, -1]]))
    assert compare(ids, np.array([[3, 1, -1]])) is None
    assert "first at [0, 1]: 2 != recorded 1" in compare(ids, np.array([[3, 2, -1]]))


def test_close_rule_is_relative_with_special_values_in_place():
    want = Field(np.array([100.0, 1.0, math.inf, math.nan]), rtol=1e-12, atol_rel=1e-12)
    assert compare(want, np.array([100.0 * (1 + 5e-13), 1.0 + 5e-11, math.inf, math.nan])) is None
    assert compare(want, np.array([100.0 * (1 + 5e-12), 1.0, math.inf, math.nan])) is not None
    assert compare(want, np.array([100.0, 1.0, 1e308, math.nan])) is not None
    assert compare(want, np.array([100.0, 1.0, math.inf, 0.0])) is not None
    assert compare(want, np.array([100.0 * (1 + 5e-13), 1.0, math.inf, math.nan]), bits=True) is not None


@pytest.fixture(scope="module")
def recorder():
    """record.py's main(), in this process (its CLI is what a re-record runs)."""
    spec = importlib.util.spec_from_file_location("hnsample_golden_record", GOLDEN_DIR / "record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_recorder_update_and_compare(recorded, recorder, tmp_path, capsys):
    copy = tmp_path / "golden.npz"
    shutil.copy(GOLDEN_FILE, copy)
    assert recorder(["--update", "topk_similarity/ties", "samplers/m_per_class", "--out", str(copy)]) == 0
    assert "re-recorded 2 entries" in capsys.readouterr().out
    updated = load(copy)
    assert updated.tier == "portable" and sorted(updated.entries) == sorted(recorded.entries)
    for name, fields in recorded.entries.items():  # same code, same outputs, same rules
        assert sorted(fields) == sorted(updated.entries[name])
        for field, value in fields.items():
            assert compare(Field(value), updated.entries[name][field], bits=True) is None, (name, field)
    assert updated.meta["rules"] == recorded.meta["rules"]
    assert recorder(["--compare", str(copy), "--only", "topk_similarity/ties", "samplers/m_per_class"]) == 0
    assert "2 identical" in capsys.readouterr().out


def test_recorder_compare_flags_a_changed_entry(recorder, tmp_path, capsys):
    copy = tmp_path / "golden.npz"
    shutil.copy(GOLDEN_FILE, copy)
    golden_file = load(copy)
    entries = {name: golden_file.fields(name) for name in golden_file.entries}
    entries["topk_similarity/ties"]["top_indices"].value[0, 0] += 1
    save(copy, golden_file.tier, entries)
    assert recorder(["--compare", str(copy), "--only", "topk_similarity/ties"]) == 1
    out = capsys.readouterr().out
    assert "differing" in out and "top_indices: 1 of" in out, out
