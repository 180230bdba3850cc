"""Pieces both networks share: the input check users see, and the transformer-style weight init."""

from __future__ import annotations

import torch
from torch import nn


def check_image_batch(x: torch.Tensor, network: str, in_channels: int, multiple: int, why: str = "") -> None:
    """Raise ValueError for a batch the network cannot take: not (B, C, H, W), wrong C, or H/W not multiples."""
    if x.dim() != 4:
        raise ValueError(f"{network} expects a (B, C, H, W) tensor, got shape {list(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{network} was built for {in_channels} input channel(s), got {x.shape[1]}")
    h, w = int(x.shape[2]), int(x.shape[3])
    if h % multiple or w % multiple:
        raise ValueError(
            f"{network} needs height and width that are multiples of {multiple}{why}, got {h}x{w}; "
            f"resize or pad to e.g. {(h + multiple - 1) // multiple * multiple}x{(w + multiple - 1) // multiple * multiple}"  # noqa: E501
        )


def init_linear_and_norm(m: nn.Module) -> bool:
    """Trunc-normal(std .02) Linear weights with zero biases, unit LayerNorms; True if ``m`` was one of those."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    else:
        return False
    return True
