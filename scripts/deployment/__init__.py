"""Layer 4, deployment: inference over a folder of images (``inference``), the ONNX export and its ONNX Runtime
backend (``onnx_network``) and the MONAI Label copy of the bundle (``monailabel_app``). It may import the layers
below (``scripts.utils`` to ``scripts.method``); the MONAI Label copy holds exactly these layers, 0 to 4."""
