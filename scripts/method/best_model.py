"""Keep the best deployed network of a run and publish it as ``models/model.pt`` only when the run completes.

A run that fails, or is interrupted, never touches ``models/model.pt``; a completed run replaces it only when its
best network scores at least as well on this run's validation list as the model already there.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from scripts.utils.files import write_atomic

__all__ = ["BestModelPublisher", "atomic_torch_save"]

logger = logging.getLogger(__name__)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save through :func:`write_atomic`: readers never see a partial file."""
    write_atomic(path, lambda f: torch.save(obj, f), binary=True)


class BestModelPublisher:
    """Track the evaluator's key metric and publish the best ``network`` state_dict when the trainer completes.

    Args:
        network: the network whose weights are published (the deployed UNeXt).
        best_path: where this run's best state_dict is kept while training (outside ``models/``).
        model_path: the published file, a plain state_dict (``models/model.pt``).
        start_iteration: best-model selection starts at this trainer iteration (the paper: half the run).
    """

    def __init__(self, network: torch.nn.Module, best_path: str, model_path: str, start_iteration: int = 0) -> None:
        self.network = network
        self.best_path = Path(best_path)
        self.model_path = Path(model_path)
        self.start_iteration = start_iteration
        self.best_metric = -float("inf")
        self.best_iteration = -1
        self._comparing = False

    def attach(self, trainer: Engine, evaluator: Engine) -> None:
        self.trainer, self.evaluator = trainer, evaluator
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._on_validation)
        trainer.add_event_handler(Events.COMPLETED, self._on_completed)

    def state_dict(self) -> dict:
        return {"best_metric": self.best_metric, "best_iteration": self.best_iteration}

    def load_state_dict(self, state: dict) -> None:
        self.best_metric = float(state["best_metric"])
        self.best_iteration = int(state["best_iteration"])

    def _key_metric(self) -> float:
        return float(self.evaluator.state.metrics[self.evaluator.state.key_metric_name])

    def _on_validation(self, _: Engine) -> None:
        if self._comparing or self.trainer.state.iteration < self.start_iteration:
            return
        metric = self._key_metric()
        if metric > self.best_metric:
            self.best_metric, self.best_iteration = metric, self.trainer.state.iteration
            if idist.get_rank() == 0:  # distributed: the metric is gathered, every rank agrees; one writes
                atomic_torch_save(self.network.state_dict(), self.best_path)
            logger.info(
                f"new best {self.evaluator.state.key_metric_name} {metric:.4f} at iteration {self.best_iteration}"
            )

    def _existing_score(self) -> float | None:
        """Validation score of the model already at ``model_path`` (None if absent or of another architecture)."""
        if not self.model_path.exists():
            return None
        current = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
        try:
            self.network.load_state_dict(torch.load(self.model_path, map_location="cpu", weights_only=True))
        except (RuntimeError, KeyError, ValueError) as e:
            logger.warning(
                f"{self.model_path} does not fit this network ({str(e).splitlines()[0]}); it will be replaced"
            )
            self.network.load_state_dict(current)
            return None
        self._comparing = True
        try:
            self.evaluator.run()
            return self._key_metric()
        finally:
            self._comparing = False
            self.network.load_state_dict(current)

    def _on_completed(self, _: Engine) -> None:
        if self.best_iteration < 0:
            logger.warning(
                f"no validation ran after iteration {self.start_iteration}: {self.model_path} left as it was"
            )
            return
        name = self.evaluator.state.key_metric_name
        existing = self._existing_score()
        if existing is not None and existing > self.best_metric:
            logger.warning(
                f"kept {self.model_path}: its {name} {existing:.4f} beats this run's best {self.best_metric:.4f}; "
                f"this run's best model is at {self.best_path}"
            )
            return
        if idist.get_rank() != 0:
            return
        with open(self.best_path, "rb") as src:
            write_atomic(self.model_path, lambda f: shutil.copyfileobj(src, f), binary=True)
        logger.info(
            f"published {self.model_path} ({name} {self.best_metric:.4f} at iteration {self.best_iteration}"
            + (f"; replaced a model scoring {existing:.4f})" if existing is not None else ")")
        )
