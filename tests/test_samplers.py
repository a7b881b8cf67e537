"""Batch samplers: batch constraints, coverage, seeded determinism, rank splits, coverage distribution and
bad inputs. Multi-process DDP runs are in test_toolkit_distributed.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from hnsample import (
    ClusterBatchSampler,
    MPerClassBatchSampler,
    NeighbourBatchSampler,
    NoDuplicatesBatchSampler,
)
from hnsample.samplers import kmeans, pack_batches


def _flat(batches):
    return [i for b in batches for i in b]


def _rank_split_ok(make, world=3):
    """Each rank's batches are disjoint from the others', all ranks yield the same number, and together
    they are the global list minus fewer than `world` batches."""
    per_rank = [list(make(rank=r, world_size=world)) for r in range(world)]
    lengths = {len(b) for b in per_rank}
    assert len(lengths) == 1
    assert all(len(make(rank=r, world_size=world)) == len(per_rank[r]) for r in range(world))
    seen = [tuple(sorted(b)) for batches in per_rank for b in batches]
    assert len(seen) == len(set(seen))
    items = _flat(_flat(per_rank))
    return per_rank, items


# ----------------------------------------------------------------------------------------------------
# pack_batches


def test_pack_batches_never_repeats_a_key_and_places_every_item_once():
    rng = np.random.default_rng(0)
    keys = [tuple(rng.integers(0, 30, size=rng.integers(1, 4)).tolist()) for _ in range(500)]
    batches = pack_batches(range(500), 16, keys)
    assert sorted(_flat(batches)) == list(range(500))
    for b in batches:
        assert len(b) <= 16
        flat = [k for i in b for k in set(keys[i])]
        assert len(flat) == len(set(flat))


def test_pack_batches_without_conflicts_keeps_order():
    batches = pack_batches(range(10), 4, [(i,) for i in range(10)])
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert pack_batches(range(5), 2) == [[0, 1], [2, 3], [4]]


def test_pack_batches_dominant_key_goes_one_per_batch():
    keys = [(0,)] * 50 + [(i + 1,) for i in range(50)]
    batches = pack_batches(range(100), 4, keys)
    assert len(batches) == 50
    assert all(sum(1 for i in b if keys[i] == (0,)) == 1 for b in batches)


# ----------------------------------------------------------------------------------------------------
# NoDuplicatesBatchSampler


def test_no_duplicates_multi_key_items():
    texts = [(f"q{i % 37}", f"p{i % 23}") for i in range(400)]
    s = NoDuplicatesBatchSampler(texts, 16, seed=3)
    batches = list(s)
    assert len(batches) == len(s)
    assert sorted(_flat(batches)) == list(range(400))
    for b in batches:
        qs = [texts[i][0] for i in b]
        ps = [texts[i][1] for i in b]
        assert len(set(qs)) == len(qs) and len(set(ps)) == len(ps)


def test_no_duplicates_without_repeats_equals_packing():
    keys = [(i, f"t{i}") for i in range(103)]
    s = NoDuplicatesBatchSampler(keys, 10, seed=2)
    assert s._no_repeats
    order = torch.randperm(103, generator=torch.Generator().manual_seed(2)).tolist()
    assert sorted(map(sorted, s.global_batches())) == sorted(map(sorted, pack_batches(order, 10)))


def test_no_duplicates_tensor_keys_with_padding_and_drop_last():
    keys = torch.tensor([[i % 10, -1] for i in range(100)])
    s = NoDuplicatesBatchSampler(keys, 8, drop_last=True, seed=0)
    for b in s:
        assert len(b) == 8
        assert len({i % 10 for i in b}) == 8


def test_no_duplicates_seeded_and_epoch_dependent():
    keys = list(range(200))
    a = NoDuplicatesBatchSampler(keys, 10, seed=5)
    b = NoDuplicatesBatchSampler(keys, 10, seed=5)
    assert list(a) == list(b)
    c = NoDuplicatesBatchSampler(keys, 10, seed=6)
    assert list(a) != list(c)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == first
    ordered = NoDuplicatesBatchSampler(keys, 10, shuffle=False)
    assert list(ordered)[0] == list(range(10))


def test_no_duplicates_rank_split():
    keys = [i % 50 for i in range(333)]
    per_rank, items = _rank_split_ok(lambda **kw: NoDuplicatesBatchSampler(keys, 8, seed=1, **kw))
    assert len(items) == len(set(items))
    assert len(items) > 333 - 3 * 8


def test_no_duplicates_coverage_is_uniform():
    # P(item in the first batch of an epoch) = 8 / 40 for every item, so the counts over 600 epochs are
    # a uniform multinomial; chi-square against it (seeded, so the test is deterministic).
    s = NoDuplicatesBatchSampler(list(range(40)), 8, seed=11)
    counts = np.zeros(40)
    for epoch in range(600):
        s.set_epoch(epoch)
        for i in next(iter(s)):
            counts[i] += 1
    assert stats.chisquare(counts).pvalue > 1e-3


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"keys": [1, 2], "batch_size": 0}, ValueError, "batch_size"),
    ({"keys": 5, "batch_size": 2}, TypeError, "keys"),
    ({"keys": [[1], {}], "batch_size": 2}, TypeError, "keys"),
    ({"keys": torch.zeros(3), "batch_size": 2}, TypeError, "keys"),
    ({"keys": torch.zeros(3, 2, 2, dtype=torch.int64), "batch_size": 2}, ValueError, "keys"),
    ({"keys": [1, 2], "batch_size": 2, "rank": 2, "world_size": 2}, ValueError, "rank"),
    ({"keys": [1, 2], "batch_size": 2, "world_size": 0}, ValueError, "world_size"),
    ({"keys": [1, 2], "batch_size": 2, "seed": 1.5}, TypeError, "seed"),
    ({"keys": [1, 2], "batch_size": 2, "drop_last": 1}, TypeError, "drop_last"),
])
def test_no_duplicates_bad_inputs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        NoDuplicatesBatchSampler(**kwargs)


def test_set_epoch_rejects_negative():
    with pytest.raises(ValueError, match="epoch"):
        NoDuplicatesBatchSampler([1, 2], 1).set_epoch(-1)


# ----------------------------------------------------------------------------------------------------
# MPerClassBatchSampler


def test_m_per_class_batches_and_coverage():
    labels = torch.tensor([c for c in range(12) for _ in range(5 + c % 4)] + [99])
    s = MPerClassBatchSampler(labels, 4, 16, seed=2)
    batches = list(s)
    assert len(batches) == len(s) > 0
    for b in batches:
        assert len(b) == 16
        _, counts = labels[b].unique(return_counts=True)
        assert counts.tolist() == [4, 4, 4, 4]
        for c in labels[b].unique():
            members = [i for i in b if labels[i] == c]
            assert len(set(members)) == 4
    s_all = MPerClassBatchSampler(labels, 4, 16, seed=2, drop_last=False)
    covered = set(_flat(s_all))
    assert covered == set(range(len(labels) - 1))  # the lone label-99 item has fewer than m items


def test_m_per_class_deterministic_and_rank_split():
    labels = np.repeat(np.arange(20), 4)  # class sizes = m: no wrap-around, so items are disjoint too
    make = lambda **kw: MPerClassBatchSampler(labels, 4, 8, seed=9, **kw)  # noqa: E731
    assert list(make()) == list(make())
    _, items = _rank_split_ok(make, world=2)
    assert len(items) == len(set(items))


def test_m_per_class_label_frequency_is_uniform():
    # 10 labels x 8 items, m = 2, 2 labels per batch: each label fills 4 groups of the 40 in an epoch, so
    # the label of the first group of the first batch is uniform over the labels.
    labels = np.repeat(np.arange(10), 8)
    s = MPerClassBatchSampler(labels, 2, 4, seed=4)
    counts = np.zeros(10)
    for epoch in range(500):
        s.set_epoch(epoch)
        counts[labels[next(iter(s))[0]]] += 1
    assert stats.chisquare(counts).pvalue > 1e-3


@pytest.mark.parametrize("args, exc, match", [
    ((torch.arange(8), 3, 8), ValueError, "multiple of m"),
    ((torch.arange(8).float(), 2, 4), TypeError, "labels"),
    ((torch.arange(8).view(2, 4), 2, 4), ValueError, "labels"),
    ((torch.arange(8), 2, 4), ValueError, "at least one label"),
    ((torch.zeros(8, dtype=torch.int64), 0, 4), ValueError, "m must be"),
])
def test_m_per_class_bad_inputs(args, exc, match):
    with pytest.raises(exc, match=match):
        MPerClassBatchSampler(*args)


# ----------------------------------------------------------------------------------------------------
# ClusterBatchSampler


def _blobs(n_blobs=4, per_blob=32, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_blobs, d, generator=g) * 10
    x = centers.repeat_interleave(per_blob, 0) + 0.1 * torch.randn(n_blobs * per_blob, d, generator=g)
    return x, torch.arange(n_blobs).repeat_interleave(per_blob)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_cluster_sampler_batches_come_from_one_cluster(metric):
    x, blob = _blobs()
    found = None
    for seed in range(20):  # a random init can merge two blobs; some seed in 20 finds all four
        s = ClusterBatchSampler(x, 16, n_clusters=4, metric=metric, seed=seed)
        if len(s.assignments.unique()) == 4:
            found = s
            break
    assert found is not None
    s = found
    # Clusters are the blobs (up to renaming).
    mapping = {int(b): int(a) for a, b in zip(s.assignments, blob, strict=True)}
    assert torch.equal(s.assignments, torch.tensor([mapping[int(b)] for b in blob]))
    batches = list(s)
    assert sorted(_flat(batches)) == list(range(len(x)))
    for b in batches:
        assert len(b) == 16 and len(blob[b].unique()) == 1


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_kmeans_assignment_matches_brute_force(metric):
    x, _ = _blobs(n_blobs=5, per_blob=20, seed=1)
    c, assign = kmeans(x, x[torch.randperm(100, generator=torch.Generator().manual_seed(0))[:5]], 50, metric)
    if metric == "cosine":
        xn = x / x.norm(dim=1, keepdim=True)
        ref = (xn @ (c / c.norm(dim=1, keepdim=True)).T).argmax(1)
    else:
        ref = torch.cdist(x, c).argmin(1)
    assert torch.equal(assign, ref)


def test_cluster_sampler_remainders_merge_nearby_clusters():
    x, blob = _blobs(n_blobs=6, per_blob=20, seed=2)
    s = ClusterBatchSampler(x, 16, n_clusters=6, seed=0)
    batches = list(s)
    assert sorted(_flat(batches)) == list(range(len(x)))
    sizes = sorted(len(b) for b in batches)
    assert sizes[1:] == [16] * (len(batches) - 1)  # at most one partial batch
    single = sum(1 for b in batches if len(s.assignments[b].unique()) == 1)
    assert single >= sum(int(c) // 16 for c in s.assignments.bincount())


def test_cluster_sampler_recluster_and_determinism():
    x, blob = _blobs(seed=3)
    a = ClusterBatchSampler(x, 16, n_clusters=4, seed=1)
    b = ClusterBatchSampler(x.numpy(), 16, n_clusters=4, seed=1)
    assert list(a) == list(b)
    before = list(a)
    # Swap the halves of the data: the same clusters now hold different items.
    perm = torch.cat([torch.arange(64, 128), torch.arange(64)])
    a.recluster(x[perm])
    assert not torch.equal(a.assignments, b.assignments)
    assert list(a) != before
    with pytest.raises(ValueError, match="rows"):
        a.recluster(x[:10])


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"embeddings": torch.randn(10), "batch_size": 2}, ValueError, "embeddings"),
    ({"embeddings": torch.ones(10, 2, dtype=torch.int64), "batch_size": 2}, TypeError, "embeddings"),
    ({"embeddings": torch.randn(10, 2), "batch_size": 2, "n_clusters": 11}, ValueError, "n_clusters"),
    ({"embeddings": torch.randn(10, 2), "batch_size": 2, "metric": "dot"}, ValueError, "metric"),
    ({"embeddings": torch.randn(0, 2), "batch_size": 2}, ValueError, "embeddings"),
])
def test_cluster_sampler_bad_inputs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ClusterBatchSampler(**kwargs)


# ----------------------------------------------------------------------------------------------------
# NeighbourBatchSampler


@pytest.mark.parametrize("grow", [True, False])
def test_neighbour_sampler_keeps_neighbour_groups_together(grow):
    # Items in cliques of 4; each item's neighbours are its clique mates; batches of 8 hold two cliques.
    n = 64
    nb = torch.tensor([[j for j in range(i // 4 * 4, i // 4 * 4 + 4) if j != i] for i in range(n)])
    s = NeighbourBatchSampler(nb, 8, seed=7, grow=grow)
    batches = list(s)
    assert sorted(_flat(batches)) == list(range(n))
    for b in batches:
        assert sorted({i // 4 for i in b}) == sorted(i // 4 for i in b[::4])
        assert len(b) == 8


def test_neighbour_sampler_grows_along_chains():
    # A chain 0-1-2-...: item i's only neighbour is i + 1. Growing follows the chain, so batches are
    # runs of consecutive items; without growing, groups are pairs.
    n = 40
    nb = torch.tensor([[i + 1 if i + 1 < n else -1] for i in range(n)])
    grown = NeighbourBatchSampler(nb, 8, seed=0, drop_last=True)
    runs = sum(1 for b in grown if sorted(b) == list(range(min(b), min(b) + 8)))
    pairs = NeighbourBatchSampler(nb, 8, seed=0, grow=False)
    assert runs >= 1
    for b in pairs:
        assert sum(1 for i in b if i + 1 in b) >= 1


def test_neighbour_sampler_never_repeats_a_key():
    g = torch.Generator().manual_seed(0)
    n = 120
    nb = torch.randint(-1, n, (n, 5), generator=g)
    keys = torch.arange(n) % 30  # e.g. the positive's id: 4 items share each
    s = NeighbourBatchSampler(nb, 10, keys=keys, seed=1)
    batches = list(s)
    assert sorted(_flat(batches)) == list(range(n))
    for b in batches:
        assert len(set(keys[b].tolist())) == len(b)
    _, items = _rank_split_ok(lambda **kw: NeighbourBatchSampler(nb, 10, keys=keys, seed=1, **kw), world=2)
    assert len(items) == len(set(items))


def test_neighbour_sampler_mined_neighbours_match_brute_force():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g)
    keys = torch.arange(40) // 2
    nb = NeighbourBatchSampler.mine_neighbours(x, 3, keys)
    xn = x / x.norm(dim=1, keepdim=True)
    sim = xn @ xn.T
    sim[keys.unsqueeze(0) == keys.unsqueeze(1)] = -float("inf")
    assert torch.equal(nb, sim.topk(3, dim=1).indices)
    s = NeighbourBatchSampler.from_embeddings(x, 8, 3, keys=keys, seed=0)
    assert s.neighbours == nb.tolist()
    s.remine(x.flip(0))
    assert s.neighbours != nb.tolist()
    assert sorted(_flat(s)) == list(range(40))


def test_neighbour_sampler_bad_inputs():
    with pytest.raises(TypeError, match="neighbours"):
        NeighbourBatchSampler(torch.zeros(4, 2), 2)
    with pytest.raises(ValueError, match="neighbours"):
        NeighbourBatchSampler(torch.full((4, 2), 4), 2)
    with pytest.raises(ValueError, match="neighbours"):
        NeighbourBatchSampler(torch.zeros(4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="keys"):
        NeighbourBatchSampler(torch.zeros(4, 1, dtype=torch.int64), 2, keys=[1, 2])
    s = NeighbourBatchSampler(torch.zeros(4, 1, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="rows"):
        s.update_neighbours(torch.zeros(5, 1, dtype=torch.int64))


def test_cluster_and_neighbour_coverage_is_uniform():
    # One tight blob of 40 items, batches of 8: every item is in each epoch's first batch with
    # probability 8/40. Cliques of 4 under NeighbourBatchSampler: each clique is in the first batch with
    # probability 2/10.
    x = torch.ones(40, 3) + 1e-3 * torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    cluster = ClusterBatchSampler(x, 8, n_clusters=1, seed=5)
    nb = torch.tensor([[j for j in range(i // 4 * 4, i // 4 * 4 + 4) if j != i] for i in range(40)])
    neighbour = NeighbourBatchSampler(nb, 8, seed=5)
    item_counts, clique_counts = np.zeros(40), np.zeros(10)
    for epoch in range(500):
        cluster.set_epoch(epoch)
        neighbour.set_epoch(epoch)
        item_counts[next(iter(cluster))] += 1
        for i in next(iter(neighbour))[::4]:
            clique_counts[i // 4] += 1
    assert stats.chisquare(item_counts).pvalue > 1e-3
    assert stats.chisquare(clique_counts).pvalue > 1e-3
