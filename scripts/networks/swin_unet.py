"""Swin-Unet (Cao et al. 2021): a pure-transformer U-shaped network, as the ``SwinTransformerSys`` of the official
code (github.com/HuCaoFighting/Swin-Unet) in the "lite" configuration (decoder stages of 2 Swin blocks each).

Module and parameter names follow the official code, so a Swin-Unet checkpoint's tensors keep their names, and
27,168,228 parameters result for 3 input channels and 2 classes. Differences from the reference, none of which change
the function or the parameter count:

- the encoder runs once per forward (the reference wrapper runs it twice, once for an unused output);
- any input whose sides are multiples of 224 works, not only ``img_size``: the shift decision, the shifted-window mask
  and the relative position index are derived from the actual token grid (no per-window Python loop);
- inside a stage the tokens stay grouped by window: the map is partitioned once on entry, the cyclic shift is a
  permutation of tokens between the regular and the shifted window order (one gather; torch.roll is slow on CPU),
  and one gather or window reverse restores the map on exit (the reference partitions and reverses in every block);
- stages take and return channels-last maps (B, H, W, C) instead of (B, L, C) plus a fixed resolution;
- the relative position bias and the shift mask are summed once per window set, then broadcast over the batch;
  without a gradient for the bias (inference, the EMA teacher) attention runs in PyTorch's fused kernel;
- the patch embedding is a Linear on 4 x 4 patches (the same product as the stride-4 convolution, channels-last);
- the x4 head normalises and classifies each token's 16 output pixels before the pixel shuffle, which then moves
  class logits instead of 96-channel features (LayerNorm and the 1x1 output are per pixel: same result);
- ``relative_position_index`` and the shifted-window mask and indices are non-persistent buffers: derived, not learnt.
- training keeps fewer activations: each block's LayerNorm and GELU outputs, and the head's normalised pixels, are
  recomputed in the backward pass (same kernels, bit-exact gradients), and past ``HEAD_CHUNK_BYTES`` of expanded
  pixels the x4 head runs image by image under ``torch.utils.checkpoint``.

ImageNet Swin-T weights are mapped by :func:`load_swin_pretrained` (official or timm key names).
"""

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from .common import check_image_batch, init_linear_and_norm

__all__ = [
    "SwinUnet",
    "load_swin_pretrained",
    "swin_size_multiple",
    "WindowAttention",
    "SwinBlock",
    "PatchMerging",
    "PatchExpand",
    "FinalPatchExpandX4",
]

logger = logging.getLogger("scripts.networks")

#: value the reference adds to attention logits between tokens of different regions of a shifted window
SHIFT_MASK_VALUE = -100.0
#: training: above this many bytes of expanded pixels the x4 head runs image by image (FinalPatchExpandX4.classify)
HEAD_CHUNK_BYTES = 256 * 2**20


@torch.jit.unused
def _exporting() -> bool:
    """True inside torch.compile / torch.export, where shape checks on symbolic sizes would become guards."""
    return torch.compiler.is_compiling()


