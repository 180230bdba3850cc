"""Speed and memory benchmarks that print figures (median of several runs after warm-up, same machine, side by side).

    python -m scripts.benchmark iteration --sizes "[224, 448]" --runs 5 --amp "[False, True]" [--device cuda]
    python -m scripts.benchmark latency --sizes "[224, 448]" --runs 20 --threads 2
    python -m scripts.benchmark pipeline --n_images 100 --threads 2

``iteration`` times one full training iteration of the method (both networks, teacher, every loss, backward, both
optimiser steps, EMA update) on random tensors with ICT active, each setting in a fresh process so that its peak
memory is its own (resident memory on CPU; allocated GPU memory on CUDA). ``latency`` times batch-1 UNeXt
inference in eager PyTorch, TorchScript and ONNX Runtime (and the Swin-Unet in eager for scale). ``pipeline``
runs ``configs/inference.json`` end to end on a folder of phantom images and sets its throughput beside the bare
network forward, with a stage-by-stage breakdown of where the rest of the time goes.
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import fire
import numpy as np
import torch
from torch.utils.data import DataLoader

from scripts.networks import SwinUnet, UNeXt
from scripts.onnx_network import export_onnx, onnx_session
from scripts.trainer import DualNetworkTrainer, SemiSupervisedLoader

__all__ = ["iteration_times", "inference_times", "median_ms"]

BUNDLE_ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trainer(size: int, labeled_batch: int, unlabeled_batch: int, iterations: int, amp: bool,
             device: torch.device) -> DualNetworkTrainer:
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
    a, b = UNeXt().to(device), SwinUnet(img_size=size).to(device)
    sgd = dict(lr=1e-3, momentum=0.9, weight_decay=1e-4)
    return DualNetworkTrainer(
        device, 1, loader, iterations, a, torch.optim.SGD(a.parameters(), **sgd), b,
        torch.optim.SGD(b.parameters(), **sgd), ict_warmup_iterations=0, amp=amp,
    )


def iteration_times(size: int = 224, labeled_batch: int = 1, unlabeled_batch: int = 4, runs: int = 5,
                    warmup: int = 2, amp: bool = False, device: str = "cpu") -> list[float]:
    """Seconds of each timed training iteration (after ``warmup`` untimed ones); the GPU is synchronised."""
    from ignite.engine import Events

    device = torch.device(device)
    trainer = _trainer(size, labeled_batch, unlabeled_batch, warmup + runs, amp, device)
    stamps: list[float] = []

    def stamp(_):
        _sync(device)
        stamps.append(time.perf_counter())

    trainer.add_event_handler(Events.ITERATION_STARTED, stamp)
    trainer.add_event_handler(Events.COMPLETED, stamp)
    trainer.run()
    return [t1 - t0 for t0, t1 in zip(stamps, stamps[1:])][warmup:]


def _iteration_child(queue, kwargs: dict) -> None:
    device = torch.device(kwargs["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = iteration_times(**kwargs)
    peak = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
    if device.type == "cuda":
        peak["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
    queue.put({"times": times, **peak})


def _in_fresh_process(target: Callable, kwargs: dict) -> dict:
    """Run ``target(queue, kwargs)`` in a spawned process and return what it put on the queue."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(queue, kwargs))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def inference_times(run: Callable[[], object], runs: int = 20, warmup: int = 3,
                    device: torch.device | None = None) -> list[float]:
    """Seconds of each call of ``run`` (after ``warmup`` untimed calls)."""
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        run()
        if device is not None:
            _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def median_ms(times: Sequence[float]) -> float:
    return 1000.0 * statistics.median(times)


