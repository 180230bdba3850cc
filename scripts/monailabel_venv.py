"""Build (once) and find the virtual environment that runs MONAI Label 0.8.5 beside this bundle.

    python -m scripts.monailabel_venv          # prints the venv's python, building the venv first if it is missing

MONAI Label cannot share the bundle's environment: ``pip install monailabel==0.8.5`` pulls numpy 1.26 (through
pydicom-seg) and, left alone, a CUDA build of torch. Its venv is made from ``requirements-monailabel.txt`` (a full
``pip freeze``): first the CPU torch pinned there, then everything else, so no dependency can replace that torch.

The venv is cached under ``$XDG_CACHE_HOME/fetal-us-bundle`` (``~/.cache`` by default, or ``cache_dir``) in a folder
named after a hash of the requirements file, this module's build recipe and the Python version, so a changed pin
gives a new venv. It is built in a temporary folder beside its final place and renamed into place only once every
package installed and MONAI Label's bundle tasks import: an interrupted build is never reused.

PyPI's x86-64 Linux torchvision wheels are CUDA builds; beside a CPU torch their C++ ops cannot load, and
``import torchvision`` then fails in two unguarded fake-kernel registrations (``torchvision::nms``/``qnms``).
MONAI Label imports ``torchvision.utils`` at start-up, so when the plain import fails the venv gets a start-up hook
(``fetal_us_torchvision_ops.pth``) that declares those two operator schemas before torchvision loads. The ops
themselves stay unavailable; the segmentation bundle path never calls them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["REQUIREMENTS", "build_venv", "ensure_venv", "venv_path", "venv_python"]

logger = logging.getLogger(__name__)

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = BUNDLE_ROOT / "requirements-monailabel.txt"
VENV_PREFIX = "monailabel-0.8.5"
BUILD_STEP_TIMEOUT_S = 3600

HOOK_MODULE = "fetal_us_torchvision_ops"
HOOK_SOURCE = '''"""Declare torchvision::nms/qnms before torchvision loads (written by the bundle's scripts/monailabel_venv.py).

A CUDA torchvision wheel beside a CPU torch cannot load its C++ ops, and its import then fails where it registers fake
kernels for these two operators; declaring their schemas lets the import (and torchvision.utils) work.
"""
import importlib.abc
import sys

_LIBRARIES = []


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        library = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            library.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBRARIES.append(library)
        return None  # the regular finders import torchvision itself


sys.meta_path.insert(0, _DeclareTorchvisionOps())
'''
# what the server and the driver import (monailabel.interfaces.app pulls in the DICOM datastore and pydicom-seg)
IMPORT_CHECK = ("import monailabel.interfaces.app, monailabel.tasks.infer.bundle, monailabel.tasks.train.bundle, "
                "monailabel.datastore.local")


def venv_path(requirements: str | os.PathLike = REQUIREMENTS, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the venv for ``requirements`` lives: ``<cache>/fetal-us-bundle/monailabel-0.8.5-<hash>``."""
    digest = hashlib.sha256(Path(requirements).read_bytes())
    digest.update(HOOK_SOURCE.encode())
    digest.update(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fetal-us-bundle"
    return Path(cache_dir) / f"{VENV_PREFIX}-{digest.hexdigest()[:12]}"


def venv_python(venv: str | os.PathLike) -> Path:
    return Path(venv) / "bin" / "python"


def _torch_requirement(requirements: Path) -> str:
    pins = [line.strip() for line in requirements.read_text().splitlines() if line.strip().startswith("torch==")]
    if len(pins) != 1:
        raise ValueError(f"{requirements}: expected exactly one 'torch==' pin (the CPU build), found {len(pins)}")
    return pins[0]


def _run(cmd: list[str], log: Path, what: str) -> None:
    """Run one build step, its output appended to ``log``; fail with the log's last lines."""
    start = time.monotonic()
    print(f"[monailabel venv] {what} ...", file=sys.stderr, flush=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=BUILD_STEP_TIMEOUT_S)
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise RuntimeError(f"building the MONAI Label venv failed at: {what} (exit {done.returncode}); log {log}:\n{tail}")
    print(f"[monailabel venv] {what}: done in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)


def _imports(python: Path, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0


def _relocate_scripts(venv: Path, old: Path, new: Path) -> None:
    """Point the console scripts' shebangs and the activate scripts at the venv's final path (venvs embed it)."""
    for script in (venv / "bin").iterdir():
        if script.is_symlink() or not script.is_file():
            continue
        try:
            text = script.read_text()
        except UnicodeDecodeError:
            continue
        if str(old) in text:
            script.write_text(text.replace(str(old), str(new)))


def build_venv(target: Path, requirements: Path = REQUIREMENTS) -> Path:
    """Build the venv for ``requirements`` into a temporary folder and rename it to ``target``. Returns ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    log = target.parent / f"{tmp.name}.log"
    start = time.monotonic()
    try:
        _run([sys.executable, "-m", "venv", str(tmp)], log, f"create the venv in {tmp}")
        python = venv_python(tmp)
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
        torch_pin = _torch_requirement(requirements)
        _run([*pip, torch_pin], log, f"install {torch_pin} first")
        constraints = tmp / "torch-constraint.txt"
        constraints.write_text(torch_pin + "\n")
        _run([*pip, "-r", str(requirements), "-c", str(constraints)], log, f"install {requirements.name}")
        if not _imports(python, "torchvision"):
            site = Path(subprocess.check_output(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
            (site / f"{HOOK_MODULE}.py").write_text(HOOK_SOURCE)
            (site / f"{HOOK_MODULE}.pth").write_text(f"import {HOOK_MODULE}\n")
            print("[monailabel venv] torchvision's C++ ops cannot load beside the CPU torch: start-up hook "
                  f"{HOOK_MODULE}.pth added", file=sys.stderr, flush=True)
        _run([str(python), "-m", "pip", "check"], log, "check the installed requirements")
        _run([str(python), "-c", IMPORT_CHECK], log, "check that MONAI Label's app and bundle tasks import")
        _relocate_scripts(tmp, tmp, target)
        try:
            tmp.rename(target)
        except OSError:
            if not venv_python(target).exists():
                raise
            shutil.rmtree(tmp)  # another process finished the same venv first: use that one
            logger.info(f"{target} was built meanwhile by another process; using it")
        log.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"[monailabel venv] ready at {target} (built in {time.monotonic() - start:.0f} s)", file=sys.stderr,
          flush=True)
    return target


def ensure_venv(requirements: str | os.PathLike = REQUIREMENTS, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached venv's python, building the venv first when it is missing."""
    requirements = Path(requirements)
    if not requirements.is_file():
        raise FileNotFoundError(f"{requirements} not found: the pinned MONAI Label environment to build")
    target = venv_path(requirements, cache_dir)
    if not venv_python(target).exists():
        build_venv(target, requirements)
    return venv_python(target)


def main(requirements: str = str(REQUIREMENTS), cache_dir: str | None = None) -> None:
    print(ensure_venv(requirements, cache_dir))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
