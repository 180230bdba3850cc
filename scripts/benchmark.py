"""Speed benchmarks that print figures (median of several runs after warm-up, same process, side by side).

    python -m scripts.benchmark iteration --sizes "[224, 448]" --runs 10 --amp "[False, True]"
    python -m scripts.benchmark inference --sizes "[224, 448]" --runs 20

``iteration`` times one full training iteration of the method (both networks, teacher, every loss, backward, both
optimiser steps, EMA update) on random tensors, with ICT active; ``inference`` times batch-1 eval forwards.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Sequence

import fire
import torch
from torch.utils.data import DataLoader

from scripts.networks import SwinUnet, UNeXt
from scripts.trainer import DualNetworkTrainer, SemiSupervisedLoader

__all__ = ["iteration_times", "inference_times"]


def _trainer(size: int, labeled_batch: int, unlabeled_batch: int, iterations: int, amp: bool) -> DualNetworkTrainer:
    g = torch.Generator().manual_seed(0)
    labeled = [
        {"image": torch.rand(3, size, size, generator=g), "label": (torch.rand(1, size, size, generator=g) > 0.5).float()}
        for _ in range(2 * labeled_batch)
    ]
    unlabeled = [{"image": torch.rand(3, size, size, generator=g)} for _ in range(2 * unlabeled_batch)]
    loader = SemiSupervisedLoader(
        DataLoader(labeled, batch_size=labeled_batch, shuffle=True, drop_last=True),
        DataLoader(unlabeled, batch_size=unlabeled_batch, shuffle=True, drop_last=True),
    )
    a, b = UNeXt(), SwinUnet(img_size=size)
    sgd = dict(lr=1e-3, momentum=0.9, weight_decay=1e-4)
    return DualNetworkTrainer(
        "cpu", 1, loader, iterations, a, torch.optim.SGD(a.parameters(), **sgd), b,
        torch.optim.SGD(b.parameters(), **sgd), ict_warmup_iterations=0, amp=amp,
    )


def iteration_times(size: int = 224, labeled_batch: int = 1, unlabeled_batch: int = 4, runs: int = 10,
                    warmup: int = 2, amp: bool = False) -> list[float]:
    """Seconds of each timed training iteration (after ``warmup`` untimed ones)."""
    from ignite.engine import Events

    trainer = _trainer(size, labeled_batch, unlabeled_batch, warmup + runs, amp)
    stamps: list[float] = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda _: stamps.append(time.perf_counter()))
    trainer.add_event_handler(Events.COMPLETED, lambda _: stamps.append(time.perf_counter()))
    trainer.run()
    return [t1 - t0 for t0, t1 in zip(stamps, stamps[1:])][warmup:]


def inference_times(net: torch.nn.Module, size: int, runs: int = 20, warmup: int = 3) -> list[float]:
    """Seconds of each batch-1 eval forward under no_grad."""
    net.eval()
    x = torch.rand(1, 3, size, size)
    times = []
    with torch.no_grad():
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            net(x)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


class Benchmarks:
    def iteration(self, sizes: Sequence[int] = (224, 448), runs: int = 10, labeled_batch: int = 1,
                  unlabeled_batch: int = 4, amp: Sequence[bool] = (False, True)) -> None:
        """Median s/iter of the full method per input size and precision; peak resident memory of the process."""
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {labeled_batch} + {unlabeled_batch}")
        for size in sizes:
            for use_amp in amp:
                t = iteration_times(size, labeled_batch, unlabeled_batch, runs, amp=use_amp)
                print(
                    f"{size:4d} px  {'bf16 autocast' if use_amp else 'fp32         '}  median {statistics.median(t):6.2f} "
                    f"s/iter  (min {min(t):.2f}, max {max(t):.2f}, n={len(t)})  peak RSS so far {_peak_rss_gb():.1f} GB",
                    flush=True,
                )

    def inference(self, sizes: Sequence[int] = (224, 448), runs: int = 20) -> None:
        """Median batch-1 eval forward time of each network."""
        for size in sizes:
            for name, net in (("UNeXt", UNeXt()), ("Swin-Unet", SwinUnet(img_size=size))):
                t = inference_times(net, size, runs)
                print(f"{name:9s} {size:4d} px  median {1000 * statistics.median(t):7.1f} ms (n={len(t)})", flush=True)


if __name__ == "__main__":
    fire.Fire(Benchmarks)
