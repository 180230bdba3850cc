"""Metrics path: Dice/HD95/ASD against hand and brute-force values, failure rules, Ignite handlers, MetricsWriter."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from scripts.evaluation.metrics import (
    FetalASD,
    FetalDice,
    FetalHD95,
    SegmentationMetric,
    pixel_sizes_from_batch,
    segmentation_metrics,
)
from scripts.method.handlers import MetricsWriter, write_atomic

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

X, Y = 40, 32  # different sides so that swapped axes show up


# ---------------------------------------------------------------- independent references


def square(x0, x1, y0, y1, shape=(X, Y)):
    m = np.zeros(shape, dtype=bool)
    m[x0:x1, y0:y1] = True
    return m


def disc(cx, cy, r, shape=(X, Y)):
    xs, ys = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= r**2


def onehot(*foreground):
    """(C, X, Y) one-hot float tensor: background first, then the given (disjoint) masks."""
    fg = np.stack(foreground).astype(bool)
    return torch.from_numpy(np.concatenate([~fg.any(0)[None], fg]).astype(np.float32))


def boundary(mask):
    """Mask pixels with a 4-neighbour outside the mask (outside the image counts as outside)."""
    p = np.pad(mask, 1)
    inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def brute_hd95_asd(a, b, spacing=(1.0, 1.0)):
    """HD95 = max of the two directed 95th percentiles; ASD = mean over both boundaries; all pairs via cdist."""
    pa = np.argwhere(boundary(a)) * np.asarray(spacing)
    pb = np.argwhere(boundary(b)) * np.asarray(spacing)
    d = cdist(pa, pb)
    ab, ba = d.min(axis=1), d.min(axis=0)
    return max(np.percentile(ab, 95), np.percentile(ba, 95)), np.concatenate([ab, ba]).mean()


def hand_dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# ---------------------------------------------------------------- segmentation_metrics


def test_dice_of_hand_made_squares():
    label = square(10, 20, 10, 20)
    shifted = square(15, 25, 10, 20)  # overlap 5 x 10 = 50 of 100 + 100
    inside = square(12, 18, 12, 18)  # 36 inside 100
    assert segmentation_metrics(onehot(shifted), onehot(label))["dice"] == pytest.approx(2 * 50 / 200)
    assert segmentation_metrics(onehot(inside), onehot(label))["dice"] == pytest.approx(2 * 36 / 136)


def test_parallel_bars_analytic_distances():
    # two 2-pixel-thick bars, 4 rows apart along y: directed distances are 3 (near row) and 4 (far row), half each
    a, b = square(5, 35, 10, 12), square(5, 35, 14, 16)
    r = segmentation_metrics(onehot(b), onehot(a), spacing=[2.0, 1.0])
    assert r["hd95_px"] == pytest.approx(4.0) and r["asd_px"] == pytest.approx(3.5)
    assert r["hd95_mm"] == pytest.approx(4.0) and r["asd_mm"] == pytest.approx(3.5)  # sy = 1


@pytest.mark.parametrize(
    "pred, label",
    [
        (disc(20, 16, 8), disc(20, 16, 12)),  # concentric discs
        (disc(18, 15, 9), disc(22, 17, 10)),
        (square(8, 24, 6, 20), square(11, 27, 9, 23)),  # shifted squares
        (square(0, 12, 0, 32), disc(10, 16, 9)),  # touching the image border
    ],
)
def test_distances_match_brute_force(pred, label):
    spacing = (0.7, 0.3)
    r = segmentation_metrics(onehot(pred), onehot(label), spacing=list(spacing))
    hd_px, asd_px = brute_hd95_asd(pred, label)
    hd_mm, asd_mm = brute_hd95_asd(pred, label, spacing)
    assert r["hd95_px"] == pytest.approx(hd_px, rel=1e-5) and r["asd_px"] == pytest.approx(asd_px, rel=1e-5)
    assert r["hd95_mm"] == pytest.approx(hd_mm, rel=1e-5) and r["asd_mm"] == pytest.approx(asd_mm, rel=1e-5)
    assert r["dice"] == pytest.approx(hand_dice(pred, label))


def test_anisotropic_spacing_scales_shift_along_x_only():
    # disjoint 5 x 5 squares: every nearest boundary point lies straight along the shift, so distances scale exactly
    a = square(5, 10, 5, 10)
    along_x = segmentation_metrics(onehot(square(17, 22, 5, 10)), onehot(a), spacing=[2.0, 1.0])
    along_y = segmentation_metrics(onehot(square(5, 10, 17, 22)), onehot(a), spacing=[2.0, 1.0])
    for key in ("hd95", "asd"):
        assert along_x[f"{key}_px"] == pytest.approx(along_y[f"{key}_px"])
        assert along_x[f"{key}_mm"] == pytest.approx(2.0 * along_x[f"{key}_px"])
        assert along_y[f"{key}_mm"] == pytest.approx(along_y[f"{key}_px"])
    assert along_x["hd95_px"] == pytest.approx(brute_hd95_asd(square(17, 22, 5, 10), a)[0])


def test_empty_prediction_scores_dice_zero_and_the_diagonal():
    label = square(10, 20, 10, 20)
    r = segmentation_metrics(onehot(np.zeros((X, Y), bool)), onehot(label), spacing=[0.5, 0.25])
    assert r["dice"] == 0.0 and r["empty_prediction"] and r["failure"]
    assert r["hd95_px"] == pytest.approx(math.hypot(40, 32)) and r["asd_px"] == pytest.approx(math.hypot(40, 32))
    assert r["hd95_mm"] == pytest.approx(math.hypot(40 * 0.5, 32 * 0.25))
    assert r["asd_mm"] == pytest.approx(math.hypot(40 * 0.5, 32 * 0.25))


def test_prediction_without_label_is_a_failure_but_not_an_empty_prediction():
    r = segmentation_metrics(onehot(square(10, 20, 10, 20)), onehot(np.zeros((X, Y), bool)))
    assert r["dice"] == 0.0 and r["failure"] and not r["empty_prediction"]
    assert r["hd95_px"] == pytest.approx(math.hypot(40, 32)) and r["hd95_mm"] is None


def test_both_empty_is_perfect():
    empty = onehot(np.zeros((X, Y), bool))
    r = segmentation_metrics(empty, empty, spacing=[0.3, 0.3])
    assert (r["dice"], r["hd95_px"], r["asd_px"], r["hd95_mm"], r["asd_mm"]) == (1.0, 0.0, 0.0, 0.0, 0.0)
    assert not r["failure"] and not r["empty_prediction"]


def test_mean_over_foreground_classes_counts_the_failed_class():
    c1, c2 = square(2, 12, 2, 12), square(20, 30, 20, 30)
    r = segmentation_metrics(onehot(c1, np.zeros_like(c2)), onehot(c1, c2))
    assert r["per_class"][1]["dice"] == 1.0 and r["per_class"][2]["dice"] == 0.0
    assert r["dice"] == pytest.approx(0.5)
    assert r["hd95_px"] == pytest.approx(math.hypot(40, 32) / 2)
    assert r["empty_prediction"] and r["per_class"][2]["empty_prediction"] and not r["per_class"][1]["failure"]


def test_bad_inputs_name_the_problem():
    good = onehot(square(2, 12, 2, 12))
    with pytest.raises(ValueError, match="same shape"):
        segmentation_metrics(good, good[:, :-1])
    with pytest.raises(ValueError, match="binary one-hot"):
        segmentation_metrics(good * 0.5, good)
    with pytest.raises(ValueError, match="spacing"):
        segmentation_metrics(good, good, spacing=[0.0, 1.0])


def test_pixel_sizes_from_batch_forms():
    collated = [torch.tensor([0.1, 0.3], dtype=torch.float64), torch.tensor([0.2, 0.4], dtype=torch.float64)]
    assert pixel_sizes_from_batch(collated, 2) == [(0.1, 0.2), (0.3, 0.4)]
    table = torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float64)
    assert pixel_sizes_from_batch(table, 2) == [(0.1, 0.2), (0.3, 0.4)]
    assert pixel_sizes_from_batch([0.1, 0.2], 1) == [(0.1, 0.2)]
    assert pixel_sizes_from_batch(None, 3) == [None, None, None]
    assert pixel_sizes_from_batch(torch.tensor([[float("nan")] * 2, [0.3, 0.4]]), 2)[0] is None
    with pytest.raises(ValueError, match="batch of 3"):
        pixel_sizes_from_batch(torch.ones(2, 2), 3)


def test_cumulative_metric_mm_skips_unknown_pixel_size():
    label, pred = square(10, 20, 10, 20), square(13, 23, 10, 20)
    batch_pred, batch_label = torch.stack([onehot(pred)] * 2), torch.stack([onehot(label)] * 2)
    metric = SegmentationMetric("hd95", get_not_nans=True)
    metric(batch_pred, batch_label, spacing=[torch.tensor([2.0, float("nan")]), torch.tensor([1.0, 1.0])])
    value, not_nans = metric.aggregate()
    assert float(value) == pytest.approx(brute_hd95_asd(pred, label, (2.0, 1.0))[0]) and int(not_nans) == 1


# ---------------------------------------------------------------- inside a real SupervisedEvaluator

# Each item's image is the prediction mask itself; the network turns it into two-class logits.
CASES = [
    # (prediction, label, pixel size [sx, sy])
    (square(12, 28, 10, 26), square(8, 24, 10, 26), [0.5, 0.25]),
    (disc(20, 16, 8), disc(21, 15, 11), [0.3, 0.3]),
    (np.zeros((X, Y), bool), square(10, 30, 8, 20), [0.2, 0.4]),  # empty prediction
]


def expected_rows():
    rows = []
    for pred, label, (sx, sy) in CASES:
        if pred.any():
            hd_px, asd_px = brute_hd95_asd(pred, label)
            hd_mm, asd_mm = brute_hd95_asd(pred, label, (sx, sy))
        else:
            hd_px = asd_px = math.hypot(X, Y)
            hd_mm = asd_mm = math.hypot(X * sx, Y * sy)
        rows.append(
            {
                "dice": hand_dice(pred, label),
                "hd95_px": hd_px,
                "asd_px": asd_px,
                "hd95_mm": hd_mm,
                "asd_mm": asd_mm,
                "empty_prediction": not pred.any(),
            }
        )
    return rows


class MaskAsLogits(torch.nn.Module):
    """Logits (background, foreground) = (1 - x, x); optionally fails on a given call to simulate a crash."""

    def __init__(self, fail_on_call: int | None = None):
        super().__init__()
        self.calls, self.fail_on_call = 0, fail_on_call

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated failure")
        return torch.cat([1 - x, x], dim=1)


def make_evaluator(network, handlers, metrics=None, batch_size=2):
    from monai.data import DataLoader, MetaTensor
    from monai.engines import SupervisedEvaluator
    from monai.inferers import SimpleInferer
    from monai.transforms import AsDiscreted

    data = [
        {
            "image": MetaTensor(torch.from_numpy(p[None].astype(np.float32)), meta={"filename_or_obj": f"case{i}.png"}),
            "label": torch.from_numpy(l[None].astype(np.float32)),
            "pixel_size_mm": s,
        }
        for i, (p, l, s) in enumerate(CASES)
    ]
    metrics = metrics or {}
    key = next(iter(metrics), None)
    return SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(data, batch_size=batch_size, num_workers=0),
        network=network,
        inferer=SimpleInferer(),
        postprocessing=AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=2),
        key_val_metric={key: metrics[key]} if key else None,
        additional_metrics={k: v for k, v in metrics.items() if k != key} or None,
        val_handlers=handlers,
    )


def test_ignite_handlers_give_expected_means_in_an_evaluator():
    from monai.handlers import from_engine

    transform = from_engine(["pred", "label"])
    metrics = {
        "dice": FetalDice(output_transform=transform),
        "hd95_px": FetalHD95(output_transform=transform),
        "asd_px": FetalASD(output_transform=transform),
        "hd95_mm": FetalHD95(output_transform=transform, pixel_size_key="pixel_size_mm"),
        "asd_mm": FetalASD(output_transform=transform, pixel_size_key="pixel_size_mm"),
    }
    evaluator = make_evaluator(MaskAsLogits(), [], metrics, batch_size=2)
    evaluator.run()
    expected = expected_rows()
    for name in metrics:
        want = np.mean([r[name] for r in expected])
        assert evaluator.state.metrics[name] == pytest.approx(want, rel=1e-5), name
    assert evaluator.state.metric_details["hd95_mm"].shape == (3, 1)


def test_metrics_writer_csv_and_json_match_independent_values(tmp_path):
    evaluator = make_evaluator(MaskAsLogits(), [MetricsWriter(tmp_path)], batch_size=2)
    evaluator.run()
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((tmp_path / "metrics.json").read_text())
    expected = expected_rows()
    assert [r["filename"] for r in rows] == ["case0.png", "case1.png", "case2.png"]
    for row, want in zip(rows, expected):
        for key in ("dice", "hd95_px", "asd_px", "hd95_mm", "asd_mm"):
            assert float(row[key]) == pytest.approx(want[key], rel=1e-5), key
        assert row["empty_prediction"] == str(int(want["empty_prediction"]))
    for key in ("dice", "hd95_px", "asd_px", "hd95_mm", "asd_mm"):
        column = [float(r[key]) for r in rows]
        assert summary["mean"][key] == pytest.approx(np.mean(column))
        assert summary["std"][key] == pytest.approx(np.std(column))
    assert summary["n_images"] == 3 and summary["n_empty_predictions"] == 1
    assert (tmp_path / "metrics.png").stat().st_size > 0


def test_metrics_writer_leaves_mm_empty_without_pixel_size_and_adds_class_columns(tmp_path):
    writer = MetricsWriter(tmp_path, class_names=["head", "symphysis"], plot=False)
    c1, c2 = square(2, 12, 2, 12), square(20, 30, 20, 30)
    label_index = torch.from_numpy((c1 * 1 + c2 * 2)[None].astype(np.float32))  # index map, one-hot encoded inside
    row = writer.score({"pred": onehot(c1, np.zeros_like(c2)), "label": label_index, "image": "x.png"})
    assert row["hd95_mm"] is None and row["dice_head"] == 1.0 and row["dice_symphysis"] == 0.0
    assert row["empty_prediction_symphysis"] and row["filename"] == "x.png"


def test_crash_mid_run_keeps_the_previous_metrics_file(tmp_path):
    make_evaluator(MaskAsLogits(), [MetricsWriter(tmp_path)], batch_size=1).run()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    crashing = make_evaluator(MaskAsLogits(fail_on_call=2), [MetricsWriter(tmp_path)], batch_size=1)
    with pytest.raises(RuntimeError, match="simulated failure"):
        crashing.run()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_write_atomic_keeps_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text('{"old": true}')

    def half_then_fail(f):
        f.write('{"new": ')
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(target, half_then_fail)
    assert target.read_text() == '{"old": true}' and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_metrics_writer_reports_circumference_error_in_mm(tmp_path):
    from scripts.evaluation.biometry import ellipse_circumference

    def ellipse(shape, cx, cy, a, b):
        x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
        return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0

    pred, label = ellipse((160, 120), 80, 60, 50, 35), ellipse((160, 120), 80, 60, 45, 35)
    pixel_size = [0.2, 0.2]
    writer = MetricsWriter(tmp_path, plot=False)
    item = {"pred": onehot(pred), "label": onehot(label), "image": "x.png", "pixel_size_mm": pixel_size}
    from_label = writer.score(item)
    want_pred, want_label = ellipse_circumference(10.0, 7.0), ellipse_circumference(9.0, 7.0)  # semi-axes in mm
    assert from_label["circumference_mm"] == pytest.approx(want_pred, rel=0.01)
    assert from_label["circumference_ref_mm"] == pytest.approx(want_label, rel=0.01)
    assert from_label["circumference_abs_error_mm"] == pytest.approx(want_pred - want_label, rel=0.05)
    # a reference circumference carried by the item (HC18's CSV value) is used as is
    from_csv = writer.score({**item, "hc_mm": torch.tensor(50.0)})
    assert from_csv["circumference_ref_mm"] == 50.0
    assert from_csv["circumference_abs_error_mm"] == pytest.approx(abs(from_label["circumference_mm"] - 50.0))
    # ACOUSLIC's reference AC; NaN (the placeholder of an item without one) falls back to the label's ellipse
    assert writer.score({**item, "ac_mm": torch.tensor(61.0)})["circumference_ref_mm"] == 61.0
    unknown = writer.score({**item, "hc_mm": torch.tensor(float("nan")), "ac_mm": torch.tensor(float("nan"))})
    assert unknown["circumference_ref_mm"] == pytest.approx(from_label["circumference_ref_mm"])
    # no pixel size: no physical measurement; an empty prediction counts as a failed measurement
    assert writer.score({**item, "pixel_size_mm": None})["circumference_mm"] is None
    empty = writer.score({**item, "pred": onehot(np.zeros_like(pred))})
    assert empty["circumference_mm"] is None and empty["circumference_ref_mm"] is not None
    assert writer.summary([from_label, empty])["n_circumference_failures"] == 1


# ---------------------------------------------------------------- the paper's definitions (MedPy) on the network grid


def brute_medpy(result, reference):
    """MedPy's HD95 (95th percentile of both directions pooled) and ASD (result -> reference) by all pairs."""
    pr, pf = np.argwhere(boundary(result)), np.argwhere(boundary(reference))
    d = cdist(pr, pf)
    return np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95), d.min(axis=1).mean()


