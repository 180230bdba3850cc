"""Each loss against an independent computation (numpy, explicit sums) on fixed tensors."""

import math

import numpy as np
import pytest
import torch

from scripts.method.losses import (
    CrossPseudoSupervisionLoss,
    InformationDivergenceLoss,
    InterpolationConsistencyLoss,
    SupervisedLoss,
    ema_alpha,
    sigmoid_rampup_weight,
)


def np_softmax(x, axis=1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_dice_loss(prob, label_idx, num_classes):
    """Reference Dice: per class over the whole batch, squared denominators, smooth 1e-5, mean over all classes."""
    losses = []
    for c in range(num_classes):
        p = prob[:, c]
        y = (label_idx == c).astype(np.float64)
        losses.append(1 - (2 * (p * y).sum() + 1e-5) / ((p**2).sum() + (y**2).sum() + 1e-5))
    return float(np.mean(losses))


@pytest.fixture
def logits_and_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, 6, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (3, 1, 6, 5), generator=g)
    return logits, labels


def test_supervised_loss_is_half_ce_plus_half_dice(logits_and_labels):
    logits, labels = logits_and_labels
    x, y = logits.numpy(), labels.numpy()[:, 0]
    prob = np_softmax(x)
    # cross-entropy: mean over rows and pixels of -log p[y]
    ce = -np.mean(np.log(np.take_along_axis(prob, y[:, None], axis=1)))
    expected = 0.5 * (ce + np_dice_loss(prob, y, 3))
    got = SupervisedLoss()(logits, labels.to(torch.float64))
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_cps_uses_the_other_networks_detached_argmax(logits_and_labels):
    logits_a, _ = logits_and_labels
    logits_b = torch.flip(logits_a, dims=[1]) + 0.3
    pa, pb = torch.softmax(logits_a, 1).requires_grad_(), torch.softmax(logits_b, 1).requires_grad_()
    cps_a, cps_b = CrossPseudoSupervisionLoss()(pa, pb)
    na, nb = pa.detach().numpy(), pb.detach().numpy()
    assert float(cps_a) == pytest.approx(np_dice_loss(na, nb.argmax(1), 3), rel=1e-6)
    assert float(cps_b) == pytest.approx(np_dice_loss(nb, na.argmax(1), 3), rel=1e-6)
    # the pseudo-label is detached: cps_a sends no gradient to pb
    cps_a.backward()
    assert pb.grad is None and pa.grad is not None


def test_ict_mix_and_target():
    ict = InterpolationConsistencyLoss(alpha=0.5)
    u = torch.arange(4 * 2 * 3 * 3, dtype=torch.float64).reshape(4, 2, 3, 3)
    mixed, lam = ict.mix(u)
    assert mixed.shape == (2, 2, 3, 3) and lam.shape == (2, 1, 1, 1)
    for i in range(2):
        l = float(lam[i])
        assert torch.allclose(mixed[i], (1 - l) * u[i] + l * u[i + 2])
    g = torch.Generator().manual_seed(1)
    student = torch.softmax(torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64), 1)
    teacher = torch.softmax(torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64), 1)
    lam = torch.tensor([0.2, 0.7], dtype=torch.float64).view(2, 1, 1, 1)
    s, t = student.numpy(), teacher.numpy()
    target = np.stack([(1 - 0.2) * t[0] + 0.2 * t[2], (1 - 0.7) * t[1] + 0.7 * t[3]])
    expected = np.mean((s - target) ** 2)
    assert float(ict(student, teacher, lam)) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="even number"):
        ict.mix(u[:3])


def test_ict_mixing_factor_is_beta_half_half():
    torch.manual_seed(0)
    ict = InterpolationConsistencyLoss(alpha=0.5)
    lam = torch.cat([ict.mix(torch.zeros(200, 1, 1, 1))[1].flatten() for _ in range(50)])
    # Beta(0.5, 0.5): mean 1/2, variance 1/8, U-shaped (more mass near 0 and 1 than in the middle)
    assert float(lam.mean()) == pytest.approx(0.5, abs=0.02)
    assert float(lam.var()) == pytest.approx(0.125, abs=0.01)
    assert float(((lam < 0.1) | (lam > 0.9)).float().mean()) > float(((lam > 0.4) & (lam < 0.6)).float().mean())