def pipeline_report(work: Path, n_images: int, runs: int, input_dir: str | None, model: str | None) -> dict:
    """Time ``configs/inference.json`` on ``n_images`` images and break an image's time into stages.

    Stages come from the evaluator's own events: loading (GET_BATCH_STARTED..COMPLETED, split into decoding, timed
    alone with the config's LoadImaged + EnsureChannelFirstd, and the rest of the preprocessing), the forward
    (ITERATION_STARTED..FORWARD_COMPLETED), postprocessing (..MODEL_COMPLETED: softmax, Invertd back to the
    original size, argmax, SaveImaged) and the handlers (..ITERATION_COMPLETED: the ellipse measurement, timed
    alone on the written masks, and the overlay PNG).
    """
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow
    from monai.engines.utils import IterationEvents

    from scripts.data.phantom import generate_phantom
    from scripts.inference import list_images

    if input_dir is None:
        input_dir = str(generate_phantom(work / "phantom", num_subjects=n_images, progress=False))
    files = list_images(input_dir)[:n_images]
    if model is None and (BUNDLE_ROOT / "models" / "model.pt").is_file():
        model = str(BUNDLE_ROOT / "models" / "model.pt")
    ckpt_dir = work / "models"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if model is None:  # speed does not depend on the weights' values
        torch.save(UNeXt().state_dict(), ckpt_dir / "model.pt")
        described = "random UNeXt weights (no trained model found)"
    else:
        (ckpt_dir / "model.pt").write_bytes(Path(model).read_bytes())
        described = model
    workflow = ConfigWorkflow(config_file=str(BUNDLE_ROOT / "configs" / "inference.json"), workflow_type="infer",
                              meta_file=str(BUNDLE_ROOT / "configs" / "metadata.json"), bundle_root=str(BUNDLE_ROOT),
                              ckpt_dir=str(ckpt_dir), output_dir=str(work / "out"), datalist=files,
                              device=torch.device("cpu"))
    workflow.initialize()
    evaluator = workflow.parser.get_parsed_content("evaluator")
    stamps: dict[str, list[float]] = {}

    def at(name):
        return lambda _: stamps.setdefault(name, []).append(time.perf_counter())

    for event, name in ((Events.GET_BATCH_STARTED, "load0"), (Events.GET_BATCH_COMPLETED, "load1"),
                        (Events.ITERATION_STARTED, "it0"), (IterationEvents.FORWARD_COMPLETED, "fwd"),
                        (IterationEvents.MODEL_COMPLETED, "post"), (Events.ITERATION_COMPLETED, "done")):
        evaluator.add_event_handler(event, at(name))
    totals = []
    for _ in range(runs):
        stamps.clear()
        t0 = time.perf_counter()
        workflow.run()
        totals.append(time.perf_counter() - t0)
    size = tuple(int(s) for s in workflow.parser.get_parsed_content("spatial_size"))

    loader = workflow.parser.get_parsed_content("preprocessing").transforms[:2]  # LoadImaged, EnsureChannelFirstd
    decode = []
    for item in files:
        t0 = time.perf_counter()
        data = dict(item)
        for t in loader:
            data = t(data)
        decode.append(time.perf_counter() - t0)
    image_size = tuple(int(s) for s in data["image"].shape[1:])

    net = UNeXt().eval()
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        forward = [statistics.median(inference_times(lambda: net(x), runs=len(files), warmup=3)) for _ in range(runs)]

    from PIL import Image

    from scripts.biometry import fit_ellipse

    fits = []  # the ellipse fit alone, on the masks the run wrote
    for mask_file in sorted((work / "out").glob("*_mask.png"))[: len(files)]:
        mask = np.asarray(Image.open(mask_file)).T
        t0 = time.perf_counter()
        fit_ellipse(mask, (0.1, 0.1))
        fits.append(time.perf_counter() - t0)

    # means over the images of the last run, so that the stages and the rest add up to its time per image
    ms = lambda a, b: 1000.0 * statistics.fmean(y - x for x, y in zip(stamps[a], stamps[b]))  # noqa: E731
    load = ms("load0", "load1")
    fit_ms = 1000.0 * statistics.fmean(fits) if fits else 0.0
    stages = {
        "decode the file (LoadImaged)": 1000.0 * statistics.fmean(decode),
        "rest of preprocessing (scale, resize)": load - 1000.0 * statistics.fmean(decode),
        "forward (prepare_batch + UNeXt)": ms("it0", "fwd"),
        "postprocess (softmax, Invertd, save)": ms("fwd", "post"),
        "ellipse fit (timed alone)": fit_ms,
        "overlay: tint, outline, ellipse, PNG": ms("post", "done") - fit_ms,
    }
    pipeline_ms = 1000.0 * statistics.median(totals) / len(files)
    stages["engine, loader and handler overhead (rest)"] = 1000.0 * totals[-1] / len(files) - sum(stages.values())
    return {"n_images": len(files), "image_size": image_size, "spatial_size": size, "model": described,
            "forward_ms": 1000.0 * statistics.median(forward), "pipeline_ms": pipeline_ms, "stages_ms": stages}


