"""pytest-benchmark versions of the top-k comparison at a small shape:
``python -m pytest benchmarks/test_bench_topk.py --benchmark-only`` (not part of the test suite)."""

import pytest
import torch

import hnsample

B, N, D, K = 512, 50_000, 384, 64


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, D, generator=g), torch.randn(N, D, generator=g), torch.randint(0, N, (B, 1), generator=g)


def test_hnsample(benchmark, data):
    q, c, pos = data
    benchmark(lambda: hnsample.topk_similarity(q, c, K, positives=pos, relative_margin=0.05))


def test_torch_naive(benchmark, data):
    q, c, pos = data

    def naive():
        s = q @ c.T
        p = s.gather(1, pos).amin(dim=1, keepdim=True)
        s.scatter_(1, pos, float("-inf"))
        return s.masked_fill_(s > p - p.abs() * 0.05, float("-inf")).topk(K, dim=1)

    benchmark(naive)


def test_matmul_floor(benchmark, data):
    q, c, _ = data
    benchmark(lambda: q @ c.T)
