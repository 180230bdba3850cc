"""Every method of the comparison is an override of train.json on the one trainer: each builds and trains 2 iterations."""

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow

from scripts.networks import SwinUnet, UNeXt

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted(p.stem for p in (ROOT / "configs" / "methods").glob("*.json"))

# method -> (class of network B or None, loss terms that must be computed, terms that must not be)
EXPECTED = {
    "full": (SwinUnet, {"sup_a", "sup_b", "cps_a", "ict", "divergence"}, set()),
    "supervised": (None, {"sup_a"}, {"sup_b", "cps_a", "ict", "divergence"}),
    "supervised_same_batch": (None, {"sup_a"}, {"sup_b", "cps_a", "ict", "divergence"}),
    "fully_supervised": (None, {"sup_a"}, {"sup_b", "cps_a", "ict", "divergence"}),
    "no_divergence": (SwinUnet, {"sup_b", "cps_a", "ict"}, {"divergence"}),
    "no_ict": (SwinUnet, {"sup_b", "cps_a", "divergence"}, {"ict"}),
    "no_cps": (SwinUnet, {"sup_b", "ict", "divergence"}, {"cps_a"}),
    "cross_teaching": (SwinUnet, {"sup_b", "cps_a"}, {"ict", "divergence"}),
    "cps_two_unext": (UNeXt, {"sup_b", "cps_a"}, {"ict", "divergence"}),
    "mean_teacher": (None, {"sup_a", "mt"}, {"sup_b", "cps_a", "ict", "divergence"}),
    "ict_unext": (None, {"sup_a", "ict"}, {"sup_b", "cps_a", "mt", "divergence"}),
}


def test_every_method_config_is_listed():
    assert set(METHODS) == set(EXPECTED)


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("methods") / "data" / "phantom"


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_two_iterations(method, phantom_dir):
    root = phantom_dir.parents[1]
    workflow = ConfigWorkflow(
        config_file=[str(ROOT / "configs" / "train.json"), str(ROOT / "configs" / "methods" / f"{method}.json")],
        meta_file=str(ROOT / "configs" / "metadata.json"),
        workflow_type="train",
        bundle_root=str(root),
        dataset_dir=str(phantom_dir),
        generate_phantom_if_empty=True,
        prepared_dir=str(root / f"prepared_{method}"),
        output_dir=str(root / f"eval_{method}"),
        ckpt_dir=str(root / f"models_{method}"),
        phantom_subjects=14,
        phantom_image_size=[320, 224],
        total_iterations=2,
        val_interval=2,
        amp=False,
        **({} if method == "fully_supervised" else {"labeled_fraction": 0.3}),
    )
    workflow.initialize()
    network_b_type, computed, absent = EXPECTED[method]
    before = {k: v.clone() for k, v in workflow.parser.get_parsed_content("network").state_dict().items()}
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 2
    if network_b_type is None:
        assert trainer.network_b is None
    else:
        assert type(trainer.network_b) is network_b_type
    assert (trainer.teacher is not None) == bool({"ict", "mt"} & computed)
    if trainer.teacher is not None:  # the teacher is an EMA copy of its student's architecture
        assert type(trainer.teacher) is (UNeXt if method in ("mean_teacher", "ict_unext") else SwinUnet)
    output = set(trainer.state.output)
    assert computed <= output and not (absent & output), (method, output)
    after = workflow.parser.get_parsed_content("network").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the deployed UNeXt was trained
    assert (root / f"models_{method}" / "model.pt").is_file()
    datalist = workflow.parser.get_parsed_content("datalist")
    if method == "supervised_same_batch":  # the unlabelled rows went through the UNeXt's forward, with no loss
        assert trainer.forward_unlabeled and workflow.parser.get_parsed_content("unlabeled_batch_size") > 0
    if method == "fully_supervised":
        assert not datalist["unlabeled"]  # every training image is labelled
    workflow.finalize()
