"""Tests of the two networks (UNeXt, Swin-Unet) and the Swin-T checkpoint mapping.

Expectations come from outside the code under test: the published parameter counts, the reference implementations'
own formulas (re-written here in their original form), and checkpoint files built here whose tensors are known.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath

from scripts.networks import SwinUnet, UNeXt, load_swin_pretrained
from scripts.networks.swin_unet import (
    EncoderStage,
    WindowAttention,
    shifted_window_mask,
    shifted_windows,
    window_partition,
    window_reverse,
)
from scripts.networks.unext import shift_tokens

# published parameter counts (UNeXt official code; Swin-Unet lite config as used by the paper)
UNEXT_PARAMS = {1: 1_471_921, 2: 1_471_938, 3: 1_471_955}
SWIN_UNET_PARAMS_2_CLASSES = 27_168_228
TOL = 1e-4


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def swin() -> SwinUnet:
    torch.manual_seed(0)
    return SwinUnet().eval()


@pytest.fixture(scope="module")
def unext() -> UNeXt:
    torch.manual_seed(0)
    model = UNeXt()
    # non-trivial BatchNorm statistics so that eval mode is really exercised
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


# --------------------------------------------------------------------------------------------------- architecture


@pytest.mark.parametrize("classes", [1, 2, 3])
def test_unext_parameter_count_matches_published(classes):
    assert n_params(UNeXt(in_channels=3, out_channels=classes)) == UNEXT_PARAMS[classes]


def test_swin_unet_parameter_count_matches_published(swin):
    assert n_params(swin) == SWIN_UNET_PARAMS_2_CLASSES


def test_single_channel_unext_only_changes_first_layer():
    # 1 input channel removes 2 * (16 * 3 * 3) weights from the first conv
    assert n_params(UNeXt(1, 2)) == UNEXT_PARAMS[2] - 2 * 16 * 9


@pytest.mark.parametrize("in_channels", [1, 3])
def test_unext_output_shape_non_square_batch2(in_channels):
    model = UNeXt(in_channels=in_channels, out_channels=3).eval()
    with torch.no_grad():
        out = model(torch.rand(2, in_channels, 64, 96))
    assert out.shape == (2, 3, 64, 96)
    assert torch.isfinite(out).all()


def test_swin_unet_output_shapes(swin):
    with torch.no_grad():
        assert swin(torch.rand(1, 3, 224, 224)).shape == (1, 2, 224, 224)
        out = swin(torch.rand(1, 3, 224, 448))
    assert out.shape == (1, 2, 224, 448)
    assert torch.isfinite(out).all()


def test_swin_unet_single_channel_three_classes():
    model = SwinUnet(in_channels=1, out_channels=3).eval()
    # 2 * (96 * 4 * 4) fewer embedding weights, one more 96-weight output kernel
    assert n_params(model) == SWIN_UNET_PARAMS_2_CLASSES - 2 * 96 * 16 + 96
    with torch.no_grad():
        assert model(torch.rand(1, 1, 224, 224)).shape == (1, 3, 224, 224)


def test_unext_rejects_bad_size_with_clear_message(unext):
    with pytest.raises(ValueError, match=r"multiples of 32.*250x256"):
        unext(torch.rand(1, 3, 250, 256))


def test_swin_unet_rejects_bad_size_with_clear_message(swin):
    with pytest.raises(ValueError, match=r"multiples of 224.*256x256"):
        swin(torch.rand(1, 3, 256, 256))


@pytest.mark.parametrize("network", [UNeXt, SwinUnet])
def test_bad_in_channels_rejected(network):
    with pytest.raises(ValueError, match="in_channels=2"):
        network(in_channels=2)


def test_wrong_channel_count_at_forward_is_reported(unext):
    with pytest.raises(ValueError, match="3 input channel"):
        unext(torch.rand(1, 1, 64, 64))


# ------------------------------------------------------------------------------ building blocks vs reference formulas


def reference_shift(x_nchw: torch.Tensor, dim: int, shift_size: int = 5) -> torch.Tensor:
    """The official shiftmlp's shift: pad by 2, chunk channels, torch.roll chunk k by k - 2, narrow back."""
    pad = shift_size // 2
    _, _, h, w = x_nchw.shape
    xn = F.pad(x_nchw, (pad, pad, pad, pad), "constant", 0)
    xs = torch.chunk(xn, shift_size, 1)
    x_cat = torch.cat([torch.roll(c, s, dim) for c, s in zip(xs, range(-pad, pad + 1))], 1)
    return torch.narrow(torch.narrow(x_cat, 2, pad, h), 3, pad, w)


