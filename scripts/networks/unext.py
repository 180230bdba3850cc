"""UNeXt (Valanarasu & Patel, MICCAI 2022): a convolutional encoder followed by tokenized shifted-MLP stages.

Reproduces the ``UNext`` class of the official code (github.com/jeya-maria-jose/UNeXt-pytorch) layer for layer, so
the parameter count is the code's published 1,471,938 for 3 input channels and 2 classes. Differences, none of which
change the function or the parameters:

- the input may have 1 or 3 channels (the reference hard-wires 3);
- the 5-chunk token shift is written as zero-filled shifts with constant slice bounds instead of pad/roll/narrow with
  Python ints taken from the input shape, so traced and ONNX graphs stay valid for other batch and spatial sizes;
- tokens are kept channels-last, (B, H, W, C), which saves the reference's transpose/view round trips;
- in inference the 2x2 max-pooling is the maximum of four strided views (same values, faster on CPU).

The spatial size must be divisible by 32 (five halvings: three max-pools and two strided patch embeddings).
"""

import math

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import nn

from .common import check_image_batch, init_linear_and_norm

__all__ = ["UNeXt", "ShiftedMLP", "ShiftedBlock", "OverlapPatchEmbed", "DWConv", "shift_tokens", "max_pool_2x2"]

#: total downsampling factor of the network: inputs must have H and W divisible by it.
UNEXT_STRIDE = 32


def shift_tokens(x: torch.Tensor, dim: int, shift_size: int = 5) -> torch.Tensor:
    """Split the channels of a channels-last map ``x`` (B, H, W, C) into ``shift_size`` chunks and move chunk k by
    k - shift_size // 2 positions along ``dim`` (1 = H, 2 = W), filling with zeros.

    Equivalent to the reference's pad / torch.roll / narrow: rolling a zero-padded map and cropping it back is a
    zero-filled shift. Chunk sizes follow ``torch.chunk`` (256 channels -> 52, 52, 52, 52, 48), as in the reference.
    The crop uses constant slice bounds (negative ends), so traced and exported graphs keep H and W dynamic.
    """
    if dim not in (1, 2):
        raise ValueError(f"shift_tokens shifts along H (dim=1) or W (dim=2) of a (B, H, W, C) map, got dim={dim}")
    pad = shift_size // 2
    padded = F.pad(x, [0, 0, 0, 0, pad, pad]) if dim == 1 else F.pad(x, [0, 0, pad, pad])
    shifted: list[torch.Tensor] = []
    for k, chunk in enumerate(torch.chunk(padded, shift_size, dim=-1)):
        shift = k - pad
        start, stop = pad - shift, -pad - shift  # output[i] = input[i - shift]; stop == 0 means "to the end"
        if dim == 1:
            shifted.append(chunk[:, start:] if stop == 0 else chunk[:, start:stop])
        else:
            shifted.append(chunk[:, :, start:] if stop == 0 else chunk[:, :, start:stop])
    return torch.cat(shifted, dim=-1)


