"""Training that survives a kill: a run killed after a checkpoint, or while writing one, and resumed with
``--resume True`` ends with the same model bytes as the uninterrupted run; a damaged checkpoint is skipped."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.method.settings import find_resume_checkpoint
from scripts.utils.checkpoints import ResumeCheckpointSaver, checkpoint_damage

ROOT = Path(__file__).resolve().parents[1]
# 4 iterations, a checkpoint after each; the published model is the one of the last iteration (best model chosen
# from iteration 4 on), so that its bytes depend on every iteration after the kill
TINY = [
    "--phantom_subjects",
    "14",
    "--phantom_image_size",
    "[320, 224]",
    "--labeled_fraction",
    "0.3",
    "--total_iterations",
    "4",
    "--val_interval",
    "1",
    "--labeled_batch_size",
    "2",
    "--unlabeled_batch_size",
    "2",
    "--best_model_after_iteration",
    "4",
]


def checkpoint_files(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "eval" / "checkpoints").glob("resume_*.pt"))


def train(root: Path, name: str, *args: str, kill: str | None = None) -> subprocess.CompletedProcess:
    """train.json in ``root`` (phantom and datalist shared) with this run's outputs in ``root/name``; ``kill`` is an
    expression on the trainer from tests/kill_probe.py, put into the config's ``run`` where its name says."""
    configs = [str(ROOT / "configs" / "train.json")]
    if kill is not None:
        base = json.loads((ROOT / "configs" / "train.json").read_text())
        run = base["run"]
        saver = next(i for i, step in enumerate(run) if "@checkpoint_saver.attach" in step)
        run.insert(saver + 1 if kill.startswith("after_checkpoint") else saver, f"$kill_probe.{kill}")
        override = root / f"{name}_kill.json"
        imports = base["imports"] + ["$import tests.kill_probe as kill_probe"]
        override.write_text(json.dumps({"imports": imports, "run": run}))
        configs.append(str(override))
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        repr(configs),
        "--bundle_root",
        str(root),
        "--output_dir",
        str(root / name / "eval"),
        "--ckpt_dir",
        str(root / name / "models"),
        *TINY,
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)


def model_bytes(root: Path, name: str) -> bytes:
    return (root / name / "models" / "model.pt").read_bytes()


def assert_same_state(a, b, where="checkpoint"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}/{i}")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A folder with the phantom and the uninterrupted run's outputs (in ``straight/``)."""
    root = tmp_path_factory.mktemp("resume")
    straight = train(root, "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    # two checkpoints are kept: the newest and the one before it
    assert checkpoint_files(root / "straight") == ["resume_checkpoint_epoch=3.pt", "resume_checkpoint_epoch=4.pt"]
    return root


FINAL = "eval/checkpoints/resume_checkpoint_epoch=4.pt"


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_gives_the_same_model(runs):
    killed = train(runs, "sigkill", kill="after_checkpoint(@train#trainer, 1, 'SIGKILL')")
    assert killed.returncode == -9
    assert checkpoint_files(runs / "sigkill") == ["resume_checkpoint_epoch=1.pt"]
    assert not (runs / "sigkill" / "models" / "model.pt").exists()
    resumed = train(runs, "sigkill", "--resume", "True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert model_bytes(runs, "sigkill") == model_bytes(runs, "straight")
    # every tensor and number of the final checkpoint too: weights, optimisers, generators, data order
    assert_same_state(
        torch.load(runs / "straight" / FINAL, weights_only=True),
        torch.load(runs / "sigkill" / FINAL, weights_only=True),
    )


@pytest.mark.slow
def test_sigterm_during_a_checkpoint_write_and_a_damaged_checkpoint_then_resume_gives_the_same_model(runs):
    """SIGTERM half way through writing the third checkpoint: the first two stay complete; then the newest of them
    is damaged as well, so the resume must skip it, say so, and go back to the first."""
    termed = train(runs, "sigterm", kill="during_checkpoint_write(@train#trainer, 3, 'SIGTERM')")
    assert termed.returncode == -15
    folder = runs / "sigterm" / "eval" / "checkpoints"
    assert checkpoint_files(runs / "sigterm") == ["resume_checkpoint_epoch=1.pt", "resume_checkpoint_epoch=2.pt"]
    assert len(list(folder.glob(".resume_checkpoint_epoch=3.pt.*.tmp"))) == 1  # the interrupted write, beside them
    second = folder / "resume_checkpoint_epoch=2.pt"
    second.write_bytes(second.read_bytes()[:1_000_000])
    resumed = train(runs, "sigterm", "--resume", "True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert f"skipping damaged checkpoint {second}" in log
    assert f"resuming from {folder / 'resume_checkpoint_epoch=1.pt'}" in log
    assert model_bytes(runs, "sigterm") == model_bytes(runs, "straight")
    assert_same_state(
        torch.load(runs / "straight" / FINAL, weights_only=True),
        torch.load(runs / "sigterm" / FINAL, weights_only=True),
    )
    assert not list(folder.glob("*.tmp"))  # the stale temporary file is cleared


def test_damaged_checkpoints_are_skipped_newest_first(tmp_path):
    saver = ResumeCheckpointSaver(str(tmp_path), {"w": torch.nn.Linear(2, 2)}, n_saved=3)

    class Engine:
        class state:
            epoch = 0

    for epoch in (1, 2, 10):  # 10 sorts after 2 by its number, not its name
        Engine.state.epoch = epoch
        saver(Engine)
    assert [p.name for p in saver.saved()] == [f"resume_checkpoint_epoch={e}.pt" for e in (1, 2, 10)]
    assert find_resume_checkpoint(str(tmp_path)).endswith("epoch=10.pt")
    newest, middle = tmp_path / "resume_checkpoint_epoch=10.pt", tmp_path / "resume_checkpoint_epoch=2.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # cut short
    data = bytearray(middle.read_bytes())
    data[len(data) // 3] ^= 0xFF  # one flipped byte inside a record
    middle.write_bytes(bytes(data))
    assert checkpoint_damage(newest) and checkpoint_damage(middle)
    assert find_resume_checkpoint(str(tmp_path)).endswith("epoch=1.pt")
    (tmp_path / "resume_checkpoint_epoch=1.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="every checkpoint in .* is damaged"):
        find_resume_checkpoint(str(tmp_path))


def test_saver_keeps_the_newest_and_writes_readable_files(tmp_path):
    net = torch.nn.Linear(2, 2)
    saver = ResumeCheckpointSaver(str(tmp_path), {"net": net}, n_saved=2)

    class Engine:
        class state:
            epoch = 0

    for epoch in range(1, 5):
        Engine.state.epoch = epoch
        saver(Engine)
    assert [p.name for p in saver.saved()] == ["resume_checkpoint_epoch=3.pt", "resume_checkpoint_epoch=4.pt"]
    assert not list(tmp_path.glob(".*"))
    state = torch.load(saver.saved()[-1], weights_only=True)
    assert torch.equal(state["net"]["weight"], net.weight)
    assert saver.saved()[-1].stat().st_mode & 0o044 == 0o044  # group and others may read it
