"""margin_mse and listwise_kl against the reference (hnsample/_reference.py) and, as sentence-transformers
losses (cached and not), against MarginMSELoss and DistillKLDivLoss on the same model and batch."""

from __future__ import annotations

import pytest
import torch
from tiny_encoder import BagEncoder

import hnsample
from hnsample import _reference as ref

B, D = 6, 8


def _embeddings(columns: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, D, generator=g, dtype=dtype, requires_grad=True) for _ in range(columns)]


@pytest.mark.parametrize("negatives", [1, 3])
def test_margin_mse_against_reference(negatives):
    q, p, *n = _embeddings(2 + negatives)
    teacher = torch.randn(B, 1 + negatives, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    margins = teacher[:, :1] - teacher[:, 1:]
    got = hnsample.margin_mse(q, p, n, teacher)
    want = ref.margin_mse(q, [p, *n], margins)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(hnsample.margin_mse(q, p, n, margins), want)  # margins or scores
    if negatives == 1:
        torch.testing.assert_close(hnsample.margin_mse(q, p, n, margins[:, 0]), want)
    for g, w in zip(torch.autograd.grad(got, [q, p, *n]), torch.autograd.grad(want, [q, p, *n]), strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("negatives", [1, 3])
def test_margin_mse_with_several_positives_per_row(negatives):
    # Each (query, positive) pair has its own teacher score, so each positive gets its own margins; a NaN
    # teacher score is a padded positive (rows with fewer positives), left out of the mean.
    q, p1, p2, p3, *n = _embeddings(4 + negatives, seed=3)
    teacher = torch.randn(B, 3 + negatives, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    teacher[1, 2] = teacher[4, 1] = teacher[4, 2] = torch.nan
    got = hnsample.margin_mse(q, [p1, p2, p3], n, teacher)
    want = ref.margin_mse_multi(q, [p1, p2, p3], n, teacher)
    torch.testing.assert_close(got, want)
    inputs = [q, p1, p2, p3, *n]
    for g, w in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs), strict=True):
        torch.testing.assert_close(g, w)
    # margins (B, P, k) give the same loss; one positive column in a list is the single-positive loss
    margins = teacher[:, :3, None] - teacher[:, None, 3:]
    torch.testing.assert_close(hnsample.margin_mse(q, [p1, p2, p3], n, margins), want)
    one = teacher[:, [0, *range(3, 3 + negatives)]]
    torch.testing.assert_close(hnsample.margin_mse(q, [p1], n, one), hnsample.margin_mse(q, p1, n, one))
    # a padded positive's embedding gets no gradient from it
    grad_p3 = torch.autograd.grad(hnsample.margin_mse(q, [p1, p2, p3], n, teacher), p3)[0]
    assert (grad_p3[[1, 4]] == 0).all() and (grad_p3[[0, 2, 3, 5]] != 0).any()
    with pytest.raises(ValueError, match="at least one positive with a teacher score"):
        bad = teacher.clone()
        bad[0, :3] = torch.nan
        hnsample.margin_mse(q, [p1, p2, p3], n, bad)
    with pytest.raises(ValueError, match=rf"\(6, 3, {negatives}\) margins"):
        hnsample.margin_mse(q, [p1, p2, p3], n, teacher[:, :-1])


def test_margin_mse_hand_checked_with_two_positives():
    q = torch.tensor([[1.0, 0.0]])
    p1, p2, n = torch.tensor([[0.5, 0.0]]), torch.tensor([[0.75, 0.0]]), torch.tensor([[0.25, 1.0]])
    # student margins 0.25 and 0.5; teacher scores [2, 1.5 | 1] -> margins 1 and 0.5
    # ((0.25 - 1)^2 + (0.5 - 0.5)^2) / 2 = 0.28125
    got = hnsample.margin_mse(q, [p1, p2], [n], torch.tensor([[2.0, 1.5, 1.0]]))
    assert float(got) == pytest.approx(0.28125)


@pytest.mark.parametrize(("student", "teacher"), [(1.0, 1.0), (0.5, 2.0)])
def test_listwise_kl_against_reference(student, teacher):
    q, *c = _embeddings(4)
    scores = torch.randn(B, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 3
    scores[0, 2] = -torch.inf  # a candidate the teacher rules out: p = 0 contributes 0
    got = hnsample.listwise_kl(q, c, scores, student_temperature=student, teacher_temperature=teacher)
    want = ref.listwise_kl(q, c, scores, student, teacher)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, [q, *c]), torch.autograd.grad(want, [q, *c]), strict=True):
        torch.testing.assert_close(g, w)


