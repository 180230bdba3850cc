"""configs/multi_gpu_train.json on CPU: torchrun with 2 processes on gloo (the same file selects nccl on GPUs)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_training_keeps_ranks_in_step(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(ROOT / "tests" / "ddp_probe.py"),
        str(tmp_path),
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["world_size"] == 2 and r["iterations"] == 4 for r in ranks)
    for name in ("unext", "swin", "teacher"):  # DDP keeps the students in step; the EMA teacher follows them
        a, b = ranks[0][name], ranks[1][name]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    initial = torch.load(tmp_path / "rank0.pt", weights_only=True)["unext"]  # trained: differs from a fresh UNeXt
    from scripts.networks import UNeXt

    fresh = UNeXt(in_channels=3, out_channels=2).state_dict()
    assert any(not torch.equal(initial[k], fresh[k]) for k in fresh if fresh[k].is_floating_point())
    # each rank trained on its own shard of the labelled and of the unlabelled stream
    for stream in ("labeled", "unlabeled"):
        first, second = ranks[0]["seen"][stream], ranks[1]["seen"][stream]
        assert len(first) == len(second) == 4 * (1 if stream == "labeled" else 2) and first != second, (
            stream,
            first,
            second,
        )
    assert ranks[0]["val_dice"] == ranks[1]["val_dice"]  # validation gathered over both ranks' shards
    # rank 0 alone writes the published model, the best checkpoint and the curves
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["model.pt"]
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # a plain UNeXt state_dict, not the DDP wrapper's
    UNeXt(in_channels=3, out_channels=2).load_state_dict(state)
    assert not list(tmp_path.glob("eval/checkpoints/*.tmp")) and (tmp_path / "eval" / "training_curves.png").is_file()


def test_only_logging_handlers_are_disabled_on_other_ranks():
    """Rank-0-only handlers are switched off by name (the ``log_on_this_rank`` flag), not by list position: MONAI
    Label inserts handlers at the front of train#handlers, and disabling by index would then hit the
    ValidationHandler on ranks > 0 (DDP hangs in the metric gather)."""
    import json

    train = json.loads((ROOT / "configs" / "train.json").read_text())
    multi = json.loads((ROOT / "configs" / "multi_gpu_train.json").read_text())
    assert not [k for k in multi if "handlers" in k]  # no positional handler overrides
    assert multi["log_on_this_rank"] == "$torch.distributed.get_rank() == 0"
    flagged = [
        h["_target_"]
        for section in ("train", "validate")
        for h in train[section]["handlers"]
        if h.get("_disabled_") == "$not @log_on_this_rank"
    ]
    assert sorted(flagged) == sorted(
        [
            "scripts.method.trainer.TrainingProgressBar",
            "StatsHandler",
            "TensorBoardStatsHandler",
            "StatsHandler",
            "TensorBoardStatsHandler",
        ]
    )
    others = [
        h["_target_"]
        for section in ("train", "validate")
        for h in train[section]["handlers"]
        if "log_on_this_rank" not in str(h.get("_disabled_", ""))
    ]
    assert "ValidationHandler" in others and others.count("LrScheduleHandler") == 2
