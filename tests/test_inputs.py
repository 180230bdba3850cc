"""Bad input ends in one clear error naming the file or setting; a failed run never replaces models/model.pt."""

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from PIL import Image

from scripts.data.transforms import AsChannelsd, CheckLabelRanged, CheckMinSized
from scripts.method.best_model import BestModelPublisher
from scripts.method.settings import check_training_settings, find_resume_checkpoint

GOOD = dict(
    spatial_size=[224, 224],
    labeled_fraction=0.05,
    labeled_batch_size=1,
    unlabeled_batch_size=4,
    num_classes=2,
    class_names=["background", "head"],
    in_channels=3,
    total_iterations=100,
    val_interval=10,
    weights={"cps_weight": 1.0, "ict_weight": 1.0, "divergence_weight": 1.0},
)


def load(path, key="image"):
    return Compose([LoadImaged(keys=key, image_only=True), EnsureChannelFirstd(keys=key)])({key: str(path)})


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "007_HC.png"
    bad.write_bytes(b"this is not a PNG")
    with pytest.raises(Exception) as err:
        load(bad)
    assert "007_HC.png" in str(err.value) or "007_HC.png" in repr(err.value.__cause__)


def test_label_values_outside_class_range(tmp_path):
    path = tmp_path / "012_HC_mask.png"
    Image.fromarray(np.array([[0, 1], [2, 255]], dtype=np.uint8)).save(path)
    data = load(path, "label")
    with pytest.raises(
        ValueError,
        match=r"012_HC_mask\.png: label values \{2, 255\} are outside the class range "
        r"0\.\.1",
    ):
        CheckLabelRanged(keys="label", num_classes=2)(data)
    assert CheckLabelRanged(keys="label", num_classes=256)(data)  # in range for 256 classes


def test_image_too_small(tmp_path):
    path = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((20, 40), dtype=np.uint8)).save(path)
    with pytest.raises(ValueError, match=r"tiny\.png: image size \(40, 20\) is smaller than the minimum \(32, 32\)"):
        CheckMinSized(keys="image", min_size=(32, 32))(load(path))


def test_as_channels_grey_rgb_rgba(tmp_path):
    grey = {"image": torch.arange(6.0).reshape(1, 2, 3)}
    out = AsChannelsd(keys="image", channels=3)(grey)["image"]
    assert out.shape == (3, 2, 3) and torch.equal(out[2], grey["image"][0])
    rgba = {"image": torch.rand(4, 2, 3)}
    assert AsChannelsd(keys="image", channels=3)(rgba)["image"].shape == (3, 2, 3)
    rgb = {"image": torch.stack([torch.zeros(2, 3), torch.ones(2, 3), 2 * torch.ones(2, 3)])}
    assert torch.allclose(AsChannelsd(keys="image", channels=1)(rgb)["image"], torch.ones(1, 2, 3))
    with pytest.raises(ValueError, match="expected 1, 3 or 4 channels, got 5"):
        AsChannelsd(keys="image")({"image": torch.zeros(5, 2, 2)})


def test_argmaxd_matches_monai_and_torch_argmax_including_ties():
    from monai.data import MetaTensor
    from monai.transforms import AsDiscreted

    from scripts.data.transforms import ArgMaxd, channel_argmax

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 17, 11, generator=g), 0)
    probs[:, 0, :3] = 1.0 / 3  # exact three-way ties: the first class wins, as in torch.argmax
    pred = MetaTensor(probs, meta={"filename_or_obj": "x.png"})
    ours = ArgMaxd(keys="pred")({"pred": pred})["pred"]
    monai = AsDiscreted(keys="pred", argmax=True)({"pred": pred.clone()})["pred"]
    assert isinstance(ours, MetaTensor) and ours.dtype == monai.dtype == torch.float32
    assert torch.equal(ours.as_tensor(), monai.as_tensor()) and (ours[0, 0, :3] == 0).all()
    batch = torch.randn(4, 2, 9, 9, generator=g)
    assert torch.equal(channel_argmax(batch, 1), torch.argmax(batch, 1, keepdim=True))