class Benchmarks:
    def iteration(self, sizes: Sequence[int] = (224, 448), runs: int = 5, warmup: int = 2, labeled_batch: int = 1,
                  unlabeled_batch: int = 4, amp: Sequence[bool] = (False, True), device: str = "cpu") -> None:
        """Median s/iter of the full method per input size and precision, and each setting's peak memory."""
        where = torch.cuda.get_device_name(0) if torch.device(device).type == "cuda" else f"{torch.get_num_threads()} threads"
        print(f"torch {torch.__version__}, {device} ({where}), batch {labeled_batch} + {unlabeled_batch}, "
              f"median of {runs} after {warmup} warm-up, each setting in a fresh process", flush=True)
        for size in sizes:
            for use_amp in amp:
                kwargs = dict(size=size, labeled_batch=labeled_batch, unlabeled_batch=unlabeled_batch, runs=runs,
                              warmup=warmup, amp=use_amp, device=device)
                r = _in_fresh_process(_iteration_child, kwargs)
                t = r["times"]
                memory = f"peak RSS {r['peak_rss_gb']:.1f} GB"
                if "peak_gpu_gb" in r:
                    memory += f", peak GPU memory {r['peak_gpu_gb']:.2f} GB"
                print(f"{size:4d} px  {'bf16 autocast' if use_amp else 'fp32         '}  median "
                      f"{statistics.median(t):7.3f} s/iter  (min {min(t):.3f}, max {max(t):.3f}, n={len(t)})  {memory}",
                      flush=True)

    def latency(self, sizes: Sequence[int] = (224, 448), runs: int = 20, threads: int = 2, swin: bool = True) -> None:
        """Median batch-1 UNeXt inference in eager PyTorch, TorchScript (traced, frozen) and ONNX Runtime on CPU."""
        torch.set_num_threads(threads)
        print(f"torch {torch.__version__}, {threads} threads, batch 1, median of {runs} after 3 warm-up", flush=True)
        with tempfile.TemporaryDirectory() as tmp, torch.inference_mode(False), torch.no_grad():
            for size in sizes:
                x = torch.rand(1, 3, size, size)
                net = UNeXt().eval()
                scripted = torch.jit.freeze(torch.jit.trace(net, x))
                sess = onnx_session(export_onnx(net, x, Path(tmp) / f"unext{size}.onnx"), threads)
                feed = {"image": x.numpy()}
                rows = [("UNeXt eager", lambda: net(x)), ("UNeXt TorchScript", lambda: scripted(x)),
                        ("UNeXt ONNX Runtime", lambda: sess.run(None, feed))]
                if swin:
                    big = SwinUnet(img_size=size).eval()
                    rows.append(("Swin-Unet eager", lambda: big(x)))
                for name, run in rows:
                    print(f"{name:19s} {size:4d} px  median {median_ms(inference_times(run, runs)):7.1f} ms", flush=True)

    def pipeline(self, n_images: int = 100, threads: int = 2, runs: int = 3, input_dir: str | None = None,
                 model: str | None = None, work_dir: str | None = None) -> None:
        """``configs/inference.json`` on ``n_images`` phantom images (or ``input_dir``) vs the bare UNeXt forward."""
        torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory() as tmp:
            report = pipeline_report(Path(work_dir or tmp), n_images, runs, input_dir, model)
        print(f"torch {torch.__version__}, {threads} threads; {report['n_images']} images of {report['image_size']} "
              f"(W x H); model: {report['model']}; median of {runs} runs")
        print(f"bare UNeXt forward (batch 1, {report['spatial_size']} px): {report['forward_ms']:.1f} ms/image = "
              f"{1000 / report['forward_ms']:.1f} images/s")
        print(f"inference.json end to end: {report['pipeline_ms']:.1f} ms/image = {1000 / report['pipeline_ms']:.1f} "
              f"images/s = {report['forward_ms'] / report['pipeline_ms']:.2f} x the bare forward")
        print(f"where an image's time goes in the last run ({sum(report['stages_ms'].values()):.1f} ms per image; "
              "ms, mean over images):")
        for stage, ms in report["stages_ms"].items():
            print(f"  {stage:38s} {ms:7.1f}")


if __name__ == "__main__":
    fire.Fire(Benchmarks)