MEDPY_CASES = [
    (disc(20, 16, 9), disc(22, 15, 7)),
    (square(5, 30, 4, 20), disc(18, 14, 10)),
    (disc(20, 16, 9) | square(1, 4, 1, 4), disc(20, 16, 9)),  # an ellipse-like blob plus one small false blob
    (square(0, 12, 0, 10), square(3, 40, 2, 32)),  # touching the image border
]


@pytest.mark.parametrize("pred,label", MEDPY_CASES)
def test_medpy_definitions_equal_medpy_and_brute_force(pred, label):
    from medpy.metric.binary import asd, hd95

    from scripts.evaluation.metrics import medpy_asd, medpy_hd95

    assert medpy_hd95(pred, label) == pytest.approx(hd95(pred, label), abs=1e-9)
    assert medpy_asd(pred, label) == pytest.approx(asd(pred, label), abs=1e-9)
    brute_hd, brute_asd = brute_medpy(pred, label)
    assert medpy_hd95(pred, label) == pytest.approx(brute_hd, abs=1e-9)
    assert medpy_asd(pred, label) == pytest.approx(brute_asd, abs=1e-9)


def test_medpy_definitions_on_known_distances():
    from scripts.evaluation.metrics import medpy_asd, medpy_hd95

    # two parallel bars 5 pixels apart along x: every boundary pixel of one is 5 or more from the other's
    a, b = square(5, 10, 4, 28), square(15, 20, 4, 28)
    assert medpy_hd95(a, b) == pytest.approx(brute_medpy(a, b)[0])
    same = disc(20, 16, 8)
    assert medpy_hd95(same, same) == 0.0 and medpy_asd(same, same) == 0.0
    # ASD is directed (prediction -> label): a small blob inside a large disc is far from the disc's boundary,
    # the disc's boundary is far from the blob too, but the two directions differ
    small, large = disc(20, 16, 2), disc(20, 16, 10)
    assert medpy_asd(small, large) == pytest.approx(brute_medpy(small, large)[1])
    assert medpy_asd(small, large) != pytest.approx(medpy_asd(large, small))


