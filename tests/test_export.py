"""Deployment exports of the UNeXt: MONAI's ckpt_export (TorchScript) and onnx_export (ONNX, dynamic batch, height
and width) run as documented and match eager PyTorch, and configs/inference.json with --backend onnxruntime writes
the same masks as the eager network.

The weights are the repository's models/model.pt (the shipped demo model) when it exists, else a seeded random UNeXt:
whether the exports agree with eager does not depend on what the weights learned.
"""

import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.deployment.inference import require_model
from scripts.deployment.onnx_network import ONNX_EXPORT_COMMAND, OnnxRuntimeNetwork, onnx_session
from scripts.networks import UNeXt

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "model.pt"
# the command README.md and docs give, run as written with the output and checkpoint redirected
TORCHSCRIPT_COMMAND = (
    "python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file "
    "models/model.pt --meta_file configs/metadata.json --config_file configs/inference.json"
)
TOL = 1e-4


def _export(command: str, filepath: Path, ckpt: Path) -> None:
    """Run a documented ``python -m monai.bundle ...`` command in this process, parsed by fire as the CLI parses it,
    with its output and checkpoint redirected."""
    import fire
    from monai.bundle import ckpt_export, onnx_export

    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "monai.bundle"]
    args[args.index("--filepath") + 1] = str(filepath)
    args[args.index("--ckpt_file") + 1] = str(ckpt)
    cwd = os.getcwd()
    os.chdir(ROOT)  # the commands name configs/ relative to the bundle root
    try:
        fire.Fire({"ckpt_export": ckpt_export, "onnx_export": onnx_export}, command=args[3:])
    finally:
        os.chdir(cwd)
    assert filepath.is_file(), command


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """models/model.pt exported by both documented commands into a temporary folder."""
    tmp = tmp_path_factory.mktemp("export")
    ckpt = MODEL
    if not ckpt.is_file():
        torch.manual_seed(0)
        ckpt = tmp / "model.pt"
        torch.save(UNeXt(3, 2).state_dict(), ckpt)
    paths = {"ts": tmp / "model.ts", "onnx": tmp / "model.onnx"}
    _export(TORCHSCRIPT_COMMAND, paths["ts"], ckpt)
    _export(ONNX_EXPORT_COMMAND, paths["onnx"], ckpt)
    net = UNeXt(3, 2).eval()
    net.load_state_dict(torch.load(ckpt, weights_only=True))
    return {"net": net, "ckpt": ckpt, **paths}


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def test_onnx_graph_declares_batch_height_and_width_dynamic(exported):
    graph = onnx.load(str(exported["onnx"])).graph
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*graph.input, *graph.output)
    }
    assert dims == {"image": ["batch", 3, "height", "width"], "pred": ["batch", 2, "height", "width"]}


def test_torchscript_and_onnx_match_eager_at_other_batch_and_sizes(exported):
    torchscript = torch.jit.load(str(exported["ts"]))
    session = onnx_session(exported["onnx"])
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 3, 224, 224), (3, 3, 256, 320)):  # the trace example was 1 x 3 x 224 x 224
        x = torch.rand(*shape, generator=g)
        with torch.no_grad():
            expected = exported["net"](x)
            scripted = torchscript(x)
        (pred,) = session.run(None, {"image": x.numpy()})
        assert scripted.shape == expected.shape == pred.shape == (shape[0], 2, *shape[2:])
        assert _max_diff(scripted, expected) <= TOL, shape
        assert _max_diff(pred, expected) <= TOL, shape
    with pytest.raises(Exception, match="multiples of 32"):  # the scripted model keeps the UNeXt's size check
        torchscript(torch.rand(1, 3, 250, 256))


def test_onnxruntime_network_keeps_metadata_and_checks_the_size(exported):
    from monai.data import MetaTensor

    network = OnnxRuntimeNetwork(str(exported["onnx"]))
    x = MetaTensor(torch.rand(1, 3, 64, 96), affine=torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0])))
    out = network(x)
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32 and out.shape == (1, 2, 64, 96)
    assert torch.equal(out.affine, x.affine)
    with pytest.raises(ValueError, match="multiples of 32, got 64x90"):
        network(torch.rand(1, 3, 64, 90))


def test_a_missing_onnx_model_or_unknown_backend_is_one_clear_error(tmp_path):
    missing = tmp_path / "model.onnx"
    for call in (
        lambda: require_model("onnxruntime", str(MODEL), str(missing)),
        lambda: OnnxRuntimeNetwork(str(missing)),
    ):
        with pytest.raises(FileNotFoundError) as error:
            call()
        assert str(error.value).startswith(f"{missing} not found") and ONNX_EXPORT_COMMAND in str(error.value)
    with pytest.raises(ValueError, match="backend='onnx' is invalid: one of torch, onnxruntime"):
        require_model("onnx", str(MODEL), str(missing))


def test_an_onnx_model_older_than_the_checkpoint_is_flagged(tmp_path, caplog):
    ckpt, exported = tmp_path / "model.pt", tmp_path / "model.onnx"
    ckpt.write_bytes(b"weights")
    exported.write_bytes(b"graph")
    os.utime(exported, (1_000_000, 1_000_000))  # exported long before the checkpoint was written
    with caplog.at_level("WARNING", logger="scripts.deployment.inference"):
        assert require_model("onnxruntime", str(ckpt), str(exported)) == str(exported)
    assert f"{exported} is older than {ckpt}: export it again" in caplog.text
    caplog.clear()
    os.utime(exported)  # re-exported now: no warning
    with caplog.at_level("WARNING", logger="scripts.deployment.inference"):
        require_model("onnxruntime", str(ckpt), str(exported))
    assert "older than" not in caplog.text


def _infer(exported: dict, input_dir: Path, output_dir: Path, backend: str) -> None:
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(ROOT / "configs" / "inference.json"),
        workflow_type="infer",
        meta_file=str(ROOT / "configs" / "metadata.json"),
        bundle_root=str(ROOT),
        ckpt_dir=str(exported["ckpt"].parent),
        onnx_path=str(exported["onnx"]),
        backend=backend,
        input_dir=str(input_dir),
        output_dir=str(output_dir),
        device=torch.device("cpu"),
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()


def test_inference_with_onnxruntime_writes_the_same_masks(exported, tmp_path):
    from scripts.data.phantom import generate_phantom

    images = generate_phantom(tmp_path / "phantom", num_subjects=4, progress=False)  # 800 x 540, as in training
    expected_stems = sorted(p.stem for p in images.glob("*HC.png"))
    for backend in ("torch", "onnxruntime"):
        _infer(exported, images, tmp_path / backend, backend)
    masks = {b: sorted((tmp_path / b).glob("*_mask.png")) for b in ("torch", "onnxruntime")}
    assert [p.name for p in masks["torch"]] == [p.name for p in masks["onnxruntime"]]
    assert [p.name.removesuffix("_mask.png") for p in masks["torch"]] == expected_stems
    for eager_file, ort_file in zip(masks["torch"], masks["onnxruntime"]):
        eager, ort = np.asarray(Image.open(eager_file)), np.asarray(Image.open(ort_file))
        assert eager.shape == (540, 800)
        assert np.array_equal(eager, ort), f"{eager_file.name}: {int((eager != ort).sum())} pixels differ"
    # the measurements come from the masks: the same masks give the same table
    assert (tmp_path / "torch" / "measurements.json").read_text() == (
        tmp_path / "onnxruntime" / "measurements.json"
    ).read_text()
