"""Build (once) and find the virtual environment that runs MONAI Label 0.8.5 beside this bundle.

    python -m scripts.tools.monailabel_venv  # prints the venv's python, building the venv first if it is missing

MONAI Label cannot share the bundle's environment: ``pip install monailabel==0.8.5`` pulls numpy 1.26 (through
pydicom-seg) and, left alone, whatever torch build PyPI serves. Its venv is made from ``requirements-monailabel.txt``
(a full ``pip freeze``, public versions only): first torch, the same version and build as this environment's, then
everything else with torch held to it, so no dependency can replace that torch. A public torch (``2.13.0``) comes
from pip's configured index; a local build (``2.13.0+cpu``, ``2.13.0+cu128``) from pip's configured sources when
they hold it (a wheel kept on disk), else from PyTorch's own index for that build
(``https://download.pytorch.org/whl/cpu``). The list's torch pin must be this environment's torch version.

The venv is cached under ``$XDG_CACHE_HOME/fetal-us-bundle`` (``~/.cache`` by default, or ``cache_dir``) in a folder
named after a hash of the requirements file, this environment's torch build, this module's build recipe and the
Python version, so a changed pin gives a new venv. It is built in a temporary folder beside its final place and
renamed into place only once every package installed and MONAI Label's bundle tasks import: an interrupted build is
never reused.

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

__all__ = [
    "REQUIREMENTS",
    "build_venv",
    "ensure_venv",
    "installed_torch",
    "torch_install_steps",
    "venv_path",
    "venv_python",
]

logger = logging.getLogger(__name__)

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = BUNDLE_ROOT / "requirements-monailabel.txt"
VENV_PREFIX = "monailabel-0.8.5"
BUILD_STEP_TIMEOUT_S = 3600
TORCH_INDEX = "https://download.pytorch.org/whl/{build}"  # PyTorch's wheel index of one build: cpu, cu128, ...

HOOK_MODULE = "fetal_us_torchvision_ops"
HOOK_SOURCE = '''"""Declare torchvision::nms/qnms before torchvision loads.

Written by scripts/tools/monailabel_venv.py.

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
IMPORT_CHECK = (
    "import monailabel.interfaces.app, monailabel.tasks.infer.bundle, monailabel.tasks.train.bundle, "
    "monailabel.datastore.local"
)


def installed_torch() -> str:
    """This environment's torch version as pip records it, local build label included (``2.13.0+cpu``)."""
    from importlib.metadata import version

    return version("torch")


def torch_install_steps(torch_version: str) -> list[list[str]]:
    """pip arguments to try in turn for the venv's torch: exactly ``torch_version``, its build included.

    ``2.13.0``: pip's configured index (PyPI). ``2.13.0+cpu``: pip's configured sources first (a wheel kept on disk),
    then PyTorch's index of that build, where local builds are published.
    """
    public, _, build = torch_version.partition("+")
    if not build:
        return [[f"torch=={public}"]]
    return [[f"torch=={torch_version}"], [f"torch=={torch_version}", "--index-url", TORCH_INDEX.format(build=build)]]