@torch.jit.unused
def _exporting() -> bool:
    """True inside torch.compile / torch.export, where shape checks on symbolic sizes would become guards."""
    return torch.compiler.is_compiling()


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pooling, stride 2, of an NCHW map with even H and W.

    Without autograd it is the maximum of the four strided sub-grids, 4-6x faster than ``F.max_pool2d``'s NCHW CPU
    kernel in PyTorch 2.13; with autograd ``F.max_pool2d`` is kept, its backward being the cheaper one.
    """
    if x.requires_grad:
        return F.max_pool2d(x, 2, 2)
    return torch.maximum(
        torch.maximum(x[..., 0::2, 0::2], x[..., 1::2, 0::2]), torch.maximum(x[..., 0::2, 1::2], x[..., 1::2, 1::2])
    )


class DWConv(nn.Module):
    """Depthwise Conv3x3 (with bias) on a channels-last map (B, H, W, C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ShiftedMLP(nn.Module):
    """Tokenized MLP of UNeXt (reference ``shiftmlp``): shift along H, Linear, depthwise Conv3x3, GELU, shift along W,
    Linear. Works on channels-last maps (B, H, W, C)."""

    def __init__(self, dim: int, hidden_dim: int | None = None, shift_size: int = 5, drop: float = 0.0) -> None:
        super().__init__()
        hidden_dim = hidden_dim or dim
        self.shift_size = shift_size
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(shift_tokens(x, dim=1, shift_size=self.shift_size))
        x = self.drop(self.act(self.dwconv(x)))
        x = self.fc2(shift_tokens(x, dim=2, shift_size=self.shift_size))
        return self.drop(x)


class ShiftedBlock(nn.Module):
    """Reference ``shiftedBlock``: x + DropPath(ShiftedMLP(LayerNorm(x))), MLP ratio 1."""

    def __init__(self, dim: int, mlp_ratio: float = 1.0, drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm2 = nn.LayerNorm(dim)  # named as in the reference so its checkpoints load
        self.mlp = ShiftedMLP(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm2(x)))


class OverlapPatchEmbed(nn.Module):
    """Conv3x3 stride 2 (pad 1) then LayerNorm; returns a channels-last map (B, H/2, W/2, C)."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class UNeXt(nn.Module):
    """UNeXt segmentation network; forward maps (B, in_channels, H, W) to logits (B, out_channels, H, W).

    Defaults are the published configuration: conv widths 16/32/128, token widths 160/256, one shifted-MLP block per
    tokenized stage, MLP ratio 1, no dropout. Module names follow the reference code so its checkpoints load as-is
    (except ``encoder1`` for 1-channel inputs).

    Args:
        in_channels: 1 (grayscale) or 3.
        out_channels: number of classes (logits, no softmax).
        drop_rate: dropout inside the shifted MLPs (reference default 0).
        drop_path_rate: stochastic-depth rate, linearly increasing over the encoder blocks (reference default 0).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 2,
        conv_widths: tuple[int, int, int] = (16, 32, 128),
        token_widths: tuple[int, int] = (160, 256),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"UNeXt takes 1 (grayscale) or 3 (RGB) input channels, got in_channels={in_channels}")
        if out_channels < 1:
            raise ValueError(f"UNeXt needs out_channels >= 1, got {out_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.size_multiple = UNEXT_STRIDE
        c1, c2, c3 = conv_widths
        t1, t2 = token_widths
        # the reference builds 3 encoder blocks' worth of rates (depths [1, 1, 1]) and uses the first two everywhere
        dpr = torch.linspace(0, drop_path_rate, 3).tolist()

        # convolutional encoder: Conv3x3 -> BN -> MaxPool 2 -> ReLU
        self.encoder1 = nn.Conv2d(in_channels, c1, 3, stride=1, padding=1)
        self.encoder2 = nn.Conv2d(c1, c2, 3, stride=1, padding=1)
        self.encoder3 = nn.Conv2d(c2, c3, 3, stride=1, padding=1)
        self.ebn1 = nn.BatchNorm2d(c1)
        self.ebn2 = nn.BatchNorm2d(c2)
        self.ebn3 = nn.BatchNorm2d(c3)

        # tokenized MLP encoder stages
        self.patch_embed3 = OverlapPatchEmbed(c3, t1)
        self.patch_embed4 = OverlapPatchEmbed(t1, t2)
        self.block1 = nn.ModuleList([ShiftedBlock(t1, drop=drop_rate, drop_path=dpr[0])])
        self.block2 = nn.ModuleList([ShiftedBlock(t2, drop=drop_rate, drop_path=dpr[1])])
        self.norm3 = nn.LayerNorm(t1)
        self.norm4 = nn.LayerNorm(t2)

        # decoder: Conv3x3 -> BN -> bilinear x2 -> ReLU -> + skip
        self.decoder1 = nn.Conv2d(t2, t1, 3, stride=1, padding=1)
        self.decoder2 = nn.Conv2d(t1, c3, 3, stride=1, padding=1)
        self.decoder3 = nn.Conv2d(c3, c2, 3, stride=1, padding=1)
        self.decoder4 = nn.Conv2d(c2, c1, 3, stride=1, padding=1)
        self.decoder5 = nn.Conv2d(c1, c1, 3, stride=1, padding=1)
        self.dbn1 = nn.BatchNorm2d(t1)
        self.dbn2 = nn.BatchNorm2d(c3)
        self.dbn3 = nn.BatchNorm2d(c2)
        self.dbn4 = nn.BatchNorm2d(c1)
        self.dblock1 = nn.ModuleList([ShiftedBlock(t1, drop=drop_rate, drop_path=dpr[0])])
        self.dblock2 = nn.ModuleList([ShiftedBlock(c3, drop=drop_rate, drop_path=dpr[1])])
        self.dnorm3 = nn.LayerNorm(t1)
        self.dnorm4 = nn.LayerNorm(c3)

        self.final = nn.Conv2d(c1, out_channels, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        """As the reference: its tokenized modules use trunc-normal(.02) Linear, unit LayerNorm and He-normal
        (fan-out) convolutions; the plain conv encoder/decoder keep PyTorch's default initialisation."""
        tokenized = [self.patch_embed3, self.patch_embed4, self.block1, self.block2, self.dblock1, self.dblock2]
        for part in tokenized:
            for m in part.modules():
                if init_linear_and_norm(m):
                    continue
                if isinstance(m, nn.Conv2d):
                    fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                    nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError for inputs this network cannot take (a user error, not an internal one)."""
        check_image_batch(x, "UNeXt", self.in_channels, self.size_multiple)

    @staticmethod
    def _up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or not _exporting():
            self.check_input(x)
        # convolutional encoder
        t1 = F.relu(max_pool_2x2(self.ebn1(self.encoder1(x))))  # H/2
        t2 = F.relu(max_pool_2x2(self.ebn2(self.encoder2(t1))))  # H/4
        t3 = F.relu(max_pool_2x2(self.ebn3(self.encoder3(t2))))  # H/8
        # tokenized stages, channels-last
        out = self.patch_embed3(t3)  # H/16
        for blk in self.block1:
            out = blk(out)
        t4 = self.norm3(out).permute(0, 3, 1, 2)
        out = self.patch_embed4(t4)  # H/32
        for blk in self.block2:
            out = blk(out)
        out = self.norm4(out).permute(0, 3, 1, 2)
        # decoder
        out = F.relu(self._up(self.dbn1(self.decoder1(out)))) + t4
        out = out.permute(0, 2, 3, 1)
        for blk in self.dblock1:
            out = blk(out)
        out = self.dnorm3(out).permute(0, 3, 1, 2)
        out = F.relu(self._up(self.dbn2(self.decoder2(out)))) + t3
        out = out.permute(0, 2, 3, 1)
        for blk in self.dblock2:
            out = blk(out)
        out = self.dnorm4(out).permute(0, 3, 1, 2)
        out = F.relu(self._up(self.dbn3(self.decoder3(out)))) + t2
        out = F.relu(self._up(self.dbn4(self.decoder4(out)))) + t1
        out = F.relu(self._up(self.decoder5(out)))
        return self.final(out)
