"""Training that survives a kill: atomic resume checkpoints, an integrity check, and the random generators' state.

A resumed run equals the uninterrupted one when the checkpoint holds, besides the networks, optimisers and engine
state, every source of randomness the next iterations draw from: the global generators (:class:`RandomGeneratorState`)
and the data order (``scripts.method.trainer.SemiSupervisedLoader.state_dict``, which uses
:func:`transform_random_states` for the random transforms of its datasets).
"""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import Randomizable, Transform

__all__ = [
    "RandomGeneratorState",
    "ResumeCheckpointSaver",
    "checkpoint_damage",
    "checkpoint_epoch",
    "set_transform_random_states",
    "transform_random_states",
]

logger = logging.getLogger(__name__)

_EPOCH = re.compile(r"_epoch=(\d+)\.pt$")


def _numpy_state(generator: np.random.RandomState) -> dict:
    """A legacy numpy generator's state as tensors and numbers (what ``torch.load(weights_only=True)`` reads)."""
    name, key, pos, has_gauss, gauss = generator.get_state(legacy=True)
    return {
        "name": name,
        "key": torch.from_numpy(key.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def _set_numpy_state(generator: np.random.RandomState, state: Mapping) -> None:
    generator.set_state(
        (state["name"], state["key"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["gauss"])
    )


class RandomGeneratorState:
    """The global random generators as a checkpointable object: torch (CPU and every CUDA device), numpy, ``random``.

    Saved after the iterations of a checkpoint and restored at the start of the resumed run, so that dropout, the ICT
    mixing coefficients and every other draw continue where the interrupted run left off. Distributed: every rank
    restores the saving rank's state (all ranks draw the same count, so their states agree anyway).
    """

    def state_dict(self) -> dict:
        version, internal, gauss = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state(np.random.mtrand._rand),
            "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        torch.set_rng_state(state["torch"])
        _set_numpy_state(np.random.mtrand._rand, state["numpy"])
        python = state["python"]
        random.setstate((python["version"], tuple(int(v) for v in python["internal"].tolist()), python["gauss"]))
        if state.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _randomizables(obj: Any, seen: set[int]) -> Iterator[Randomizable]:
    """Every Randomizable reachable from a transform through its attributes (Compose lists, a dictionary transform's
    array transform), depth first in attribute order: the same order for the same construction."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Randomizable):
        yield obj
    for value in vars(obj).values() if hasattr(obj, "__dict__") else ():
        for child in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(child, Transform):
                yield from _randomizables(child, seen)


def transform_random_states(dataset: Any) -> list[dict]:
    """The generator states of the random transforms in ``dataset.transform`` (empty when it has none)."""
    transform = getattr(dataset, "transform", None)
    return [_numpy_state(t.R) for t in _randomizables(transform, set())] if transform is not None else []


def set_transform_random_states(dataset: Any, states: list[dict]) -> None:
    """Restore what :func:`transform_random_states` returned for the same dataset configuration."""
    transform = getattr(dataset, "transform", None)
    found = list(_randomizables(transform, set())) if transform is not None else []
    if len(found) != len(states):
        raise ValueError(
            f"the checkpoint holds {len(states)} random transform states for a dataset with {len(found)} "
            "random transforms: resume with the configuration the checkpoint was trained with"
        )
    for t, state in zip(found, states):
        _set_numpy_state(t.R, state)


def checkpoint_epoch(path: str | os.PathLike) -> int | None:
    """The epoch in a ``<prefix>_checkpoint_epoch=<n>.pt`` name, else None."""
    found = _EPOCH.search(Path(path).name)
    return int(found.group(1)) if found else None


def checkpoint_damage(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete torch checkpoint (a truncated or corrupted zip archive), or None if it is.

    Every record's CRC is checked, so a file cut short by a kill or a flipped byte is found before torch.load.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        return f"not a complete checkpoint archive ({error})"
    return f"record {bad} fails its CRC check" if bad else None


class ResumeCheckpointSaver:
    """Save the state_dicts of ``save_dict`` every ``save_interval`` epochs to
    ``<save_dir>/<file_prefix>_checkpoint_epoch=<n>.pt``, atomically, keeping the newest ``n_saved``.

    Each file is written to a temporary file beside it, flushed to disk and renamed into place; only then are older
    checkpoints beyond ``n_saved`` removed, so a kill at any moment leaves the previous complete checkpoint (and at
    worst a stale ``.<name>.*.tmp``, removed when the next run attaches). Only rank 0 writes. Networks wrapped in
    DistributedDataParallel are saved as their module, as ignite's Checkpoint does.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        file_prefix: str = "resume",
        save_interval: int = 1,
        n_saved: int = 2,
    ) -> None:
        if n_saved < 1 or save_interval < 1:
            raise ValueError(f"n_saved ({n_saved}) and save_interval ({save_interval}) must be at least 1")
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.file_prefix, self.save_interval, self.n_saved = file_prefix, save_interval, n_saved

    def attach(self, engine: Engine) -> None:
        if idist.get_rank() == 0 and self.save_dir.is_dir():
            for stale in self.save_dir.glob(f".{self.file_prefix}_*.tmp"):
                stale.unlink(missing_ok=True)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self)

    def saved(self) -> list[Path]:
        """This saver's checkpoints in ``save_dir``, oldest first."""
        found = [p for p in self.save_dir.glob(f"{self.file_prefix}_checkpoint_epoch=*.pt") if checkpoint_epoch(p)]
        return sorted(found, key=checkpoint_epoch)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        state = {}
        for name, obj in self.save_dict.items():
            if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
                obj = obj.module
            state[name] = obj.state_dict()
        path = self.save_dir / f"{self.file_prefix}_checkpoint_epoch={engine.state.epoch}.pt"
        self.save_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.save_dir, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a checkpoint is as readable as any other output
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        directory = os.open(self.save_dir, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself is on disk before an older checkpoint goes
        finally:
            os.close(directory)
        for old in self.saved()[: -self.n_saved]:
            old.unlink(missing_ok=True)
