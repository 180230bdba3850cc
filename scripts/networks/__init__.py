"""The two networks of the bundle: UNeXt (deployed) and Swin-Unet (co-trained), plus Swin-T checkpoint mapping."""

from .swin_unet import SwinUnet, load_swin_pretrained
from .unext import UNeXt

__all__ = ["UNeXt", "SwinUnet", "load_swin_pretrained"]
