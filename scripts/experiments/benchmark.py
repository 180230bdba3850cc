"""Speed and memory benchmarks that print figures (median of several runs after warm-up, same machine, side by side).

    python -m scripts.experiments.benchmark iteration --sizes "[224, 448]" --runs 5 --amp "[False,True]" [--device cuda]
    python -m scripts.experiments.benchmark iteration --sizes "[224]" --amp "[False]" --against d0bc723 --pairs 3
    python -m scripts.experiments.benchmark latency --sizes "[224, 448]" --runs 20 --threads 2
    python -m scripts.experiments.benchmark pipeline --n_images 100 --threads 2
    python -m scripts.experiments.benchmark floor --sizes "[224, 448]" --threads 2

``iteration`` times one full training iteration of the method (both networks, teacher, every loss, backward, both
optimiser steps, EMA update) on random tensors with ICT active, each setting in a fresh process so that its peak
memory is its own (resident memory on CPU; allocated GPU memory on CUDA), with the process's CPU time, kernel
(system) time and minor page faults per iteration. ``--against REV`` also runs the same measurement on the code of
another git revision (its files extracted to a temporary folder, imported by the child process in place of this
checkout's ``scripts``), alternating the two in fresh processes (A B A B ...), and reports the median ratio.
``latency`` times batch-1 UNeXt inference in eager PyTorch, TorchScript and ONNX Runtime (and the Swin-Unet in
eager for scale). ``pipeline`` runs ``configs/inference.json`` end to end on a folder of phantom images and sets its
throughput beside the bare network forward, with a stage-by-stage breakdown of where the rest of the time goes.
``floor`` counts an iteration's floating-point work per operation and sets the time of its matrix products beside
what this CPU's fastest fp32 matrix product would take for them: how far a faster implementation could go.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

# the iteration benchmark's child process may import an older revision's scripts package in place of this one:
# module-level imports are kept to what every revision has, each tried at its path in the layers first, then directly
# in scripts/ where a revision from before the layers (d0bc723) has it
from scripts.networks import SwinUnet, UNeXt

try:
    from scripts.method.trainer import DualNetworkTrainer, SemiSupervisedLoader
except ImportError:
    from scripts.trainer import DualNetworkTrainer, SemiSupervisedLoader

__all__ = ["measure_iterations", "inference_times", "median_ms", "side_by_side"]

BUNDLE_ROOT = Path(__file__).resolve().parents[2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trainer(
    size: int, labeled_batch: int, unlabeled_batch: int, iterations: int, amp: bool, device: torch.device
) -> DualNetworkTrainer:
    g = torch.Generator().manual_seed(0)
    labeled = [
        {
            "image": torch.rand(3, size, size, generator=g),
            "label": (torch.rand(1, size, size, generator=g) > 0.5).float(),
        }
        for _ in range(2 * labeled_batch)
    ]
    unlabeled = [{"image": torch.rand(3, size, size, generator=g)} for _ in range(2 * unlabeled_batch)]
    loader = SemiSupervisedLoader(
        DataLoader(labeled, batch_size=labeled_batch, shuffle=True, drop_last=True),
        DataLoader(unlabeled, batch_size=unlabeled_batch, shuffle=True, drop_last=True),
    )
    a, b = UNeXt().to(device), SwinUnet(img_size=size).to(device)
    sgd = dict(lr=1e-3, momentum=0.9, weight_decay=1e-4)
    optimizers = torch.optim.SGD(a.parameters(), **sgd), torch.optim.SGD(b.parameters(), **sgd)
    try:  # loss terms as components (scripts/method/terms.py; scripts/terms.py before the layers)
        try:
            from scripts.method import losses, terms
        except ImportError:
            from scripts import losses, terms
    except ImportError:  # a revision from before them (--against): the trainer took the weights as arguments
        return DualNetworkTrainer(
            device, 1, loader, iterations, a, optimizers[0], b, optimizers[1], ict_warmup_iterations=0, amp=amp
        )
    unsupervised = [
        terms.CrossPseudoSupervisionTerm(1.0),
        terms.InformationDivergenceTerm(1.0),
        terms.InterpolationConsistencyTerm(1.0, warmup_iterations=0),
    ]
    return DualNetworkTrainer(
        device,
        1,
        loader,
        iterations,
        a,
        optimizers[0],
        b,
        optimizers[1],
        loss_function=losses.SupervisedLoss(),
        terms=unsupervised,
        amp=amp,
    )


#: what :func:`measure_iterations` records per iteration
ITERATION_FIGURES = ("seconds", "user_s", "system_s", "minor_faults")


def _usage() -> tuple[float, float, int]:
    """This process's user and system CPU seconds and minor page faults so far (every thread)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def measure_iterations(
    size: int = 224,
    labeled_batch: int = 1,
    unlabeled_batch: int = 4,
    runs: int = 5,
    warmup: int = 2,
    amp: bool = False,
    device: str = "cpu",
    compile: bool = False,
    channels_last: bool = False,
) -> dict[str, list[float]]:
    """Per timed training iteration (after ``warmup`` untimed ones): wall seconds (the GPU synchronised), user and
    system CPU seconds and minor page faults of this process, as lists under :data:`ITERATION_FIGURES`.

    ``channels_last`` puts the UNeXt (the convolutional network) in channels-last memory format; ``compile`` runs
    both students through ``torch.compile`` (``Module.compile``, after the trainer has copied the EMA teacher, which
    stays eager); the compilation happens in the warm-up iterations."""
    from ignite.engine import Events

    device = torch.device(device)
    trainer = _trainer(size, labeled_batch, unlabeled_batch, warmup + runs, amp, device)
    if channels_last:
        trainer.network_a.to(memory_format=torch.channels_last)
    if compile:
        trainer.network_a.compile()
        trainer.network_b.compile()
    stamps: list[tuple[float, float, float, int]] = []

    def stamp(_):
        _sync(device)
        stamps.append((time.perf_counter(), *_usage()))

    trainer.add_event_handler(Events.ITERATION_STARTED, stamp)
    trainer.add_event_handler(Events.COMPLETED, stamp)
    trainer.run()
    deltas = [[b - a for a, b in zip(s0, s1)] for s0, s1 in zip(stamps, stamps[1:])][warmup:]
    return {name: [d[i] for d in deltas] for i, name in enumerate(ITERATION_FIGURES)}


