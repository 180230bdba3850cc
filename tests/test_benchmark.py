"""The inference-pipeline benchmark runs inference.json for real and accounts for an image's time by stage."""

from scripts.benchmark import pipeline_report


def test_pipeline_report_on_two_phantom_images(tmp_path):
    report = pipeline_report(tmp_path, n_images=2, runs=1, input_dir=None, model=None)
    assert report["n_images"] == 2 and report["image_size"] == (800, 540) and report["spatial_size"] == (224, 224)
    masks = sorted((tmp_path / "out").glob("*_mask.png"))
    assert len(masks) == 2 and len(list((tmp_path / "out").glob("*_overlay.png"))) == 2
    stages = report["stages_ms"]
    measured = {k: v for k, v in stages.items() if not k.startswith("engine")}
    assert all(v > 0 for v in measured.values()), stages
    assert report["forward_ms"] > 0 and report["pipeline_ms"] > report["forward_ms"]
