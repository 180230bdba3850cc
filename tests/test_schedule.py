"""The default run uses the method: its ramped unsupervised weights reach at least half by the last iteration."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from scripts.method.terms import CrossPseudoSupervisionTerm
from scripts.method.trainer import DualNetworkTrainer

ROOT = Path(__file__).resolve().parents[1]


def _config(*overrides: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.json"), *(str(ROOT / "configs" / o) for o in overrides)])
    return parser


def ramp(t: int, total: float, length: int) -> float:
    """The authors' sigmoid ramp-up, exp(-5 (1 - phase)^2), stepped every total // length iterations."""
    step = max(1, int(total // length))
    phase = min(t // step, length) / length
    return math.exp(-5.0 * (1.0 - phase) ** 2)


@pytest.mark.parametrize("recipe", [(), ("evidence_recipe.json",)])
def test_default_and_evidence_ramps_reach_half_weight_by_the_last_iteration(recipe):
    config = _config(*recipe)
    total = config.get_parsed_content("total_iterations")
    rampup = config.get_parsed_content("rampup_iterations")
    length = config.get_parsed_content("rampup_length")
    assert ramp(total - 1, rampup, length) >= 0.5
    assert config.get_parsed_content("ict_warmup_iterations") < total  # ICT starts within the run
    # the trainer's own ramp agrees with the formula above
    trainer = DualNetworkTrainer.__new__(DualNetworkTrainer)
    trainer.rampup_iterations, trainer.rampup_length = rampup, length
    trainer.terms = [CrossPseudoSupervisionTerm(weight=1.0)]
    assert trainer.unsupervised_weights(total - 1)["w_cps"] == pytest.approx(ramp(total - 1, rampup, length))


def test_paper_recipe_keeps_the_authors_ramp_over_400_passes():
    raw = _config("paper_recipe.json").get("rampup_iterations")
    assert raw.replace(" ", "") == "$400*len(@train#dataset#data)/@labeled_batch_size"