def venv_path(
    requirements: str | os.PathLike = REQUIREMENTS,
    cache_dir: str | os.PathLike | None = None,
    torch_version: str | None = None,
) -> Path:
    """Where the venv for ``requirements`` lives: ``<cache>/fetal-us-bundle/monailabel-0.8.5-<hash>``."""
    digest = hashlib.sha256(Path(requirements).read_bytes())
    digest.update((torch_version or installed_torch()).encode())
    digest.update(HOOK_SOURCE.encode())
    digest.update(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fetal-us-bundle"
    return Path(cache_dir) / f"{VENV_PREFIX}-{digest.hexdigest()[:12]}"


def venv_python(venv: str | os.PathLike) -> Path:
    return Path(venv) / "bin" / "python"


def _torch_requirement(requirements: Path, torch_version: str) -> str:
    """The list's ``torch==`` pin, checked against ``torch_version`` (the same public version, no local label)."""
    pins = [
        line.split("#")[0].strip()
        for line in requirements.read_text().splitlines()
        if line.strip().startswith("torch==")
    ]
    if len(pins) != 1:
        raise ValueError(f"{requirements}: expected exactly one 'torch==' pin, found {len(pins)}")
    pinned = pins[0].removeprefix("torch==")
    if "+" in pinned:
        raise ValueError(
            f"{requirements}: torch=={pinned} is a local build that public indexes do not serve; pin "
            f"torch=={pinned.partition('+')[0]} (the build follows this environment's torch)"
        )
    if pinned != torch_version.partition("+")[0]:
        raise ValueError(
            f"{requirements} pins torch=={pinned} but this environment has torch {torch_version}: MONAI "
            f"Label's environment uses this environment's torch version; install torch=={pinned} here "
            "or re-freeze the list (see its header)"
        )
    return pins[0]


def _run(cmd: list[str], log: Path, what: str, check: bool = True) -> bool:
    """Run one build step, its output appended to ``log``; unless ``check``, return whether it succeeded, else fail
    with the log's last lines."""
    start = time.monotonic()
    print(f"[monailabel venv] {what} ...", file=sys.stderr, flush=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=BUILD_STEP_TIMEOUT_S)
    if done.returncode != 0:
        if not check:
            print(f"[monailabel venv] {what}: not found there (exit {done.returncode})", file=sys.stderr, flush=True)
            return False
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise RuntimeError(
            f"building the MONAI Label venv failed at: {what} (exit {done.returncode}); log {log}:\n{tail}"
        )
    print(f"[monailabel venv] {what}: done in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    return True


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


def build_venv(target: Path, requirements: Path = REQUIREMENTS, torch_version: str | None = None) -> Path:
    """Build the venv for ``requirements`` into a temporary folder and rename it to ``target``. Returns ``target``.

    ``torch_version``: the torch to install, build included (default: this environment's, :func:`installed_torch`).
    """
    torch_version = torch_version or installed_torch()
    _torch_requirement(Path(requirements), torch_version)  # refuse a list for another torch before any work
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    log = target.parent / f"{tmp.name}.log"
    start = time.monotonic()
    try:
        _run([sys.executable, "-m", "venv", str(tmp)], log, f"create the venv in {tmp}")
        python = venv_python(tmp)
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
        steps = torch_install_steps(torch_version)
        for i, step in enumerate(steps):
            where = f" from {step[-1]}" if "--index-url" in step else ""
            if _run([*pip, *step], log, f"install {step[0]} first{where}", check=i == len(steps) - 1):
                break
        constraints = tmp / "torch-constraint.txt"
        constraints.write_text(f"torch=={torch_version}\n")  # the list's pin: same public version
        _run([*pip, "-r", str(requirements), "-c", str(constraints)], log, f"install {requirements.name}")
        if not _imports(python, "torchvision"):
            site = Path(
                subprocess.check_output(
                    [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
                ).strip()
            )
            (site / f"{HOOK_MODULE}.py").write_text(HOOK_SOURCE)
            (site / f"{HOOK_MODULE}.pth").write_text(f"import {HOOK_MODULE}\n")
            print(
                "[monailabel venv] torchvision's C++ ops cannot load beside the CPU torch: start-up hook "
                f"{HOOK_MODULE}.pth added",
                file=sys.stderr,
                flush=True,
            )
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
    print(
        f"[monailabel venv] ready at {target} (built in {time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True
    )
    return target


def ensure_venv(requirements: str | os.PathLike = REQUIREMENTS, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached venv's python, building the venv first when it is missing."""
    requirements = Path(requirements)
    if not requirements.is_file():
        raise FileNotFoundError(f"{requirements} not found: the pinned MONAI Label environment to build")
    torch_version = installed_torch()
    _torch_requirement(requirements, torch_version)
    target = venv_path(requirements, cache_dir, torch_version)
    if not venv_python(target).exists():
        build_venv(target, requirements, torch_version)
    return venv_python(target)


def main(requirements: str = str(REQUIREMENTS), cache_dir: str | None = None) -> None:
    """Print the python of MONAI Label's venv, building it first (minutes) when it is not cached yet.

    REQUIREMENTS: the pinned list to build from; CACHE_DIR: where venvs are kept (default
    ``$XDG_CACHE_HOME/fetal-us-bundle``). Build progress goes to stderr, the python's path alone to stdout.
    """
    print(ensure_venv(requirements, cache_dir))


if __name__ == "__main__":
    sys.path.insert(0, str(BUNDLE_ROOT))  # run as a file too
    from scripts.utils.cli import main as cli_main

    cli_main(main, __doc__, prog="python -m scripts.tools.monailabel_venv")