def test_paper_grid_metrics_resize_to_the_grid_and_score_failures():
    from scripts.evaluation.metrics import medpy_hd95, paper_grid_metrics, worst_distance

    pred, label = disc(20, 16, 9), disc(22, 15, 7)
    same_grid = paper_grid_metrics(pred, label, (X, Y))
    assert same_grid["hd95_medpy_grid_px"] == pytest.approx(medpy_hd95(pred, label))
    # doubling both masks (nearest) and scoring on the original grid gives the original figures back
    big_pred, big_label = (np.kron(m, np.ones((2, 2), dtype=bool)) for m in (pred, label))
    assert paper_grid_metrics(big_pred, big_label, (X, Y)) == pytest.approx(same_grid)
    empty = np.zeros((X, Y), dtype=bool)
    assert paper_grid_metrics(empty, label, (X, Y))["hd95_medpy_grid_px"] == pytest.approx(worst_distance((X, Y)))
    assert paper_grid_metrics(empty, empty, (X, Y)) == {"hd95_medpy_grid_px": 0.0, "asd_medpy_grid_px": 0.0}


def test_the_two_hd95_definitions_differ_on_a_false_blob():
    """MONAI's HD95 (larger directed 95th percentile) against MedPy's (pooled): a small far blob moves one a lot."""
    from scripts.evaluation.metrics import medpy_hd95

    label = disc(25, 20, 8, shape=(64, 64))
    pred = label | square(0, 2, 60, 62, shape=(64, 64))
    monai_hd95 = segmentation_metrics(onehot(pred), onehot(label))["hd95_px"]
    assert monai_hd95 > 3 * medpy_hd95(pred, label)


def test_write_atomic_gives_the_usual_file_mode(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.txt", lambda f: f.write("x"))
        with open(tmp_path / "b.txt", "w") as f:  # what a plain open() gives under the same umask
            f.write("x")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o644
