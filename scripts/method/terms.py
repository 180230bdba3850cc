"""The unsupervised loss terms of the method (arXiv 2509.06495; formulas in docs/README.md#method) as components,
and the EMA teacher that two of them learn from.

Each term is declared in ``configs/train.json`` (``train#terms``) with its weight and its own numbers. Before the
forward passes it names the extra rows it needs (:meth:`UnsupervisedTerm.extra_rows`): inputs that the teacher's
student or the EMA teacher must see besides the batch, each under a name. After them it reads every prediction it
needs from :class:`Predictions` by network and row name, never by position, and returns its loss and what to log.

Networks are named "a" (the UNeXt), "b" (network B), "teacher" (the EMA teacher) and "student" (whichever of "a" and
"b" the teacher follows). Every student sees the rows "labeled" (x_l) and, where the run uses them, "unlabeled"
(x_u); "batch" names both together, x = cat(x_l, x_u).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from scripts.method.losses import (
    CrossPseudoSupervisionLoss,
    InformationDivergenceLoss,
    InterpolationConsistencyLoss,
    ema_alpha,
)

__all__ = [
    "Predictions",
    "UnsupervisedTerm",
    "CrossPseudoSupervisionTerm",
    "InformationDivergenceTerm",
    "InterpolationConsistencyTerm",
    "MeanTeacherTerm",
    "EmaTeacher",
]

#: the rows every student sees, in this order; "batch" names those present together
BATCH_ROWS = ("labeled", "unlabeled")


class Predictions:
    """The fp32 logits of one iteration by network and row name, each softmax over classes computed once.

    Every network ran once on the concatenation of its named rows (:meth:`add`). The softmax is taken per group of
    rows, the batch ("labeled" and "unlabeled") being one group and every other row name its own, so that a term
    reading the batch gets that one tensor and a term reading part of it a view of it.
    """

    def __init__(self, aliases: Mapping[str, str] | None = None) -> None:
        self._aliases = dict(aliases or {})
        self._logits: dict[str, torch.Tensor] = {}
        self._spans: dict[str, dict[str, slice]] = {}
        self._prob: dict[tuple[str, str], torch.Tensor] = {}

    def add(self, network: str, logits: torch.Tensor, rows: Mapping[str, int]) -> None:
        """``logits`` of ``network`` on its rows, named in order with their counts."""
        spans, start = {}, 0
        for name, count in rows.items():
            spans[name], start = slice(start, start + count), start + count
        assert start == logits.shape[0], f"{network}: {start} named rows for {logits.shape[0]} outputs"
        batch = [spans[name] for name in BATCH_ROWS if name in spans]
        if batch:
            assert batch[0].start == 0 and all(p.stop == q.start for p, q in zip(batch, batch[1:])), list(spans)
            spans["batch"] = slice(0, batch[-1].stop)
        self._logits[network], self._spans[network] = logits, spans

    def has(self, network: str, name: str) -> bool:
        return name in self._spans.get(self._aliases.get(network, network), {})

    def logits(self, network: str, name: str) -> torch.Tensor:
        network = self._aliases.get(network, network)
        return self._view(self._logits[network], self._span(network, name))

    def prob(self, network: str, name: str) -> torch.Tensor:
        network = self._aliases.get(network, network)
        group = "batch" if name in BATCH_ROWS else name
        key = (network, group)
        if key not in self._prob:
            self._prob[key] = torch.softmax(self.logits(network, group), dim=1)
        if group == name:
            return self._prob[key]
        return self._view(self._prob[key], self._span(network, name))  # the batch starts at row 0

    def _span(self, network: str, name: str) -> slice:
        spans = self._spans[network]
        if name not in spans:
            raise KeyError(f"network {network!r} saw no rows named {name!r}; it saw {list(spans)}")
        return spans[name]

    @staticmethod
    def _view(tensor: torch.Tensor, span: slice) -> torch.Tensor:
        return tensor if span.start == 0 and span.stop == tensor.shape[0] else tensor[span]


class UnsupervisedTerm:
    """One weighted unsupervised loss term; the trainer adds w(t) x its loss, w(t) its weight ramped up over the run.

    A weight of 0 switches the term off: it is then never computed. Subclasses name themselves and implement
    :meth:`__call__` (and :meth:`extra_rows` when they need inputs besides the batch).

    Attributes:
        name: the term's name in the config, whose weight is ``<name>_weight``.
        weight_key: the key of its ramped weight in the trainer's output.
        label: its name in the start-of-run log line.
        needs_network_b: it compares the two students.
        needs_teacher: it learns from the EMA teacher.
        needs_unlabeled: it reads the unlabelled rows, so an iteration without them skips it.
        start_iteration: the first (0-based) iteration it is computed in.
    """

    name = weight_key = label = ""
    needs_network_b = needs_teacher = False
    needs_unlabeled = True
    start_iteration = 0

    def __init__(self, weight: float) -> None:
        if weight < 0:
            raise ValueError(f"{self.name}_weight must be >= 0, got {weight}")
        self.weight = weight

    def active(self, iteration: int, has_unlabeled: bool) -> bool:
        """Whether the term is computed at 0-based ``iteration``."""
        return self.weight > 0 and iteration >= self.start_iteration and (has_unlabeled or not self.needs_unlabeled)

    def extra_rows(self, unlabeled: torch.Tensor | None) -> dict[str, dict[str, torch.Tensor]]:
        """Inputs this term needs besides the batch, ``{network: {row name: rows}}`` ("student" or "teacher")."""
        return {}

    def __call__(self, predictions: Predictions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the term's loss before its weight, the values to log by key)."""
        raise NotImplementedError


