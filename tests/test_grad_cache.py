"""hnsample.grad_cache against the uncached step: the same mini-batches embedded with autograd (same
RNG seed, dropout on) and the loss on their concatenation. Loss and every parameter gradient must agree
to a relative 1e-5 in float32 (per element, or of the tensor's largest element where that is larger)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hnsample

B, D_IN, D = 12, 10, 8
MINI = 5  # 12 rows -> mini-batches of 5, 5, 2


class Tower(torch.nn.Module):
    """A small encoder whose output depends on dropout draws."""

    def __init__(self, p: float = 0.2):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(D_IN, 16), torch.nn.Tanh(), torch.nn.Dropout(p),
                                       torch.nn.Linear(16, D))

    def forward(self, x):
        return F.normalize(self.net(x), dim=-1)


def _batch(columns: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, D_IN, generator=g) for _ in range(columns)]


def uncached(loss_fn, encoders, columns, mini_batch_size, seed):
    """The reference step: every mini-batch embedded with autograd, in the order grad_cache embeds."""
    torch.manual_seed(seed)
    encs = encoders if isinstance(encoders, (list, tuple)) else [encoders] * len(columns)
    embs = [torch.cat([e(mb) for mb in hnsample.mini_batches(c, mini_batch_size)])
            for e, c in zip(encs, columns, strict=True)]
    return loss_fn(*embs)


def cached(loss_fn, encoders, columns, mini_batch_size, seed):
    torch.manual_seed(seed)
    return hnsample.grad_cache(loss_fn, encoders, columns, mini_batch_size=mini_batch_size)


def _grads(modules, run, scale=1.0):
    for m in modules:
        m.zero_grad(set_to_none=True)
    loss = run()
    (loss * scale).backward()
    return loss.detach(), [p.grad.clone() for m in modules for p in m.parameters()]


def _assert_equal_step(loss_fn, encoders, columns, modules, mini=MINI, seed=3, rtol=1e-5, atol=1e-7):
    want_loss, want = _grads(modules, lambda: uncached(loss_fn, encoders, columns, mini, seed))
    got_loss, got = _grads(modules, lambda: cached(loss_fn, encoders, columns, mini, seed))
    torch.testing.assert_close(got_loss, want_loss, rtol=rtol, atol=atol)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        # An element that is a difference of larger terms (a weight whose contributions cancel) carries
        # the rounding of those terms, and the two steps sum them in different orders (the GEMM kernels
        # block them differently on different CPUs): its tolerance is relative to the tensor's scale.
        torch.testing.assert_close(g, w, rtol=rtol, atol=max(atol, rtol * float(w.abs().max())))
    return want


def _info_nce(**kw):
    def loss(q, *docs):
        return hnsample.info_nce(q, torch.cat(docs), **kw)
    return loss


INFO_NCE_OPTIONS = {
    "plain": {},
    "symmetric": {"symmetric": True, "temperature": 0.1},
    "hcl_hardness_margins": {"hcl_beta": 0.5, "tau_plus": 0.05, "hardness_alpha": 0.5, "positive_margin": 0.1,
                             "false_negative_margin": 0.3, "temperature": 0.1},
    "sum": {"reduction": "sum", "false_negative_relative_margin": 0.1},
}


@pytest.mark.parametrize("options", list(INFO_NCE_OPTIONS.values()), ids=list(INFO_NCE_OPTIONS))
def test_info_nce_equals_uncached_step_with_dropout(options):
    torch.manual_seed(0)
    tower = Tower()
    want = _assert_equal_step(_info_nce(**options), tower, _batch(3), [tower])
    # The dropout draws matter: another seed gives other gradients, so the test above can fail.
    _, other = _grads([tower], lambda: uncached(_info_nce(**options), tower, _batch(3), MINI, seed=4))
    assert not torch.allclose(other[0], want[0])


def test_info_nce_with_ids_labels_multi_positive_and_two_towers():
    torch.manual_seed(0)
    query_tower, doc_tower = Tower(), Tower()
    g = torch.Generator().manual_seed(1)
    positive_ids = torch.stack([torch.arange(B), torch.randint(B, 2 * B, (B,), generator=g)], dim=1)
    positive_ids[::3, 1] = -1
    kw = dict(positive_ids=positive_ids, doc_ids=torch.randint(0, 20, (2 * B,), generator=g),
              query_labels=torch.randint(0, 4, (B,), generator=g), doc_labels=torch.randint(0, 4, (2 * B,), generator=g),
              temperature=0.07)
    _assert_equal_step(_info_nce(**kw), [query_tower, doc_tower, doc_tower], _batch(3), [query_tower, doc_tower])


def test_learnable_temperature_gets_its_gradient():
    torch.manual_seed(0)
    tower, criterion = Tower(), hnsample.InfoNCELoss(0.07, learnable_temperature=True)

    def loss_fn(q, *docs):
        return criterion(q, torch.cat(docs))

    want = _assert_equal_step(loss_fn, tower, _batch(2), [tower, criterion])
    assert float(want[-1].abs()) > 0  # the temperature's gradient is part of the comparison


def test_triplet_loss_and_a_users_own_loss():
    torch.manual_seed(0)
    tower = Tower()
    a, p, n = torch.arange(B), torch.arange(B) + B, torch.arange(B) + 2 * B

    def triplet(*cols):
        return hnsample.triplet_margin_loss(torch.cat(cols), (a, p, n), margin=0.5)

    _assert_equal_step(triplet, tower, _batch(3), [tower])

    def own(q, d):  # a plain cross-entropy over the full score matrix, plus a regularizer
        logits = q @ d.T / 0.05
        return F.cross_entropy(logits, torch.arange(B)) + 0.1 * (q.sum(0) ** 2).mean()

    _assert_equal_step(own, tower, _batch(2), [tower])


def test_mini_batch_larger_than_the_batch_and_one_row_mini_batches():
    torch.manual_seed(0)
    tower = Tower()
    for mini in (1, B, 100):
        _assert_equal_step(_info_nce(), tower, _batch(2), [tower], mini=mini)


def test_gradient_accumulation_and_a_loss_scale():
    torch.manual_seed(0)
    tower = Tower()
    batches = [_batch(2, seed=s) for s in (10, 11)]
    tower.zero_grad(set_to_none=True)
    for i, cols in enumerate(batches):
        (uncached(_info_nce(), tower, cols, MINI, seed=i) * 0.5).backward()
    want = [p.grad.clone() for p in tower.parameters()]
    tower.zero_grad(set_to_none=True)
    for i, cols in enumerate(batches):
        (cached(_info_nce(), tower, cols, MINI, seed=i) * 0.5).backward()
    for g, w in zip((p.grad for p in tower.parameters()), want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_rng_after_the_step_is_that_of_the_uncached_step():
    torch.manual_seed(0)
    tower = Tower()
    uncached(_info_nce(), tower, _batch(2), MINI, seed=5).backward()
    after_uncached = torch.rand(3)
    cached(_info_nce(), tower, _batch(2), MINI, seed=5).backward()
    torch.testing.assert_close(torch.rand(3), after_uncached)


def test_autocast_bfloat16():
    torch.manual_seed(0)
    tower = Tower()
    cols = _batch(1)  # one column, split in two halves by the loss
    dtypes = []
    tower.net[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))

    def run(fn, mini):
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(lambda e: hnsample.info_nce(e[:B // 2].float(), e[B // 2:].float()), tower, cols, mini, 3)
        return step

    # One encoder call: the same bf16 operations in both steps. (With several, the uncached step sums
    # the calls' gradients of autocast's shared bf16 weight copy in bf16, the cached one in float32:
    # equal up to bf16 rounding.)
    want_loss, want = _grads([tower], run(uncached, B))
    dtypes.clear()
    got_loss, got = _grads([tower], run(cached, B))
    # The second pass runs inside backward, outside the autocast block: it re-enters it.
    assert dtypes == [torch.bfloat16] * 2
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    _, several = _grads([tower], run(cached, MINI))
    for g, w in zip(several, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0.05, atol=0.05)


def test_torch_compile_encoder():
    torch.manual_seed(0)
    tower = Tower()
    compiled = torch.compile(tower)
    _assert_equal_step(_info_nce(), compiled, _batch(2), [tower])


def test_mapping_features_and_no_grad():
    torch.manual_seed(0)
    emb = torch.nn.EmbeddingBag(30, D, mode="sum")
    drop = torch.nn.Dropout(0.3)

    def encode(features):
        weights = features["attention_mask"].float()
        return F.normalize(drop(emb(features["input_ids"], per_sample_weights=weights)), dim=-1)

    g = torch.Generator().manual_seed(2)
    cols = []
    for _ in range(2):
        lengths = torch.randint(1, 6, (B,), generator=g)
        mask = (torch.arange(8) < lengths.unsqueeze(1)).long()
        cols.append({"input_ids": torch.randint(0, 30, (B, 8), generator=g) * mask, "attention_mask": mask,
                     "name": "column"})
    _assert_equal_step(_info_nce(), encode, cols, [emb])
    with torch.no_grad():
        torch.manual_seed(1)
        got = hnsample.grad_cache(_info_nce(), encode, cols, mini_batch_size=MINI)
        torch.manual_seed(1)
        want = uncached(_info_nce(), encode, cols, MINI, 1)
    assert not got.requires_grad
    torch.testing.assert_close(got, want)


def test_mini_batches_table():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    ids = torch.arange(16).reshape(4, 4) * mask
    feats = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros(4, 4), "tag": "t"}
    parts = hnsample.mini_batches(feats, 2)
    assert [p["input_ids"].tolist() for p in parts] == [[[0, 1], [4, 0]], [[8, 9, 10], [12, 0, 0]]]
    assert [tuple(p["token_type_ids"].shape) for p in parts] == [(2, 2), (2, 3)]
    assert [p["tag"] for p in parts] == ["t", "t"]
    assert [p.tolist() for p in hnsample.mini_batches(torch.arange(5), 2)] == [[0, 1], [2, 3], [4]]
    assert hnsample.mini_batches(["a", "b", "c"], 2) == [["a", "b"], ["c"]]
    assert [p.shape[0] for p in hnsample.mini_batches(torch.zeros(0, 3), 2)] == [0]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"mini_batch_size": 0}, ValueError, "mini_batch_size must be an int >= 1"),
        ({"mini_batch_size": 2.0}, ValueError, "mini_batch_size must be an int >= 1"),
        ({"columns": []}, ValueError, "at least one batch column"),
        ({"columns": [3]}, TypeError, "a batch column must be a tensor"),
        ({"encoders": [lambda x: x]}, TypeError, "one callable per column"),
        ({"encoders": lambda x: "x"}, TypeError, "must return a tensor of embeddings"),
        ({"loss_fn": lambda *e: 1.0}, TypeError, "loss_fn must return a tensor"),
        ({"loss_fn": "x"}, TypeError, "loss_fn must be callable"),
        ({"distributed_model": torch.nn.Linear(2, 2)}, TypeError, "distributed_model must be a Distributed"),
        ({"columns": [{"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)}] * 2}, ValueError, "share their row"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    base = dict(loss_fn=lambda q, d: (q * d).sum(), encoders=lambda x: x, columns=[torch.zeros(4, 2)] * 2,
                mini_batch_size=2)
    base.update(kwargs)
    with pytest.raises(exc, match=match):
        hnsample.grad_cache(base.pop("loss_fn"), base.pop("encoders"), base.pop("columns"), **base)


def test_outputs_an_encoder_adds_to_its_features_are_not_kept():
    # sentence-transformers' modules write their token embeddings into the features dict they are given;
    # the first pass's must not stay alive until backward.
    import gc
    import weakref

    refs = []
    lin = torch.nn.Linear(D_IN, D)

    def encode(features):
        features["token_embeddings"] = torch.zeros(1000, 100)
        refs.append(weakref.ref(features["token_embeddings"]))
        return F.normalize(lin(features["x"]), dim=-1)

    cols = [{"x": c} for c in _batch(2)]
    loss = hnsample.grad_cache(_info_nce(), encode, cols, mini_batch_size=MINI)
    gc.collect()
    assert len(refs) == 6 and all(r() is None for r in refs)
    loss.backward()
    assert lin.weight.grad is not None


def test_second_pass_keeps_only_the_gradients():
    # While the encoder runs again, the embeddings of the first pass and the loss's graph (here the
    # normalized copies a cosine loss makes) are freed: only their gradients stay cached, as in
    # sentence-transformers' Cached* losses.
    import gc
    import weakref

    lin = torch.nn.Linear(D_IN, D)
    kept: list[weakref.ref] = []
    alive_during_second_pass: list[int] = []

    def encode(x):
        if torch.is_grad_enabled():
            gc.collect()
            alive_during_second_pass.append(sum(r() is not None for r in kept))
        return lin(x)

    def loss_fn(q, d):
        qn, dn = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
        kept.extend(weakref.ref(t) for t in (q, d, qn, dn))
        return hnsample.info_nce(qn, dn)

    loss = hnsample.grad_cache(loss_fn, encode, _batch(2), mini_batch_size=MINI)
    loss.backward()
    assert alive_during_second_pass == [0] * 6
    assert lin.weight.grad is not None


def test_the_cached_loss_is_back_propagated_once():
    lin = torch.nn.Linear(D_IN, D)
    loss = hnsample.grad_cache(_info_nce(), lambda x: F.normalize(lin(x), dim=-1), _batch(2), mini_batch_size=MINI)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="back-propagated once"):
        loss.backward()