def iteration_child(keep_freed_memory: bool | None = None, threads: int | None = None, **kwargs) -> dict:
    """One process's share of the iteration benchmark: :func:`measure_iterations` on the ``scripts`` package this
    process imports, with the peak memory, the code measured and how malloc was set.

    ``keep_freed_memory``: None sets malloc as that code's training config does (``scripts.method.settings.
    keep_freed_memory``, ``scripts.settings`` before the layers), True or False forces it on or off.
    """
    import scripts

    try:
        from scripts.method import settings
    except ImportError:  # a revision from before the layers
        from scripts import settings

    if threads:
        torch.set_num_threads(threads)
    keep = getattr(settings, "keep_freed_memory", None)
    if keep_freed_memory and keep is None:
        raise ValueError(f"{Path(scripts.__file__).parent} has no settings.keep_freed_memory to switch on")
    malloc = bool(keep()) if keep is not None and keep_freed_memory is not False else False
    device = torch.device(kwargs.get("device", "cpu"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = measure_iterations(**kwargs)
    result.update(
        peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,  # KiB -> GiB
        malloc_kept=malloc,
        code=str(Path(scripts.__file__).resolve().parents[1]),
        threads=torch.get_num_threads(),
    )
    if device.type == "cuda":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
    return result


# run in the child: load this file as a module (its `scripts` imports resolve in the child's working directory, the
# code measured), then print iteration_child's result as one JSON line
_CHILD = """import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_iteration_benchmark", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print("RESULT " + json.dumps(module.iteration_child(**json.loads(sys.argv[2]))), flush=True)
"""


def run_iteration_child(code_root: str | Path, **kwargs) -> dict:
    """:func:`iteration_child` in a fresh Python process whose ``scripts`` package is the one in ``code_root``."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(Path(__file__).resolve()), json.dumps(kwargs)],
        cwd=code_root,
        capture_output=True,
        text=True,
    )
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not results:
        raise RuntimeError(
            f"the iteration benchmark failed in {code_root} (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return json.loads(results[-1][len("RESULT ") :])


def extract_revision(revision: str, into: Path) -> str:
    """Write the files of git ``revision`` of this repository into ``into`` (``git archive``: no worktree, branch or
    index is touched); returns the commit's short hash."""
    found = subprocess.run(
        ["git", "-C", str(BUNDLE_ROOT), "rev-parse", "--short", "--verify", f"{revision}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if found.returncode:
        raise ValueError(f"--against {revision!r} is not a commit of the repository at {BUNDLE_ROOT}")
    commit = found.stdout.strip()
    archive = subprocess.run(
        ["git", "-C", str(BUNDLE_ROOT), "archive", "--format=tar", commit], capture_output=True, check=True
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return commit


def side_by_side(
    code: dict[str, tuple[Path, bool | None]], pairs: int, report: Callable[[str, dict], object] | None = None, **kwargs
) -> dict[str, list[dict]]:
    """Each ``label: (code_root, keep_freed_memory)`` measured ``pairs`` times, alternating A B A B ... in fresh
    processes, so that a change in the machine's load falls on both sides alike; ``report(label, result)`` is called
    after each process."""
    results: dict[str, list[dict]] = {label: [] for label in code}
    for _ in range(pairs):
        for label, (root, keep) in code.items():
            results[label].append(run_iteration_child(root, keep_freed_memory=keep, **kwargs))
            if report is not None:
                report(label, results[label][-1])
    return results


def _pooled_medians(results: Sequence[dict]) -> dict[str, float]:
    return {name: statistics.median(v for r in results for v in r[name]) for name in ITERATION_FIGURES}


def _iteration_line(label: str, results: Sequence[dict]) -> str:
    m = _pooled_medians(results)
    n = sum(len(r["seconds"]) for r in results)
    memory = f"peak RSS {max(r['peak_rss_gb'] for r in results):.1f} GiB"
    if "peak_gpu_gb" in results[0]:
        memory += f", peak GPU {max(r['peak_gpu_gb'] for r in results):.2f} GiB"
    return (
        f"{label}: median {m['seconds']:.3f} s/iter (n={n}); CPU {m['user_s'] + m['system_s']:.2f} s of which "
        f"system {m['system_s']:.2f} s; {m['minor_faults'] / 1e3:.0f} k minor page faults; {memory}; "
        f"malloc kept: {'/'.join(sorted({str(r['malloc_kept']) for r in results}))}"
    )


def inference_times(
    run: Callable[[], object], runs: int = 20, warmup: int = 3, device: torch.device | None = None
) -> list[float]:
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


def pipeline_report(
    work: Path,
    n_images: int,
    runs: int,
    input_dir: str | None,
    model: str | None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    writer_threads: int | None = None,
    stage_images: int = 20,
    device: str = "cpu",
) -> dict:
    """Throughput of ``configs/inference.json`` on ``n_images`` images against the bare UNeXt forward at its batch
    size, and what each stage of an image costs when timed alone.

    End to end (median of ``runs``, images per second): the default outputs without overlays (masks and
    measurements) and with overlays. ``batch_size``, ``num_workers`` and ``writer_threads`` are the config's unless
    given. The stages (decoding, the rest of the preprocessing, the forward at that batch size, the postprocessing
    up to the mask, writing the mask, the measurement, the overlay) are timed one after the other on the first
    ``stage_images`` images in this thread (the network on ``device``): the pipeline overlaps them (DataLoader
    workers decode, threads measure and draw), so their sum is the CPU work per image, not the pipeline's time per
    image.
    """
    from monai.bundle import ConfigWorkflow
    from monai.data import MetaTensor

    from scripts.data.phantom import generate_phantom
    from scripts.deployment.inference import MeasurementWriter, OverlayWriter, list_images

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
    given = {"batch_size": batch_size, "num_workers": num_workers, "writer_threads": writer_threads}
    overrides = {k: v for k, v in given.items() if v is not None}

    throughput = {}
    for setting, overlays, out in (("masks_measurements", False, "out_no_overlays"), ("with_overlays", True, "out")):
        workflow = ConfigWorkflow(
            config_file=str(BUNDLE_ROOT / "configs" / "inference.json"),
            workflow_type="infer",
            meta_file=str(BUNDLE_ROOT / "configs" / "metadata.json"),
            bundle_root=str(BUNDLE_ROOT),
            ckpt_dir=str(ckpt_dir),
            output_dir=str(work / out),
            datalist=files,
            device=torch.device(device),
            progress=False,
            save_overlays=overlays,
            **overrides,
        )
        workflow.initialize()
        totals = []
        for _ in range(runs):
            t0 = time.perf_counter()
            workflow.run()
            totals.append(time.perf_counter() - t0)
        throughput[setting] = len(files) / statistics.median(totals)
    parser = workflow.parser
    settings = {k: int(parser.get_parsed_content(k)) for k in given}
    size = tuple(int(s) for s in parser.get_parsed_content("spatial_size"))

    device = torch.device(device)
    net = parser.get_parsed_content("network").eval().to(device)
    net.load_state_dict(torch.load(ckpt_dir / "model.pt", map_location=device, weights_only=True))
    batch = settings["batch_size"]
    with torch.no_grad():
        x = torch.rand(batch, 3, *size, device=device)
        per_batch = statistics.median(
            inference_times(lambda: net(x), runs=max(3, len(files) // batch), warmup=2, device=device)
        )
    throughput["bare_forward"] = batch / per_batch

    preprocessing = parser.get_parsed_content("preprocessing")
    postprocessing = parser.get_parsed_content("postprocessing").transforms
    to_mask = [t for t in postprocessing if type(t).__name__ != "SaveImaged"]
    save_mask = [t for t in postprocessing if type(t).__name__ == "SaveImaged"]
    measurer = MeasurementWriter(str(work / "stages"), sector_key="original")
    drawer = OverlayWriter(str(work / "stages"), max_size=parser.get_parsed_content("overlay_max_size"))
    stages: dict[str, list[float]] = {}

    def timed(stage: str, run: Callable[[], object]):
        t0 = time.perf_counter()
        result = run()
        stages.setdefault(stage, []).append(1000.0 * (time.perf_counter() - t0))
        return result

    def chain(transforms, data):
        for t in transforms:
            data = t(data)
        return data

    for item in files[:stage_images]:
        data = timed(
            "decode the file (LoadImaged, EnsureChannelFirstd)", lambda: chain(preprocessing.transforms[:2], dict(item))
        )
        data = timed("rest of the preprocessing (scale, resize)", lambda: chain(preprocessing.transforms[2:], data))
        with torch.no_grad():
            logits = net(data["image"].as_tensor()[None].to(device))[0]
        data["pred"] = MetaTensor(logits.cpu())
        data = timed("postprocess to the mask (softmax, Invertd, argmax, clean)", lambda: chain(to_mask, data))
        timed("write the mask PNG (SaveImaged)", lambda: chain(save_mask, dict(data)))
        name = Path(item["image"]).name
        _, fit = timed(
            "measure (ellipse fit, quality flags, sector)",
            lambda: measurer.measure(data["pred"], item.get("pixel_size_mm"), name, data["original"]),
        )
        measurement = {"fit": fit, "pixel_size": (1.0, 1.0)}
        timed(
            "overlay PNG (draw at display size, write)",
            lambda: drawer.write(data["original"], data["pred"], Path(name).stem, measurement),
        )
    items = [(stage, statistics.fmean(values)) for stage, values in stages.items()]
    items.insert(2, (f"forward (batch {batch}, per image)", 1000.0 * per_batch / batch))
    image_size = tuple(int(s) for s in data["original"].shape[1:])
    return {
        "n_images": len(files),
        "image_size": image_size,
        "spatial_size": size,
        "model": described,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **settings,
        "images_per_s": throughput,
        "stages_ms": dict(items),
    }


#: the matrix products of an iteration (what ``floor`` sets beside the machine's matrix-product rate)
MATRIX_PRODUCTS = ("mm", "addmm", "bmm")


def _gflop_by_operation(counter) -> dict[str, float]:
    return {str(op).removeprefix("aten."): n / 1e9 for op, n in counter.get_flop_counts()["Global"].items()}


def count_flops(run: Callable[[], object]) -> dict[str, float]:
    """GFLOP of ``run()`` per aten operation (``torch.utils.flop_counter.FlopCounterMode``: a multiply-add counts
    2; it counts the operations it has formulas for: matrix products, convolutions, attention), backward included
    when ``run`` calls it."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return _gflop_by_operation(counter)


def matmul_rate(n: int = 4096, runs: int = 7) -> float:
    """This CPU's fp32 matrix-product rate in GFLOP/s: the median of ``runs`` products of two n x n matrices
    (2 n^3 operations each) after two warm-up ones, at torch's current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / 1e9 / statistics.median(inference_times(lambda: a @ b, runs, warmup=2))


def iteration_floor(size: int = 224, labeled_batch: int = 1, unlabeled_batch: int = 4) -> dict:
    """One CPU training iteration of the full method, built as :func:`measure_iterations` builds it (fp32), each
    iteration running from its ITERATION_STARTED to the next one's: ``gflop``, iteration 2's work per operation
    (as :func:`count_flops` counts it), and under ``torch.profiler`` iteration 3's wall ``seconds`` and
    ``self_cpu_s``, each operation's own time (the profiler times an operation on the thread that calls it, so
    this is its wall time with its intra-op threads; the operations add up to about the iteration's wall time)."""
    from ignite.engine import Events
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    trainer = _trainer(size, labeled_batch, unlabeled_batch, 3, False, torch.device("cpu"))
    counter, profiler = FlopCounterMode(display=False), profile(activities=[ProfilerActivity.CPU])
    window, marks = contextlib.ExitStack(), []

    def started(engine) -> None:
        window.close()
        marks.append(time.perf_counter())
        window.enter_context({2: counter, 3: profiler}.get(engine.state.iteration, contextlib.nullcontext()))

    def completed(_) -> None:
        window.close()
        marks.append(time.perf_counter())

    trainer.add_event_handler(Events.ITERATION_STARTED, started)
    trainer.add_event_handler(Events.COMPLETED, completed)
    trainer.run()
    return {
        "gflop": _gflop_by_operation(counter),
        "seconds": marks[3] - marks[2],
        "self_cpu_s": {e.key.removeprefix("aten::"): e.self_cpu_time_total / 1e6 for e in profiler.key_averages()},
    }


class Benchmarks:
    """``python -m scripts.experiments.benchmark iteration``, ``latency``, ``pipeline`` and ``floor``."""

    def iteration(
        self,
        sizes: Sequence[int] = (224, 448),
        runs: int = 5,
        warmup: int = 2,
        labeled_batch: int = 1,
        unlabeled_batch: int = 4,
        amp: Sequence[bool] = (False, True),
        device: str = "cpu",
        threads: int | None = None,
        against: str | None = None,
        pairs: int = 3,
        keep_freed_memory: bool | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        """Median s/iter of the full method per input size and precision, with CPU and kernel time, minor page
        faults and peak memory; ``--against REV`` sets this checkout beside git revision REV (A B A B ...,
        ``pairs`` processes each) and reports the median of the pairs' time ratios. ``--threads`` sets torch's
        thread count (default: torch's own); ``--keep_freed_memory True/False`` forces the malloc setting on or off
        on both sides (default: as each side's training config sets it). ``--compile True`` / ``--channels_last True``
        time ``torch.compile`` and the UNeXt in channels-last (this checkout only, not with ``--against``)."""
        if against is not None and (compile or channels_last):
            raise ValueError("--compile and --channels_last time this checkout only; leave out --against")
        if torch.device(device).type == "cuda":
            where = torch.cuda.get_device_name(0)
        else:
            where = (
                f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
                f"{'yes' if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 'no'}, "
                f"{threads or torch.get_num_threads()} threads"
            )
        print(
            f"torch {torch.__version__}, {device} ({where}), batch {labeled_batch} + {unlabeled_batch}, "
            f"median of {runs} after {warmup} warm-up, every process fresh",
            flush=True,
        )
        with tempfile.TemporaryDirectory() as tmp:
            code = {"this checkout": (BUNDLE_ROOT, keep_freed_memory)}
            if against is not None:
                commit = extract_revision(against, Path(tmp))
                code[commit] = (Path(tmp), keep_freed_memory)
                print(f"side by side with {against} ({commit}), {pairs} processes each, alternating", flush=True)
            for size in sizes:
                for use_amp in amp:
                    precision = ("bf16 autocast" if use_amp else "fp32") + " compiled" * compile
                    precision += " channels-last" * channels_last
                    kwargs = dict(
                        size=size,
                        labeled_batch=labeled_batch,
                        unlabeled_batch=unlabeled_batch,
                        runs=runs,
                        warmup=warmup,
                        amp=use_amp,
                        device=device,
                        threads=threads,
                        **({"compile": True} if compile else {}),
                        **({"channels_last": True} if channels_last else {}),
                    )

                    def progress(label: str, result: dict) -> None:
                        times = ", ".join(f"{t:.2f}" for t in result["seconds"])
                        print(f"  {size} px {precision}, {label}: {times} s", flush=True)

                    results = side_by_side(
                        code, pairs if against is not None else 1, progress if against is not None else None, **kwargs
                    )
                    for label, res in results.items():
                        print(f"{size:4d} px {precision:13s} {_iteration_line(label, res)}", flush=True)
                    if against is not None:
                        mine, theirs = results.values()
                        ratios = [
                            statistics.median(a["seconds"]) / statistics.median(b["seconds"])
                            for a, b in zip(mine, theirs)
                        ]
                        cpu = [
                            statistics.median(u + s for u, s in zip(a["user_s"], a["system_s"]))
                            / statistics.median(u + s for u, s in zip(b["user_s"], b["system_s"]))
                            for a, b in zip(mine, theirs)
                        ]
                        r = statistics.median(ratios)
                        print(
                            f"{size:4d} px {precision:13s} this checkout / {commit}: median time ratio {r:.3f} "
                            f"({1 / r:.2f}x; pairs {', '.join(f'{x:.3f}' for x in ratios)}), CPU-time ratio "
                            f"{statistics.median(cpu):.3f}",
                            flush=True,
                        )

    def latency(self, sizes: Sequence[int] = (224, 448), runs: int = 20, threads: int = 2, swin: bool = True) -> None:
        """Median batch-1 UNeXt inference in eager PyTorch, TorchScript (traced, frozen) and ONNX Runtime on CPU."""
        from scripts.deployment.onnx_network import export_onnx, onnx_session

        torch.set_num_threads(threads)
        print(f"torch {torch.__version__}, {threads} threads, batch 1, median of {runs} after 3 warm-up", flush=True)
        with tempfile.TemporaryDirectory() as tmp, torch.inference_mode(False), torch.no_grad():
            for size in sizes:
                x = torch.rand(1, 3, size, size)
                net = UNeXt().eval()
                scripted = torch.jit.freeze(torch.jit.trace(net, x))
                sess = onnx_session(export_onnx(net, x, Path(tmp) / f"unext{size}.onnx"), threads)
                feed = {"image": x.numpy()}
                rows = [
                    ("UNeXt eager", lambda: net(x)),
                    ("UNeXt TorchScript", lambda: scripted(x)),
                    ("UNeXt ONNX Runtime", lambda: sess.run(None, feed)),
                ]
                if swin:
                    big = SwinUnet(img_size=size).eval()
                    rows.append(("Swin-Unet eager", lambda: big(x)))
                for name, run in rows:
                    print(
                        f"{name:19s} {size:4d} px  median {median_ms(inference_times(run, runs)):7.1f} ms", flush=True
                    )

    def floor(
        self, sizes: Sequence[int] = (224, 448), threads: int = 2, labeled_batch: int = 1, unlabeled_batch: int = 4
    ) -> None:
        """How far the fp32 iteration on this CPU is from its matrix products alone: the iteration's GFLOP per
        operation, its wall time and the time of its matrix products (profiled), beside the time those
        products would take at this CPU's n = 4096 matrix-product rate. Run it on a quiet machine."""
        from scripts.method.settings import keep_freed_memory

        keep_freed_memory()  # as training sets malloc (large products run at half speed in freshly mapped memory)
        torch.set_num_threads(threads)
        rate = matmul_rate()
        print(
            f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
            f"{'yes' if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 'no'}, {threads} threads, fp32; batch "
            f"{labeled_batch} + {unlabeled_batch}; matrix product of two 4096 x 4096 matrices: {rate:.0f} GFLOP/s",
            flush=True,
        )
        for size in sizes:
            found = iteration_floor(size, labeled_batch, unlabeled_batch)
            gflop, own = found["gflop"], found["self_cpu_s"]
            products = sum(gflop.get(op, 0.0) for op in MATRIX_PRODUCTS)
            seconds = sum(own.get(op, 0.0) for op in MATRIX_PRODUCTS)
            print(
                f"{size:4d} px: {sum(gflop.values()):.1f} GFLOP counted ("
                + ", ".join(f"{op} {n:.1f}" for op, n in sorted(gflop.items(), key=lambda kv: -kv[1]))
                + f"); iteration (profiled) {found['seconds']:.2f} s, of which the matrix products "
                f"({', '.join(MATRIX_PRODUCTS)}, {products:.1f} GFLOP) {seconds:.2f} s = "
                f"{products / seconds:.0f} GFLOP/s "
                f"({products / rate:.2f} s at the 4096 rate) and everything else {found['seconds'] - seconds:.2f} s",
                flush=True,
            )

    def pipeline(
        self,
        n_images: int = 100,
        threads: int = 2,
        runs: int = 3,
        input_dir: str | None = None,
        model: str | None = None,
        work_dir: str | None = None,
        batch_size: int | None = None,
        num_workers: int | None = None,
        writer_threads: int | None = None,
        device: str = "cpu",
    ) -> None:
        """``configs/inference.json`` on ``n_images`` phantom images (or ``input_dir``), with and without overlays,
        against the bare UNeXt forward at the same batch size; then each stage's cost per image, timed alone.
        ``--device cuda`` runs the network there (the rest of the pipeline stays on the CPU)."""
        torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory() as tmp:
            report = pipeline_report(
                Path(work_dir or tmp),
                n_images,
                runs,
                input_dir,
                model,
                batch_size,
                num_workers,
                writer_threads,
                device=device,
            )
        rates = report["images_per_s"]
        print(
            f"torch {torch.__version__}, {report['device']}, {threads} threads; {report['n_images']} images of "
            f"{report['image_size']} "
            f"(W x H); model: {report['model']}; batch {report['batch_size']}, {report['num_workers']} DataLoader "
            f"workers, {report['writer_threads']} writer threads; median of {runs} runs"
        )
        print(
            f"bare UNeXt forward (batch {report['batch_size']}, {report['spatial_size']} px): "
            f"{rates['bare_forward']:.1f} images/s"
        )
        for setting, label in (("masks_measurements", "masks + measurements"), ("with_overlays", "+ overlays")):
            print(
                f"inference.json, {label:20s}: {rates[setting]:6.1f} images/s = "
                f"{rates[setting] / rates['bare_forward']:.2f} x the bare forward"
            )
        print(
            f"each stage's cost per image, timed alone one after the other ({sum(report['stages_ms'].values()):.1f} "
            "ms in all; the pipeline overlaps them):"
        )
        for stage, ms in report["stages_ms"].items():
            print(f"  {stage:58s} {ms:7.1f} ms")


if __name__ == "__main__":
    from scripts.utils.cli import main

    bench = Benchmarks()
    main(
        {"iteration": bench.iteration, "latency": bench.latency, "pipeline": bench.pipeline, "floor": bench.floor},
        __doc__,
        prog="python -m scripts.experiments.benchmark",
    )
