"""The self-supervised (SimMIM) start for the Swin-Unet: masks, the command, and a checkpoint that loads."""

from __future__ import annotations

import pytest
import torch

from scripts.data import generate_phantom, prepare_dataset
from scripts.method.pretrain import ENCODER_PREFIXES, SimMIM, pretrain, random_patch_mask
from scripts.networks import SwinUnet, load_swin_pretrained


def test_random_patch_mask_hides_the_asked_share_of_each_image():
    mask = random_patch_mask(4, (7, 7), 0.6, torch.Generator().manual_seed(0))
    assert mask.shape == (4, 7, 7)
    assert mask.flatten(1).sum(1).tolist() == [round(0.6 * 49)] * 4
    assert not torch.equal(mask[0], mask[1])


def test_simmim_loss_counts_only_hidden_pixels():
    torch.manual_seed(0)
    model = SimMIM(SwinUnet(in_channels=1, img_size=224)).eval()  # no drop-path noise between the two passes
    x = torch.rand(1, 1, 224, 224)
    mask = torch.zeros(1, 7, 7, dtype=torch.bool)
    mask[0, 0, 0] = True
    loss = model(x, mask)
    loss.backward()
    # by hand: the head's reconstruction against x over the one hidden 32 x 32 patch
    with torch.no_grad():
        swin = model.swin
        tokens = swin.patch_embed(x)
        tokens[:, :8, :8] = model.mask_token
        for layer in swin.layers:
            tokens = layer(tokens)
        rec = model.head(swin.norm(tokens).permute(0, 3, 1, 2))
        expected = (rec - x)[..., :32, :32].abs().mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


@pytest.mark.slow
def test_pretrain_command_writes_an_encoder_that_loads_completely(tmp_path):
    dataset = tmp_path / "phantom"
    generate_phantom(dataset, num_subjects=8, image_size=(256, 192), seed=1, progress=False)
    prepared = tmp_path / "prepared"
    prepare_dataset(dataset, prepared, labeled_count=2, seed=0, progress=False)
    out = pretrain(
        prepared_dir=str(prepared), output=str(tmp_path / "swin_simmim.pt"), iterations=2, batch_size=2, progress=False
    )
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["simmim"]["iterations"] == 2
    encoder = checkpoint["model"]

    model = SwinUnet(in_channels=3, out_channels=2, img_size=224)
    own_encoder = [k for k in model.state_dict() if k.startswith(ENCODER_PREFIXES)]
    assert sorted(encoder) == sorted(own_encoder)  # every encoder tensor is in the file, nothing else
    mirrored = [
        k
        for k in model.state_dict()
        if k.startswith("layers_up.")
        and f"layers.{model.num_layers - 1 - int(k.split('.')[1])}.{k.split('.', 2)[2]}" in encoder
    ]
    loaded, skipped = load_swin_pretrained(model, out)
    assert (loaded, skipped) == (len(own_encoder) + len(mirrored), 0)
    for k in own_encoder:
        assert torch.equal(model.state_dict()[k], encoder[k]), k
    # the network of train.json takes it through swin_pretrained_path (the EMA teacher deep-copies that network)
    configured = SwinUnet(in_channels=3, out_channels=2, img_size=224, pretrained_path=out)
    assert torch.equal(configured.state_dict()["patch_embed.proj.weight"], encoder["patch_embed.proj.weight"])


def test_pretrain_refuses_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="mask_ratio"):
        pretrain(prepared_dir=str(tmp_path), mask_ratio=1.5)
    with pytest.raises(ValueError, match="multiple of 224"):
        pretrain(prepared_dir=str(tmp_path), spatial_size=200)
