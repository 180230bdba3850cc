"""Every method of the comparison is an override of train.json on the one trainer: each builds, trains 2 iterations."""

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


@pytest.mark.parametrize("method", METHODS)
def test_method_declares_its_terms_with_their_numbers(method):
    """Each method resolves to the four term components of train.json, switched by their weights, with the
    terms' own numbers from the config; those it must compute have a weight above 0."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.json"), str(ROOT / "configs" / "methods" / f"{method}.json")])
    terms = {term.name: term for term in parser.get_parsed_content("train#terms")}
    assert list(terms) == ["cps", "divergence", "ict", "mt"]  # the loss adds them (and draws their noise) in this order
    _, computed, absent = EXPECTED[method]
    on = {name for name, term in terms.items() if term.weight > 0}
    assert {"cps" if k == "cps_a" else k for k in computed} - {"sup_a", "sup_b"} <= on
    assert not {"cps" if k == "cps_a" else k for k in absent} - {"sup_b"} & on
    ict, mt = terms["ict"], terms["mt"]
    assert float(ict.loss.beta.concentration1) == 0.5 and (mt.noise_std, mt.noise_clamp) == (0.1, 0.2)
    teacher = parser.get_parsed_content("train#ema_teacher")
    assert teacher.max_alpha == 0.99 and teacher.student == ("a" if method in ("mean_teacher", "ict_unext") else "b")


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("methods") / "data" / "phantom"


def workflow_for(method: str, phantom_dir, **overrides) -> ConfigWorkflow:
    """train.json + the method's override on the shared phantom, 2 iterations validated once, unless overridden."""
    root = phantom_dir.parents[1]
    values = dict(
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
    )
    if method != "fully_supervised":
        values["labeled_fraction"] = 0.3
    return ConfigWorkflow(
        config_file=[str(ROOT / "configs" / "train.json"), str(ROOT / "configs" / "methods" / f"{method}.json")],
        meta_file=str(ROOT / "configs" / "metadata.json"),
        workflow_type="train",
        **{**values, **overrides},
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_two_iterations(method, phantom_dir):
    root = phantom_dir.parents[1]
    workflow = workflow_for(method, phantom_dir)
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


@pytest.mark.slow
def test_total_iterations_is_honoured_exactly(phantom_dir):
    """total_iterations 5 with val_interval 2: 5 iterations, validated after 2, 4 and 5, the learning rate decayed
    to 0 over exactly those 5."""
    import csv

    root = phantom_dir.parents[1]
    workflow = workflow_for(
        "supervised",
        phantom_dir,
        total_iterations=5,
        val_interval=2,
        output_dir=str(root / "eval_total_5"),
        ckpt_dir=str(root / "models_total_5"),
    )
    workflow.initialize()
    workflow.run()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 5
    with open(root / "eval_total_5" / "validation.csv") as f:
        assert [int(row["iteration"]) for row in csv.DictReader(f)] == [2, 4, 5]
    assert trainer.optimizer_a.param_groups[0]["lr"] == 0.0
    workflow.finalize()