@pytest.mark.parametrize("channels", [5, 128, 256])  # 128 and 256 have an uneven last chunk, as in the network
def test_shift_tokens_matches_reference_pad_roll_narrow(channels):
    x = torch.randn(2, channels, 8, 12)
    for nchw_dim, nhwc_dim in ((2, 1), (3, 2)):
        expected = reference_shift(x, nchw_dim)
        got = shift_tokens(x.permute(0, 2, 3, 1), dim=nhwc_dim).permute(0, 3, 1, 2)
        assert torch.equal(got, expected)


def test_shift_tokens_is_zero_filled_shift():
    x = torch.arange(1.0, 7.0).view(1, 6, 1, 1).repeat(1, 1, 1, 5)  # (B, H=6, W=1, C=5): value = row index + 1
    out = shift_tokens(x, dim=1)
    for k in range(5):
        shift = k - 2
        expected = torch.tensor([i - shift + 1.0 if 0 <= i - shift < 6 else 0.0 for i in range(6)])
        assert torch.equal(out[0, :, 0, k], expected)


def reference_shift_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """The official SwinTransformerBlock's mask: label 9 regions with loops, partition, compare, fill -100."""
    img_mask = torch.zeros((1, h, w, 1))
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img_mask[:, hs, wsl, :] = cnt
            cnt += 1
    mw = window_partition(img_mask, ws).view(-1, ws * ws)
    diff = mw.unsqueeze(1) - mw.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


@pytest.mark.parametrize("h,w", [(56, 56), (14, 28), (28, 14)])
def test_shift_mask_matches_reference_loop(h, w):
    assert torch.equal(shifted_window_mask(h, w, 7, 3), reference_shift_mask(h, w, 7, 3))


# ------------------------------------------------ fast Swin-Unet blocks vs the official code, written the textbook way
# Plain transcriptions of github.com/HuCaoFighting/Swin-Unet (swin_transformer_unet_skip_expand_decoder_sys.py),
# applied to our modules' parameters: the network's fast paths must give the same outputs and gradients.

FAST_ATOL = 1e-5  # outputs (of order 1, sums of a few hundred fp32 products)
# gradients, relative to each gradient's largest entry: a weight's gradient sums over every pixel of the batch (up to
# 10^5 fp32 terms, added in another order by the fast path)
FAST_GRAD_RTOL = 5e-5


def ref_window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, ws, ws, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)


