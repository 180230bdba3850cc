"""The dual-network semi-supervised trainer (arXiv 2509.06495) as a MONAI/Ignite engine.

One trainer serves every method through its loss weights: the full method (CPS + ICT + information divergence),
its ablations (a weight of 0 switches a term off and skips its computation), cross teaching between the two
networks (CPS only), supervised-only training (``network_b=None`` or all unsupervised weights 0), and the
single-network baselines Mean Teacher and ICT on the UNeXt (``teacher_of="a"``, ``network_b=None``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from monai.engines import Trainer
from monai.engines.workflow import Workflow
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch.nn import DataParallel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from scripts.losses import (
    CrossPseudoSupervisionLoss,
    InformationDivergenceLoss,
    InterpolationConsistencyLoss,
    SupervisedLoss,
    ema_alpha,
    sigmoid_rampup_weight,
)

__all__ = ["SemiSupervisedLoader", "DualNetworkTrainer", "TrainingProgressBar", "loss_terms", "unwrap"]

# keys of engine.state.output besides MONAI's image/label/pred/loss
LOSS_TERMS = ("sup_a", "sup_b", "cps_a", "cps_b", "ict", "mt", "kl", "mig", "divergence",
              "w_cps", "w_ict", "w_mt", "w_div", "lr")


def unwrap(network: torch.nn.Module | None) -> torch.nn.Module | None:
    """The module inside a DistributedDataParallel (or DataParallel) wrapper; any other network as it is."""
    return network.module if isinstance(network, (DistributedDataParallel, DataParallel)) else network


class SemiSupervisedLoader:
    """Endless iterable of ``{"labeled": batch, "unlabeled": batch}`` drawn from two loaders that cycle independently.

    Each loader reshuffles when it wraps; a DistributedSampler gets its epoch advanced at each wrap so that every
    pass sees a new order on every rank. ``unlabeled`` is omitted when no unlabelled loader is given.

    Resumable: :meth:`state_dict` holds, per loader, the passes completed, the batches drawn in the current pass and
    the random state that pass started from (the generator its shuffle and worker seeds are drawn from, and the
    generators of its dataset's random transforms). After :meth:`load_state_dict`, the first iteration re-creates
    that pass and draws again the batches already taken (the global generators are left as they were), so the
    batches that follow equal the uninterrupted run's, with or without workers (``persistent_workers=False``).
    """

    def __init__(self, labeled: DataLoader, unlabeled: DataLoader | None = None) -> None:
        if len(labeled) == 0:
            raise ValueError(
                f"the labelled loader yields no batch: {len(labeled.dataset)} labelled images for a labelled batch of "
                f"{labeled.batch_size} (drop_last={labeled.drop_last}); add labelled images or lower the batch size"
            )
        self.loaders = {"labeled": labeled}
        if unlabeled is not None:
            if len(unlabeled) == 0:
                raise ValueError(
                    f"the unlabelled loader yields no batch: {len(unlabeled.dataset)} unlabelled images for a batch of "
                    f"{unlabeled.batch_size}; add unlabelled images or lower the unlabelled batch size"
                )
            self.loaders["unlabeled"] = unlabeled
        self.progress = {name: {"passes": 0, "position": 0, "start": None} for name in self.loaders}
        self._resume: dict[str, dict] = {}

    def state_dict(self) -> dict:
        return {name: dict(progress) for name, progress in self.progress.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.loaders):
            raise ValueError(f"the checkpoint's data order covers {sorted(state)}, this run's loaders are "
                             f"{sorted(self.loaders)}: resume with the configuration the checkpoint was trained with")
        self._resume = {name: dict(progress) for name, progress in state.items()}
        self.progress = {name: dict(progress) for name, progress in state.items()}

    @staticmethod
    def _generator(loader: DataLoader) -> torch.Generator:
        return loader.generator if loader.generator is not None else torch.default_generator

    def _start_pass(self, name: str, loader: DataLoader) -> Iterator:
        """A new pass over ``loader``, or on resume the interrupted pass with its drawn batches skipped."""
        from scripts.checkpoints import RandomGeneratorState, set_transform_random_states, transform_random_states

        progress, resume = self.progress[name], self._resume.pop(name, None)
        if resume is None or resume["start"] is None:
            progress["start"] = {"generator": self._generator(loader).get_state(),
                                 "transforms": transform_random_states(loader.dataset)}
            progress["position"] = 0
            return iter(loader)
        generators = RandomGeneratorState()
        outside = generators.state_dict()  # the global generators as the checkpoint restored them
        self._generator(loader).set_state(resume["start"]["generator"])
        set_transform_random_states(loader.dataset, resume["start"]["transforms"])
        batches = iter(loader)
        for _ in range(resume["position"]):
            next(batches)
        generators.load_state_dict(outside)
        return batches

    def _cycle(self, name: str, loader: DataLoader) -> Iterator:
        sampler = getattr(loader, "sampler", None)
        progress = self.progress[name]
        while True:
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(progress["passes"])
            for batch in self._start_pass(name, loader):
                progress["position"] += 1
                yield batch
            progress["passes"] += 1

    def __iter__(self) -> Iterator[dict]:
        streams = {name: self._cycle(name, loader) for name, loader in self.loaders.items()}
        while True:
            yield {name: next(stream) for name, stream in streams.items()}


def loss_terms(output: dict) -> dict[str, float]:
    """The loss and every computed loss term and weight of one iteration, as floats (for StatsHandler/TensorBoard)."""
    terms = {k: output[k] for k in (Keys.LOSS, *LOSS_TERMS) if k in output}
    return {k: float(v) for k, v in terms.items()}


class DualNetworkTrainer(Trainer):
    """UNeXt (network A) and Swin-Unet (network B) trained together, with an EMA teacher of B (REFERENCE §1.3-1.4).

    Per iteration, with labelled rows x_l, y and unlabelled rows x_u (x = cat(x_l, x_u)):
    loss = [sup(A(x_l), y) + w_cps cps_A] + [sup(B(x_l), y) + w_cps cps_B + w_ict ict_B] + w_div L_ID(p_A(x), p_B(x)),
    every w ramped up by ``w(t) = W exp(-5 (1 - min(t // r, L) / L)^2)``; ICT is 0 for the first
    ``ict_warmup_iterations``. A runs once on x; B runs once on cat(x, ICT mix); the teacher (eval mode, no grad)
    runs once on x_u. One backward of the summed loss, both optimisers step, then
    teacher = alpha teacher + (1 - alpha) S with alpha = min(1 - 1 / (t + 1), ema_max_alpha), S the student
    (its parameters and floating-point buffers: the teacher's batch-norm statistics follow the student's).

    Distributed: the students may be DistributedDataParallel modules (``configs/multi_gpu_train.json``); the
    teacher is a copy of the wrapped module, updated from the synchronised student weights (parameters by DDP's
    gradient all-reduce, buffers broadcast from rank 0 after each step), hence identical on every rank.

    The EMA teacher belongs to the student ``teacher_of`` ("b", the Swin-Unet, in the paper's method; "a" for the
    single-UNeXt baselines). Its consistency terms: ICT as above (the mix joins the student's one forward), and
    Mean Teacher (Tarvainen & Valpola 2017, as in SSL4MIS): mt = mean[(p_S(x_u) - p_T(x_u + n))^2] with
    n = clamp(N(0, 0.1^2), -0.2, 0.2), the student's p_S(x_u) taken from its forward on x.

    Args:
        device, max_epochs, train_data_loader, epoch_length, non_blocking, train_handlers, amp: as MONAI's Trainer;
            ``train_data_loader`` yields ``{"labeled": {"image", "label"}, "unlabeled": {"image"}}`` (see
            :class:`SemiSupervisedLoader`), so ``epoch_length`` is required.
        network_a, optimizer_a: the deployed CNN and its optimiser.
        network_b, optimizer_b: the second network and its optimiser; ``None`` trains A alone (supervised).
        cps_weight, ict_weight, divergence_weight, mt_weight: W of each unsupervised term; 0 switches the term off.
            CPS and divergence need network B; ICT and Mean Teacher need the network named by ``teacher_of``.
        teacher_of: "b" or "a": the student whose EMA teacher ICT and Mean Teacher use.
        rampup_length: L of the ramp-up (200). rampup_iterations: iterations the ramp spans (r = that // L);
            defaults to the whole run, as the paper's schedule does.
        ict_warmup_iterations: iterations before ICT starts (1000 in the paper). ict_alpha: Beta(a, a) mixing.
        ema_max_alpha: the cap on the EMA decay (0.99).
        amp: autocast of the forward passes in ``amp_dtype``; losses are computed in fp32.
        amp_dtype: "bfloat16" (no gradient scaler needed; native on AVX512-BF16/AMX CPUs and Ampere or newer GPUs)
            or "float16" (older GPUs: one GradScaler scales the summed loss and steps both optimisers).
        forward_unlabeled: pass the unlabelled rows through the networks' forward even when no term uses them (no
            loss on them): the same-batch supervised baseline, whose batch-norm statistics then come from the same
            labelled + unlabelled batch as the full method's UNeXt.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        epoch_length: int,
        network_a: torch.nn.Module,
        optimizer_a: torch.optim.Optimizer,
        network_b: torch.nn.Module | None = None,
        optimizer_b: torch.optim.Optimizer | None = None,
        cps_weight: float = 1.0,
        ict_weight: float = 1.0,
        divergence_weight: float = 1.0,
        mt_weight: float = 0.0,
        teacher_of: str = "b",
        rampup_length: int = 200,
        rampup_iterations: int | None = None,
        ict_warmup_iterations: int = 1000,
        ict_alpha: float = 0.5,
        ema_max_alpha: float = 0.99,
        non_blocking: bool = False,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        amp_dtype: str = "bfloat16",
        forward_unlabeled: bool = False,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            handlers=train_handlers,
            amp=amp,
            decollate=False,
        )
        if not isinstance(amp, bool):
            raise ValueError(f"amp must be True or False, got {amp!r} (on the command line: --amp True)")
        if amp_dtype not in ("bfloat16", "float16"):
            raise ValueError(f"amp_dtype must be 'bfloat16' or 'float16', got {amp_dtype!r}")
        self.amp_dtype = getattr(torch, amp_dtype)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
        self.grad_scaler = (torch.amp.GradScaler(torch.device(device).type)
                            if amp and amp_dtype == "float16" else None)
        if (network_b is None) != (optimizer_b is None):
            raise ValueError("network_b and optimizer_b must be given together")
        if teacher_of not in ("a", "b"):
            raise ValueError(f"teacher_of must be 'a' (the UNeXt) or 'b' (network B), got {teacher_of!r}")
        weights = {"cps_weight": cps_weight, "ict_weight": ict_weight, "divergence_weight": divergence_weight,
                   "mt_weight": mt_weight}
        for name, value in weights.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        needs_b = ["cps_weight", "divergence_weight"] + (["ict_weight", "mt_weight"] if teacher_of == "b" else [])
        for name in needs_b:
            if network_b is None and weights[name] > 0:
                raise ValueError(f"{name}={weights[name]} needs a second network: set network_b or set {name} to 0")
        self.network_a, self.optimizer_a = network_a, optimizer_a
        self.network_b, self.optimizer_b = network_b, optimizer_b
        self.cps_weight, self.ict_weight, self.divergence_weight = cps_weight, ict_weight, divergence_weight
        self.mt_weight, self.teacher_of = mt_weight, teacher_of
        self.rampup_length = rampup_length
        self.rampup_iterations = rampup_iterations
        self.ict_warmup_iterations = ict_warmup_iterations
        self.ema_max_alpha = ema_max_alpha
        self.forward_unlabeled = forward_unlabeled

        self.supervised_loss = SupervisedLoss()
        self.cps_loss = CrossPseudoSupervisionLoss()
        self.ict_loss = InterpolationConsistencyLoss(alpha=ict_alpha)
        self.divergence_loss = InformationDivergenceLoss()

        # the EMA teacher of the student, kept only when a consistency term uses it
        self.teacher: torch.nn.Module | None = None
        if ict_weight > 0 or mt_weight > 0:
            student = unwrap(network_a if teacher_of == "a" else network_b)  # DDP: the teacher copies its module
            self.teacher = copy.deepcopy(student).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            # floating-point tensors (parameters and buffers such as batch-norm running statistics, which the
            # teacher uses in eval mode) for one fused EMA update per iteration; integer buffers are copied
            pairs = list(zip(self.teacher.state_dict().values(), student.state_dict().values()))
            floats = [(t, s) for t, s in pairs if t.is_floating_point()]
            self._ema_pairs = ([t for t, _ in floats], [s for _, s in floats])
            self._copied = [(t, s) for t, s in pairs if not t.is_floating_point()]

    def describe_terms(self) -> str:
        """Which loss terms this run uses, each one's full weight, where its ramp ends and the weight it reaches."""
        last = self.state.max_epochs * self.state.epoch_length - 1
        total = self.rampup_iterations or last + 1
        at_end = self.unsupervised_weights(last)
        terms = ["supervised (UNeXt" + (" and network B)" if self.network_b is not None else ")")]
        for name, key, weight in (("CPS", "w_cps", self.cps_weight), ("ICT", "w_ict", self.ict_weight),
                                  ("Mean Teacher", "w_mt", self.mt_weight),
                                  ("information divergence", "w_div", self.divergence_weight)):
            if weight > 0:
                start = f", from iteration {self.ict_warmup_iterations}" if name == "ICT" else ""
                terms.append(f"{name} (weight {weight:g}, ramped to full by iteration {int(total)}{start}; "
                             f"{at_end[key]:.2f} at the last iteration)")
        if self.forward_unlabeled and len(terms) == 1:
            terms.append("unlabelled rows pass through the forward (batch-norm statistics), no loss on them")
        return "loss terms: " + "; ".join(terms)

    def run(self) -> None:  # type: ignore[override]
        """Run (or continue) training. MONAI's own CUDA scaler is not made: this trainer keeps ``grad_scaler``."""
        self.scaler = None
        if self.state.iteration == 0:
            self.logger.info(self.describe_terms())
        Workflow.run(self)

    def unsupervised_weights(self, iteration: int) -> dict[str, float]:
        """The ramped weights (w_cps, w_ict, w_mt, w_div) at 0-based iteration t."""
        total = self.rampup_iterations or self.state.max_epochs * self.state.epoch_length
        interval = max(1, int(total // max(1, self.rampup_length)))
        ramp = lambda w: sigmoid_rampup_weight(iteration, w, self.rampup_length, interval)  # noqa: E731
        return {"w_cps": ramp(self.cps_weight), "w_ict": ramp(self.ict_weight), "w_mt": ramp(self.mt_weight),
                "w_div": ramp(self.divergence_weight)}

    def _to_device(self, batch: dict, key: str) -> torch.Tensor:
        return batch[key].to(self.state.device, non_blocking=self.non_blocking)

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Distributed: give every rank rank 0's buffers (batch-norm statistics) after the step, as DDP would at the
        next forward, so that validation, checkpoints and the EMA teacher see one model on every rank."""
        for network in (self.network_a, self.network_b):
            if isinstance(network, DistributedDataParallel) and network.broadcast_buffers:
                for buffer in network.module.buffers():
                    torch.distributed.broadcast(buffer, src=0)

    @torch.no_grad()
    def update_teacher(self, iteration: int) -> None:
        """teacher = alpha teacher + (1 - alpha) student, alpha = min(1 - 1 / (t + 1), ema_max_alpha)."""
        alpha = ema_alpha(iteration, self.ema_max_alpha)
        torch._foreach_lerp_(self._ema_pairs[0], self._ema_pairs[1], 1.0 - alpha)
        for teacher, student in self._copied:
            teacher.copy_(student)

    def _iteration(self, engine: DualNetworkTrainer, batchdata: dict[str, Any]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        labeled, unlabeled = batchdata["labeled"], batchdata.get("unlabeled")
        x_l, y = self._to_device(labeled, Keys.IMAGE), self._to_device(labeled, Keys.LABEL)
        x_u = self._to_device(unlabeled, Keys.IMAGE) if unlabeled is not None else None
        t = engine.state.iteration - 1
        n_l = x_l.shape[0]
        a, b = self.network_a, self.network_b
        has_teacher = self.teacher is not None and x_u is not None
        use_cps = b is not None and x_u is not None and self.cps_weight > 0
        use_ict = has_teacher and self.ict_weight > 0 and t >= self.ict_warmup_iterations
        use_mt = has_teacher and self.mt_weight > 0
        use_div = b is not None and self.divergence_weight > 0
        use_unlabeled = x_u is not None and (use_cps or use_div or has_teacher or self.forward_unlabeled)
        weights = self.unsupervised_weights(t) if use_unlabeled or use_div else {}
        x = torch.cat((x_l, x_u)) if use_unlabeled else x_l
        n = x.shape[0]

        engine.state.output = out = {Keys.IMAGE: x_l, Keys.LABEL: y}
        a.train()
        if b is not None:
            b.train()
        device_type = torch.device(engine.state.device).type
        with torch.autocast(device_type, dtype=self.amp_dtype, enabled=self.amp):
            mixed = None
            if use_ict or use_mt:
                teacher_in = []
                if use_ict:
                    mixed, lam = self.ict_loss.mix(x_u)
                    teacher_in.append(x_u)
                if use_mt:
                    teacher_in.append(x_u + torch.clamp(torch.randn_like(x_u) * 0.1, -0.2, 0.2))
                with torch.no_grad():
                    teacher_x = teacher_in[0] if len(teacher_in) == 1 else torch.cat(teacher_in)  # no copy for one
                    teacher_prob = torch.softmax(self.teacher(teacher_x).float(), dim=1).split(x_u.shape[0])
            # the ICT mix joins the student's one forward
            mix_a, mix_b = (mixed, None) if self.teacher_of == "a" else (None, mixed)
            logits_a = a(x if mix_a is None else torch.cat((x, mix_a))).float()
            logits_b = b(x if mix_b is None else torch.cat((x, mix_b))).float() if b is not None else None
        logits_s = logits_a if self.teacher_of == "a" else logits_b
        logits_mixed = logits_s[n:] if use_ict else None
        logits_a = logits_a[:n]
        out[Keys.PRED] = logits_a[:n_l].detach()
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)

        loss = out["sup_a"] = self.supervised_loss(logits_a[:n_l], y)
        # each softmax once, shared by every term that needs it
        needs_prob = use_unlabeled or use_div
        prob_a = torch.softmax(logits_a, dim=1) if needs_prob else None
        prob_b = None
        if b is not None:
            logits_b = logits_b[:n]
            out["sup_b"] = self.supervised_loss(logits_b[:n_l], y)
            loss = loss + out["sup_b"]
            prob_b = torch.softmax(logits_b, dim=1) if needs_prob else None
            if use_cps:
                out["cps_a"], out["cps_b"] = self.cps_loss(prob_a[n_l:], prob_b[n_l:])
                loss = loss + weights["w_cps"] * (out["cps_a"] + out["cps_b"])
            if use_div:
                out["divergence"], out["kl"], out["mig"] = self.divergence_loss(prob_a, prob_b)
                loss = loss + weights["w_div"] * out["divergence"]
        if use_ict:
            out["ict"] = self.ict_loss(torch.softmax(logits_mixed, dim=1), teacher_prob[0], lam)
            loss = loss + weights["w_ict"] * out["ict"]
        if use_mt:
            prob_s = prob_a if self.teacher_of == "a" else prob_b
            out["mt"] = torch.mean((prob_s[n_l:] - teacher_prob[-1]) ** 2)
            loss = loss + weights["w_mt"] * out["mt"]
        out[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        self.optimizer_a.zero_grad(set_to_none=True)
        if self.optimizer_b is not None:
            self.optimizer_b.zero_grad(set_to_none=True)
        optimizers = [o for o in (self.optimizer_a, self.optimizer_b) if o is not None]
        if self.grad_scaler is None:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            for optimizer in optimizers:
                optimizer.step()
        else:  # one scaler for the one summed loss: each step unscales its optimiser's gradients, skips on inf/NaN
            self.grad_scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            for optimizer in optimizers:
                self.grad_scaler.step(optimizer)
            self.grad_scaler.update()
        self.sync_buffers()
        if self.teacher is not None:
            self.update_teacher(t)

        for k in LOSS_TERMS:
            if k in out:
                out[k] = out[k].detach() if isinstance(out[k], torch.Tensor) else out[k]
        out.update(weights)
        out["lr"] = self.optimizer_a.param_groups[0]["lr"]
        out[Keys.LOSS] = loss.detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return out


class TrainingProgressBar:
    """A tqdm progress bar over the whole run showing the total loss (ignite's ProgressBar, attachable from a config)."""

    def __init__(self, persist: bool = False) -> None:
        from ignite.handlers import ProgressBar

        self.bar = ProgressBar(persist=persist)

    def attach(self, engine: Engine) -> None:
        self.bar.attach(engine, output_transform=lambda out: {"loss": float(out[Keys.LOSS])})
