"""Why does (or doesn't) the method help? Per-validation diagnostics of both networks, the teacher and the terms.

At every validation this handler scores, on a fixed subset of the validation list, the Dice of the UNeXt (A), the
Swin-Unet (B) and B's EMA teacher; and, on a fixed subset of the *unlabelled* training images whose masks exist on
disk but are never used for training (the phantom and HC18 keep every annotation), the accuracy (Dice) of the hard
pseudo-labels each network hands the other through cross pseudo supervision, the teacher's, and the agreement of A
and B. With the ramped weight each term had at that iteration, it writes ``diagnostics.csv`` and
``diagnostics.png`` to ``output_dir``. It is switched on by ``diagnostics: true`` (the evidence recipe does).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from scripts.utils.files import write_atomic

__all__ = ["MethodDiagnostics", "hidden_label_path"]

WEIGHTS = ("w_cps", "w_ict", "w_div", "w_mt")


def hidden_label_path(image_path: str) -> Path | None:
    """The HC18-layout annotation beside an unlabelled training image (``NNN_HC.png`` -> ``NNN_HC_Annotation.png``)."""
    path = Path(image_path)
    annotation = path.with_name(f"{path.stem}_Annotation.png")
    return annotation if annotation.is_file() else None


def _dice(pred: torch.Tensor, target: torch.Tensor) -> list[float]:
    """Foreground Dice per image of two (N, H, W) integer maps (1.0 where both are empty)."""
    p, t = pred > 0, target > 0
    inter = (p & t).flatten(1).sum(1).float()
    total = (p.flatten(1).sum(1) + t.flatten(1).sum(1)).float()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total)).tolist()


class MethodDiagnostics:
    """Dice of A, B and the teacher on validation images; pseudo-label accuracy on unlabelled images; term weights.

    Args:
        network_a, network_b, teacher: the UNeXt, the Swin-Unet (or None) and the EMA teacher (or None).
        validation_dataset: preprocessed validation items ({"image", "label"} at the network size).
        unlabeled_dataset, unlabeled_items: the preprocessed unlabelled items and their datalist entries (for the
            path of each one's hidden annotation).
        output_dir: where diagnostics.csv and diagnostics.png go.
        max_images: images of each subset scored (the first ones, the same at every validation).
        batch_size: forward batch.
    """

    def __init__(
        self,
        network_a,
        network_b,
        teacher,
        validation_dataset,
        unlabeled_dataset,
        unlabeled_items,
        output_dir: str | os.PathLike,
        max_images: int = 32,
        batch_size: int = 8,
    ) -> None:
        self.networks = {"a": network_a, "b": network_b, "teacher": teacher}
        self.output_dir = Path(output_dir)
        self.batch_size = batch_size
        self.validation = [validation_dataset[i] for i in range(min(max_images, len(validation_dataset)))]
        self.unlabeled = []
        for i, item in enumerate(unlabeled_items or []):
            if len(self.unlabeled) == max_images:
                break
            annotation = hidden_label_path(item["image"])
            if annotation is not None:
                self.unlabeled.append((i, annotation))
        self.unlabeled_dataset = unlabeled_dataset
        self.rows: list[dict] = []

    def attach(self, trainer: Engine, evaluator: Engine) -> None:
        self.trainer = trainer
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _hidden_masks(self, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        from scripts.data.hc18 import load_hc18_mask

        images, masks = [], []
        for index, annotation in self.unlabeled:
            image = self.unlabeled_dataset[index]["image"]
            mask = torch.as_tensor(load_hc18_mask(annotation).T.copy(), dtype=torch.float32)  # MONAI's (x, y) order
            masks.append(F.interpolate(mask[None, None], size=size, mode="nearest")[0, 0].long())
            images.append(torch.as_tensor(image))
        return torch.stack(images), torch.stack(masks)

    @torch.no_grad()
    def _predict(self, name: str, images: torch.Tensor) -> torch.Tensor | None:
        network = self.networks[name]
        if network is None:
            return None
        was_training = network.training
        network.eval()
        device = next(network.parameters()).device
        out = torch.cat(
            [
                network(images[i : i + self.batch_size].to(device)).argmax(1).cpu()
                for i in range(0, len(images), self.batch_size)
            ]
        )
        network.train(was_training)
        return out

    def __call__(self, evaluator: Engine) -> None:
        row: dict = {"iteration": self.trainer.state.iteration}
        output = self.trainer.state.output or {}
        for key in WEIGHTS:
            if key in output:
                row[key] = float(output[key])
        if self.validation:
            images = torch.stack([torch.as_tensor(v["image"]) for v in self.validation])
            labels = torch.stack([torch.as_tensor(v["label"])[0].long() for v in self.validation])
            for name in self.networks:
                pred = self._predict(name, images)
                if pred is not None:
                    row[f"val_dice_{name}"] = float(np.mean(_dice(pred, labels)))
        if self.unlabeled:
            images, masks = self._hidden_masks(tuple(self.unlabeled_dataset[self.unlabeled[0][0]]["image"].shape[1:]))
            preds = {name: self._predict(name, images) for name in self.networks}
            for name, pred in preds.items():
                if pred is not None:
                    row[f"pseudo_dice_{name}"] = float(np.mean(_dice(pred, masks)))
            if preds["b"] is not None:
                row["agreement_ab"] = float(np.mean(_dice(preds["a"], preds["b"])))
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fields = list(dict.fromkeys(k for row in self.rows for k in row))

        def write_csv(f):
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)

        write_atomic(self.output_dir / "diagnostics.csv", write_csv)

        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 4), dpi=100)
        left, right = fig.subplots(1, 2)
        its = [r["iteration"] for r in self.rows]
        for key in fields:
            if key.startswith(("val_dice_", "pseudo_dice_", "agreement")):
                left.plot(
                    its,
                    [r.get(key, np.nan) for r in self.rows],
                    marker=".",
                    linestyle="-" if key.startswith("val") else "--",
                    label=key,
                )
            elif key in WEIGHTS:
                right.plot(its, [r.get(key, np.nan) for r in self.rows], marker=".", label=key)
        left.set(xlabel="iteration", ylabel="Dice", ylim=(0, 1), title="networks (val) and pseudo-labels (unlabelled)")
        right.set(xlabel="iteration", ylabel="weight", title="ramped term weights")
        for ax in (left, right):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        write_atomic(self.output_dir / "diagnostics.png", lambda f: fig.savefig(f, format="png"), binary=True)
