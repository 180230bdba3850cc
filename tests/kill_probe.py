"""Imported by tests/test_resume.py through a config override: kill a training run at a chosen moment."""

import io
import os
import signal
import time

import torch
from ignite.engine import Events


def _kill(signal_name: str) -> None:
    os.kill(os.getpid(), getattr(signal, signal_name))
    time.sleep(60)  # a handled signal must not let the run go on


def after_checkpoint(trainer, epoch: int, signal_name: str) -> None:
    """Kill the run right after the checkpoint of ``epoch`` (attach after the checkpoint saver)."""
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=epoch), lambda _: _kill(signal_name))


def during_checkpoint_write(trainer, epoch: int, signal_name: str) -> None:
    """Kill the run half way through writing the checkpoint of ``epoch`` (attach before the checkpoint saver)."""
    real_save = torch.save

    def half_then_kill(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        f.flush()
        _kill(signal_name)

    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=epoch), lambda _: setattr(torch, "save", half_then_kill))
