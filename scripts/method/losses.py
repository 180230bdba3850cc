"""Losses of the dual-network semi-supervised method (arXiv 2509.06495; formulas in docs/README.md#method).

p denotes a softmax over classes, A the UNeXt and B the Swin-Unet. Every loss takes probabilities or logits
exactly as its docstring says; the trainer computes each softmax once and passes it to every term that needs it.
"""

from __future__ import annotations

import math

import torch
from monai.losses import DiceCELoss, DiceLoss

from scripts.data.transforms import channel_argmax

__all__ = [
    "SupervisedLoss",
    "CrossPseudoSupervisionLoss",
    "InterpolationConsistencyLoss",
    "InformationDivergenceLoss",
    "sigmoid_rampup_weight",
    "ema_alpha",
]


def reference_dice(**kwargs) -> DiceLoss:
    """Dice as in the reference: all classes including background, squared denominators, smoothing 1e-5, whole batch.

    loss = mean_c [1 - (2 sum p_c y_c + 1e-5) / (sum p_c^2 + sum y_c^2 + 1e-5)], sums over batch and pixels.
    """
    return DiceLoss(include_background=True, squared_pred=True, smooth_nr=1e-5, smooth_dr=1e-5, batch=True, **kwargs)


class SupervisedLoss(DiceCELoss):
    """Supervised loss on labelled rows: 0.5 * (cross-entropy + Dice), from logits (B, C, ...) and index labels
    (B, 1, ...).

    The Dice part is :func:`reference_dice` (softmax of the logits, one-hot of the label).
    """

    def __init__(self) -> None:
        super().__init__(
            include_background=True,
            to_onehot_y=True,
            softmax=True,
            squared_pred=True,
            smooth_nr=1e-5,
            smooth_dr=1e-5,
            batch=True,
            lambda_dice=0.5,
            lambda_ce=0.5,
        )


class CrossPseudoSupervisionLoss(torch.nn.Module):
    """Cross pseudo supervision, Dice only: Dice(p_A, argmax p_B) + Dice(p_B, argmax p_A), pseudo-labels detached.

    Returns the two terms separately, (cps_A, cps_B), so each can be logged; both take probabilities (B, C, ...).
    """

    def __init__(self) -> None:
        super().__init__()
        self.dice = reference_dice(to_onehot_y=True)

    def forward(self, prob_a: torch.Tensor, prob_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pseudo_a = channel_argmax(prob_a.detach(), dim=1)
        pseudo_b = channel_argmax(prob_b.detach(), dim=1)
        return self.dice(prob_a, pseudo_b), self.dice(prob_b, pseudo_a)


class InterpolationConsistencyLoss(torch.nn.Module):
    """ICT (Verma et al. 2019) of a student B against its EMA teacher T, on the two halves u0, u1 of the unlabelled
    rows.

    mix = (1 - lam) u0 + lam u1 with lam ~ Beta(alpha, alpha) per pair (:meth:`mix`);
    loss = mean[(softmax(B(mix)) - ((1 - lam) softmax(T(u0)) + lam softmax(T(u1))))^2] (:meth:`forward`).
    MONAI's MixUp mixes within one batch without a teacher, hence this class.
    """

    def __init__(self, alpha: float = 0.5) -> None:
        super().__init__()
        self.beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))

    def mix(self, unlabeled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split (2n, C, H, W) into halves and mix them; returns (mixed (n, C, H, W), lam (n, 1, 1, 1))."""
        if unlabeled.shape[0] < 2 or unlabeled.shape[0] % 2:
            raise ValueError(f"ICT needs an even number of unlabelled rows (at least 2), got {unlabeled.shape[0]}")
        u0, u1 = unlabeled.chunk(2)
        lam = self.beta.sample((u0.shape[0], 1, 1, 1)).to(device=unlabeled.device, dtype=unlabeled.dtype)
        return torch.lerp(u0, u1, lam), lam

    def forward(self, student_prob_mixed: torch.Tensor, teacher_prob: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """student_prob_mixed: softmax(B(mix)) (n, C, ...); teacher_prob: softmax(T(cat(u0, u1))) (2n, C, ...)."""
        t0, t1 = teacher_prob.chunk(2)
        target = torch.lerp(t0, t1, lam)
        return torch.mean((student_prob_mixed - target) ** 2)


class InformationDivergenceLoss(torch.nn.Module):
    """Information divergence between two networks' probabilities p_A, p_B (B, C, ...), gradients to both.

    KL_i = sum_c pA_c log((pA_c + eps) / (pB_c + eps));  H(p)_i = -sum_c p_c log(p_c + eps);  m = (pA + pB) / 2;
    MIG_i = H(pA)_i + H(pB)_i - H(m)_i;  loss = mean_i MIG_i + mean_i KL_i, means over all rows and pixels.
    For identical inputs KL = 0 and MIG = H(p). Returns (loss, mean KL, mean MIG).
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, prob_a: torch.Tensor, prob_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        log_a = torch.log(prob_a + self.eps)
        log_b = torch.log(prob_b + self.eps)
        mid = 0.5 * (prob_a + prob_b)
        kl = (prob_a * (log_a - log_b)).sum(dim=1).mean()
        # H(pA) + H(pB) - H(m), summed over classes, averaged over rows and pixels.
        mig = (mid * torch.log(mid + self.eps) - prob_a * log_a - prob_b * log_b).sum(dim=1).mean()
        return mig + kl, kl, mig


def sigmoid_rampup_weight(iteration: int, weight: float, rampup_length: int, rampup_iterations: int) -> float:
    """w(t) = W exp(-5 (1 - min(s, L) / L)^2), s = floor(t L / R), L = rampup_length, R = rampup_iterations.

    The authors' ramp is s = t // r with r = R / L iterations per step (their 150 x 200 = 30,000); written with
    R it is the same where R is a multiple of L, and it reaches full weight at t = R for any R (t // r with r
    rounded down to a whole number reached it later, at L iterations at least).
    """
    if rampup_length <= 0:
        return float(weight)
    s = min(iteration * rampup_length // max(1, int(rampup_iterations)), rampup_length)
    phase = 1.0 - s / rampup_length
    return float(weight) * math.exp(-5.0 * phase * phase)


def ema_alpha(iteration: int, max_alpha: float = 0.99) -> float:
    """EMA decay alpha = min(1 - 1 / (t + 1), max_alpha); t = 0 copies the student into the teacher."""
    return min(1.0 - 1.0 / (iteration + 1), max_alpha)
