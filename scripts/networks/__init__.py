"""Layer 1, networks: UNeXt (deployed) and Swin-Unet (co-trained), plus Swin-T checkpoint mapping. It may import only
``scripts.utils``; it does not import ``scripts.evaluation``, its sibling at layer 1."""

from .swin_unet import SwinUnet, load_swin_pretrained
from .unext import UNeXt

__all__ = ["UNeXt", "SwinUnet", "load_swin_pretrained"]