def ref_window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """(B * nW, ws, ws, C) -> (B, H, W, C)."""
    b = int(windows.shape[0] / (h * w / ws / ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


def ref_relative_position_index(ws: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid([torch.arange(ws), torch.arange(ws)], indexing="ij"))
    coords_flatten = torch.flatten(coords, 1)
    relative_coords = (coords_flatten[:, :, None] - coords_flatten[:, None, :]).permute(1, 2, 0).contiguous()
    relative_coords[:, :, 0] += ws - 1
    relative_coords[:, :, 1] += ws - 1
    relative_coords[:, :, 0] *= 2 * ws - 1
    return relative_coords.sum(-1)


def ref_window_attention(m: WindowAttention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Official WindowAttention.forward on m's parameters; x (B * nW, N, C), mask (nW, N, N) or None."""
    b_, n, c = x.shape
    heads = m.num_heads
    qkv = m.qkv(x).reshape(b_, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (c // heads) ** -0.5
    attn = q @ k.transpose(-2, -1)
    bias = m.relative_position_bias_table[ref_relative_position_index(m.window_size).view(-1)].view(n, n, -1)
    attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        attn = attn.view(b_ // nw, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, n, n)
    attn = torch.softmax(attn, dim=-1)
    return m.proj((attn @ v).transpose(1, 2).reshape(b_, n, c))


def ref_swin_block(blk, x: torch.Tensor, shift_size: int) -> torch.Tensor:
    """Official SwinTransformerBlock.forward (drop-path 0) on a (B, H, W, C) map: roll, partition, attend, reverse."""
    b, h, w, c = x.shape
    ws = blk.window_size
    shortcut = x
    x = blk.norm1(x)
    mask = reference_shift_mask(h, w, ws, shift_size) if shift_size > 0 else None
    if shift_size > 0:
        x = torch.roll(x, shifts=(-shift_size, -shift_size), dims=(1, 2))
    windows = ref_window_partition(x, ws).view(-1, ws * ws, c)
    windows = ref_window_attention(blk.attn, windows, mask).view(-1, ws, ws, c)
    x = ref_window_reverse(windows, ws, h, w)
    if shift_size > 0:
        x = torch.roll(x, shifts=(shift_size, shift_size), dims=(1, 2))
    x = shortcut + x
    return x + blk.mlp(blk.norm2(x))


def ref_swin_blocks(stage, x: torch.Tensor) -> torch.Tensor:
    """Official BasicLayer's blocks: shift window // 2 on odd blocks, none where the grid is one window."""
    ws = stage.window_size
    for i, blk in enumerate(stage.blocks):
        shift = 0 if i % 2 == 0 or min(x.shape[1], x.shape[2]) <= ws else ws // 2
        x = ref_swin_block(blk, x, shift)
    return x


def ref_patch_merging(m, x: torch.Tensor) -> torch.Tensor:
    x0, x1, x2, x3 = x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]
    return m.reduction(m.norm(torch.cat([x0, x1, x2, x3], -1)))


def ref_pixel_shuffle(x: torch.Tensor, s: int) -> torch.Tensor:
    """einops 'b h w (p1 p2 c) -> b (h p1) (w p2) c', written with loops over p1, p2."""
    b, h, w, cc = x.shape
    c = cc // (s * s)
    out = x.new_empty(b, h * s, w * s, c)
    for p1 in range(s):
        for p2 in range(s):
            out[:, p1::s, p2::s] = x[..., (p1 * s + p2) * c : (p1 * s + p2 + 1) * c]
    return out


def ref_swin_unet(model: SwinUnet, x: torch.Tensor) -> torch.Tensor:
    """Official SwinTransformerSys.forward (encoder, decoder with skips, x4 expand, 1x1 conv) on model's weights."""
    b = x.shape[0]
    t = model.patch_embed.proj(x)  # conv p x p stride p
    hp, wp = t.shape[2], t.shape[3]
    t = model.patch_embed.norm(t.flatten(2).transpose(1, 2)).view(b, hp, wp, -1)
    skips = []
    for layer in model.layers:
        skips.append(t)
        t = ref_swin_blocks(layer, t)
        if layer.downsample is not None:
            t = ref_patch_merging(layer.downsample, t)
    t = model.norm(t)
    for k, layer_up in enumerate(model.layers_up):
        if k == 0:
            t = layer_up.norm(ref_pixel_shuffle(layer_up.expand(t), 2))
            continue
        t = model.concat_back_dim[k](torch.cat([t, skips[model.num_layers - 1 - k]], -1))
        t = ref_swin_blocks(layer_up, t)
        if layer_up.upsample is not None:
            t = layer_up.upsample.norm(ref_pixel_shuffle(layer_up.upsample.expand(t), 2))
    t = model.norm_up(t)
    t = model.up.norm(ref_pixel_shuffle(model.up.expand(t), 4))
    return model.output(t.permute(0, 3, 1, 2).contiguous())


def outputs_and_grads(fn, module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor):
    """fn(x)'s output and the gradients of <fn(x), g> for x and every parameter of module."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    y.backward(g)
    grads = {"input": x.grad.clone()} | {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return y.detach(), grads


def assert_same_function(fast, reference, module, x):
    """Same output (FAST_ATOL) and same gradients (FAST_GRAD_RTOL) for x and every parameter of module."""
    with torch.no_grad():
        g = torch.randn_like(reference(x))
    g /= g.numel() ** 0.5  # the gradient of a loss averaged over the output, in scale
    y_fast, grads_fast = outputs_and_grads(fast, module, x, g)
    y_ref, grads_ref = outputs_and_grads(reference, module, x, g)
    torch.testing.assert_close(y_fast, y_ref, rtol=0, atol=FAST_ATOL)
    assert grads_fast.keys() == grads_ref.keys()
    for name, expected in grads_ref.items():
        tol = FAST_GRAD_RTOL * max(1e-3, float(expected.abs().max()))
        torch.testing.assert_close(grads_fast[name], expected, rtol=0, atol=tol, msg=lambda m: f"{name}: {m}")


def test_window_partition_and_reverse_match_reference():
    x = torch.randn(2, 14, 28, 5)
    windows = window_partition(x, 7)
    assert torch.equal(windows, ref_window_partition(x, 7).view(-1, 49, 5))
    assert torch.equal(window_reverse(windows, 7, 14, 28), x)
    one = torch.randn(3, 7, 7, 4)  # a grid of one window: a view, no copy
    assert window_partition(one, 7).data_ptr() == one.data_ptr()


@pytest.mark.parametrize("h,w", [(56, 56), (14, 28), (28, 14)])
def test_shifted_window_orders_are_the_reference_roll_and_partition(h, w):
    x = torch.randn(2, h, w, 3)
    plan = shifted_windows(h, w, 7, 3)
    regular = window_partition(x, 7).reshape(2, h * w, 3)
    shifted = ref_window_partition(torch.roll(x, shifts=(-3, -3), dims=(1, 2)), 7).reshape(2, h * w, 3)
    assert torch.equal(regular.index_select(1, plan.to_shifted), shifted)
    assert torch.equal(shifted.index_select(1, plan.to_regular), regular)
    assert torch.equal(shifted.index_select(1, plan.to_spatial).view(2, h, w, 3), x)
    assert torch.equal(plan.mask, reference_shift_mask(h, w, 7, 3))


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("mode", ["train", "no_grad", "frozen_bias"])
def test_window_attention_matches_reference(shifted, mode):
    """Both paths: written out (trained bias) and fused scaled_dot_product_attention (bias needs no gradient)."""
    torch.manual_seed(0)
    m = WindowAttention(dim=48, window_size=7, num_heads=3)
    torch.nn.init.normal_(m.relative_position_bias_table, std=0.5)
    nw = 8
    mask = reference_shift_mask(14, 28, 7, 3) if shifted else None
    assert mask is None or mask.shape[0] == nw
    x = torch.randn(2 * nw, 49, 48)
    if mode == "no_grad":
        with torch.no_grad():
            torch.testing.assert_close(m(x, mask), ref_window_attention(m, x, mask), rtol=0, atol=FAST_ATOL)
        return
    if mode == "frozen_bias":  # e.g. fine-tuning with a frozen table: the fused path, gradients for x and the rest
        m.relative_position_bias_table.requires_grad_(False)
    assert_same_function(lambda t: m(t, mask), lambda t: ref_window_attention(m, t, mask), m, x)


@pytest.mark.parametrize("grid", [(28, 28), (14, 28), (7, 7)])
def test_swin_stage_matches_reference_blocks(grid):
    torch.manual_seed(0)
    stage = EncoderStage(
        dim=24,
        depth=4,
        num_heads=2,
        window_size=7,
        resolution=(28, 28),
        mlp_ratio=4.0,
        qkv_bias=True,
        drop=0.0,
        attn_drop=0.0,
        drop_path=[0.0] * 4,
        downsample=False,
    )
    for blk in stage.blocks:
        torch.nn.init.normal_(blk.attn.relative_position_bias_table, std=0.5)
    x = torch.randn(2, *grid, 24)
    assert_same_function(stage.forward_blocks, lambda t: ref_swin_blocks(stage, t), stage, x)


def saved_bytes(storages: dict):
    """A context in which autograd's saved tensors are recorded in ``storages`` (storage address -> bytes)."""

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


@pytest.mark.parametrize("amp", [False, True])
def test_swin_block_recomputation_is_bit_exact_and_keeps_less(monkeypatch, amp):
    """Training recomputes the LayerNorms' and the GELU's outputs in the backward pass: gradients equal the plain
    block's bit for bit (also under bf16 autocast), and in fp32 what the forward keeps shrinks by each block's two
    (B, L, C) LayerNorm outputs with their (B, L) means and inverse deviations, and its (B, L, 4C) GELU output."""
    from scripts.networks.swin_unet import SwinBlock

    torch.manual_seed(0)
    b, length, c = 2, 4 * 49, 24
    blocks = torch.nn.ModuleList(SwinBlock(c, 2, 7, shift=i % 2 == 1, drop_path=0.1) for i in range(2)).train()
    x = torch.randn(b, length, c)
    g = torch.randn(b, length, c)

    def run(grads: dict, kept: dict):
        torch.manual_seed(1)  # DropPath's draws
        blocks.zero_grad(set_to_none=True)
        t = x.clone().requires_grad_()
        with saved_bytes(kept), torch.autocast("cpu", torch.bfloat16, enabled=amp):
            y = t
            for blk in blocks:
                y = blk(y)
        y.backward(g)
        grads.update({"x": t.grad, "y": y.detach(), **{n: p.grad for n, p in blocks.named_parameters()}})

    fast, plain, kept_fast, kept_plain = {}, {}, {}, {}
    run(fast, kept_fast)
    monkeypatch.setattr(SwinBlock, "_recomputes", lambda self: False)
    run(plain, kept_plain)
    assert fast.keys() == plain.keys()
    for name in plain:
        assert torch.equal(fast[name], plain[name]), name
    saved = sum(kept_plain.values()) - sum(kept_fast.values())
    assert saved > 0 if amp else saved == len(blocks) * ((2 + 4) * b * length * c + 2 * 2 * b * length) * 4


def test_output_head_recomputation_is_bit_exact_and_keeps_less():
    """The x4 head's classification recomputes the normalised pixels in the backward pass: the same gradients as
    ``F.linear(patches(x), weight)``, bit for bit, without keeping the (B, H, W, 16, C) normalised pixels."""
    from scripts.networks.swin_unet import FinalPatchExpandX4

    torch.manual_seed(0)
    head, weight = FinalPatchExpandX4(8), torch.randn(3, 8, requires_grad=True)
    x = torch.randn(2, 5, 6, 8)
    g = torch.randn(2, 5, 6, 16, 3)
    results = []
    for classify in (head.classify, lambda t, w: F.linear(head.patches(t), w)):
        head.zero_grad(set_to_none=True)
        weight.grad = None
        t, kept = x.clone().requires_grad_(), {}
        with saved_bytes(kept):
            y = classify(t, weight)
        y.backward(g)
        results.append(([y.detach(), t.grad, weight.grad, *(p.grad for p in head.parameters())], sum(kept.values())))
    (fast, kept_fast), (plain, kept_plain) = results
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))
    assert kept_plain - kept_fast == (2 * 5 * 6 * 16 * 8 + 2 * 2 * 5 * 6 * 16) * 4  # pixels, means, inverse std


def test_output_head_runs_image_by_image_above_the_chunk_size(monkeypatch):
    """Past HEAD_CHUNK_BYTES of expanded pixels the head runs one image at a time, each recomputed in the backward
    pass: the same outputs and gradients (the weight gradients summed image by image) and nothing of the head kept
    but its input."""
    from scripts.networks import swin_unet
    from scripts.networks.swin_unet import FinalPatchExpandX4

    torch.manual_seed(0)
    head, weight = FinalPatchExpandX4(8), torch.randn(3, 8, requires_grad=True)
    x = torch.randn(3, 5, 6, 8)
    g = torch.randn(3, 5, 6, 16, 3)
    results = []
    for chunk_bytes in (swin_unet.HEAD_CHUNK_BYTES, 16 * 5 * 6 * 8 * 4):  # the whole batch, then one image's worth
        monkeypatch.setattr(swin_unet, "HEAD_CHUNK_BYTES", chunk_bytes)
        head.zero_grad(set_to_none=True)
        weight.grad = None
        t, kept = x.clone().requires_grad_(), {}
        with saved_bytes(kept):
            y = head.classify(t, weight)
        y.backward(g)
        results.append(([y.detach(), t.grad, weight.grad, *(p.grad for p in head.parameters())], kept))
    (whole, kept_whole), (by_image, kept_by_image) = results
    for a, b in zip(by_image, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))  # fp32 sums, reordered
    assert sum(kept_whole.values()) >= 3 * 5 * 6 * 16 * 8 * 4  # the batch's expanded pixels
    assert sum(kept_by_image.values()) <= x.numel() * 4 + weight.numel() * 4  # at most the input


@pytest.mark.parametrize("shape", [(2, 3, 224, 224), (1, 3, 224, 448)])
def test_swin_unet_matches_reference_forward_and_gradients(shape):
    torch.manual_seed(0)
    # narrower than the published network (same code paths, a quarter of the width) to keep the test short
    model = SwinUnet(embed_dim=32, num_heads=(1, 2, 4, 8), drop_path_rate=0.0).train()
    for m in model.modules():
        if isinstance(m, WindowAttention):
            torch.nn.init.normal_(m.relative_position_bias_table, std=0.5)
    x = torch.rand(*shape)
    assert_same_function(model, lambda t: ref_swin_unet(model, t), model, x)
    model.eval()
    with torch.no_grad():  # inference: fused attention
        torch.testing.assert_close(model(x), ref_swin_unet(model, x), rtol=0, atol=FAST_ATOL)


def test_drop_path_per_sample_and_identity_in_eval():
    """MONAI's DropPath, which both networks use, as the published blocks' stochastic depth."""
    dp = DropPath(0.5)
    x = torch.ones(64, 3, 4)
    dp.train()
    y = dp(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}  # kept samples rescaled by 1 / (1 - p)
    assert (per_sample == per_sample[:, :1]).all()  # whole samples, not elements
    dp.eval()
    assert torch.equal(dp(x), x)


def test_swin_encoder_runs_once_per_forward(swin):
    calls = {"embed": 0, "stage0": 0, "bottleneck": 0}
    hooks = [
        swin.patch_embed.register_forward_hook(lambda *_: calls.__setitem__("embed", calls["embed"] + 1)),
        swin.layers[0].register_forward_hook(lambda *_: calls.__setitem__("stage0", calls["stage0"] + 1)),
        swin.layers[-1].register_forward_hook(lambda *_: calls.__setitem__("bottleneck", calls["bottleneck"] + 1)),
    ]
    try:
        with torch.no_grad():
            swin(torch.rand(1, 3, 224, 224))
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"embed": 1, "stage0": 1, "bottleneck": 1}


def test_training_step_reaches_every_parameter():
    torch.manual_seed(0)
    for model, size in ((UNeXt(), 64), (SwinUnet(drop_path_rate=0.0), 224)):
        model.train()
        model(torch.rand(1, 3, size, size)).square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not missing, f"{type(model).__name__}: no gradient for {missing[:5]}"


def test_monai_inferers_call_the_network(unext):
    from monai.inferers import SimpleInferer, SlidingWindowInferer

    x = torch.rand(1, 3, 100, 90)  # not a multiple of 32: the sliding window supplies 64x64 patches
    with torch.no_grad():
        out = SlidingWindowInferer(roi_size=(64, 64), sw_batch_size=2, overlap=0.25)(x, unext)
        assert out.shape == (1, 2, 100, 90)
        assert SimpleInferer()(torch.rand(2, 3, 64, 64), unext).shape == (2, 2, 64, 64)


# ------------------------------------------------------------------------------------------------------------ export


def _trace(model: torch.nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from the Python-side input checks
        return torch.jit.trace(model, x, check_trace=False)


def _onnx_session(model: torch.nn.Module, x: torch.Tensor, path, dynamic_axes: dict, dynamo: bool = False):
    ort = pytest.importorskip("onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dims = {axis: torch.export.Dim.DYNAMIC for axis in dynamic_axes["image"]}
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=True,
                opset_version=18,
                input_names=["image"],
                output_names=["pred"],
                dynamic_shapes={"x": dims},
            )
        else:
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["image"],
                output_names=["pred"],
                dynamic_axes=dynamic_axes,
            )
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_unext_torchscript_parity_other_batch_and_size(unext):
    traced = _trace(unext, torch.rand(1, 3, 64, 64))
    scripted = torch.jit.script(unext)
    with torch.no_grad():
        for shape in ((1, 3, 64, 64), (2, 3, 96, 64)):
            x = torch.rand(*shape)
            expected = unext(x)
            assert _max_diff(traced(x), expected) <= TOL
            assert _max_diff(scripted(x), expected) <= TOL
    with pytest.raises(Exception, match="multiples of 32"):  # the scripted model keeps the size check
        scripted(torch.rand(1, 3, 250, 256))


@pytest.mark.parametrize(
    "dynamo",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                not os.environ.get("SCRIPTS_SLOW_TESTS"),
                reason="dynamo ONNX export takes ~30 s; set SCRIPTS_SLOW_TESTS=1",
            ),
        ),
    ],
)
def test_unext_onnx_parity_dynamic_batch_and_size(unext, tmp_path, dynamo):
    axes = {"image": {0: "batch", 2: "height", 3: "width"}, "pred": {0: "batch", 2: "height", 3: "width"}}
    sess = _onnx_session(unext, torch.rand(1, 3, 64, 64), tmp_path / "unext.onnx", axes, dynamo)
    for shape in ((1, 3, 64, 64), (3, 3, 96, 128)):
        x = torch.rand(*shape)
        (pred,) = sess.run(None, {"image": x.numpy()})
        with torch.no_grad():
            assert pred.shape == (shape[0], 2, *shape[2:])
            assert _max_diff(pred, unext(x)) <= TOL


