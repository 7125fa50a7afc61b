"""Tests for byol.py: heads p and q, the target xi and its EMA (section 3.3), Eqs. 6-7, the BYOL baseline loss."""
import math

import pytest
import torch
from torch import nn

from byol import (Predictor, Projector, byol_loss, cosine_term, detector_loss, ema_update, latent, make_target,
                  negative_cosine, similarity_loss, tau_schedule)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def unit(*xs):
    return torch.tensor(xs, dtype=torch.float32)


# ---------------------------------------------------------------- heads
def test_projector_and_predictor_shapes():
    torch.manual_seed(0)
    p, q = Projector(), Predictor()
    h = torch.randn(2, 4, 1024)  # (B, K, 1024) box features
    v = q(p(h))
    assert p(h).shape == (2, 4, 256) and v.shape == (2, 4, 256)
    assert [type(m) for m in p.children()] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (p.fc1.in_features, p.fc1.out_features, p.fc2.out_features) == (1024, 4096, 256)
    assert (q.fc1.in_features, q.fc1.out_features, q.fc2.out_features) == (256, 4096, 256)


def test_projector_batchnorm_spans_all_boxes():
    # (B, K, D) input is normalised over all B*K boxes: the same as feeding the flattened (B*K, D) batch.
    torch.manual_seed(0)
    p = Projector(in_dim=6, hidden_dim=10, out_dim=5)
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(p(x), p(x.reshape(12, 6)).reshape(3, 4, 5))