def test_hand_checked_values():
    q = torch.tensor([[1.0, 0.0]])
    p, n = torch.tensor([[0.5, 0.0]]), torch.tensor([[0.25, 1.0]])
    # s+ = 0.5, s- = 0.25, margin 0.25; teacher margin 1.0 -> (0.25 - 1)^2 = 0.5625
    assert float(hnsample.margin_mse(q, p, [n], torch.tensor([1.0]))) == pytest.approx(0.5625)
    # equal teacher scores: P = (1/2, 1/2); Q = softmax(0.5, 0.25)
    q_pos = 1 / (1 + torch.exp(torch.tensor(-0.25)))
    want = 0.5 * torch.log(0.5 / q_pos) + 0.5 * torch.log(0.5 / (1 - q_pos))
    got = hnsample.listwise_kl(q, [p, n], torch.tensor([[3.0, 3.0]]))
    assert float(got) == pytest.approx(float(want))


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda q, c: hnsample.margin_mse(q, c[0], [], torch.zeros(B)), ValueError, "at least one negative"),
        (lambda q, c: hnsample.margin_mse(q, c[0], c[1:], torch.zeros(B, 5)), ValueError, "teacher must have shape"),
        (lambda q, c: hnsample.margin_mse(q, c[0], [c[1][:2]], torch.zeros(B)), ValueError, "candidate column 1"),
        (lambda q, c: hnsample.listwise_kl(q, c[:1], torch.zeros(B, 1)), ValueError, "at least 2 candidate"),
        (lambda q, c: hnsample.listwise_kl(q, c, torch.zeros(B, 2)), ValueError, "teacher_scores must have shape"),
        (lambda q, c: hnsample.listwise_kl(q, c, torch.zeros(B, 3), teacher_temperature=0), ValueError,
         "teacher_temperature must be"),
    ],
)
def test_bad_arguments(call, exc, match):
    q, *c = _embeddings(4)
    with pytest.raises(exc, match=match):
        call(q, c)


def _step(model, loss, features, labels):
    model.zero_grad(set_to_none=True)
    value = loss(features, labels)
    value.backward()
    return value.detach(), model.emb.weight.grad.clone()


@pytest.mark.parametrize("negatives", [1, 3])
@pytest.mark.parametrize("mini_batch_size", [None, 4])
def test_equal_to_sentence_transformers(negatives, mini_batch_size):
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    torch.manual_seed(0)
    bag = BagEncoder()
    g = torch.Generator().manual_seed(1)
    features = [{"input_ids": torch.randint(0, 50, (B, 5), generator=g)} for _ in range(2 + negatives)]
    teacher = torch.randn(B, 1 + negatives, generator=g) * 4
    cases = [
        (st_losses.MarginMSELoss(bag), hnsample.SentenceTransformerMarginMSELoss(bag, mini_batch_size=mini_batch_size),
         teacher),
        (st_losses.MarginMSELoss(bag), hnsample.SentenceTransformerMarginMSELoss(bag, mini_batch_size=mini_batch_size),
         teacher[:, :1] - teacher[:, 1:]),
    ]
    if negatives > 1:
        cases.append((st_losses.DistillKLDivLoss(bag, temperature=2.0, student_temperature=0.5),
                      hnsample.SentenceTransformerDistillKLDivLoss(bag, 2.0, student_temperature=0.5,
                                                                   mini_batch_size=mini_batch_size), teacher))
    for theirs, ours, labels in cases:
        want_loss, want_grad = _step(bag, theirs, features, labels)
        got_loss, got_grad = _step(bag, ours, features, labels)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mini_batch_size", [None, 4])
def test_sentence_transformers_loss_with_several_positives(mini_batch_size):
    # (query, positive_1, positive_2, negatives...) columns with per-pair teacher scores: the loss equals
    # the mean of ST's MarginMSELoss over the valid (query, positive) pairs, weighted by their terms.
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    torch.manual_seed(0)
    bag = BagEncoder()
    g = torch.Generator().manual_seed(2)
    features = [{"input_ids": torch.randint(0, 50, (B, 5), generator=g)} for _ in range(5)]  # q, p1, p2, n1, n2
    teacher = torch.randn(B, 4, generator=g) * 4
    ours = hnsample.SentenceTransformerMarginMSELoss(bag, num_positives=2, mini_batch_size=mini_batch_size)
    got_loss, got_grad = _step(bag, ours, features, teacher)
    theirs = st_losses.MarginMSELoss(bag)
    bag.zero_grad(set_to_none=True)
    parts = [theirs([features[0], features[p], features[3], features[4]], teacher[:, [p - 1, 2, 3]])
             for p in (1, 2)]
    want_loss = (parts[0] + parts[1]) / 2
    want_loss.backward()
    torch.testing.assert_close(got_loss, want_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, bag.emb.weight.grad, rtol=1e-5, atol=1e-6)
    assert ours.get_config_dict()["num_positives"] == 2
    with pytest.raises(ValueError, match="num_positives"):
        hnsample.SentenceTransformerMarginMSELoss(bag, num_positives=0)