def test_fill_holes_matches_monai_fill_holes_on_random_label_maps():
    """Our labelling-based FillHolesd equals MONAI's flood fill (full connectivity), 2D and 3D, one or two labels,
    holes of one class inside another included, and keeps the MetaTensor's metadata."""
    from monai.data import MetaTensor
    from monai.transforms import FillHolesd as MonaiFillHolesd
    from scipy import ndimage

    from scripts.data.transforms import FillHolesd

    rng = np.random.default_rng(0)
    for trial in range(24):
        shape = (60, 45) if trial % 3 else (20, 18, 16)
        smooth = ndimage.gaussian_filter(rng.random(shape), 1.5)
        labels = np.digitize(smooth, np.quantile(smooth, [0.4, 0.75]))[None].astype(np.float32)
        if trial % 4 == 0:  # the labels in a box of the frame, as a head is: holes near their bounding box's edge
            inside = np.zeros(shape, bool)
            inside[tuple(slice(int(rng.integers(0, n // 3)), int(rng.integers(n // 2, n + 1))) for n in shape)] = True
            labels[0][~inside] = 0
        applied = [1, 2] if trial % 2 else [1]
        pred = MetaTensor(torch.as_tensor(labels), meta={"filename_or_obj": "x.png"})
        monai = MonaiFillHolesd(keys="pred", applied_labels=applied)({"pred": pred.clone()})["pred"]
        ours = FillHolesd(keys="pred", applied_labels=applied)({"pred": pred})["pred"]
        assert isinstance(ours, MetaTensor) and ours.meta["filename_or_obj"] == "x.png"
        assert torch.equal(ours.as_tensor(), monai.as_tensor()), trial
    ring = np.zeros((1, 9, 9), np.float32)
    ring[0, 2:7, 2:7], ring[0, 4, 4] = 1, 0  # one enclosed pixel; the border's zeros stay open
    filled = FillHolesd(keys="m", applied_labels=[1])({"m": torch.as_tensor(ring)})["m"]
    assert filled[0, 4, 4] == 1 and filled.sum() == 25


@pytest.mark.parametrize(
    "change, message",
    [
        ({"spatial_size": [256, 256]}, "spatial_size=.*multiple of 224"),
        ({"labeled_fraction": 1.5}, r"labeled_fraction=1.5 is invalid"),
        ({"unlabeled_batch_size": 3}, "unlabeled_batch_size=3 .*even"),
        ({"num_classes": 3}, "class_names=.*one name per class"),
        ({"in_channels": 2}, "in_channels=2"),
        ({"val_interval": 500}, "val_interval=500"),
        ({"weights": {"cps_weight": -1.0}}, "cps_weight=-1.0"),
        ({"weights": {"ict_weight": "yes"}}, "ict_weight='yes'"),
    ],
)
def test_bad_config_values_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        check_training_settings(**{**GOOD, **change})


def test_good_config_values_pass():
    assert check_training_settings(**GOOD)
    assert check_training_settings(**{**GOOD, "spatial_size": [64, 96], "uses_swin_unet": False})


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no resume_"):
        find_resume_checkpoint(str(tmp_path))


class FakeRun:
    """A trainer and an evaluator engine whose key metric we set by hand."""

    def __init__(self, scores, existing_score=None):
        self.net = torch.nn.Linear(2, 2)
        self.scores = list(scores)
        self.existing_score = existing_score
        self.evaluator = Engine(lambda e, b: None)
        self.evaluator.state.key_metric_name = "val_mean_dice"

        @self.evaluator.on(Events.EPOCH_COMPLETED)
        def score(engine):
            # when the publisher evaluates the existing model, report its score
            comparing = existing_score is not None and torch.equal(self.net.weight, self.existing_weight)
            engine.state.metrics = {"val_mean_dice": existing_score if comparing else self.scores.pop(0)}

        self.trainer = Engine(self._step)

        @self.trainer.on(Events.EPOCH_COMPLETED)
        def validate(engine):
            self.evaluator.run([0])

    def _step(self, engine, batch):
        with torch.no_grad():
            self.net.weight.add_(1.0)


def publish_run(tmp_path, scores, existing=None, crash_at=None):
    run = FakeRun(scores, existing)
    model = tmp_path / "models" / "model.pt"
    if existing is not None:
        model.parent.mkdir(exist_ok=True)
        run.existing_weight = torch.full((2, 2), -7.0)
        torch.save({"weight": run.existing_weight, "bias": torch.zeros(2)}, model)
    publisher = BestModelPublisher(run.net, str(tmp_path / "ckpt" / "best.pt"), str(model))
    publisher.attach(run.trainer, run.evaluator)
    if crash_at is not None:
        run.trainer.add_event_handler(Events.ITERATION_COMPLETED(once=crash_at), lambda e: 1 / 0)
    run.trainer.run([0], max_epochs=len(scores))
    return model, publisher


def test_completed_run_publishes_its_best(tmp_path):
    model, publisher = publish_run(tmp_path, [0.5, 0.9, 0.7])
    state = torch.load(model, weights_only=True)
    # best at iteration 2 of 3, each iteration adds 1: the published weights are the final ones minus 1
    assert torch.allclose(state["weight"], publisher.network.weight.detach() - 1.0)
    assert publisher.best_metric == 0.9 and publisher.best_iteration == 2


def test_failed_run_leaves_model_untouched(tmp_path):
    model = tmp_path / "models" / "model.pt"
    model.parent.mkdir()
    model.write_bytes(b"previous model")
    with pytest.raises(ZeroDivisionError):
        publish_run(tmp_path, [0.5, 0.9, 0.7], crash_at=3)
    assert model.read_bytes() == b"previous model"


def test_worse_run_keeps_the_existing_model(tmp_path):
    model, _ = publish_run(tmp_path, [0.5, 0.6], existing=0.8)
    assert torch.equal(torch.load(model, weights_only=True)["weight"], torch.full((2, 2), -7.0))
    model, _ = publish_run(tmp_path, [0.5, 0.95], existing=0.8)
    assert not torch.equal(torch.load(model, weights_only=True)["weight"], torch.full((2, 2), -7.0))
