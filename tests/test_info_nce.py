"""hnsample.info_nce against the literal full-matrix reference, plus autograd, compile and error checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_encoder import BagEncoder

import hnsample
from hnsample import _reference as ref
from hnsample import settings
from hnsample.engine import CpuBackend, CpuKernels, registry

B, M, D = 7, 13, 6


def make(b=B, m=M, d=D, dtype=torch.float64, device="cpu", seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1).to(device, dtype)
    c = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1).to(device, dtype)
    # Make the positives clearly related so the margin masks have both outcomes.
    c[: min(b, m)] = F.normalize(c[: min(b, m)] + 1.5 * q[: min(b, m)], dim=1)
    return q.requires_grad_(requires_grad), c.requires_grad_(requires_grad)


def grads(loss, *xs):
    return torch.autograd.grad(loss, xs, allow_unused=True)


def assert_close_to_reference(kwargs, device="cpu", block_size=None, b=B, m=M, atol=1e-10):
    q, c = make(b, m, device=device)
    extra = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    got = hnsample.info_nce(q, c, block_size=block_size, **extra)
    want = ref.info_nce(q, c, **extra)
    torch.testing.assert_close(got, want.to(got.device), atol=atol, rtol=1e-9)
    if got.ndim:
        got, want = got.sum(), want.sum()
    for a, w in zip(grads(got, q, c), grads(want, q, c), strict=True):
        torch.testing.assert_close(a, w.to(a.device), atol=atol, rtol=1e-8)


LABELS_Q = torch.tensor([0, 1, 2, 0, 1, 2, 3])
LABELS_D = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 5, 6, 2])
DOC_IDS = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 8, 3, 10, 6, 12])
GUIDE_G = torch.Generator().manual_seed(5)
GUIDE_Q = torch.randn(B, 4, generator=GUIDE_G, dtype=torch.float64)
GUIDE_D = torch.randn(M, 4, generator=GUIDE_G, dtype=torch.float64)
MULTI_POS = torch.tensor([[0, 7], [1, -1], [2, 9], [-1, 3], [4, 12], [5, -1], [6, 8]])

OPTIONS = {
    "plain": {},
    "temperature": {"temperature": 0.2},
    "doc_ids": {"doc_ids": DOC_IDS},
    "labels": {"query_labels": LABELS_Q, "doc_labels": LABELS_D},
    "fn_margin": {"false_negative_margin": 0.05},
    "fn_relative": {"false_negative_relative_margin": 0.1},
    "gist": {"guide_queries": GUIDE_Q, "guide_docs": GUIDE_D, "guide_margin": 0.1},
    "hcl_beta": {"hcl_beta": 0.5},
    "tau_plus": {"tau_plus": 0.1},
    "hcl": {"hcl_beta": 1.0, "tau_plus": 0.2},
    "hardness": {"hardness_alpha": 2.0},
    "positive_margin": {"positive_margin": 0.2},
    "symmetric": {"symmetric": True},
    "multi_positive": {"positive_ids": MULTI_POS},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "combined": {
        "positive_ids": MULTI_POS,
        "doc_ids": DOC_IDS,
        "query_labels": LABELS_Q,
        "doc_labels": LABELS_D,
        "false_negative_margin": 0.3,
        "guide_queries": GUIDE_Q,
        "guide_docs": GUIDE_D,
        "guide_margin": 0.5,
        "hcl_beta": 0.5,
        "tau_plus": 0.05,
        "hardness_alpha": 1.0,
        "positive_margin": 0.1,
        "temperature": 0.1,
    },
    "combined_symmetric": {
        "positive_ids": MULTI_POS,
        "doc_ids": DOC_IDS,
        "false_negative_relative_margin": 0.2,
        "hardness_alpha": 0.5,
        "positive_margin": 0.1,
        "symmetric": True,
        "hcl_beta": 0.3,
        "reduction": "none",
    },
}


@pytest.mark.parametrize(
    ("block_size", "fused_min_rows"),
    [(None, 256), (5, 256), (40, 256), (40, 1)],
    ids=["default", "tiny_blocks", "row_blocks", "fused_row_blocks"],
)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_matches_reference(name, block_size, fused_min_rows, device):
    # "default" runs the fused path (one full-row block), "fused_row_blocks" the fused path over
    # 3-row blocks, the others the two-pass path.
    with settings.override(info_nce_fused_min_rows=fused_min_rows):
        assert_close_to_reference(OPTIONS[name], device=device, block_size=block_size)


class _RecordingKernels(CpuKernels):
    """The CPU kernels, recording the direction (forward / backward) of every InfoNCE block."""

    def __init__(self):
        super().__init__()
        self.directions: list[bool] = []

    def info_nce_block(self, params, backward, *args):
        self.directions.append(backward)
        super().info_nce_block(params, backward, *args)


def test_fused_path_is_taken_and_skipped():
    # The fused path turns blocks into gradients during the forward call itself; the two-pass path
    # runs only forward blocks until backward() is called.
    def forward_makes_gradients(q, c, **kw) -> bool:
        kernels = _RecordingKernels()
        with registry.use("cpu", CpuBackend(kernels)):
            hnsample.info_nce(q, c, **kw)
        assert kernels.directions and not kernels.directions[0]
        return any(kernels.directions)

    q, c = make()
    assert forward_makes_gradients(q, c)
    assert not forward_makes_gradients(q, c, reduction="none")
    assert not forward_makes_gradients(q, c, symmetric=True)
    assert not forward_makes_gradients(q.detach(), c.detach())
    assert not forward_makes_gradients(q, c, block_size=5)
    with torch.no_grad():
        assert not forward_makes_gradients(q, c)


def test_fused_backward_with_other_upstream_gradients():
    # If the statistics' upstream gradient is not the assumed multiple, the fused op recomputes.
    q, c = make(4, 7, 3)
    args, kw = _stats_args(q, c, symmetric=False)
    s_pos = torch.randn(4, 2, dtype=torch.float64)
    fused = torch.ops.hnsample.info_nce_stats_fused(*args, s_pos, tau_plus=0.0, row_weight=0.25,
                                                   **_fused_kwargs(kw))
    plain = torch.ops.hnsample.info_nce_stats(*args, **kw)
    for a, b in zip(fused[:3], plain[:3], strict=True):
        torch.testing.assert_close(a, b)
    w = torch.randn(4, dtype=torch.float64)
    for scale in (None, 3.0):
        gw = fused[7] * scale if scale is not None else w
        got = torch.autograd.grad(fused[0], (q, c, args[2]), gw, retain_graph=True)
        want = torch.autograd.grad(plain[0], (q, c, args[2]), gw, retain_graph=True)
        for x, y in zip(got, want, strict=True):
            torch.testing.assert_close(x, y)


def test_options_change_the_loss():
    # Each option must actually act on this data, or the reference comparison above proves little.
    q, c = make(requires_grad=False)
    plain = float(hnsample.info_nce(q, c))
    for name, kw in OPTIONS.items():
        if name in ("plain", "sum", "none"):
            continue
        assert float(hnsample.info_nce(q, c, **kw).sum()) != pytest.approx(plain, rel=1e-6), name


def test_masks_mask_something():
    # Masking a negative removes mass from the denominator, so some row losses must drop.
    q, c = make(requires_grad=False)
    base = hnsample.info_nce(q, c, reduction="none")
    for name in ("doc_ids", "labels", "fn_margin", "fn_relative", "gist"):
        rows = hnsample.info_nce(q, c, reduction="none", **OPTIONS[name])
        assert torch.isfinite(rows).all()
        assert (rows < base - 1e-12).any(), name
        assert (rows <= base + 1e-12).all(), name


def test_plain_equals_multiple_negatives_ranking_formula():
    # sentence-transformers' MultipleNegativesRankingLoss: cross_entropy(scale * cos_sim(a, c), arange).
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 32, generator=g, requires_grad=True)
    c = torch.randn(40, 32, generator=g, requires_grad=True)
    scale = 20.0
    want = F.cross_entropy(scale * F.normalize(a, dim=1) @ F.normalize(c, dim=1).T, torch.arange(16))
    got = hnsample.info_nce(F.normalize(a, dim=1), F.normalize(c, dim=1), temperature=1 / scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for x, y in zip(grads(got, a, c), grads(want, a, c), strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)


def test_symmetric_equals_symmetric_ranking_formula():
    # MultipleNegativesSymmetricRankingLoss: mean of the forward loss and cross_entropy over the
    # transposed (B, B) positive block.
    q, c = make(8, 20, requires_grad=False)
    s = (q @ c.T) / 0.1
    want = 0.5 * (F.cross_entropy(s, torch.arange(8)) + F.cross_entropy(s[:, :8].T, torch.arange(8)))
    torch.testing.assert_close(hnsample.info_nce(q, c, temperature=0.1, symmetric=True), want)


def test_hcl_without_reweighting_is_plain():
    q, c = make(requires_grad=False)
    torch.testing.assert_close(
        hnsample.info_nce(q, c, hcl_beta=0.0, tau_plus=0.0), ref.info_nce(q, c, hcl_beta=0.0, tau_plus=0.0)
    )
    s = (q @ c.T) / 0.05
    torch.testing.assert_close(hnsample.info_nce(q, c), F.cross_entropy(s, torch.arange(B)))


def test_hcl_matches_robinson_formula():
    # Robinson et al.'s debiased hard-negative loss, one positive, negatives = all other docs.
    q, c = make(requires_grad=False)
    tau, beta, tp = 0.5, 1.0, 0.1
    s = q @ c.T
    out = []
    for i in range(B):
        pos = torch.exp(s[i, i] / tau)
        neg = torch.exp(torch.cat([s[i, :i], s[i, i + 1 :]]) / tau)
        n = neg.numel()
        imp = torch.exp(beta * torch.log(neg))
        reweight = (imp * neg).sum() / imp.mean()
        ng = torch.clamp((-tp * n * pos + reweight) / (1 - tp), min=n * math.e ** (-1 / tau))
        out.append(-torch.log(pos / (pos + ng)))
    want = torch.stack(out).mean()
    torch.testing.assert_close(hnsample.info_nce(q, c, temperature=tau, hcl_beta=beta, tau_plus=tp), want)


def test_learnable_temperature_gets_gradient(device):
    q, c = make(device=device)
    t = torch.tensor(0.07, dtype=torch.float64, device=device, requires_grad=True)
    for kw in ({}, OPTIONS["combined"], OPTIONS["combined_symmetric"]):
        kw = {
            k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items() if k != "temperature"
        }
        got = hnsample.info_nce(q, c, temperature=t, block_size=9, **kw).sum()
        want = ref.info_nce(q, c, temperature=t, **kw).sum()
        (gt,) = grads(got, t)
        (wt,) = grads(want, t)
        assert float(gt) != 0.0
        torch.testing.assert_close(gt, wt, atol=1e-9, rtol=1e-8)


def test_learnable_float32_temperature_keeps_its_dtype():
    q, c = make(dtype=torch.float32)
    t = torch.tensor([0.05], requires_grad=True)
    loss = hnsample.info_nce(q, c, temperature=t)
    (gt,) = grads(loss, t)
    assert gt.dtype == torch.float32 and gt.shape == (1,)


@pytest.mark.parametrize("name", ["plain", "combined", "combined_symmetric", "hcl"])
def test_gradcheck(name):
    q, c = make(4, 7, 3)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    kw = dict(OPTIONS[name])
    kw.pop("temperature", None)
    if "positive_ids" in kw:
        kw["positive_ids"] = torch.tensor([[0, 5], [1, -1], [-1, 2], [3, 6]])
    for key in ("doc_ids", "query_labels", "doc_labels", "guide_queries", "guide_docs"):
        kw.pop(key, None)
    if "false_negative_relative_margin" in kw:
        kw["false_negative_relative_margin"] = 0.5
    # hardness_alpha multiplies stopgrad(s): finite differences would see through the stopgrad.
    kw.pop("hardness_alpha", None)

    def f(q, c, t):
        return hnsample.info_nce(q, c, temperature=t, block_size=6, **kw)

    assert torch.autograd.gradcheck(f, (q, c, t), eps=1e-6, atol=1e-6)


def _stats_args(q, c, symmetric=True, guide=True):
    """(positional tensors, keyword-only scalars) of hnsample::info_nce_stats."""
    b = q.shape[0]
    pos = torch.tensor([[0, 5], [1, -1], [-1, 2], [3, 6]])[:b]
    tensors = (
        q,
        c,
        torch.tensor(0.2, dtype=torch.float64, requires_grad=True),
        pos,
        None,
        None,
        None,
        None,
        torch.full((b,), 0.9, dtype=torch.float64),
        torch.randn(b, 2, dtype=q.dtype) if guide else None,
        torch.randn(c.shape[0], 2, dtype=q.dtype) if guide else None,
        torch.full((b,), 0.5, dtype=torch.float64) if guide else None,
    )
    return tensors, dict(hardness_alpha=0.5, hcl_beta=0.3, positive_margin=0.1, symmetric=symmetric, block_size=5)


def _fused_kwargs(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k != "symmetric"}


def test_opcheck():
    q, c = make(4, 7, 3)
    s_pos = torch.randn(4, 2, dtype=torch.float64)
    args, kw = _stats_args(q, c, symmetric=False)
    torch.library.opcheck(torch.ops.hnsample.info_nce_stats_fused.default, args + (s_pos,),
                          dict(_fused_kwargs(kw), tau_plus=0.1, row_weight=0.25))
    torch.library.opcheck(torch.ops.hnsample.info_nce_stats.default, *_stats_args(q, c))
    torch.library.opcheck(torch.ops.hnsample.info_nce_stats.default,
                          *_stats_args(q.float().detach(), c.float().detach(), symmetric=False, guide=False))


def test_torch_compile():
    q, c = make(dtype=torch.float32)
    t = torch.tensor(0.05, requires_grad=True)

    def f(q, c, t):
        return hnsample.info_nce(q, c, temperature=t, hcl_beta=0.5, symmetric=True, false_negative_margin=0.1)

    want = f(q, c, t)
    wg = grads(want, q, c, t)
    compiled = torch.compile(f, fullgraph=False, backend="aot_eager")
    got = compiled(q, c, t)
    torch.testing.assert_close(got, want)
    for a, w in zip(grads(got, q, c, t), wg, strict=True):
        torch.testing.assert_close(a, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_low_precision(dtype, device):
    g = torch.Generator().manual_seed(3)
    q32 = F.normalize(torch.randn(32, 64, generator=g), dim=1).to(device)
    c32 = F.normalize(torch.randn(96, 64, generator=g), dim=1).to(device)
    c32[:32] = F.normalize(c32[:32] + q32, dim=1)
    exact = ref.info_nce(q32, c32)
    q, c = q32.to(dtype).requires_grad_(), c32.to(dtype).requires_grad_()
    got = hnsample.info_nce(q, c, block_size=1000)
    assert got.dtype == torch.float32
    gq, gc = grads(got, q, c)
    assert gq.dtype == dtype and gc.dtype == dtype
    # same-precision torch: scores and cross entropy in the low precision
    naive = F.cross_entropy(((q @ c.T) / 0.05).float(), torch.arange(32, device=device))
    tol = 2 * abs(float(naive.detach()) - float(exact)) + 1e-3
    assert abs(float(got.detach()) - float(exact)) <= tol
    qq, cc = q32.clone().double().requires_grad_(), c32.clone().double().requires_grad_()
    eq, ec = grads(ref.info_nce(qq, cc), qq, cc)
    assert float((gq.double() - eq.to(device)).abs().max()) < 0.05 * float(eq.abs().max()) + 1e-3
    assert float((gc.double() - ec.to(device)).abs().max()) < 0.05 * float(ec.abs().max()) + 1e-3


def test_all_masked_rows_are_defined():
    q, c = make()
    labels = torch.zeros(B, dtype=torch.int64)
    doc_labels = torch.zeros(M, dtype=torch.int64)
    rows = hnsample.info_nce(
        q,
        c,
        query_labels=labels,
        doc_labels=doc_labels,
        reduction="none",
        symmetric=True,
        tau_plus=0.1,
        hcl_beta=0.5,
    )
    assert torch.isfinite(rows).all()
    # One positive and no negatives: -log(e^l / e^l) = 0 in both directions.
    torch.testing.assert_close(rows, torch.zeros(B, dtype=torch.float64))
    gq, gc = grads(rows.sum(), q, c)
    assert torch.isfinite(gq).all() and torch.isfinite(gc).all()
    # Only some rows fully masked: those are 0, the rest match the reference.
    half_labels = {
        "query_labels": torch.tensor([0, 0, 0, 1, 2, 3, 4]),
        "doc_labels": torch.zeros(M, dtype=torch.int64),
        "hcl_beta": 0.5,
    }
    rows = hnsample.info_nce(q, c, reduction="none", **half_labels)
    assert (rows[:3].abs() < 1e-12).all() and (rows[3:] > 1e-4).all()
    assert_close_to_reference(half_labels)


def test_rows_without_positives():
    q, c = make()
    pos = torch.tensor([0, -1, 2, -1, 4, 5, 6])
    rows = hnsample.info_nce(q, c, positive_ids=pos, reduction="none")
    assert rows[1] == 0 and rows[3] == 0
    mean = hnsample.info_nce(q, c, positive_ids=pos)
    torch.testing.assert_close(mean, rows.sum() / 5)
    assert_close_to_reference({"positive_ids": pos})
    none = hnsample.info_nce(q, c, positive_ids=torch.full((B,), -1))
    assert float(none) == 0.0
    gq, _ = grads(none, q, c)
    assert torch.isfinite(gq).all()


def test_noncontiguous_and_empty():
    q, c = make(requires_grad=False)
    qt = torch.randn(D, B, dtype=torch.float64).T
    qt.copy_(q)
    ct = torch.stack([c, c], dim=2)[:, :, 0]
    assert not qt.is_contiguous() and not ct.is_contiguous()
    torch.testing.assert_close(hnsample.info_nce(qt, ct), hnsample.info_nce(q, c))
    empty = torch.zeros(0, D, dtype=torch.float64, requires_grad=True)
    out = hnsample.info_nce(empty, c)
    assert float(out) == 0.0
    assert hnsample.info_nce(empty, c, reduction="none").shape == (0,)
    out.backward()
    assert empty.grad.shape == (0, D)
    # No docs at all: every positive id must be padding; the loss is 0 with zero gradients.
    q2 = q.clone().requires_grad_()
    no_docs = torch.zeros(0, D, dtype=torch.float64, requires_grad=True)
    for reduction in ("mean", "none"):
        out = hnsample.info_nce(q2, no_docs, positive_ids=torch.full((B,), -1), reduction=reduction)
        assert (out == 0).all()
        (gq,) = grads(out.sum(), q2)
        assert (gq == 0).all()


def test_nan_input_gives_nan_loss():
    q, c = make(requires_grad=False)
    c = c.clone()
    c[10, 0] = float("nan")
    rows = hnsample.info_nce(q, c, reduction="none")
    assert torch.isnan(rows).all()


def test_module_and_learnable_temperature():
    q, c = make(dtype=torch.float32)
    loss = hnsample.InfoNCELoss(0.07, learnable_temperature=True, hcl_beta=0.5)
    out = loss(q, c)
    out.backward()
    assert loss.log_temperature.grad is not None and float(loss.log_temperature.grad) != 0.0
    torch.testing.assert_close(
        out.detach(),
        hnsample.info_nce(q.detach(), c.detach(), temperature=0.07, hcl_beta=0.5),
        atol=1e-6,
        rtol=1e-5,
    )
    fixed = hnsample.InfoNCELoss(0.07, symmetric=True)
    assert list(fixed.parameters()) == []
    torch.testing.assert_close(fixed(q, c), hnsample.info_nce(q, c, temperature=0.07, symmetric=True))
    with pytest.raises(TypeError, match="unknown InfoNCELoss option"):
        hnsample.InfoNCELoss(0.05, bogus=1)
    with pytest.raises(ValueError, match="temperature"):
        hnsample.InfoNCELoss(-1.0)


_TinyEncoder = BagEncoder


def _features(n, seed):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 50, (n, 5), generator=g)}


def test_sentence_transformers_wrapper_matches_mnrl_formula():
    torch.manual_seed(0)
    model = _TinyEncoder()
    feats = [_features(6, 1), _features(6, 2), _features(6, 3)]  # anchor, positive, hard negative
    loss = hnsample.SentenceTransformerInfoNCELoss(model, temperature=1 / 20)
    got = loss(feats, None)
    emb = [F.normalize(model(f)["sentence_embedding"], dim=-1) for f in feats]
    want = F.cross_entropy(20 * emb[0] @ torch.cat(emb[1:]).T, torch.arange(6))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    gw = torch.autograd.grad(got, model.emb.weight)[0]
    ww = torch.autograd.grad(want, model.emb.weight)[0]
    torch.testing.assert_close(gw, ww, atol=1e-6, rtol=1e-4)
    assert loss.get_config_dict()["temperature"] == pytest.approx(0.05)
    guided = hnsample.SentenceTransformerInfoNCELoss(model, guide=_TinyEncoder(), guide_margin=0.0)
    assert torch.isfinite(guided(feats, None))
    with pytest.raises(ValueError, match="sentence_features"):
        loss([feats[0]], None)


def test_against_sentence_transformers_class():
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    torch.manual_seed(0)
    model = _TinyEncoder()
    feats = [_features(5, 1), _features(5, 2), _features(5, 3)]
    want = MultipleNegativesRankingLoss(model, scale=20.0)(feats, None)
    got = hnsample.SentenceTransformerInfoNCELoss(model, temperature=1 / 20)(feats, None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert st is not None


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"queries": "x"}, TypeError, "queries must be a torch.Tensor"),
        ({"queries": torch.zeros(3)}, ValueError, "queries must be 2-D"),
        ({"docs": torch.zeros(M, D + 1, dtype=torch.float64)}, ValueError, "docs must have 6 columns"),
        ({"docs": torch.zeros(M, D, dtype=torch.float32)}, TypeError, "docs must have the dtype"),
        ({"queries": torch.zeros(B, D, dtype=torch.int64)}, TypeError, "queries must be float32"),
        ({"docs": torch.zeros(3, D, dtype=torch.float64)}, ValueError, "positive_ids is required"),
        ({"temperature": 0.0}, ValueError, "temperature must be finite and > 0"),
        ({"temperature": "a"}, TypeError, "temperature must be a float or a tensor"),
        ({"temperature": torch.tensor([0.1, 0.2])}, ValueError, "temperature must hold one value"),
        ({"temperature": torch.tensor(1)}, TypeError, "temperature must be a float tensor"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"symmetric": 1}, TypeError, "symmetric must be a bool"),
        ({"positive_ids": torch.tensor([0, 1, 2, 3, 4, 5, 13])}, ValueError, "positive_ids must hold"),
        ({"positive_ids": torch.zeros(B, 2)}, TypeError, "positive_ids must be an integer tensor"),
        ({"positive_ids": torch.zeros(B + 1, dtype=torch.int64)}, ValueError, "positive_ids must have shape"),
        ({"positive_ids": torch.tensor([[0, 0]] * B)}, ValueError, "must not list the same doc twice"),
        ({"doc_ids": torch.zeros(M - 1, dtype=torch.int64)}, ValueError, "doc_ids must have shape"),
        ({"query_labels": torch.zeros(B, dtype=torch.int64)}, ValueError, "must be given together"),
        (
            {"query_labels": torch.zeros(B), "doc_labels": torch.zeros(M)},
            TypeError,
            "query_labels must be an int",
        ),
        (
            {"guide_queries": torch.zeros(B, 2)},
            ValueError,
            "guide_queries and guide_docs must be given together",
        ),
        (
            {"guide_queries": torch.zeros(B, 2), "guide_docs": torch.zeros(M, 3)},
            ValueError,
            "guide_docs must have 2",
        ),
        (
            {"guide_queries": torch.zeros(B + 1, 2), "guide_docs": torch.zeros(M, 2)},
            ValueError,
            "guide_queries must",
        ),
        ({"false_negative_margin": float("nan")}, ValueError, "false_negative_margin must be finite"),
        (
            {"false_negative_relative_margin": "x"},
            TypeError,
            "false_negative_relative_margin must be a float",
        ),
        ({"hcl_beta": -1.0}, ValueError, "hcl_beta must be >= 0"),
        ({"tau_plus": 1.0}, ValueError, "tau_plus must be < 1"),
        ({"hardness_alpha": None}, TypeError, "hardness_alpha must be a float"),
        ({"positive_margin": math.inf}, ValueError, "positive_margin must be finite"),
        ({"block_size": 0}, ValueError, "block_size must be >= 1"),
        ({"block_size": 2.5}, TypeError, "block_size must be an int"),
        ({"gather": True}, ValueError, "initialized torch.distributed"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    q, c = make(requires_grad=False)
    args = {"queries": q, "docs": c, **kwargs}
    with pytest.raises(exc, match=match):
        hnsample.info_nce(args.pop("queries"), args.pop("docs"), **args)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["plain", "combined", "combined_symmetric", "labels"])
def test_gpu_matches_cpu(name):
    kw = OPTIONS[name]
    q, c = make(40, 70, 16, dtype=torch.float32, requires_grad=False)
    kw = {**_resize(kw, 40, 70), "reduction": "none", "block_size": 300}  # some OPTIONS name a reduction
    cpu = hnsample.info_nce(q, c, **kw)
    kw_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    gpu = hnsample.info_nce(q.cuda(), c.cuda(), **kw_gpu)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_guide_of_another_dtype(dtype):
    # float64 guide embeddings with float32 / bf16 inputs: the guide's score blocks are written in the
    # scores' dtype (the kernels read both with one dtype code), so the masks are the reference's.
    q, c = make(6, 9, 8, dtype=torch.float32, requires_grad=False)
    g = torch.Generator().manual_seed(3)
    gq, gd = torch.randint(-2, 3, (6, 2), generator=g) / 4, torch.randint(-2, 3, (9, 2), generator=g) / 4
    got = hnsample.info_nce(q.to(dtype), c.to(dtype), guide_queries=gq.double(), guide_docs=gd.double(),
                            guide_margin=0.0, temperature=0.1)
    want = ref.info_nce(q.to(dtype).double(), c.to(dtype).double(), guide_queries=gq.double(),
                      guide_docs=gd.double(), guide_margin=0.0, temperature=0.1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("extra", [{}, {"symmetric": True, "hardness_alpha": 0.3}, {"reduction": "none"}],
                         ids=["fused", "symmetric", "per_row"])
def test_16bit_gradients_are_rounded_once(dtype, extra):
    # Positives close to their queries: each gradient is a small difference of large sums (the positive
    # term and the negatives'). They must be summed in float32 and rounded to 16 bits once; rounding each
    # to 16 bits first (autograd's default for two contributions) was 5.9e-5 off of a 7.8e-5 gradient.
    q, c = make(300, 700, 64, dtype=torch.float32, requires_grad=False)
    leaves = [q.to(dtype).requires_grad_(True), c.to(dtype).requires_grad_(True)]
    kw = {"temperature": 0.05, **extra}
    got = torch.autograd.grad(hnsample.info_nce(*leaves, **kw).sum(), leaves)
    exact = [x.detach().double().requires_grad_(True) for x in leaves]
    ref = torch.autograd.grad(hnsample.info_nce(*exact, **kw).sum(), exact)
    for g, r in zip(got, ref, strict=True):
        # the final rounding to 16 bits (2^-9, bf16) and float32 sums
        assert float((g.double() - r).abs().max()) <= 2.0**-8 * float(r.abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", ["plain", "symmetric_hardness"])
def test_gpu_16bit_inputs_match_cpu(name, dtype):
    # 16-bit inputs on CUDA are scored by the mixed-precision product (tensor cores, fp32 accumulation of
    # the exact products) with float32 exp; the CPU converts them to fp32 first: the same loss and
    # gradients up to summation order and the stated exp bound.
    kw = {"temperature": 0.05, "block_size": 50_000}
    if name == "symmetric_hardness":
        kw.update(symmetric=True, hardness_alpha=0.3)  # no masks: no threshold a rounding could flip
    q, c = make(300, 700, 64, dtype=torch.float32, requires_grad=False)
    q, c = q.to(dtype), c.to(dtype)
    leaves = [q.clone().requires_grad_(True), c.clone().requires_grad_(True)]
    cpu = hnsample.info_nce(*leaves, **kw)
    want = torch.autograd.grad(cpu, leaves)
    leaves_gpu = [x.detach().cuda().requires_grad_(True) for x in leaves]
    gpu = hnsample.info_nce(*leaves_gpu, **kw)
    got = torch.autograd.grad(gpu, leaves_gpu)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
    # The positives are close to their queries, so each gradient is a small difference of large sums:
    # fp32 rounding in either path is amplified alike. Both paths' errors against float64 must be alike.
    exact = [x.detach().double().requires_grad_(True) for x in leaves]
    ref = torch.autograd.grad(hnsample.info_nce(*exact, **kw), exact)
    for g, w, r in zip(got, want, ref, strict=True):
        err_gpu = float((g.cpu().double() - r).abs().max())
        err_cpu = float((w.double() - r).abs().max())
        assert err_gpu <= 4 * err_cpu + 2.0**-8 * float(r.abs().max()), (err_gpu, err_cpu)


def _resize(kw, b, m):
    """OPTIONS tensors tiled to (b, m) rows/cols."""
    out = {}
    for k, v in kw.items():
        if k in ("doc_ids", "doc_labels", "guide_docs"):
            v = v.repeat(math.ceil(m / v.shape[0]), *([1] * (v.ndim - 1)))[:m]
        elif k in ("query_labels", "guide_queries"):
            v = v.repeat(math.ceil(b / v.shape[0]), *([1] * (v.ndim - 1)))[:b]
        elif k == "positive_ids":
            v = torch.arange(b).unsqueeze(1)
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.float()
        out[k] = v
    return out


@pytest.mark.gpu
def test_gpu_backward_and_temperature():
    q, c = make(40, 70, 16, dtype=torch.float32)
    qg, cg = q.detach().cuda().requires_grad_(), c.detach().cuda().requires_grad_()
    t = torch.tensor(0.05, requires_grad=True)
    tg = t.detach().cuda().requires_grad_()
    kw = {"symmetric": True, "hcl_beta": 0.5, "false_negative_margin": 0.2}
    a = hnsample.info_nce(q, c, temperature=t, block_size=300, **kw)
    b = hnsample.info_nce(qg, cg, temperature=tg, block_size=300, **kw)
    for x, y in zip(grads(a, q, c, t), grads(b, qg, cg, tg), strict=True):
        torch.testing.assert_close(y.cpu(), x, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["plain", "combined", "combined_symmetric", "hcl", "labels", "gist"])
def test_float32_blocks_match_reference(name):
    # float32 inputs take the vectorized CPU path (float exp): compare with the float64 reference on
    # several column chunks and blocks.
    b, m = 40, 600
    kw = _resize(OPTIONS[name], b, m)
    if "positive_ids" in OPTIONS[name]:
        kw["positive_ids"] = torch.stack([torch.arange(b), torch.arange(b) + 300], dim=1)
        kw["positive_ids"][::5, 1] = -1
    q, c = make(b, m, 16, dtype=torch.float32)
    got = hnsample.info_nce(q, c, block_size=40 * 320, **kw)
    want = ref.info_nce(
        q,
        c,
        **{
            k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in kw.items()
        },
    )
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    got, want = got.sum(), want.sum()
    for x, y in zip(grads(got, q, c), grads(want, q, c), strict=True):
        torch.testing.assert_close(x.double(), y.double(), atol=2e-5, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_infinite_scores(dtype):
    q, c = make(dtype=dtype, requires_grad=False)
    c = c.clone()
    c[9] = torch.inf  # an unmasked negative with an infinite score: the loss is not finite
    assert not torch.isfinite(hnsample.info_nce(q, c, reduction="none")).any()
    assert not torch.isfinite(hnsample.info_nce(q, c, reduction="none", symmetric=True)).any()
    # Masked by doc id it leaves every denominator, and the loss is finite again.
    ids = torch.arange(M)
    ids[9] = 0
    ids[0] = 0
    rows = hnsample.info_nce(q, c, doc_ids=ids, positive_ids=torch.arange(B), reduction="none")
    assert torch.isfinite(rows[0])


@pytest.mark.parametrize("name", ["plain", "combined"])
def test_fused_backward_scaled_upstream(name):
    # 3 * loss reaches the fused op as a multiple of the assumed upstream gradient (scaled stored
    # gradients); loss + loss ** 2 as another multiple; both must match the reference.
    kw = {k: v for k, v in OPTIONS[name].items() if k != "temperature"}
    q, c = make()
    t = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    for f in (lambda x: 3 * x, lambda x: x + x**2):
        got = grads(f(hnsample.info_nce(q, c, temperature=t, **kw)), q, c, t)
        want = grads(f(ref.info_nce(q, c, temperature=t, **kw)), q, c, t)
        for a, w in zip(got, want, strict=True):
            torch.testing.assert_close(a, w, atol=1e-10, rtol=1e-8)