class CrossPseudoSupervisionTerm(UnsupervisedTerm):
    """cps_a + cps_b on the unlabelled rows of the two students (:class:`CrossPseudoSupervisionLoss`)."""

    name, weight_key, label = "cps", "w_cps", "CPS"
    needs_network_b = True

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__(weight)
        self.loss = CrossPseudoSupervisionLoss()

    def __call__(self, predictions: Predictions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cps_a, cps_b = self.loss(predictions.prob("a", "unlabeled"), predictions.prob("b", "unlabeled"))
        return cps_a + cps_b, {"cps_a": cps_a, "cps_b": cps_b}


class InformationDivergenceTerm(UnsupervisedTerm):
    """L_ID(p_A(x), p_B(x)) on every row of the batch, labelled included (:class:`InformationDivergenceLoss`)."""

    name, weight_key, label = "divergence", "w_div", "information divergence"
    needs_network_b = True
    needs_unlabeled = False

    def __init__(self, weight: float = 1.0, eps: float = 1e-8) -> None:
        super().__init__(weight)
        self.loss = InformationDivergenceLoss(eps=eps)

    def __call__(self, predictions: Predictions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        divergence, kl, mig = self.loss(predictions.prob("a", "batch"), predictions.prob("b", "batch"))
        return divergence, {"divergence": divergence, "kl": kl, "mig": mig}


class InterpolationConsistencyTerm(UnsupervisedTerm):
    """ICT of the teacher's student against the EMA teacher (:class:`InterpolationConsistencyLoss`).

    Rows: the student's forward on the mix of the two halves of x_u ("ict_mix"), the teacher's on x_u ("unlabeled").
    The mixing factors are drawn in :meth:`extra_rows` and used by the :meth:`__call__` of the same iteration.

    Args:
        weight: W of the term. beta_alpha: lam ~ Beta(beta_alpha, beta_alpha) per pair (0.5).
        warmup_iterations: iterations before the term starts (1000 in the paper).
    """

    name, weight_key, label = "ict", "w_ict", "ICT"
    needs_teacher = True

    def __init__(self, weight: float = 1.0, beta_alpha: float = 0.5, warmup_iterations: int = 1000) -> None:
        super().__init__(weight)
        self.loss = InterpolationConsistencyLoss(alpha=beta_alpha)
        self.start_iteration = int(warmup_iterations)
        self.lam: torch.Tensor | None = None

    def extra_rows(self, unlabeled: torch.Tensor | None) -> dict[str, dict[str, torch.Tensor]]:
        mixed, self.lam = self.loss.mix(unlabeled)
        return {"student": {"ict_mix": mixed}, "teacher": {"unlabeled": unlabeled}}

    def __call__(self, predictions: Predictions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ict = self.loss(predictions.prob("student", "ict_mix"), predictions.prob("teacher", "unlabeled"), self.lam)
        return ict, {"ict": ict}


class MeanTeacherTerm(UnsupervisedTerm):
    """Mean Teacher (Tarvainen & Valpola 2017, as in SSL4MIS): mt = mean[(p_S(x_u) - p_T(x_u + n))^2].

    n = clamp(N(0, noise_std^2), -noise_clamp, noise_clamp); p_S(x_u) comes from the student's forward on the batch,
    the teacher sees x_u + n ("noisy_unlabeled").
    """

    name, weight_key, label = "mt", "w_mt", "Mean Teacher"
    needs_teacher = True

    def __init__(self, weight: float = 0.1, noise_std: float = 0.1, noise_clamp: float = 0.2) -> None:
        super().__init__(weight)
        self.noise_std, self.noise_clamp = noise_std, noise_clamp

    def extra_rows(self, unlabeled: torch.Tensor | None) -> dict[str, dict[str, torch.Tensor]]:
        noise = torch.clamp(torch.randn_like(unlabeled) * self.noise_std, -self.noise_clamp, self.noise_clamp)
        return {"teacher": {"noisy_unlabeled": unlabeled + noise}}

    def __call__(self, predictions: Predictions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student, teacher = predictions.prob("student", "unlabeled"), predictions.prob("teacher", "noisy_unlabeled")
        mt = torch.mean((student - teacher) ** 2)
        return mt, {"mt": mt}


class EmaTeacher:
    """The EMA teacher T of one student S, made by :meth:`follow` and updated after every optimiser step.

    T = alpha T + (1 - alpha) S with alpha = min(1 - 1 / (t + 1), max_alpha)
    (:func:`scripts.method.losses.ema_alpha`), over S's parameters and floating-point buffers (batch-norm statistics,
    which T uses in eval mode); integer buffers are copied. The update is torch's EMA
    (:func:`torch.optim.swa_utils.get_ema_multi_avg_fn`) at that iteration's alpha.

    Args:
        student: "b" (network B, the paper's method) or "a" (the UNeXt, the single-network baselines).
        max_alpha: the cap on alpha (0.99).
    """

    def __init__(self, student: str = "b", max_alpha: float = 0.99) -> None:
        if student not in ("a", "b"):
            raise ValueError(f"teacher_of must be 'a' (the UNeXt) or 'b' (network B), got {student!r}")
        if not 0.0 <= max_alpha <= 1.0:
            raise ValueError(f"the EMA teacher's max_alpha must be in [0, 1], got {max_alpha}")
        self.student, self.max_alpha = student, max_alpha
        self.network: torch.nn.Module | None = None

    def follow(self, student: torch.nn.Module) -> torch.nn.Module:
        """The teacher: a copy of ``student`` (a plain module, not a DDP wrapper) in eval mode, without gradients."""
        teacher = copy.deepcopy(student).eval().requires_grad_(False)
        pairs = list(zip(teacher.state_dict().values(), student.state_dict().values()))
        averaged = [(t, s) for t, s in pairs if t.is_floating_point()]
        self._averaged = ([t for t, _ in averaged], [s for _, s in averaged])
        self._copied = [(t, s) for t, s in pairs if not t.is_floating_point()]
        self.network = teacher
        return teacher

    @torch.no_grad()
    def update(self, iteration: int) -> None:
        """One EMA step at 0-based ``iteration`` (t = 0 copies the student)."""
        if self._averaged[0]:
            get_ema_multi_avg_fn(ema_alpha(iteration, self.max_alpha))(*self._averaged, None)
        for teacher, student in self._copied:
            teacher.copy_(student)