# ---------------------------------------------------------------- target network and EMA
def test_make_target_is_a_frozen_copy():
    online = small_net()
    target = make_target(online)
    assert target.training and all(not prm.requires_grad for prm in target.parameters())
    assert all(prm.requires_grad for prm in online.parameters())
    for a, b in zip(online.parameters(), target.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def perturbed_pair():
    online = small_net()
    target = make_target(online)
    with torch.no_grad():
        for prm in target.parameters():
            prm.add_(torch.randn_like(prm))
        for buf in online.buffers():  # give the online BN different running statistics
            buf.add_(3)
    return online, target


@pytest.mark.parametrize("tau", [1.0, 0.0, 0.5, 0.9])
def test_ema_update_parameters(tau):
    online, target = perturbed_pair()
    before = [prm.clone() for prm in target.parameters()]
    buffers_before = [buf.clone() for buf in target.buffers()]
    ema_update(online, target, tau)
    for xi0, xi, theta in zip(before, target.parameters(), online.parameters()):
        if tau == 1.0:
            assert torch.equal(xi, xi0)
        elif tau == 0.0:
            assert torch.equal(xi, theta)
        else:
            torch.testing.assert_close(xi, tau * xi0 + (1 - tau) * theta)
        assert not xi.requires_grad
    for buf0, buf in zip(buffers_before, target.buffers()):  # BN running stats are not averaged
        assert torch.equal(buf, buf0)


def test_ema_update_rejects_bad_input():
    online, target = perturbed_pair()
    with pytest.raises(ValueError):
        ema_update(online, target, 1.5)
    with pytest.raises(ValueError):
        ema_update(online, nn.Linear(4, 8), 0.9)


def test_ema_update_creates_no_graph():
    online, target = perturbed_pair()
    ema_update(online, target, 0.5)
    assert all(prm.grad_fn is None for prm in target.parameters())


def test_tau_schedule():
    total = 1000
    taus = [tau_schedule(k, total) for k in range(total + 1)]
    assert taus[0] == pytest.approx(0.99, abs=1e-12)
    assert taus[-1] == pytest.approx(1.0, abs=1e-12)
    assert taus[total // 2] == pytest.approx(0.995, abs=1e-12)  # cos(pi/2) = 0: halfway
    assert all(b > a for a, b in zip(taus, taus[1:]))  # strictly increasing
    assert tau_schedule(0, total, tau_base=0.996) == pytest.approx(0.996)
    assert tau_schedule(total + 50, total) == pytest.approx(1.0)  # clamped past the end


def test_cosine_term():
    assert cosine_term(0, 10) == pytest.approx(1.0)
    assert cosine_term(5, 10) == pytest.approx(0.5)
    assert cosine_term(10, 10) == pytest.approx(0.0, abs=1e-12)
    assert cosine_term(2, 6) == pytest.approx((math.cos(math.pi / 3) + 1) / 2)  # = 0.75
    with pytest.raises(ValueError):
        cosine_term(0, 0)


# ---------------------------------------------------------------- Eq. 6
def test_similarity_identical_vectors_give_minimum():
    torch.manual_seed(0)
    v = torch.randn(3, 4, 16)  # (B, K, D)
    assert similarity_loss(v, [v.clone(), v.clone()]).item() == pytest.approx(-4.0, abs=1e-5)
    assert similarity_loss(v, [v.clone()]).item() == pytest.approx(-2.0, abs=1e-5)


def test_similarity_orthogonal_vectors_give_zero():
    v = unit(1, 0, 0).expand(2, 4, 3)
    w = unit(0, 1, 0).expand(2, 4, 3)
    u = unit(0, 0, 5).expand(2, 4, 3)
    assert similarity_loss(v, [w, u]).item() == pytest.approx(0.0, abs=1e-7)


def test_similarity_hand_computed():
    # Image 0: box 0 at 60 degrees to view 2 (cos 0.5) and 90 degrees to view 3 -> -1 + 0 = -1;
    #          box 1 opposite to view 2 (cos -1) and at 45 degrees to view 3 -> 2 - sqrt(2).
    #          Mean over K = 2 boxes: (1 - sqrt 2) / 2.
    # Image 1: all identical -> -2 - 2 = -4.   Mean over images: ((1 - sqrt 2) / 2 - 4) / 2.
    online = torch.stack([torch.stack([unit(1, 0), unit(1, 0)]), torch.stack([unit(0, 2), unit(3, 1)])])
    view2 = torch.stack([torch.stack([3 * unit(0.5, math.sqrt(3) / 2), unit(-1, 0)]),
                         torch.stack([unit(0, 1), unit(3, 1)])])
    view3 = torch.stack([torch.stack([unit(0, -2), unit(1, 1)]), torch.stack([unit(0, 7), unit(6, 2)])])
    expected = ((1 - math.sqrt(2)) / 2 - 4) / 2
    assert similarity_loss(online, [view2, view3]).item() == pytest.approx(expected, abs=1e-6)


def test_similarity_gradient_reaches_online_only():
    torch.manual_seed(0)
    v = torch.randn(2, 4, 8, requires_grad=True)
    t1 = torch.randn(2, 4, 8, requires_grad=True)
    t2 = torch.randn(2, 4, 8, requires_grad=True)
    loss = similarity_loss(v, [t1, t2])
    loss.backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert t1.grad is None and t2.grad is None


def test_similarity_scale_invariant():
    torch.manual_seed(0)
    v, t1, t2 = torch.randn(3, 2, 4, 8).unbind(0)
    base = similarity_loss(v, [t1, t2])
    torch.testing.assert_close(similarity_loss(5.0 * v, [0.1 * t1, 300.0 * t2]), base)
    assert -4.0 < base.item() < 4.0


def test_negative_cosine_low_precision_returns_float32():
    a = torch.randn(4, 8).to(torch.bfloat16)
    out = negative_cosine(a, a)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((4,), -2.0), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- Eq. 7
def test_detector_loss_minimum_and_zero():
    torch.manual_seed(0)
    v = torch.randn(2, 4, 16)
    assert detector_loss([v, v, v], [v, v, v]).item() == pytest.approx(-8.0, abs=1e-5)
    e1, e2 = unit(1, 0).expand(2, 4, 2), unit(0, 1).expand(2, 4, 2)
    assert detector_loss([e1, e1, e1], [e2, e2, e2]).item() == pytest.approx(0.0, abs=1e-7)


def test_detector_loss_pairs_views_as_eq7():
    # L_sim(q1; z2, z3) + Lbar_sim(z1; q2, q3): q1 never meets z1, q2/q3 meet only z1.
    e1, e2 = unit(1, 0).expand(1, 4, 2), unit(0, 1).expand(1, 4, 2)
    assert detector_loss([e1, e2, e2], [e2, e1, e1]).item() == pytest.approx(-4.0 - 4.0, abs=1e-6)
    assert detector_loss([e1, e2, e2], [e1, e2, e2]).item() == pytest.approx(0.0, abs=1e-6)
    # Only the first term at its minimum: q1 = z2 = z3 = e1, z1 = e2 orthogonal to q2 = q3 = e1.
    assert detector_loss([e1, e1, e1], [e2, e1, e1]).item() == pytest.approx(-4.0, abs=1e-6)


def test_detector_loss_gradients_online_only_and_scale_invariant():
    torch.manual_seed(0)
    q = [torch.randn(2, 4, 8, requires_grad=True) for _ in range(3)]
    z = [torch.randn(2, 4, 8, requires_grad=True) for _ in range(3)]
    loss = detector_loss(q, z)
    loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in q)
    assert all(t.grad is None for t in z)
    scaled = detector_loss([2.0 * t for t in q], [0.5 * t for t in z])
    torch.testing.assert_close(scaled, loss)


# ---------------------------------------------------------------- image-level BYOL
def test_byol_loss():
    torch.manual_seed(0)
    a, b = torch.randn(5, 16), torch.randn(5, 16)
    assert byol_loss(a, b, b.clone(), a.clone()).item() == pytest.approx(-4.0, abs=1e-5)
    e1, e2 = unit(1, 0).expand(3, 2), unit(0, 1).expand(3, 2)
    assert byol_loss(e1, e1, e2, e2).item() == pytest.approx(0.0, abs=1e-7)
    assert byol_loss(e1, e1, e1, e2).item() == pytest.approx(-2.0, abs=1e-6)  # q2 meets z1 = e1 only
    q1, q2 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    z1, z2 = torch.randn(5, 16, requires_grad=True), torch.randn(5, 16, requires_grad=True)
    byol_loss(q1, q2, z1, z2).backward()
    assert q1.grad is not None and q2.grad is not None and z1.grad is None and z2.grad is None


def test_latent_is_eq5():
    """Eq. 5: v = q(p(h)) on the online branch, v' = p(h') on the target branch (no predictor)."""
    torch.manual_seed(0)
    p, q = Projector(in_dim=8, hidden_dim=16, out_dim=4), Predictor(in_dim=4, hidden_dim=16, out_dim=4)
    h = torch.randn(2, 3, 8)  # (B, K, 1024) in the paper
    assert torch.equal(latent(h, p, q), q(p(h))) and torch.equal(latent(h, p), p(h))
    assert latent(h, p, q).shape == (2, 3, 4)
