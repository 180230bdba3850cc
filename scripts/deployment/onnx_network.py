"""The UNeXt as an ONNX model: the export settings, and a ``torch.nn.Module`` that runs it in ONNX Runtime on CPU.

One set of export settings serves MONAI's ``onnx_export`` command (:data:`ONNX_EXPORT_COMMAND`, passed as its
``--converter_kwargs``), :func:`export_onnx` (the benchmark) and the tests. The model is traced with PyTorch's
TorchScript-based exporter (opset 17) with the batch, height and width axes of ``image`` and ``pred`` dynamic; H and
W must still be multiples of 32 (the UNeXt halves them five times). ``configs/inference.json`` with
``--backend onnxruntime`` uses :class:`OnnxRuntimeNetwork` as its ``network``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from monai.networks.utils import convert_to_onnx
from monai.utils import convert_to_dst_type

from scripts.networks.common import check_image_batch
from scripts.networks.unext import UNEXT_STRIDE

__all__ = [
    "DYNAMIC_AXES",
    "ONNX_CONVERTER_KWARGS",
    "ONNX_EXPORT_COMMAND",
    "OnnxRuntimeNetwork",
    "export_onnx",
    "onnx_session",
]

#: input and output named as in metadata.json's network_data_format; batch, height and width known only at run time
DYNAMIC_AXES = {name: {0: "batch", 2: "height", 3: "width"} for name in ("image", "pred")}
#: ``monai.networks.utils.convert_to_onnx`` arguments besides the model and its example input (``use_trace=True``)
ONNX_CONVERTER_KWARGS = {
    "dynamo": False,
    "opset_version": 17,
    "input_names": ["image"],
    "output_names": ["pred"],
    "dynamic_axes": DYNAMIC_AXES,
}
#: the bundle command that writes models/model.onnx from models/model.pt (run in the bundle root)
ONNX_EXPORT_COMMAND = (
    "python -m monai.bundle onnx_export network_def --filepath models/model.onnx --ckpt_file models/model.pt "
    "--meta_file configs/metadata.json --config_file configs/inference.json --use_trace True "
    f'--converter_kwargs "{ONNX_CONVERTER_KWARGS!r}"'
)


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Write ``model`` traced on ``example`` to ``path`` as ``onnx_export`` does, with :data:`ONNX_CONVERTER_KWARGS`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from the Python-side input check, the legacy-exporter notice
        convert_to_onnx(model, [example], filename=str(path), use_trace=True, **ONNX_CONVERTER_KWARGS)
    return Path(path)


def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session on ``path`` with ``threads`` intra-op threads (default: torch's thread count)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1  # one sequential graph: parallelism comes from within the operators
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxRuntimeNetwork(torch.nn.Module):
    """Runs an exported UNeXt in ONNX Runtime on CPU: (B, C, H, W) tensor in, its first output out as a tensor of the
    input's type, device and dtype (a MetaTensor keeps its metadata, as the eager network's output does).

    Args:
        onnx_path: the ``.onnx`` file (:data:`ONNX_EXPORT_COMMAND` writes it).
        threads: ONNX Runtime intra-op threads; default ``torch.get_num_threads()``.
        size_multiple: H and W must be multiples of it (32 for the UNeXt); the input is checked before the run.
    """

    def __init__(self, onnx_path: str, threads: int | None = None, size_multiple: int = UNEXT_STRIDE) -> None:
        super().__init__()
        if not Path(onnx_path).is_file():
            raise FileNotFoundError(f"{onnx_path} not found: export it first with: {ONNX_EXPORT_COMMAND}")
        self.onnx_path = str(onnx_path)
        self.session = onnx_session(onnx_path, threads)
        source = self.session.get_inputs()[0]
        self.input_name = source.name
        self.in_channels = source.shape[1] if isinstance(source.shape[1], int) else None
        self.size_multiple = size_multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels is not None:
            check_image_batch(x, f"ONNX model {self.onnx_path}", self.in_channels, self.size_multiple)
        feed = {self.input_name: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)}
        out = self.session.run(None, feed)[0]
        return convert_to_dst_type(out, x)[0]
