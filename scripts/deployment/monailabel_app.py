r"""This bundle in MONAI Label 0.8.5: make the copy a MONAI Label app serves, and run its infer and train tasks.

    python scripts/deployment/monailabel_app.py export --output APP/model/fetal_us_unext [--train_overrides "{...}"]
    VENV/bin/python scripts/deployment/monailabel_app.py infer --bundle APP/model/fetal_us_unext --image scan.png \
        --output mask.png
    VENV/bin/python scripts/deployment/monailabel_app.py train --bundle APP/model/fetal_us_unext --studies STUDIES \
        --max_epochs 2

``VENV`` is MONAI Label's own environment (``python -m scripts.tools.monailabel_venv`` builds it and prints its python).
``export`` runs in either environment; ``infer`` and ``train`` build exactly the tasks MONAI Label's ``monaibundle``
sample app builds for a bundle (``BundleInferTask``, ``BundleTrainTask`` with default arguments), so what passes
here is what the server runs. Each prints one line ``result: {json}`` at the end.

Why a copy: MONAI Label reads one ``configs/inference.json`` and one ``configs/train.json`` per bundle and cannot
merge override files. The copy's ``inference.json`` is ours merged with ``configs/monailabel_inference.json``:
MONAI Label drops ``SaveImaged`` and writes the mask itself (ITK), which for a 2D image needs the mask without its
channel axis and as uint8, else it writes a (1, W, H) float volume instead of a W x H PNG. Its ``train.json`` is ours
with ``train_overrides`` merged in (the unlabelled pool: ``dataset_dir``/``prepared_dir``; run sizes), and its run
length is MONAI Label's ``max_epochs`` x ``val_interval`` iterations (``total_iterations`` does not cap it).
Its ``models/`` holds only ``model.pt``, since MONAI Label offers every ``models/*.pt`` as a model. The copy is for
MONAI Label only: ``monai.bundle run`` on its ``inference.json`` would hand the squeezed mask to the measurement and
overlay handlers, which expect (1, W, H); run the bundle itself from the repository.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a file: keep the deployment modules (inference, ...) off the top level
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

logger = logging.getLogger("monailabel_app")

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
EXPORT_MARKER = ".monailabel_export.json"
STUDY_EXTENSIONS = ("*.png", "*.jpg", "*.nii.gz", "*.nii", "*.nrrd")
#: the packages of ``scripts`` that inference and training use: every layer up to this one (clinical, experiments
#: and tools stay out of the copy)
EXPORTED_PACKAGES = ("utils", "networks", "evaluation", "data", "method", "deployment")


def _result(summary: dict) -> dict:
    print("result: " + json.dumps(summary), flush=True)
    return summary


def export(
    output: str, model: str | None = None, train_overrides: dict | None = None, bundle_root: str = str(BUNDLE_ROOT)
) -> dict:
    """Write the MONAI Label copy of the bundle at ``bundle_root`` into ``output`` (a folder under ``<app>/model/``).

    Configs and ``scripts/`` (its ``__init__.py`` and :data:`EXPORTED_PACKAGES`) are rewritten on every export;
    ``models/model.pt`` is copied from ``model`` when given, else from the bundle's ``models/model.pt`` only when
    ``output`` has none yet (a model MONAI Label trained there is kept). ``train_overrides``: config ids -> values
    merged into the copy's ``train.json``.
    """
    from monai.bundle import ConfigParser
    from monai.bundle.utils import merge_kv

    src, out = Path(bundle_root).resolve(), Path(output).resolve()
    if out.exists() and any(out.iterdir()) and not (out / EXPORT_MARKER).exists():
        raise FileExistsError(f"{out} exists and is not an earlier export of this bundle: choose an empty folder")
    if model is not None and not Path(model).is_file():
        raise FileNotFoundError(f"model {model} not found: a state_dict of the UNeXt (models/model.pt)")

    (out / "configs").mkdir(parents=True, exist_ok=True)
    inference = ConfigParser.load_config_files(
        [str(src / "configs" / "inference.json"), str(src / "configs" / "monailabel_inference.json")]
    )
    ConfigParser.export_config_file(inference, str(out / "configs" / "inference.json"), indent=4)
    train = ConfigParser(ConfigParser.load_config_files(str(src / "configs" / "train.json")))
    train["train#trainer#max_iterations"] = None  # MONAI Label sizes the run by train#trainer#max_epochs alone
    for key, value in (train_overrides or {}).items():
        merge_kv(train, key, value)
    ConfigParser.export_config_file(train.get(), str(out / "configs" / "train.json"), indent=4)
    for name in ("metadata.json", "logging.conf"):
        shutil.copy2(src / "configs" / name, out / "configs" / name)
    shutil.copy2(src / "LICENSE", out / "LICENSE")
    shutil.rmtree(out / "scripts", ignore_errors=True)
    (out / "scripts").mkdir()
    shutil.copy2(src / "scripts" / "__init__.py", out / "scripts" / "__init__.py")
    for package in EXPORTED_PACKAGES:
        shutil.copytree(
            src / "scripts" / package, out / "scripts" / package, ignore=shutil.ignore_patterns("__pycache__")
        )

    target = out / "models" / "model.pt"
    source = Path(model) if model is not None else src / "models" / "model.pt"
    if model is not None or (not target.exists() and source.is_file()):
        target.parent.mkdir(exist_ok=True)
        shutil.copy2(source, target)
        logger.info(f"model: {source} -> {target}")
    elif not target.exists():
        logger.warning(
            f"no model in {src / 'models'}: MONAI Label offers inference once a training has written {target}"
        )
    (out / EXPORT_MARKER).write_text(json.dumps({"source": str(src), "train_overrides": train_overrides or {}}) + "\n")
    return _result({"bundle": str(out), "model": str(target) if target.exists() else None})


def infer(bundle: str, image: str, output: str, device: str = "cpu") -> dict:
    """MONAI Label's ``BundleInferTask`` on one image; its label file is moved to ``output``."""
    from monailabel.tasks.infer.bundle import BundleInferTask

    task = BundleInferTask(str(Path(bundle).resolve()), conf={})
    if not task.is_valid():
        raise SystemExit(
            f"MONAI Label refused the bundle {bundle}: it needs configs/inference.json and models/model.pt"
        )
    label_file, params = task({"image": str(Path(image).resolve()), "device": device})
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(label_file, output)
    return _result(
        {
            "output": str(output),
            "labels": task.labels,
            "dimension": task.dimension,
            "model_choices": task.config().get("model_filename"),
            "label_names": params.get("label_names"),
        }
    )