def np_information_divergence(pa, pb, eps=1e-8):
    """Explicit per-pixel loops over rows and pixels."""
    b, c, h, w = pa.shape
    kls, migs = [], []
    for i in range(b):
        for y in range(h):
            for x in range(w):
                a, bb = pa[i, :, y, x], pb[i, :, y, x]
                m = (a + bb) / 2
                kls.append(sum(a[k] * math.log((a[k] + eps) / (bb[k] + eps)) for k in range(c)))
                ent = lambda p: -sum(p[k] * math.log(p[k] + eps) for k in range(c))  # noqa: E731
                migs.append(ent(a) + ent(bb) - ent(m))
    return np.mean(kls) + np.mean(migs), np.mean(kls), np.mean(migs)


def test_information_divergence_against_explicit_sums(logits_and_labels):
    logits, _ = logits_and_labels
    pa = torch.softmax(logits, 1)
    pb = torch.softmax(2.0 * torch.roll(logits, 1, dims=0), 1)
    loss, kl, mig = InformationDivergenceLoss()(pa, pb)
    e_loss, e_kl, e_mig = np_information_divergence(pa.numpy(), pb.numpy())
    assert float(kl) == pytest.approx(e_kl, rel=1e-9)
    assert float(mig) == pytest.approx(e_mig, rel=1e-9)
    assert float(loss) == pytest.approx(e_loss, rel=1e-9)
    # MIG = (H(pA) + H(pB)) / 2 - JSD(pA, pB) <= mean entropy, and KL >= 0
    assert float(kl) > 0


def test_information_divergence_identical_inputs(logits_and_labels):
    logits, _ = logits_and_labels
    p = torch.softmax(logits, 1)
    loss, kl, mig = InformationDivergenceLoss()(p, p.clone())
    entropy = float(-(p * torch.log(p + 1e-8)).sum(1).mean())
    assert float(kl) == pytest.approx(0.0, abs=1e-12)
    assert float(mig) == pytest.approx(entropy, rel=1e-9)
    assert float(loss) == pytest.approx(entropy, rel=1e-9)


def test_information_divergence_gradients_reach_both():
    g = torch.Generator().manual_seed(3)
    la = torch.randn(2, 2, 4, 4, generator=g, requires_grad=True)
    lb = torch.randn(2, 2, 4, 4, generator=g, requires_grad=True)
    loss, _, _ = InformationDivergenceLoss()(torch.softmax(la, 1), torch.softmax(lb, 1))
    loss.backward()
    assert la.grad.abs().sum() > 0 and lb.grad.abs().sum() > 0


def test_sigmoid_rampup_formula():
    # w(t) = W exp(-5 (1 - min(s, L) / L)^2), s = floor(t L / R): the authors' t // r with r = R / L = 50 here
    assert sigmoid_rampup_weight(0, 2.0, 200, 10_000) == pytest.approx(2.0 * math.exp(-5.0))
    assert sigmoid_rampup_weight(100 * 50, 1.0, 200, 10_000) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup_weight(100 * 50 + 49, 1.0, 200, 10_000) == pytest.approx(math.exp(-1.25))  # s = t // r
    assert sigmoid_rampup_weight(200 * 50, 1.0, 200, 10_000) == pytest.approx(1.0)
    assert sigmoid_rampup_weight(10**6, 1.0, 200, 10_000) == pytest.approx(1.0)
    # R not a multiple of L, and R < L: full weight exactly at t = R, halfway (s = L / 2) at t = R / 2
    for span in (500, 150, 70):
        assert sigmoid_rampup_weight(span - 1, 1.0, 200, span) < 1.0 == sigmoid_rampup_weight(span, 1.0, 200, span)
        assert sigmoid_rampup_weight(span // 2, 1.0, 200, span) == pytest.approx(math.exp(-5 * 0.25), rel=0.05)
    assert sigmoid_rampup_weight(7, 0.0, 200, 10_000) == 0.0


def test_ema_alpha_formula():
    assert ema_alpha(0) == 0.0  # the first update copies the student
    assert ema_alpha(1) == pytest.approx(0.5)
    assert ema_alpha(9) == pytest.approx(0.9)
    assert ema_alpha(99) == pytest.approx(0.99)
    assert ema_alpha(5000) == pytest.approx(0.99)
