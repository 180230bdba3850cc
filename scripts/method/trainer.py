"""The dual-network semi-supervised trainer (arXiv 2509.06495; docs/README.md#method) as a MONAI/Ignite engine.

One trainer serves every method: the supervised loss is injected (``loss_function``, as in MONAI's
SupervisedTrainer) and the unsupervised terms are components (:mod:`scripts.method.terms`) declared in the config with
their weights. The full method is CPS + ICT + information divergence; its ablations set a weight to 0 (the term is then
never computed); cross teaching is CPS alone; supervised training has no network B or every weight at 0; the
single-network baselines Mean Teacher and ICT run on the UNeXt with its own EMA teacher (``EmaTeacher(student="a")``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch.nn import DataParallel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from scripts.method.losses import sigmoid_rampup_weight
from scripts.method.terms import EmaTeacher, Predictions, UnsupervisedTerm

__all__ = [
    "SemiSupervisedLoader",
    "DualNetworkTrainer",
    "MixedPrecision",
    "TrainingProgressBar",
    "loss_terms",
    "run_iterations",
    "unwrap",
]

# keys of engine.state.output besides MONAI's image/label/pred/loss
LOSS_TERMS = (
    "sup_a",
    "sup_b",
    "cps_a",
    "cps_b",
    "ict",
    "mt",
    "kl",
    "mig",
    "divergence",
    "w_cps",
    "w_ict",
    "w_mt",
    "w_div",
    "lr",
)


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
            raise ValueError(
                f"the checkpoint's data order covers {sorted(state)}, this run's loaders are "
                f"{sorted(self.loaders)}: resume with the configuration the checkpoint was trained with"
            )
        self._resume = {name: dict(progress) for name, progress in state.items()}
        self.progress = {name: dict(progress) for name, progress in state.items()}

    @staticmethod
    def _generator(loader: DataLoader) -> torch.Generator:
        return loader.generator if loader.generator is not None else torch.default_generator

    def _start_pass(self, name: str, loader: DataLoader) -> Iterator:
        """A new pass over ``loader``, or on resume the interrupted pass with its drawn batches skipped."""
        from scripts.utils.checkpoints import RandomGeneratorState, set_transform_random_states, transform_random_states

        progress, resume = self.progress[name], self._resume.pop(name, None)
        if resume is None or resume["start"] is None:
            progress["start"] = {
                "generator": self._generator(loader).get_state(),
                "transforms": transform_random_states(loader.dataset),
            }
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


def run_iterations(max_epochs: int, epoch_length: int, max_iterations: int | None = None) -> int:
    """The iterations a run does: ``max_iterations``, or ``max_epochs * epoch_length`` when that is fewer or when
    ``max_iterations`` is None (the config sizes the learning-rate decay with this too)."""
    full = int(max_epochs) * int(epoch_length)
    return full if max_iterations is None else min(int(max_iterations), full)


class MixedPrecision:
    """Autocast of the forward passes in ``dtype``, and for float16 one GradScaler for the one summed loss.

    fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none (native on AVX512-BF16/AMX
    CPUs and Ampere or newer GPUs). With several optimisers, each step unscales its own optimiser's gradients and
    skips on inf/NaN; the scale is updated once per iteration.
    """

    def __init__(self, device: str | torch.device, enabled: bool = False, dtype: str = "bfloat16") -> None:
        if not isinstance(enabled, bool):
            raise ValueError(f"amp must be True or False, got {enabled!r} (on the command line: --amp True)")
        if dtype not in ("bfloat16", "float16"):
            raise ValueError(f"amp_dtype must be 'bfloat16' or 'float16', got {dtype!r}")
        self.device_type = torch.device(device).type
        self.enabled, self.dtype = enabled, getattr(torch, dtype)
        self.scaler = torch.amp.GradScaler(self.device_type) if enabled and dtype == "float16" else None

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        for optimizer in optimizers:
            optimizer.step() if self.scaler is None else self.scaler.step(optimizer)
        if self.scaler is not None:
            self.scaler.update()


def _cat(rows: Mapping[str, torch.Tensor]) -> torch.Tensor:
    tensors = list(rows.values())
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)  # no copy for one


class DualNetworkTrainer(Trainer):
    """UNeXt (network A) and network B (the Swin-Unet) trained together, with an EMA teacher (arXiv 2509.06495).

    Per iteration t (0-based), with labelled rows x_l, y and unlabelled rows x_u (x = cat(x_l, x_u)):
    loss = sup(A(x_l), y) + sup(B(x_l), y) + sum over the terms of w(t) term, each term's weight W ramped up by
    ``w(t) = W exp(-5 (1 - min(floor(t L / R), L) / L)^2)`` (L = ``rampup_length``, R = ``rampup_iterations``).
    Each network runs once per iteration (:meth:`forward`): A and B on x, the teacher's student also on the rows its
    terms add (the ICT mix) in the same call, the teacher (eval mode, no grad) on the rows its terms ask for (x_u for
    ICT, x_u + noise for Mean Teacher). One backward of the summed loss, both optimisers step, then the EMA teacher
    follows its student (:class:`scripts.method.terms.EmaTeacher`). A term whose weight is 0 is never computed; while
    any term (or ``forward_unlabeled``) uses them, x_u join the students' forward in every iteration.

    Distributed: the students may be DistributedDataParallel modules (``configs/multi_gpu_train.json``); the
    teacher is a copy of the wrapped module, updated from the synchronised student weights (parameters by DDP's
    gradient all-reduce, buffers broadcast from rank 0 after each step), hence identical on every rank.

    Args:
        device, max_epochs, train_data_loader, epoch_length, non_blocking, train_handlers: as MONAI's Trainer;
            ``train_data_loader`` yields ``{"labeled": {"image", "label"}, "unlabeled": {"image"}}`` (see
            :class:`SemiSupervisedLoader`), so ``epoch_length`` is required. One epoch ends in a validation.
        network_a, optimizer_a: the deployed CNN and its optimiser.
        network_b, optimizer_b: the second network and its optimiser; ``None`` trains A alone.
        loss_function: the supervised loss of logits (B, C, ...) and index labels (B, 1, ...).
        terms: the unsupervised terms (:mod:`scripts.method.terms`), added in this order. CPS and information divergence
            need network B; ICT and Mean Teacher need the EMA teacher's student.
        ema_teacher: which student the EMA teacher follows and its alpha cap; made only when a term with a weight
            above 0 needs it (default ``EmaTeacher()``: of network B, alpha at most 0.99).
        rampup_length: L, the ramp-up's steps (200). rampup_iterations: R, the iterations it spans (full weight
            from t = R on); defaults to the whole run, as the paper's schedule does.
        max_iterations: end the run after this many iterations, in the middle of an epoch if need be (that epoch's
            validation and checkpoint then run at once); None: ``max_epochs * epoch_length``.
        amp, amp_dtype: autocast of the forward passes in "bfloat16" or "float16" (:class:`MixedPrecision`; MONAI's
            own amp with its CUDA-only scaler is not used); losses are computed in fp32.
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
        *,
        loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        terms: Sequence[UnsupervisedTerm] = (),
        ema_teacher: EmaTeacher | None = None,
        rampup_length: int = 200,
        rampup_iterations: int | None = None,
        max_iterations: int | None = None,
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
            decollate=False,
        )
        self.precision = MixedPrecision(device, amp, amp_dtype)
        if (network_b is None) != (optimizer_b is None):
            raise ValueError("network_b and optimizer_b must be given together")
        self.network_a, self.optimizer_a = network_a, optimizer_a
        self.network_b, self.optimizer_b = network_b, optimizer_b
        self.students = {"a": network_a} if network_b is None else {"a": network_a, "b": network_b}
        self.optimizers = [o for o in (optimizer_a, optimizer_b) if o is not None]
        self.loss_function = loss_function
        self.terms = list(terms)
        self.rampup_length, self.rampup_iterations = rampup_length, rampup_iterations
        self.max_iterations = max_iterations
        self.forward_unlabeled = forward_unlabeled

        used = [term for term in self.terms if term.weight > 0]
        if len({term.name for term in self.terms}) != len(self.terms):
            raise ValueError(f"each term once: got {[term.name for term in self.terms]}")
        self.ema_teacher = (ema_teacher or EmaTeacher()) if any(t.needs_teacher for t in used) else None
        for term in used:
            needs_b = term.needs_network_b or (term.needs_teacher and self.ema_teacher.student == "b")
            if needs_b and network_b is None:
                raise ValueError(
                    f"{term.name}_weight={term.weight} needs a second network: set network_b or set "
                    f"{term.name}_weight to 0"
                )
        # the EMA teacher of the student, kept only when a term uses it; DDP: the teacher copies the wrapped module
        self.teacher = (
            self.ema_teacher.follow(unwrap(self.students[self.ema_teacher.student]))
            if self.ema_teacher is not None
            else None
        )
        self.uses_unlabeled = forward_unlabeled or bool(used)

        self.add_event_handler(Events.STARTED, lambda engine: engine.logger.info(engine.describe_terms()))
        self.add_event_handler(Events.ITERATION_COMPLETED, self._end_epoch_at_last_iteration)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._stop_after_last_iteration)
        self.add_event_handler(Events.EPOCH_STARTED, self._stop_if_done)

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The float16 loss scaler (checkpointed), None for bfloat16 or fp32."""
        return self.precision.scaler

    @property
    def amp_dtype(self) -> torch.dtype:
        return self.precision.dtype

    @property
    def iterations(self) -> int:
        """The iterations of this run (:func:`run_iterations`)."""
        return run_iterations(self.state.max_epochs, self.state.epoch_length, self.max_iterations)

    def _end_epoch_at_last_iteration(self, engine: Engine) -> None:
        if engine.state.iteration == self.iterations and engine.state.iteration % engine.state.epoch_length:
            engine.terminate_epoch()  # a short last epoch: its EPOCH_COMPLETED handlers (validation...) still run

    def _stop_after_last_iteration(self, engine: Engine) -> None:
        """Stop once every iteration is done while epochs remain (fewer iterations than max_epochs * epoch_length)."""
        if engine.state.iteration >= self.iterations and engine.state.epoch < engine.state.max_epochs:
            engine.terminate()

    def _stop_if_done(self, engine: Engine) -> None:
        """A run resumed from its last checkpoint, after a short last epoch, has nothing left to do."""
        if engine.state.iteration >= self.iterations:
            engine.terminate()

    def describe_terms(self) -> str:
        """Which loss terms this run uses, each one's full weight, where its ramp ends and the weight it reaches."""
        last = self.iterations - 1
        full = self.ramp_iterations() if self.rampup_length > 0 else 0  # the first t with floor(t L / R) >= L
        at_end = self.unsupervised_weights(last)
        described = ["supervised (UNeXt" + (" and network B)" if self.network_b is not None else ")")]
        for term in self.terms:
            if term.weight > 0:
                start = f", from iteration {term.start_iteration}" if term.start_iteration else ""
                described.append(
                    f"{term.label} (weight {term.weight:g}, ramped to full by iteration {full}"
                    f"{start}; {at_end[term.weight_key]:.2f} at the last iteration)"
                )
        if self.forward_unlabeled and len(described) == 1:
            described.append("unlabelled rows pass through the forward (batch-norm statistics), no loss on them")
        return "loss terms: " + "; ".join(described)

    def ramp_iterations(self) -> int:
        """R of the ramp-up: the iterations it spans, ``rampup_iterations`` (default: the run), at least 1."""
        return max(1, int(self.rampup_iterations or self.iterations))

    def unsupervised_weights(self, iteration: int) -> dict[str, float]:
        """Every term's ramped weight (w_cps, w_ict, ...) at 0-based iteration t."""
        span = self.ramp_iterations()
        return {
            term.weight_key: sigmoid_rampup_weight(iteration, term.weight, self.rampup_length, span)
            for term in self.terms
        }

    def _to_device(self, batch: dict, key: str) -> torch.Tensor:
        return batch[key].to(self.state.device, non_blocking=self.non_blocking)

    def forward(self, x_l: torch.Tensor, x_u: torch.Tensor | None, terms: Sequence[UnsupervisedTerm]) -> Predictions:
        """Every network once on its named rows: the students on x_l (and x_u where this run uses it) plus the rows
        the terms add for the teacher's student, the teacher on the rows the terms ask of it."""
        batch = {"labeled": x_l} if x_u is None or not self.uses_unlabeled else {"labeled": x_l, "unlabeled": x_u}
        rows = {**{name: dict(batch) for name in self.students}, "teacher": {}}
        for term in terms:
            for network, extra in term.extra_rows(x_u).items():
                target = rows[self.ema_teacher.student if network == "student" else network]
                for name, tensor in extra.items():
                    if target.setdefault(name, tensor) is not tensor:
                        raise ValueError(f"two terms ask for different {network} rows named {name!r}")
        predictions = Predictions({"student": self.ema_teacher.student} if self.ema_teacher is not None else None)
        counts = {network: {k: v.shape[0] for k, v in named.items()} for network, named in rows.items()}
        with self.precision.autocast():
            if rows["teacher"]:
                with torch.no_grad():
                    predictions.add("teacher", self.teacher(_cat(rows["teacher"])).float(), counts["teacher"])
            for name, network in self.students.items():
                network.train()
                predictions.add(name, network(_cat(rows[name])).float(), counts[name])
        return predictions

    def supervised_loss(self, predictions: Predictions, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """sup_a (+ sup_b): ``loss_function`` on each student's labelled rows."""
        logged = {f"sup_{name}": self.loss_function(predictions.logits(name, "labeled"), y) for name in self.students}
        return sum(logged.values()), logged

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Distributed: give every rank rank 0's buffers (batch-norm statistics) after the step, as DDP would at the
        next forward, so that validation, checkpoints and the EMA teacher see one model on every rank."""
        for network in self.students.values():
            if isinstance(network, DistributedDataParallel) and network.broadcast_buffers:
                for buffer in network.module.buffers():
                    torch.distributed.broadcast(buffer, src=0)

    def _iteration(self, engine: DualNetworkTrainer, batchdata: dict[str, Any]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        labeled, unlabeled = batchdata["labeled"], batchdata.get("unlabeled")
        x_l, y = self._to_device(labeled, Keys.IMAGE), self._to_device(labeled, Keys.LABEL)
        x_u = self._to_device(unlabeled, Keys.IMAGE) if unlabeled is not None else None
        t = engine.state.iteration - 1
        terms = [term for term in self.terms if term.active(t, x_u is not None)]
        engine.state.output = out = {Keys.IMAGE: x_l, Keys.LABEL: y}

        predictions = self.forward(x_l, x_u, terms)
        out[Keys.PRED] = predictions.logits("a", "labeled").detach()
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)

        loss, logged = self.supervised_loss(predictions, y)
        weights = self.unsupervised_weights(t) if terms or predictions.has("a", "unlabeled") else {}
        for term in terms:
            value, term_logged = term(predictions)
            loss = loss + weights[term.weight_key] * value
            logged.update(term_logged)
        out.update({key: value.detach() for key, value in logged.items()})
        out[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        self.precision.step(self.optimizers)
        self.sync_buffers()
        if self.ema_teacher is not None:
            self.ema_teacher.update(t)

        out.update(weights, lr=self.optimizer_a.param_groups[0]["lr"])
        out[Keys.LOSS] = loss.detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return out


class TrainingProgressBar:
    """A tqdm progress bar over the whole run showing the total loss (ignite's ProgressBar, attachable in a config)."""

    def __init__(self, persist: bool = False) -> None:
        from ignite.handlers import ProgressBar

        self.bar = ProgressBar(persist=persist)

    def attach(self, engine: Engine) -> None:
        self.bar.attach(engine, output_transform=lambda out: {"loss": float(out[Keys.LOSS])})