class _LinearOfRecomputed(torch.autograd.Function):
    """``F.linear(fn(x, *params), weight, bias)`` that keeps ``x`` for the backward pass instead of ``fn``'s output
    and recomputes that there (``fn`` a :class:`_LayerNorm` or :class:`_Gelu`: cheap next to the product, with an
    output as large as x or 4 x larger). The backward pass runs the kernels autograd would (``addmm``'s products on
    the same operands in the same order, then ``fn``'s own backward), so the gradients equal those of the plain
    ``linear(fn(x))`` bit for bit; the recomputed output is freed before ``fn``'s backward, which does not need it.
    """

    @staticmethod
    def forward(ctx, fn, x, weight, bias, *params):
        ctx.fn, ctx.device = fn, x.device.type
        # the backward pass recomputes under the same autocast state (what torch.amp.custom_bwd does for one device)
        ctx.autocast = torch.is_autocast_enabled(ctx.device), torch.get_autocast_dtype(ctx.device)
        ctx.save_for_backward(x, weight, *params)
        return F.linear(fn.run(x, *params)[0], weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad
        enabled, dtype = ctx.autocast
        with torch.autocast(ctx.device, dtype, enabled=enabled):
            h, state = ctx.fn.run(x, *params)
            grad_2d = grad.reshape(-1, grad.shape[-1])
            grad_weight = grad_2d.t().mm(h.reshape(-1, h.shape[-1])) if needs[2] else None
            grad_bias = grad_2d.sum(0) if needs[3] else None
            grad_h = grad_2d.mm(weight).view(h.shape).to(h.dtype)  # autocast's cast of h, backwards
        del h
        grads = ctx.fn.grads(grad_h, state, *params, needs=[needs[1], *needs[4:]])
        return None, grads[0], grad_weight, grad_bias, *grads[1:]


class _Gelu:
    """Exact GELU for :class:`_LinearOfRecomputed`: its output, and its input's gradient as autograd computes it."""

    @staticmethod
    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.gelu(x), x

    @staticmethod
    def grads(grad: torch.Tensor, x: torch.Tensor, needs: list[bool]) -> tuple[torch.Tensor | None]:
        return (torch.ops.aten.gelu_backward(grad, x) if needs[0] else None,)


class _LayerNorm:
    """``norm`` for :class:`_LinearOfRecomputed`, through the kernels ``F.layer_norm`` and its backward run."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        self.shape, self.eps = list(norm.normalized_shape), norm.eps

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        if torch.is_autocast_enabled(x.device.type):
            x = x.float()  # autocast runs layer_norm in fp32
        out, mean, rstd = torch.native_layer_norm(x, self.shape, weight, bias, self.eps)
        return out, (x, mean, rstd)

    def grads(self, grad: torch.Tensor, state: tuple, weight: torch.Tensor, bias: torch.Tensor, needs: list[bool]):
        x, mean, rstd = state
        return torch.ops.aten.native_layer_norm_backward(grad, x, self.shape, mean, rstd, weight, bias, needs)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear (with dropout after each)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def relative_position_index(window_size: int) -> torch.Tensor:
    """(N, N) index into the ((2w-1)^2, heads) bias table for the N = w*w tokens of a window (Liu et al. 2021)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
    return rel[..., 0] * (2 * window_size - 1) + rel[..., 1]


def _shift_regions(n: int, window_size: int, shift_size: int) -> torch.Tensor:
    """Region id (0, 1, 2) of each of n positions: [0, n-w), [n-w, n-s), [n-s, n)."""
    i = torch.arange(n)
    return (i >= n - window_size).long() + (i >= n - shift_size).long()


def shifted_window_mask(
    height: int, width: int, window_size: int, shift_size: int, mask_value: float = SHIFT_MASK_VALUE
) -> torch.Tensor:
    """(nW, N, N) additive mask for shifted-window attention on a height x width grid: 0 between tokens of the same
    region of the cyclically shifted map, ``mask_value`` (the reference's -100) otherwise. Same regions as the
    reference's 3x3 slices (0:-w, -w:-s, -s:), computed without a loop."""
    ids = _shift_regions(height, window_size, shift_size)[:, None] * 3 + _shift_regions(width, window_size, shift_size)
    ids = ids.view(height // window_size, window_size, width // window_size, window_size)
    ids = ids.permute(0, 2, 1, 3).reshape(-1, window_size * window_size)
    return (ids[:, None, :] != ids[:, :, None]).float() * mask_value


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, w*w, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """(B * nW, w*w, C) -> (B, H, W, C); inverse of :func:`window_partition`."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window_size, width // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


class ShiftedWindows(NamedTuple):
    """Everything the shifted blocks of a stage need for one grid size: the (nW, N, N) additive mask, and the (H*W,)
    gather indices between token orders of a (B, H*W, C) tensor: regular windows -> shifted windows (``to_shifted``),
    back (``to_regular``), and shifted windows -> the row-major map (``to_spatial``). A gather replaces torch.roll +
    window partition + reverse, which are 10-15x slower on CPU."""

    mask: torch.Tensor
    to_shifted: torch.Tensor
    to_regular: torch.Tensor
    to_spatial: torch.Tensor


def shifted_windows(height: int, width: int, window_size: int, shift_size: int) -> ShiftedWindows:
    """The :class:`ShiftedWindows` plan of a height x width grid (cyclic shift by -shift_size on both axes)."""
    pos = torch.arange(height * width).view(1, height, width, 1)
    regular = window_partition(pos, window_size).flatten()  # map position of each token in regular window order
    shifted = window_partition(torch.roll(pos, shifts=(-shift_size, -shift_size), dims=(1, 2)), window_size).flatten()
    regular_rank, shifted_rank = torch.argsort(regular), torch.argsort(shifted)
    return ShiftedWindows(
        shifted_window_mask(height, width, window_size, shift_size),
        regular_rank[shifted],
        shifted_rank[regular],
        shifted_rank,
    )


class WindowAttention(nn.Module):
    """Multi-head self-attention inside w x w windows with a learnt relative position bias:
    softmax(q k^T / sqrt(d) + bias + mask) v.

    Two paths with the same result. When the bias table needs no gradient (no_grad/inference, the frozen EMA teacher)
    ``F.scaled_dot_product_attention`` runs with bias + mask as its float ``attn_mask``: PyTorch's fused CPU kernel
    reads q, k, v in place and never stores the N x N probabilities. When the bias is trained, PyTorch 2.13 on CPU
    sends a mask that requires grad to its unfused "math" kernel, which is slower than the product written out here.
    """

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, N, N) bias gathered from the table."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B * nW, N, C) windows, each image's nW windows in a row; mask: (nW, N, N) additive shift mask or None."""
        return self.attend(self.qkv(x), mask)

    def attend(self, qkv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention from the windows' ``qkv`` projection, (B * nW, N, 3 C)."""
        bw, n, c = qkv.shape[0], qkv.shape[1], self.dim
        qkv = qkv.view(bw, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B*nW, heads, N, d) views of the projection
        bias = self.relative_position_bias().unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:  # bias and shift mask summed once per window set
            bias = bias + mask.unsqueeze(1)  # (nW, heads, N, N)
        if torch.is_grad_enabled() and self.relative_position_bias_table.requires_grad:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = (attn.view(-1, bias.shape[0], self.num_heads, n, n) + bias).view(bw, self.num_heads, n, n)
            out = self.attn_drop(attn.softmax(dim=-1)) @ v
        else:
            if mask is not None:  # the fused kernel broadcasts a mask over the batch only, not over part of it
                bias = bias.expand(bw // bias.shape[0], -1, -1, -1, -1).reshape(bw, self.num_heads, n, n)
            drop = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(bw, n, c)))


class SwinBlock(nn.Module):
    """Swin Transformer block: x + DropPath(W-MSA(LN(x))), then x + DropPath(MLP(LN(x))).

    Works on (B, L, C) tokens grouped by window (L = nW * w*w, each window's w*w tokens in a row), the order its
    :class:`SwinStage` keeps them in: regular windows, or for a block built with ``shift`` True windows shifted by
    window // 2, with the shift mask. Where the grid is a single window the reference disables the shift; the stage
    then runs a shifting block on regular windows without a mask.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shift: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, C) tokens grouped by window; mask: the (nW, N, N) shift mask when the windows are shifted."""
        if not torch.jit.is_scripting():
            if self._recomputes():
                return self._forward_recomputing(x, mask)
        b, length, c = x.shape
        y = self.attn(self.norm1(x).view(-1, self.window_size * self.window_size, c), mask)
        x = x + self.drop_path(y.view(b, length, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    @torch.jit.unused
    def _recomputes(self) -> bool:
        """Training (without dropout in the MLP, whose masks would have to be kept anyway)."""
        return torch.is_grad_enabled() and not _exporting() and (self.mlp.drop.p == 0 or not self.training)

    @torch.jit.unused
    def _forward_recomputing(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """:meth:`forward` keeping neither the LayerNorms' outputs nor the GELU's for the backward pass, where
        :class:`_LinearOfRecomputed` computes them again."""
        b, length, c = x.shape
        qkv, mlp = self.attn.qkv, self.mlp
        qkv = _LinearOfRecomputed.apply(_LayerNorm(self.norm1), x, qkv.weight, qkv.bias, *self.norm1.parameters())
        y = self.attn.attend(qkv.view(-1, self.window_size * self.window_size, 3 * c), mask)
        x = x + self.drop_path(y.view(b, length, c))
        h = _LinearOfRecomputed.apply(_LayerNorm(self.norm2), x, mlp.fc1.weight, mlp.fc1.bias, *self.norm2.parameters())
        return x + self.drop_path(_LinearOfRecomputed.apply(_Gelu, h, mlp.fc2.weight, mlp.fc2.bias))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concatenation [(0,0), (1,0), (0,1), (1,1)] -> LayerNorm(4C) -> Linear 4C -> 2C (no bias)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))


def _pixel_shuffle_last(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, H, W, s*s*C) -> (B, s*H, s*W, C), i.e. einops 'b h w (p1 p2 c) -> b (h p1) (w p2) c'."""
    b, h, w, c = x.shape
    x = x.view(b, h, w, scale, scale, c // (scale * scale)).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * scale, w * scale, c // (scale * scale))


class PatchExpand(nn.Module):
    """Linear C -> 2C (no bias), pixel-shuffle x2 -> C/2 channels, LayerNorm(C/2)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_pixel_shuffle_last(self.expand(x), 2))


class FinalPatchExpandX4(nn.Module):
    """Linear C -> 16C (no bias), pixel-shuffle x4 -> C channels, LayerNorm(C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.expand = nn.Linear(dim, 16 * dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def expanded(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, 16, C): each token's 4 x 4 output pixels (row-major), unshuffled."""
        b, h, w, c = x.shape
        return self.expand(x).view(b, h, w, 16, c)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`expanded`, normalised."""
        return self.norm(self.expanded(x))

    def classify(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, 16, K): ``weight`` (K, C) applied to each of :meth:`patches`' pixels.

        With autograd on, the normalised pixels are recomputed in the backward pass instead of kept. Where the
        batch's expanded pixels would exceed :data:`HEAD_CHUNK_BYTES` (they are the network's largest tensors: 540 MB
        for 7 images at 448 px), the head runs one image at a time and each image's is recomputed in the backward
        pass (``torch.utils.checkpoint``): only the head's input is kept, and no block that large is allocated and
        freed in every iteration (which grew malloc's heap by half a gigabyte at a time, docs/benchmark.md).
        """
        if not torch.jit.is_scripting():
            if torch.is_grad_enabled() and not _exporting():
                b, h, w, c = x.shape
                if b == 1 or b * 16 * h * w * c * x.element_size() <= HEAD_CHUNK_BYTES:
                    return self._classify_recomputing(x, weight)
                parts = [checkpoint(self._classify_recomputing, t, weight, use_reentrant=False) for t in x.split(1)]
                return torch.cat(parts)
        return F.linear(self.patches(x), weight)

    @torch.jit.unused
    def _classify_recomputing(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        pixels = self.expanded(x)
        return _LinearOfRecomputed.apply(_LayerNorm(self.norm), pixels, weight, None, *self.norm.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        return _pixel_shuffle_last(self.patches(x).view(b, h, w, 16 * c), 4)


class SwinStage(nn.Module):
    """``depth`` Swin blocks alternating regular and shifted windows, sharing one :class:`ShiftedWindows` per grid.

    The (B, H, W, C) map is partitioned into regular windows once; between blocks the tokens move from one window
    order to the other by a gather, and the last order is turned back into the map once.
    The plan for the grid of ``resolution`` (the configured image size) is kept in non-persistent buffers; other grid
    sizes get theirs computed on the fly (a handful of small tensor ops, no per-window loop).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        resolution: tuple[int, int],
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
    ) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads,
                window_size,
                shift=i % 2 == 1,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i],
            )
            for i in range(depth)
        )
        self.has_shift = any(blk.shift for blk in self.blocks)
        self.plan_resolution = tuple(resolution)
        plan = self._plan(*resolution)
        for name in ShiftedWindows._fields:
            self.register_buffer(f"shift_{name}", None if plan is None else getattr(plan, name), persistent=False)

    def _plan(self, height: int, width: int) -> ShiftedWindows | None:
        if min(height, width) <= self.window_size or height % self.window_size or width % self.window_size:
            return None
        return shifted_windows(height, width, self.window_size, self.window_size // 2)

    def shifted_windows(self, x: torch.Tensor) -> ShiftedWindows | None:
        """The shifted-window plan for the grid of the (B, H, W, C) map ``x``, on its device, mask in its dtype."""
        height, width = int(x.shape[1]), int(x.shape[2])
        if (height, width) == self.plan_resolution:
            if self.shift_mask is None:
                return None
            plan = ShiftedWindows(self.shift_mask, self.shift_to_shifted, self.shift_to_regular, self.shift_to_spatial)
        else:
            plan = self._plan(height, width)
            if plan is None:
                return None
        return ShiftedWindows(
            plan.mask.to(device=x.device, dtype=x.dtype),
            plan.to_shifted.to(x.device),
            plan.to_regular.to(x.device),
            plan.to_spatial.to(x.device),
        )

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        plan = self.shifted_windows(x) if self.has_shift else None
        x = window_partition(x, self.window_size).view(b, h * w, c)
        in_shifted_order = False
        for blk in self.blocks:
            if blk.shift and plan is not None:
                if not in_shifted_order:
                    x = x.index_select(1, plan.to_shifted)
                    in_shifted_order = True
                x = blk(x, plan.mask)
            else:
                if in_shifted_order and plan is not None:
                    x = x.index_select(1, plan.to_regular)
                    in_shifted_order = False
                x = blk(x, None)
        if in_shifted_order and plan is not None:
            return x.index_select(1, plan.to_spatial).view(b, h, w, c)
        return window_reverse(x.view(-1, self.window_size * self.window_size, c), self.window_size, h, w)


class EncoderStage(SwinStage):
    """Reference ``BasicLayer``: Swin blocks, then optional patch merging."""

    def __init__(self, *args, downsample: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.downsample = PatchMerging(self.dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


class DecoderStage(SwinStage):
    """Reference ``BasicLayer_up``: Swin blocks, then optional patch expanding."""

    def __init__(self, *args, upsample: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.upsample = PatchExpand(self.dim) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return x if self.upsample is None else self.upsample(x)


class PatchEmbed(nn.Module):
    """Conv p x p stride p (in -> embed_dim), LayerNorm; returns (B, H/p, W/p, embed_dim).

    The convolution is computed as what it is, a Linear on non-overlapping p x p patches, which gives channels-last
    tokens directly (the NCHW output of the conv needed a copy before the LayerNorm, and another in its backward).
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h // p, w // p, c * p * p)
        return self.norm(F.linear(patches, self.proj.weight.flatten(1), self.proj.bias))


def swin_size_multiple(patch_size: int = 4, num_stages: int = 4, window_size: int = 7) -> int:
    """The multiple an input side must be: every stage's grid (H/p, H/2p, ..., H/(p 2^(n-1))) holds whole windows
    (224 for the published configuration)."""
    return patch_size * 2 ** (num_stages - 1) * window_size


class SwinUnet(nn.Module):
    """Swin-Unet; forward maps (B, in_channels, H, W) to logits (B, out_channels, H, W), H and W multiples of 224.

    Defaults are the configuration of the paper (Swin-T encoder, "lite" decoder of 2 blocks per stage, drop-path 0.2,
    no absolute position embedding, "expand_first" x4 head).

    Args:
        in_channels: input channels (1 or 3; pretrained patch-embedding weights need 3).
        out_channels: number of classes (logits).
        img_size: the size the model is mainly used at; only decides which shift masks are precomputed.
        pretrained_path: optional local ImageNet Swin-T checkpoint, loaded with :func:`load_swin_pretrained`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 2,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 4,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.2,
        pretrained_path: str | None = None,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"SwinUnet takes 1 (grayscale) or 3 (RGB) input channels, got in_channels={in_channels}")
        if out_channels < 1:
            raise ValueError(f"SwinUnet needs out_channels >= 1, got {out_channels}")
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have the same length")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_layers = n = len(depths)
        self.patch_size = patch_size
        self.window_size = window_size
        self.total_stride = patch_size * 2 ** (n - 1)
        self.size_multiple = swin_size_multiple(patch_size, n, window_size)
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        grid = (img_h // patch_size, img_w // patch_size)
        dims = [embed_dim * 2**i for i in range(n)]
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()

        def stage_kwargs(i: int) -> dict:
            return dict(
                dim=dims[i],
                depth=depths[i],
                num_heads=num_heads[i],
                window_size=window_size,
                resolution=(grid[0] // 2**i, grid[1] // 2**i),
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
            )

        self.patch_embed = PatchEmbed(in_channels, embed_dim, patch_size)
        self.pos_drop = nn.Dropout(drop_rate)
        self.layers = nn.ModuleList(EncoderStage(**stage_kwargs(i), downsample=i < n - 1) for i in range(n))
        self.norm = nn.LayerNorm(dims[-1])

        # decoder level k mirrors encoder stage n-1-k; level 0 only expands the bottleneck
        self.layers_up = nn.ModuleList([PatchExpand(dims[-1])])
        self.concat_back_dim = nn.ModuleList([nn.Identity()])
        for k in range(1, n):
            i = n - 1 - k
            self.layers_up.append(DecoderStage(**stage_kwargs(i), upsample=k < n - 1))
            self.concat_back_dim.append(nn.Linear(2 * dims[i], dims[i]))
        self.norm_up = nn.LayerNorm(embed_dim)
        self.up = FinalPatchExpandX4(embed_dim)
        self.output = nn.Conv2d(embed_dim, out_channels, kernel_size=1, bias=False)

        self._init_weights()
        if pretrained_path is not None:
            load_swin_pretrained(self, pretrained_path)

    def _init_weights(self) -> None:
        """As the reference: trunc-normal(std .02) Linear weights and relative position bias tables, zero biases,
        unit LayerNorms; convolutions keep PyTorch's default."""
        for m in self.modules():
            if not init_linear_and_norm(m) and isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError for inputs this network cannot take (a user error, not an internal one)."""
        why = (
            f" (the token grid of every stage, H/{self.patch_size} to H/{self.total_stride}, must be divisible by "
            f"the window {self.window_size})"
        )
        check_image_batch(x, "SwinUnet", self.in_channels, self.size_multiple, why)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encoder: returns the normalised bottleneck and the input of every stage (the skips)."""
        x = self.pos_drop(self.patch_embed(x))
        skips = []
        for layer in self.layers:
            skips.append(x)
            x = layer(x)
        return self.norm(x), skips

    def forward_up_features(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Decoder: expand, concatenate the mirrored skip, reduce, Swin blocks; returns (B, H/4, W/4, embed_dim)."""
        for k, (concat_back, layer_up) in enumerate(zip(self.concat_back_dim, self.layers_up)):
            if k > 0:
                x = concat_back(torch.cat([x, skips[self.num_layers - 1 - k]], dim=-1))
            x = layer_up(x)
        return self.norm_up(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or not _exporting():
            self.check_input(x)
        x, skips = self.forward_features(x)
        # the 1x1 output conv as a matmul on each output pixel's features, then the x4 pixel shuffle of the logits
        logits = self.up.classify(self.forward_up_features(x, skips), self.output.weight.flatten(1))
        b, h, w = logits.shape[0], logits.shape[1], logits.shape[2]
        logits = logits.view(b, h, w, 4, 4, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return logits.reshape(b, self.out_channels, 4 * h, 4 * w)


# ---------------------------------------------------------------------------------------------------------------------
# ImageNet Swin-T checkpoints (official Microsoft or timm key names) -> SwinUnet


_PREFIXES = ("module.", "swin_unet.", "model.", "backbone.", "encoder.")


def _unwrap_state_dict(obj: object, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a Swin checkpoint: expected a dict of tensors, optionally under 'model'")
    state = dict(obj)
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def official_swin_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename timm (>= 0.9) Swin keys to the official layout; official keys pass through unchanged.

    timm puts patch merging at the start of the next stage (``layers.{i+1}.downsample``, official ``layers.{i}``)
    and calls the classifier ``head.fc``. A file is taken as timm-style when it has no stage-0 downsample but has a
    downsample elsewhere, or has ``head.fc.*``.
    """
    downs = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.downsample\.", k))}
    timm_layout = (bool(downs) and 0 not in downs) or any(k.startswith("head.fc.") for k in state)
    if not timm_layout:
        return dict(state)
    out = {}
    for k, v in state.items():
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
        out[re.sub(r"^head\.fc\.", "head.", k)] = v
    return out


def load_swin_pretrained(model: SwinUnet, path: str | os.PathLike) -> tuple[int, int]:
    """Load a local ImageNet Swin-T checkpoint into ``model`` the way Swin-Unet's ``load_from`` does.

    Encoder tensors are copied by name; each decoder stage ``layers_up.k`` also takes the Swin-block tensors of the
    mirrored encoder stage ``layers.(n-1-k)``. Tensors whose shape differs from the model's, or that have no
    counterpart (classifier head, ``attn_mask``, ``relative_position_index``), are skipped.

    Returns:
        (loaded, skipped): model tensors that were set, and checkpoint tensors that were used nowhere.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Swin pretrained checkpoint not found: {path}")
    state = official_swin_names(_unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True), path))
    own = model.state_dict()
    n = model.num_layers

    # candidate target key -> source key; keys of the file itself first, mirrors only where the file has none
    sources: dict[str, str] = {k: k for k in state}
    for k in state:
        m = re.match(r"layers\.(\d+)\.(.+)$", k)
        if m:
            sources.setdefault(f"layers_up.{n - 1 - int(m.group(1))}.{m.group(2)}", k)

    to_load: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    mismatched: list[str] = []
    for target, source in sources.items():
        if target not in own:
            continue
        if own[target].shape != state[source].shape:
            mismatched.append(f"{source} {tuple(state[source].shape)} -> {target} {tuple(own[target].shape)}")
            continue
        to_load[target] = state[source]
        used.add(source)
    model.load_state_dict(to_load, strict=False)

    skipped = sorted(set(state) - used)
    logger.info(
        "Swin pretrained weights from %s: %d tensors loaded (%d into the decoder), %d skipped",
        path,
        len(to_load),
        sum(k.startswith("layers_up.") for k in to_load),
        len(skipped),
    )
    if mismatched:
        logger.info("shape mismatches skipped: %s", "; ".join(mismatched))
    logger.debug("skipped checkpoint tensors: %s", ", ".join(skipped))
    return len(to_load), len(skipped)
