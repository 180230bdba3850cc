"""Run by tests/test_distributed.py under torchrun: train.json + multi_gpu_train.json for a few iterations, then save
this rank's UNeXt, Swin-Unet and teacher weights and the subjects it trained on to ``<out>/rank<r>.pt``."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

ROOT = Path(__file__).resolve().parents[1]


def main(work: str) -> None:
    work = Path(work)
    workflow = ConfigWorkflow(
        config_file=[str(ROOT / "configs" / "train.json"), str(ROOT / "configs" / "multi_gpu_train.json")],
        meta_file=str(ROOT / "configs" / "metadata.json"),
        workflow_type="train",
        bundle_root=str(work),
        dataset_dir=str(work / "data" / "phantom"),
        generate_phantom_if_empty=True,
        phantom_subjects=16,
        phantom_image_size=[320, 224],
        prepared_dir=str(work / "prepared"),
        output_dir=str(work / "eval"),
        ckpt_dir=str(work / "models"),
        labeled_fraction=0.4,
        labeled_batch_size=1,
        unlabeled_batch_size=2,
        total_iterations=4,
        val_interval=2,
        ict_warmup_iterations=0,
        amp=False,
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    seen = {"labeled": [], "unlabeled": []}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: [seen[k].extend(str(s) for s in e.state.batch[k]["subject"]) for k in seen],
    )
    workflow.run()
    unwrap = lambda net: {k: v.detach().cpu().clone() for k, v in net.module.state_dict().items()}  # noqa: E731
    state = {
        "unext": unwrap(trainer.network_a),
        "swin": unwrap(trainer.network_b),
        "teacher": {k: v.detach().cpu().clone() for k, v in trainer.teacher.state_dict().items()},
        "seen": seen,
        "world_size": dist.get_world_size(),
        "iterations": trainer.state.iteration,
        "val_dice": float(workflow.parser.get_parsed_content("validate#evaluator").state.metrics["val_mean_dice"]),
    }
    torch.save(state, work / f"rank{dist.get_rank()}.pt")
    workflow.finalize()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