def train(
    bundle: str, studies: str, max_epochs: int = 1, val_split: float = 0.2, device: str = "cpu", name: str | None = None
) -> dict:
    """MONAI Label's ``BundleTrainTask`` on the labelled images of a local datastore (``studies/labels/final``).

    The labelled images come from the datastore; the unlabelled pool, from the bundle's own datalist
    (``dataset_dir``/``prepared_dir`` in the copy's ``train.json``), whose size is reported.
    """
    from monai.bundle import ConfigParser
    from monailabel.datastore.local import LocalDatastore
    from monailabel.tasks.train.bundle import BundleTrainTask

    bundle_path = Path(bundle).resolve()
    datastore = LocalDatastore(str(Path(studies).resolve()), extensions=STUDY_EXTENSIONS, auto_reload=False)
    labeled = datastore.datalist()
    task = BundleTrainTask(str(bundle_path), conf={})
    if not task.is_valid():
        raise SystemExit(f"MONAI Label refused the bundle {bundle}: it needs configs/train.json")
    model = bundle_path / "models" / "model.pt"
    before = model.stat().st_mtime_ns if model.exists() else None
    request = {
        "model": name or bundle_path.name,
        "max_epochs": int(max_epochs),
        "val_split": float(val_split),
        "device": device,
        "multi_gpu": False,
    }
    task(request, datastore)

    config = ConfigParser()
    config.read_config(str(bundle_path / "configs" / "train.json"))
    config["bundle_root"] = str(bundle_path)
    datalist = json.loads((Path(config.get_parsed_content("prepared_dir")) / "datalist.json").read_text())
    return _result(
        {
            "model": str(model) if model.exists() else None,
            "model_written": model.exists() and model.stat().st_mtime_ns != before,
            "datastore_labeled": len(labeled),
            "unlabeled_pool": len(datalist.get("unlabeled", [])),
        }
    )


def _bundle_cli():
    """scripts/utils/cli.py loaded by its path, as its own module: a ``scripts`` package imported here would stand in
    for the exported copy's own ``scripts`` that MONAI Label's tasks import."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "utils" / "cli.py"
    spec = importlib.util.spec_from_file_location("fetal_us_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    _bundle_cli().main(
        {"export": export, "infer": infer, "train": train},
        __doc__,
        prog="python scripts/deployment/monailabel_app.py",
        serialize=lambda _: None,
    )
