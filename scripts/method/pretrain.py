"""Self-supervised start for the Swin-Unet when no ImageNet Swin-T file is at hand: masked-image modelling (SimMIM).

The authors' Swin-Unet and its EMA teacher start from ImageNet Swin-T weights (their ``load_from``). Where that file
is not available, this pretrains the same encoder on the training images of the prepared split (labelled and
unlabelled alike; never validation or test) the way SimMIM does (Xie et al., CVPR 2022): random 32 x 32 patches
(``mask_ratio`` of them) are replaced by a learnt mask token after the patch embedding, the encoder runs as in
the Swin-Unet, a one-layer head (1 x 1 conv to 32 x 32 x C values, pixel shuffle) predicts the raw pixels, and the
loss is the L1 error on the masked pixels only. The written file holds the encoder's tensors under the official
Swin names (``{"model": {...}}``), so ``swin_pretrained_path`` loads it like an ImageNet file: encoder by name,
each decoder stage from its mirrored encoder stage, the EMA teacher copied from the student as in the authors' code.

    python -m scripts.method.pretrain --dataset_dir data/phantom_benchmark --prepared_dir data/prepared_benchmark \
        --output models/swin_simmim.pt --iterations 300
    python -m monai.bundle run --config_file "['configs/train.json','configs/evidence_recipe.json']" \
        --swin_pretrained_path models/swin_simmim.pt

The data pipeline is MONAI's (the same loading, channel and intensity steps as training); the masking, the head
and the loop are written here because MONAI ships no masked-image-modelling component for a 2D Swin encoder.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    RandFlipd,
    RandRotated,
    Resized,
    ScaleIntensityRanged,
)
from torch import nn
from tqdm import tqdm

from scripts.data.transforms import AsChannelsd
from scripts.networks import SwinUnet
from scripts.utils.files import write_atomic

__all__ = ["SimMIM", "ENCODER_PREFIXES", "random_patch_mask", "pretrain"]

logger = logging.getLogger(__name__)

ENCODER_PREFIXES = ("patch_embed.", "layers.", "norm.")  # the Swin-T encoder inside SwinUnet, official names
MASK_PATCH = 32  # SimMIM's mask patch: the encoder's total stride, so each masked patch is one bottleneck token


def random_patch_mask(batch: int, grid: tuple[int, int], ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(batch, gh, gw) booleans, exactly round(ratio * gh * gw) True per image, chosen uniformly."""
    n = grid[0] * grid[1]
    k = int(round(ratio * n))
    order = torch.rand(batch, n, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask.view(batch, *grid)


class SimMIM(nn.Module):
    """A SwinUnet's encoder with a mask token and SimMIM's one-layer pixel head; forward returns the L1 loss."""

    def __init__(self, swin: SwinUnet) -> None:
        super().__init__()
        self.swin = swin
        embed_dim = swin.patch_embed.proj.out_channels
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        stride = swin.total_stride
        self.head = nn.Sequential(
            nn.Conv2d(swin.norm.normalized_shape[0], stride**2 * swin.in_channels, 1), nn.PixelShuffle(stride)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) images; mask: (B, H/32, W/32) booleans, True = hidden. Mean L1 over hidden pixels."""
        swin = self.swin
        tokens = swin.patch_embed(x)  # (B, H/4, W/4, D)
        per_token = swin.total_stride // swin.patch_size
        hidden = mask.repeat_interleave(per_token, 1).repeat_interleave(per_token, 2)[..., None].to(tokens.dtype)
        tokens = tokens * (1 - hidden) + self.mask_token.to(tokens.dtype) * hidden
        tokens = swin.pos_drop(tokens)
        for layer in swin.layers:
            tokens = layer(tokens)
        features = swin.norm(tokens).permute(0, 3, 1, 2)  # (B, 8D, H/32, W/32)
        reconstruction = self.head(features)
        pixel_mask = mask.repeat_interleave(swin.total_stride, 1).repeat_interleave(swin.total_stride, 2)
        pixel_mask = pixel_mask[:, None].expand_as(x).to(x.dtype)
        return (F.l1_loss(reconstruction, x, reduction="none") * pixel_mask).sum() / pixel_mask.sum().clamp(min=1)

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The encoder tensors under the official Swin names (what :func:`load_swin_pretrained` maps)."""
        return {k: v.detach().clone() for k, v in self.swin.state_dict().items() if k.startswith(ENCODER_PREFIXES)}


def _training_images(prepared_dir: Path) -> list[dict]:
    datalist = json.loads((prepared_dir / "datalist.json").read_text())
    items = [{"image": i["image"]} for key in ("labeled", "unlabeled") for i in datalist.get(key, [])]
    if not items:
        raise ValueError(f"{prepared_dir / 'datalist.json'} lists no training image to pretrain on")
    return items


def pretrain(
    dataset_dir: str | None = None,
    prepared_dir: str = "data/prepared",
    output: str = "models/swin_simmim.pt",
    iterations: int = 300,
    batch_size: int = 8,
    learning_rate: float = 5e-4,
    weight_decay: float = 0.05,
    mask_ratio: float = 0.6,
    spatial_size: int = 224,
    in_channels: int = 3,
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
    labeled_fraction: float = 0.25,
    labeled_count: int | None = None,
    max_train_images: int | None = None,
    layout: str | None = None,
    pixel_size_mm: float | None = None,
) -> str:
    """Pretrain the Swin-Unet encoder by masked-image modelling on the split's training images; write ``output``.

    ``dataset_dir``: when given, the split is (re)made first with :func:`scripts.data.prepare_dataset` into
    ``prepared_dir`` with the split options (``labeled_fraction``, ``labeled_count``, ``max_train_images``,
    ``layout``, ``pixel_size_mm``: give the training run's, e.g. ``labeled_count=25, max_train_images=500``, so that
    it reuses the same split); else ``prepared_dir`` must already hold a datalist. AdamW with a linear warm-up over
    the first 10 % and a cosine decay, as SimMIM. Returns the checkpoint's path. ``output`` is written atomically,
    only when training completes.
    """
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be between 0 and 1, got {mask_ratio}")
    if iterations < 1 or batch_size < 1:
        raise ValueError(f"iterations and batch_size must be >= 1, got {iterations} and {batch_size}")
    if spatial_size % 224:
        raise ValueError(f"spatial_size must be a multiple of 224 (the Swin-Unet's windows), got {spatial_size}")
    prepared = Path(prepared_dir)
    if dataset_dir is not None:
        from scripts.data import prepare_dataset

        prepare_dataset(
            dataset_dir,
            prepared,
            seed=seed,
            generate_phantom_if_empty=False,
            labeled_fraction=labeled_fraction,
            labeled_count=labeled_count,
            max_train_images=max_train_images,
            layout=layout,
            pixel_size_mm=pixel_size_mm,
        )
    else:
        split = {
            "labeled_count": labeled_count,
            "max_train_images": max_train_images,
            "layout": layout,
            "pixel_size_mm": pixel_size_mm,
        }
        if any(value is not None for value in split.values()):
            raise ValueError(f"split options {sorted(k for k, v in split.items() if v is not None)} need --dataset_dir")
    items = _training_images(prepared)
    torch.manual_seed(seed)
    transform = Compose(
        [
            LoadImaged("image", image_only=True),
            EnsureChannelFirstd("image"),
            ScaleIntensityRanged("image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
            Resized("image", (spatial_size, spatial_size), mode="bilinear", anti_aliasing=True),
            RandRotated("image", range_x=0.35, prob=0.5, padding_mode="zeros"),
            RandFlipd("image", prob=0.5, spatial_axis=0),
            AsChannelsd("image", channels=in_channels),
            EnsureTyped("image", dtype=torch.float32, track_meta=False),
        ]
    )
    transform.set_random_state(seed=seed)
    loader = DataLoader(
        Dataset(items, transform),
        batch_size=min(batch_size, len(items)),
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    model = SimMIM(SwinUnet(in_channels=in_channels, out_channels=2, img_size=spatial_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    warmup = max(1, iterations // 10)
    schedule = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, iterations - warmup)),
        ],
        milestones=[warmup],
    )
    masks = torch.Generator().manual_seed(seed)
    grid = (spatial_size // MASK_PATCH, spatial_size // MASK_PATCH)
    history = []
    start = time.perf_counter()
    bar = tqdm(total=iterations, desc="SimMIM pretraining", unit="it", disable=not progress)
    model.train()
    while len(history) < iterations:
        for batch in loader:
            x = batch["image"]
            loss = model(x, random_patch_mask(x.shape[0], grid, mask_ratio, masks))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            history.append(loss.item())
            bar.update(1)
            bar.set_postfix(l1=f"{history[-1]:.4f}")
            if len(history) == iterations:
                break
    bar.close()
    seconds = time.perf_counter() - start
    checkpoint = {
        "model": model.encoder_state(),
        "simmim": {
            "iterations": iterations,
            "batch_size": batch_size,
            "mask_ratio": mask_ratio,
            "spatial_size": spatial_size,
            "images": len(items),
            "seconds": round(seconds, 1),
            "l1_first": history[0],
            "l1_last": history[-1],
            "l1_last10_mean": sum(history[-10:]) / len(history[-10:]),
        },
    }
    write_atomic(output, lambda f: torch.save(checkpoint, f), binary=True)
    logger.info(
        "SimMIM: %d iterations on %d images in %.0f s, L1 %.4f -> %.4f; encoder written to %s",
        iterations,
        len(items),
        seconds,
        history[0],
        history[-1],
        output,
    )
    return str(output)


if __name__ == "__main__":
    from scripts.utils.cli import main

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    main(pretrain, __doc__, prog="python -m scripts.method.pretrain")
