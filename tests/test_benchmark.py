"""The inference-pipeline benchmark runs inference.json for real, with and without overlays, beside the bare
forward at the same batch size, and times each stage of an image alone."""

import torch

from scripts.experiments.benchmark import count_flops, pipeline_report


def test_pipeline_report_on_three_phantom_images(tmp_path):
    report = pipeline_report(
        tmp_path,
        n_images=3,
        runs=1,
        input_dir=None,
        model=None,
        batch_size=2,
        num_workers=1,
        writer_threads=1,
        stage_images=2,
    )
    assert report["n_images"] == 3 and report["image_size"] == (800, 540) and report["spatial_size"] == (224, 224)
    assert (report["batch_size"], report["num_workers"], report["writer_threads"]) == (2, 1, 1)
    assert len(list((tmp_path / "out").glob("*_mask.png"))) == 3
    assert len(list((tmp_path / "out").glob("*_overlay.png"))) == 3
    assert len(list((tmp_path / "out_no_overlays").glob("*_mask.png"))) == 3
    assert not list((tmp_path / "out_no_overlays").glob("*_overlay.png"))
    assert set(report["images_per_s"]) == {"bare_forward", "masks_measurements", "with_overlays"}
    assert all(v > 0 for v in report["images_per_s"].values())
    stages = report["stages_ms"]
    assert len(stages) == 7 and all(v > 0 for v in stages.values()), stages
    assert list(stages)[2].startswith("forward (batch 2")


def test_flops_of_a_linear_layer_forward_and_backward():
    # y = x W^T + b: forward 2 M K N; backward one product for the input's gradient and one for the weight's, 2 M K N
    # each (the bias gradient is a sum, not counted)
    m, k, n = 64, 96, 288
    layer, x = torch.nn.Linear(k, n), torch.randn(m, k, requires_grad=True)
    counted = count_flops(lambda: layer(x).sum().backward())
    assert counted == {"addmm": 2 * m * k * n / 1e9, "mm": 2 * 2 * m * k * n / 1e9}
