"""The sampling noise u(seed, row, candidate): the compiled Philox-4x32-10 against the independent numpy
re-derivation in hnsample._reference, bit for bit, and against the published Random123 answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from hnsample import _C
from hnsample import _reference as R

U64 = (1 << 64) - 1


def _u_from_bits(bits: int) -> float:
    """u for a Philox output whose first two words are bits >> 32 and bits & 0xffffffff: the top 52
    bits m give (m + 0.5) / 2**52 (exact in float64)."""
    return (float(bits >> 12) + 0.5) / 2.0**52


# Random123 kat_vectors for philox4x32 10: counter words (c0, c1, c2, c3), key words (k0, k1) and the
# first two output words. Our counter is (col lo, col hi, row lo, row hi) and the key (seed lo, seed hi).
KAT = [
    ((0, 0, 0, 0), (0, 0), 0x6627E8D5E169C58D),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), 0x408F276D41C83B0E),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), 0xD16CFE0994FDCCEB),
]


@pytest.mark.parametrize("counter,key,bits", KAT, ids=["zeros", "ones", "pi"])
def test_noise_matches_published_philox_answers(counter, key, bits):
    col = counter[0] | counter[1] << 32
    row = counter[2] | counter[3] << 32
    seed = key[0] | key[1] << 32
    expected = _u_from_bits(bits)
    assert _C.uniform_noise(seed, row, col) == expected
    assert float(R.uniform_noise(seed, row, col)) == expected


def _edge_values() -> list[int]:
    return [
        0,
        1,
        2,
        255,
        (1 << 31) - 1,
        1 << 31,
        (1 << 32) - 1,
        1 << 32,
        (1 << 32) + 1,
        (1 << 63) - 1,
        1 << 63,
        U64 - 1,
        U64,
    ]


def test_noise_bit_exact_on_edge_counters():
    edges = _edge_values()
    for seed in edges:
        rows = np.array(edges, dtype=np.uint64)[:, None]
        cols = np.array(edges, dtype=np.uint64)[None, :]
        ref = R.uniform_noise(seed, rows, cols)
        got = np.array([[_C.uniform_noise(seed, r, c) for c in edges] for r in edges])
        np.testing.assert_array_equal(got, ref)


def test_noise_bit_exact_on_random_counters():
    rng = np.random.default_rng(1234)
    n = 4000
    seeds = rng.integers(0, U64, size=n, dtype=np.uint64, endpoint=True)
    # a mix of small ids (the common case) and full 64-bit ids
    rows = np.where(
        rng.random(n) < 0.5,
        rng.integers(0, 1 << 20, n),
        rng.integers(0, U64, n, dtype=np.uint64, endpoint=True),
    ).astype(np.uint64)
    cols = np.where(
        rng.random(n) < 0.5,
        rng.integers(0, 1 << 20, n),
        rng.integers(0, U64, n, dtype=np.uint64, endpoint=True),
    ).astype(np.uint64)
    triples = list(zip(seeds.tolist(), rows.tolist(), cols.tolist(), strict=True))
    got = np.array([_C.uniform_noise(s, r, c) for s, r, c in triples])
    ref = np.array([float(R.uniform_noise(s, r, c)) for s, r, c in triples])
    np.testing.assert_array_equal(got, ref)


def test_noise_is_open_unit_interval_and_uniform():
    seed = 77
    ref = R.uniform_noise(
        seed, np.arange(200, dtype=np.uint64)[:, None], np.arange(500, dtype=np.uint64)[None, :]
    )
    assert ref.min() > 0.0 and ref.max() < 1.0
    assert stats.kstest(ref.ravel(), "uniform").pvalue > 1e-3
    # neighbouring counters are uncorrelated (rows, columns and seeds)
    assert abs(np.corrcoef(ref[:-1].ravel(), ref[1:].ravel())[0, 1]) < 0.02
    assert abs(np.corrcoef(ref[:, :-1].ravel(), ref[:, 1:].ravel())[0, 1]) < 0.02
    other = R.uniform_noise(
        seed + 1, np.arange(200, dtype=np.uint64)[:, None], np.arange(500, dtype=np.uint64)[None, :]
    )
    assert abs(np.corrcoef(ref.ravel(), other.ravel())[0, 1]) < 0.02


def test_noise_never_reaches_zero_or_one():
    """The extreme Philox outputs map strictly inside (0, 1), so log(u) and log(-log(u)) are finite."""
    extremes = np.array([0, 1, (1 << 12) - 1, 1 << 12, U64 - (1 << 12), U64 - 1, U64], dtype=np.uint64)
    u = R.noise_from_bits(extremes)
    assert (u > 0).all() and (u < 1).all()
    assert np.isfinite(np.log(-np.log(u))).all()
    assert u[0] == _u_from_bits(0) and u[-1] == _u_from_bits(U64)


def test_noise_depends_on_every_argument():
    base = _C.uniform_noise(5, 6, 7)
    assert _C.uniform_noise(5, 6, 7) == base
    assert (
        len(
            {
                base,
                _C.uniform_noise(6, 6, 7),
                _C.uniform_noise(5, 7, 7),
                _C.uniform_noise(5, 6, 8),
                _C.uniform_noise(5 + (1 << 32), 6, 7),
                _C.uniform_noise(5, 6 + (1 << 32), 7),
                _C.uniform_noise(5, 6, 7 + (1 << 32)),
                _C.uniform_noise(5, 7, 6),
            }
        )
        == 8
    )


def test_noise_rejects_negative_counters():
    with pytest.raises(TypeError):
        _C.uniform_noise(0, -1, 0)