def test_swin_unet_torchscript_and_onnx_parity_224(swin, tmp_path):
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        expected = swin(x)
        assert _max_diff(_trace(swin, x)(x), expected) <= TOL
        assert _max_diff(torch.jit.script(swin)(x), expected) <= TOL
    axes = {"image": {0: "batch"}, "pred": {0: "batch"}}
    sess = _onnx_session(swin, x, tmp_path / "swin.onnx", axes, dynamo=bool(os.environ.get("SCRIPTS_SLOW_TESTS")))
    x2 = torch.rand(2, 3, 224, 224)
    (pred,) = sess.run(None, {"image": x2.numpy()})
    with torch.no_grad():
        assert _max_diff(pred, swin(x2)) <= TOL


# ------------------------------------------------------------------------------------------- Swin-T pretrained weights


def fake_official_swin_t(template: SwinUnet, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Swin-T ImageNet state dict in Microsoft's layout: encoder tensors of a SwinUnet (random values), the
    buffers the official model saves (relative_position_index, attn_mask of shifted blocks), a 1000-class head."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in template.state_dict().items():
        if k.startswith(("patch_embed.", "layers.", "norm.")):
            state[k] = torch.randn(v.shape, generator=g)
    for i, res in enumerate((56, 28, 14, 7)):
        for j in range(2):
            state[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = torch.randint(0, 169, (49, 49))
        if res > 7:
            state[f"layers.{i}.blocks.1.attn_mask"] = torch.zeros((res // 7) ** 2, 49, 49)
    state["head.weight"] = torch.randn(1000, 768, generator=g)
    state["head.bias"] = torch.randn(1000, generator=g)
    return state


def to_timm_layout(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm >= 0.9 naming: downsample at the start of the next stage, head.fc, no non-persistent buffers."""
    out = {}
    for k, v in official.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            continue
        k = re.sub(r"^layers\.(\d)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
        out[k.replace("head.", "head.fc.")] = v
    return out


def expected_counts(model: SwinUnet, file_state: dict) -> tuple[int, int]:
    """Loaded = every encoder tensor of the model + every decoder Swin-block tensor (mirrors have equal shapes);
    skipped = file tensors that are head or buffers."""
    own = model.state_dict()
    encoder = [k for k in own if k.startswith(("patch_embed.", "layers.", "norm."))]
    decoder_blocks = [k for k in own if re.match(r"layers_up\.\d\.blocks\.", k)]
    skipped = [k for k in file_state if k.startswith("head") or k.endswith(("relative_position_index", "attn_mask"))]
    return len(encoder) + len(decoder_blocks), len(skipped)


def assert_loaded_like_swin_unet(model: SwinUnet, official: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    for k, v in official.items():
        if k.startswith(("patch_embed.", "layers.", "norm.")) and k in own:
            assert torch.equal(own[k], v), k
    # decoder stage k mirrors encoder stage 3 - k
    for up, enc in ((1, 2), (2, 1), (3, 0)):
        for name in ("blocks.0.attn.qkv.weight", "blocks.1.attn.relative_position_bias_table", "blocks.1.mlp.fc2.bias"):
            assert torch.equal(own[f"layers_up.{up}.{name}"], official[f"layers.{enc}.{name}"])


def test_load_official_swin_t_checkpoint(swin, tmp_path, caplog):
    official = fake_official_swin_t(swin)
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": official}, path)
    model = SwinUnet()
    untouched = model.concat_back_dim[1].weight.clone()
    with caplog.at_level(logging.INFO, logger="scripts.networks"):
        loaded, skipped = load_swin_pretrained(model, str(path))
    assert (loaded, skipped) == expected_counts(model, official)
    assert_loaded_like_swin_unet(model, official)
    assert torch.equal(model.concat_back_dim[1].weight, untouched)  # no counterpart in Swin-T
    assert f"{loaded} tensors loaded" in caplog.text and f"{skipped} skipped" in caplog.text

    # the constructor path does the same
    model2 = SwinUnet(pretrained_path=str(path))
    assert torch.equal(model2.layers_up[3].blocks[0].attn.qkv.weight, official["layers.0.blocks.0.attn.qkv.weight"])


def test_load_timm_swin_t_checkpoint(swin, tmp_path):
    official = fake_official_swin_t(swin, seed=1)
    timm_state = to_timm_layout(official)
    path = tmp_path / "timm_swin_t.bin"
    torch.save(timm_state, path)  # plain state dict, no "model" key
    model = SwinUnet()
    loaded, skipped = load_swin_pretrained(model, path)
    assert (loaded, skipped) == (expected_counts(model, official)[0], 2)  # only head.fc.weight / head.fc.bias skipped
    assert_loaded_like_swin_unet(model, official)
    assert torch.equal(model.layers[0].downsample.reduction.weight, timm_state["layers.1.downsample.reduction.weight"])
    assert torch.equal(model.layers[2].downsample.norm.bias, timm_state["layers.3.downsample.norm.bias"])


def test_shape_mismatch_is_skipped_not_fatal(swin, tmp_path):
    official = fake_official_swin_t(swin, seed=2)
    path = tmp_path / "swin_t.pth"
    torch.save({"model": official}, path)
    model = SwinUnet(in_channels=1)  # patch embedding takes 1 channel: the RGB kernel does not fit
    before = model.patch_embed.proj.weight.clone()
    loaded, skipped = load_swin_pretrained(model, path)
    full_loaded, full_skipped = expected_counts(swin, official)
    assert (loaded, skipped) == (full_loaded - 1, full_skipped + 1)
    assert torch.equal(model.patch_embed.proj.weight, before)
    assert torch.equal(model.patch_embed.proj.bias, official["patch_embed.proj.bias"])


def test_missing_checkpoint_names_the_path(swin, tmp_path):
    missing = tmp_path / "nowhere" / "swin_tiny.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_swin_pretrained(swin, str(missing))
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        SwinUnet(pretrained_path=str(missing))
