"""Inference and training speed against plain PyTorch, memory, and fast-path agreement (``isdnet-bench speed``).

Everything is measured in one run on one machine, so the ratios are comparable even on a busy machine:

- inference of an SU-Net on a LASC-sized (88 x 320 x 320) and a CT-sized (200 x 512 x 512) volume, through
  ``segment()`` and through a plain float32, contiguous, batch-1 loop with the same weights; slices/s, their
  ratio, GFLOP/s (``torch.utils.flop_counter``) against the matrix-multiply peak measured here, peak RSS;
- the peak memory of ``segment()`` on a 600 x 512 x 512 volume, against input + output + 1 GB;
- a ``baseline`` and an ``isdnet`` training step on the same slices;
- the Dice between the fast path's and the float32 segmentations of a phantom and of real hippocampus MRI;
- ``isdnet rank`` (``rank_volumes``, every signal the model has) on 50 hippocampus volumes, against a minute.

Each inference measurement runs in its own child process so its peak resident memory is its own. One file of
about 550 lines on purpose: the five sections share the timing, peak and child-process helpers, and each is a
short function over them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from isdnet.config import TrainConfig
from isdnet.dataset import load_dataset
from isdnet.distributed import ProcessGroup
from isdnet.geometry import NORMALISATION, SliceGeometry, prepare_volume
from isdnet.images import read_image
from isdnet.infer import segment
from isdnet.metrics import dice_per_class
from isdnet.modelfile import load_model, make_header, save_model
from isdnet.networks import SUNet, build_network
from isdnet.runtime import resolve_device, resolve_precision, to_device
from isdnet.slices import CachedVolume, SliceDataset, epoch_batches
from isdnet.train import train
from isdnet.trainer import Trainer

from .machine import describe_machine

GIB = 1024**3
SECTIONS = ("inference", "memory", "training", "agreement", "rank")
HIPPOCAMPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"
RANK_VOLUMES = 50  # issue 15: `isdnet rank` on 50 hippocampus volumes ...
RANK_TARGET_S = 60.0  # ... in under a minute on 2 cores


@dataclass
class Sizes:
    """The problem sizes of a full or a ``--quick`` run."""

    width: int  # SU-Net base width of the inference network
    lasc: tuple[int, int, int]  # (slices, rows, cols)
    ct: tuple[int, int, int]
    large: tuple[int, int, int]  # the memory check
    large_width: int  # SU-Net width for the memory check (activations are measured on the CT row)
    reference_slices: tuple[int, int]  # slices of the plain loop timed on (LASC, CT)
    train_size: int
    train_batch: int
    agreement_width: int
    agreement_steps: int
    rank_volumes: int


FULL = Sizes(width=32, lasc=(88, 320, 320), ct=(200, 512, 512), large=(600, 512, 512), large_width=8,
             reference_slices=(16, 6), train_size=128, train_batch=8, agreement_width=16, agreement_steps=400,
             rank_volumes=RANK_VOLUMES)
QUICK = Sizes(width=8, lasc=(4, 64, 64), ct=(3, 96, 96), large=(6, 96, 96), large_width=8,
              reference_slices=(2, 1), train_size=32, train_batch=2, agreement_width=8, agreement_steps=2,
              rank_volumes=3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``isdnet-bench speed``."""
    parser.add_argument("--out", type=Path, default=Path("bench-speed.json"), help="JSON results file")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, in-process: checks the benchmark runs")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--batch-size", type=int, default=None, help="segment()'s batch size (default: its own)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each training and matmul timing")
    parser.add_argument("--large-width", type=int, default=None,
                        help="SU-Net width for the 600-slice memory check (default 8: the full width takes long)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these sections (the others are left out of the table and the JSON)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a trained hippocampus model for the agreement and rank checks (default: train one "
                             "briefly; for rank an isdnet model, so that D's signal is timed too)")


def run(args: argparse.Namespace) -> None:
    """Run every section, print the table and write the JSON file."""
    sizes = QUICK if args.quick else FULL
    repeats = 1 if args.quick else args.repeats
    if args.large_width:
        sizes.large_width = args.large_width
    device = resolve_device(args.device)
    dtype = resolve_precision(args.precision, device)
    started = time.monotonic()
    results: dict[str, Any] = {
        "command": "isdnet-bench speed" + (" --quick" if args.quick else ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(device),
        "device": str(device), "dtype": _dtype_name(dtype), "threads": torch.get_num_threads(),
        "quick": args.quick,
    }
    matmul_n = 256 if args.quick else 8192 if device.type == "cuda" else 2048
    results["matmul_peak_gflops"] = {
        name: matmul_peak(device, d, matmul_n, repeats)
        for name, d in {"fp32": torch.float32, _dtype_name(dtype): dtype}.items()}
    with tempfile.TemporaryDirectory(prefix="isdnet-bench-") as tmp:
        if "inference" in args.only:
            model_path = _random_model(Path(tmp) / "sunet.safetensors", sizes.width, sizes.lasc[1])
            results["inference"] = [
                inference_row(name, shape, model_path, device, dtype, args, ref_slices, matmul_n, repeats)
                for name, shape, ref_slices in (("LASC", sizes.lasc, sizes.reference_slices[0]),
                                                ("CT", sizes.ct, sizes.reference_slices[1]))]
        if "memory" in args.only:
            large_model = _random_model(Path(tmp) / "sunet-large.safetensors", sizes.large_width, sizes.large[1])
            results["memory"] = memory_row(sizes.large, large_model, sizes.large_width, device, args)
    if "training" in args.only:
        results["training"] = training_rows(sizes, device, args.precision, repeats)
    if "agreement" in args.only:
        results["agreement"] = agreement_rows(sizes, args)
    if "rank" in args.only:
        results["rank"] = rank_row(sizes, args)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    args.out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(format_table(results))
    print(f"\nwritten: {args.out}")


# ----------------------------------------------------------------------------------------------------
# Machine and peaks


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _median_time(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    _synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Measured GFLOP/s of an n x n matrix multiply in ``dtype``: the machine's practical peak."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    calls = 4 if dtype == torch.float32 else 16
    seconds = _median_time(lambda: [torch.mm(a, b) for _ in range(calls)], max(3, repeats), device)
    return round(2 * n**3 * calls / seconds / 1e9, 1)


def flops_per_slice(width: int, rows: int, cols: int) -> float:
    """Forward FLOPs of the SU-Net on one slice, counted by ``torch.utils.flop_counter`` on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    net = SUNet(1, 2, width).to("meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.empty(1, 1, rows, cols, device="meta"))
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------------
# Inference rows, each measured in a child process


def _random_model(path: Path, width: int, size: int) -> Path:
    """A model file with a fixed-seed SU-Net (speed does not depend on the weights)."""
    torch.manual_seed(0)
    net = SUNet(1, 2, width)
    geometry = SliceGeometry("z", (1.0, 1.0), (size // 16 * 16, size // 16 * 16)).to_dict()
    header = make_header(["background", "structure"], dict(NORMALISATION), geometry, net, method="baseline")
    return save_model(path, header, net)


def synthetic_volume(shape: tuple[int, int, int]) -> sitk.Image:
    """An int16 volume of ``shape`` (slices, rows, cols), 1 mm in-plane and 2.5 mm apart, built slice by slice."""
    image = sitk.Image([shape[2], shape[1], shape[0]], sitk.sitkInt16)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:shape[1], :shape[2]]
    disc = ((yy - shape[1] / 2) ** 2 + (xx - shape[2] / 2) ** 2) < (min(shape[1:]) / 3) ** 2
    for z in range(shape[0]):
        plane = (disc * 600 + rng.normal(0, 50, disc.shape)).astype(np.int16)
        image = sitk.Paste(image, sitk.GetImageFromArray(plane[None]), [shape[2], shape[1], 1], [0, 0, 0],
                           [0, 0, z])
    image.SetSpacing((1.0, 1.0, 2.5))
    return image


def _memory_now() -> tuple[float, float]:
    """(current, peak) resident memory of this process in bytes; the peak since the last ``_reset_peak``."""
    status = Path("/proc/self/status")
    if status.exists():
        fields = dict(line.split(":", 1) for line in status.read_text(encoding="utf-8").splitlines() if ":" in line)
        return float(fields["VmRSS"].split()[0]) * 1024, float(fields["VmHWM"].split()[0]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float("nan"), float(peak * (1 if platform.system() == "Darwin" else 1024))


def _reset_peak() -> bool:
    """Restart the peak-RSS count (Linux: ``clear_refs``); False where the peak covers the whole process."""
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="utf-8")
    except OSError:
        return False
    return True


def inference_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One timed inference in this process: ``segment()`` ("fast") or the plain float32 batch-1 loop.

    The matrix-multiply peak of the path's dtype is measured here too, just before the timed run, so that the
    fraction of peak compares two rates taken under the same load (a shared machine's speed drifts in minutes).
    """
    torch.manual_seed(0)
    image = synthetic_volume(tuple(spec["shape"]))
    model = load_model(spec["model"])
    device = torch.device(spec["device"])
    warm = synthetic_volume((2, *spec["shape"][1:]))
    batch = {} if spec["batch_size"] is None else {"batch_size": spec["batch_size"]}
    prepare_seconds = 0.0
    if spec["mode"] == "fast":
        segment(warm, model, device=spec["device"], precision=spec["precision"], **batch)
        peak_gflops = (matmul_peak(device, resolve_precision(spec["precision"], device), spec["matmul_n"],
                                   spec["repeats"]) if spec["matmul_n"] else None)
        start = time.perf_counter()
        prepare_volume(image, SliceGeometry.from_dict(model.header["geometry"]))
        prepare_seconds = time.perf_counter() - start
        rss_before, _ = _memory_now()
        reset = _reset_peak()
        start = time.perf_counter()
        result = segment(image, model, device=spec["device"], precision=spec["precision"], **batch)
        seconds = time.perf_counter() - start
        slices = spec["shape"][0]
        output_bytes = result.labels.GetNumberOfPixels() * result.labels.GetSizeOfPixelComponent()
    else:
        net = build_network(model.header["architecture"]["segmenter"])
        net.load_state_dict(model.segmenter.state_dict())
        net = net.to(device).eval()
        geometry = SliceGeometry.from_dict(model.header["geometry"])
        prepared = prepare_volume(image, geometry)
        slices = min(spec["reference_slices"], prepared.num_slices)

        def loop(count: int) -> None:
            with torch.no_grad():
                for i in range(count):
                    x = torch.from_numpy(prepared.image[i:i + 1][:, None].copy()).to(device)
                    net(x).argmax(1).to(torch.uint8).cpu()

        loop(1)
        peak_gflops = matmul_peak(device, torch.float32, spec["matmul_n"], spec["repeats"])
        rss_before, _ = _memory_now()
        reset = _reset_peak()
        start = time.perf_counter()
        loop(slices)
        _synchronize(device)
        seconds = time.perf_counter() - start
        output_bytes = 0
    _, peak = _memory_now()
    input_bytes = image.GetNumberOfPixels() * image.GetSizeOfPixelComponent()
    return dict(seconds=seconds, prepare_seconds=prepare_seconds, slices=slices, rss_before=rss_before,
                peak_rss=peak, peak_is_local=reset, peak_gflops=peak_gflops,
                input_bytes=input_bytes, output_bytes=output_bytes)


def _run_child(spec: dict[str, Any], isolate: bool) -> dict[str, Any]:
    """``inference_child(spec)`` in a fresh spawned process (so its peak memory is its own), or in this one."""
    if not isolate:
        return inference_child(spec)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(inference_child, (spec,))


def inference_row(name: str, shape: tuple[int, int, int], model_path: Path, device: torch.device,
                  dtype: torch.dtype, args: argparse.Namespace, reference_slices: int, matmul_n: int,
                  repeats: int) -> dict[str, Any]:
    """segment() against the plain float32 batch-1 loop on one volume size."""
    spec = dict(shape=list(shape), model=str(model_path), device=str(device), precision=args.precision,
                batch_size=args.batch_size, reference_slices=reference_slices, matmul_n=matmul_n, repeats=repeats)
    fast = _run_child({**spec, "mode": "fast"}, isolate=not args.quick)
    plain = _run_child({**spec, "mode": "reference"}, isolate=not args.quick)
    width = load_model(model_path).header["architecture"]["segmenter"]["base_channels"]
    flops = flops_per_slice(width, shape[1], shape[2])
    row: dict[str, Any] = {"volume": name, "shape": list(shape), "gflop_per_slice": round(flops / 1e9, 2)}
    for key, measured, peak_dtype in (("fast", fast, _dtype_name(dtype)), ("plain_fp32", plain, "fp32")):
        # FLOP rates count the network's time only: segment()'s volume preparation is timed apart and left out.
        rate = measured["slices"] / measured["seconds"]
        network_rate = measured["slices"] / (measured["seconds"] - measured["prepare_seconds"])
        row[key] = dict(slices_timed=measured["slices"], slices_per_s=round(rate, 3),
                        prepare_s=round(measured["prepare_seconds"], 2),
                        network_slices_per_s=round(network_rate, 3), gflops=round(network_rate * flops / 1e9, 1),
                        peak_gflops=measured["peak_gflops"],
                        fraction_of_peak=round(network_rate * flops / 1e9 / measured["peak_gflops"], 3),
                        peak_dtype=peak_dtype, peak_rss_gib=round(measured["peak_rss"] / GIB, 3),
                        extra_rss_gib=round((measured["peak_rss"] - measured["rss_before"]) / GIB, 3))
    row["speedup"] = round(row["fast"]["slices_per_s"] / row["plain_fp32"]["slices_per_s"], 2)
    row["speedup_network"] = round(row["fast"]["network_slices_per_s"] / row["plain_fp32"]["slices_per_s"], 2)
    return row


def memory_row(shape: tuple[int, int, int], model_path: Path, width: int, device: torch.device,
               args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of segment() on a large volume against the target input + output + 1 GB."""
    measured = _run_child(dict(shape=list(shape), model=str(model_path), device=str(device), mode="fast",
                               precision=args.precision, batch_size=args.batch_size, reference_slices=0,
                               matmul_n=0, repeats=0),
                          isolate=not args.quick)
    extra = measured["peak_rss"] - measured["rss_before"]
    return dict(shape=list(shape), width=width, seconds=round(measured["seconds"], 1),
                input_gib=round(measured["input_bytes"] / GIB, 3),
                output_gib=round(measured["output_bytes"] / GIB, 3), peak_rss_gib=round(measured["peak_rss"] / GIB, 3),
                rss_before_gib=round(measured["rss_before"] / GIB, 3),
                extra_gib=round(extra / GIB, 3), peak_is_local=measured["peak_is_local"],
                within_target=bool(extra - measured["output_bytes"] <= GIB))


# ----------------------------------------------------------------------------------------------------
# Training


def training_rows(sizes: Sizes, device: torch.device, precision: str, repeats: int) -> list[dict[str, Any]]:
    """Slices/s of a baseline and an isdnet step on the same slices, in float32 and in the resolved precision,
    and the time the training loop spends making such a batch (loading, copy to the device, augmentation).

    The same B slices go through S in both: baseline treats all as labeled, isdnet half as labeled and half as
    unlabeled (so the cost of D and D0 is what the ratio shows).
    """
    generator = torch.Generator().manual_seed(0)
    b, size = sizes.train_batch, sizes.train_size
    x = torch.randn(b, 1, size, size, generator=generator)
    y = torch.randint(0, 2, (b, size, size), generator=generator)
    dtypes = {resolve_precision(precision, device, training=True), torch.float32, torch.bfloat16}
    rows = []
    for dtype in sorted(dtypes, key=_dtype_name):
        t_baseline = _step_time("baseline", x, y, sizes.width, device, dtype, repeats)
        t_isdnet = _step_time("isdnet", x, y, sizes.width, device, dtype, repeats)
        rows.append(dict(dtype=_dtype_name(dtype), slice_size=size, batch=b,
                         baseline_slices_per_s=round(b / t_baseline, 3), isdnet_slices_per_s=round(b / t_isdnet, 3),
                         isdnet_over_baseline=round(t_isdnet / t_baseline, 2)))
    data_seconds = _batch_time(b, size, device, repeats)
    for row in rows:
        row["data_ms"] = 1000 * data_seconds
        row["data_share_of_isdnet_step"] = data_seconds * row["isdnet_slices_per_s"] / b  # rounded in the table only
    return rows


def _batch_time(batch: int, size: int, device: torch.device, repeats: int) -> float:
    """Median seconds the training loop takes to make one isdnet batch of ``batch`` slices (half labeled, half
    unlabeled) from float16 slices in memory, as ``epoch_batches`` does: crop, copy to the device, augment."""
    rng = np.random.default_rng(0)

    def volumes(labeled: bool) -> list[CachedVolume]:
        images = [rng.normal(size=(32, size, size)).astype(np.float16) for _ in range(4)]
        return [CachedVolume(image=im, label=(im > 1).astype(np.uint8) if labeled else None, minimum=float(im.min()))
                for im in images]

    labeled = SliceDataset(volumes(True), size, labeled=True, random_crop=True)
    unlabeled = SliceDataset(volumes(False), size, labeled=False, random_crop=True)
    config = TrainConfig(method="isdnet", batch_size=max(1, batch // 2), warmup_epochs=0)
    batches = epoch_batches(labeled, unlabeled, config, 1, device, ProcessGroup())
    return _median_time(lambda: next(batches), max(5, repeats), device)


# ----------------------------------------------------------------------------------------------------
# Agreement


def _step_time(method: str, x: torch.Tensor, y: torch.Tensor, width: int, device: torch.device,
               dtype: torch.dtype, repeats: int) -> float:
    """Median seconds of one ``Trainer.train_step``; isdnet gets the first half of x as labeled, the rest not."""
    trainer = Trainer(TrainConfig(method=method, base_channels=width), 2, device, dtype)
    x, y = to_device(x, device), y.to(device)
    half = len(x) // 2
    if method == "baseline":
        return _median_time(lambda: trainer.train_step(x, y), repeats, device)
    return _median_time(lambda: trainer.train_step(x[:half], y[:half], x[half:]), repeats, device)


def _segmentation_dice(fast: sitk.Image, reference: sitk.Image, labels: list[int]) -> float:
    """Mean Dice over the foreground labels between two label maps (1.0 where both are empty)."""
    per_class = dice_per_class(sitk.GetArrayFromImage(fast), sitk.GetArrayFromImage(reference), labels)
    return float(np.mean(list(per_class.values())))


def agreement_rows(sizes: Sizes, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Dice between the fast path and float32 on a phantom and on real hippocampus MRI (when present)."""
    from isdnet.phantoms import write_phantom_dataset

    rows = []
    with tempfile.TemporaryDirectory(prefix="isdnet-agree-") as tmp:
        phantom_dir = write_phantom_dataset(Path(tmp) / "phantom", 3, seed=0)
        sets = [("phantom", phantom_dir, None)]
        if HIPPOCAMPUS.is_dir() and not args.quick:
            sets.append(("hippocampus", HIPPOCAMPUS, args.model))
        for name, folder, model_path in sets:
            spec = load_dataset(folder)
            train_cases, test_cases = _split(name, folder, spec.cases)
            if model_path is None:
                config = TrainConfig(method="baseline", epochs=1, steps_per_epoch=sizes.agreement_steps,
                                     base_channels=sizes.agreement_width, validation_fraction=0.0,
                                     precision="fp32", device="cpu", learning_rate=1e-3)
                model_path = Path(tmp) / f"{name}.safetensors"
                train(train_cases, [], spec.labels, model_path, config)
            model = load_model(model_path)
            labels = [v for v in sorted(spec.labels) if v]
            scores = []
            for case in test_cases:
                image = read_image(case.image)
                fast = segment(image, model, device=args.device, precision=args.precision).labels
                reference = segment(image, model, device="cpu", precision="fp32").labels
                scores.append(_segmentation_dice(fast, reference, labels))
            rows.append(dict(data=name, cases=len(test_cases), trained_steps=None if args.model and name != "phantom"
                             else sizes.agreement_steps, min_dice=round(min(scores), 4),
                             mean_dice=round(float(np.mean(scores)), 4)))
    return rows


def rank_row(sizes: Sizes, args: argparse.Namespace) -> dict[str, Any]:
    """``rank_volumes`` with strategy ``combined`` (every signal the model has: one pass of S, its flip, and D) on
    ``sizes.rank_volumes`` hippocampus volumes (phantoms with ``--quick``), timed end to end from the files."""
    from isdnet.phantoms import write_phantom_dataset
    from isdnet.rank import rank_volumes

    with tempfile.TemporaryDirectory(prefix="isdnet-rank-") as tmp:
        real = HIPPOCAMPUS.is_dir() and not args.quick
        folder = HIPPOCAMPUS if real else write_phantom_dataset(Path(tmp) / "phantom", sizes.rank_volumes, seed=0)
        spec = load_dataset(folder)
        cases = spec.cases[:sizes.rank_volumes]
        model_path = given = args.model if real else None
        if model_path is None:  # the engine's default networks, 2 steps in: the cost does not depend on the weights
            config = TrainConfig(method="isdnet", epochs=1, warmup_epochs=0, steps_per_epoch=2,
                                 validation_fraction=0.0, device="cpu")
            model_path = Path(tmp) / "isdnet.safetensors"
            train(cases[:2], cases[2:4] or cases[:1], spec.labels, model_path, config)
        started = time.perf_counter()
        ranked = rank_volumes(cases, model_path, "combined", device=args.device, precision=args.precision)
        seconds = time.perf_counter() - started
    target = RANK_TARGET_S * len(ranked) / RANK_VOLUMES  # the minute for 50 volumes, prorated
    return dict(data="hippocampus" if real else "phantom", volumes=len(ranked),
                signals=sorted(ranked[0].scores), model=str(given) if given else "engine defaults, 2 steps trained",
                seconds=round(seconds, 2), seconds_per_volume=round(seconds / len(ranked), 3),
                target_s=target, within_target=seconds <= target)


def _split(name: str, folder: Path, cases: list[Any]) -> tuple[list[Any], list[Any]]:
    """Training and test cases: the dataset's own split file when it has one, else all but the last case."""
    split_file = folder / "splits.json"
    if name == "hippocampus" and split_file.exists():
        split = json.loads(split_file.read_text(encoding="utf-8"))
        by_name = {Path(c.image).name.split(".")[0]: c for c in cases}
        pick = lambda names, n: [by_name[k] for k in names if k in by_name][:n]  # noqa: E731
        return pick(split["train"], 24), pick(split["test"], 10)
    return cases[:-1], cases[-1:]


# ----------------------------------------------------------------------------------------------------
# Table


def format_table(results: dict[str, Any]) -> str:
    """The results as plain-text tables."""
    peaks = results["matmul_peak_gflops"]
    lines = [f"{results['command']}  {results['date']}", f"machine: {results['machine']}; device {results['device']}, "
             f"{results['threads']} threads, fast-path dtype {results['dtype']}",
             "matmul peak GFLOP/s: " + ", ".join(f"{k} {v}" for k, v in peaks.items()), "",
             f"{'inference':<11} {'path':<24} {'slices':>6} {'slices/s':>9} {'net only':>9} {'GFLOP/s':>8} "
             f"{'peak':>7} {'% peak':>7} {'peak RSS GiB':>12} {'speed-up':>9}"]
    for row in results.get("inference", []):
        shape = "x".join(map(str, row["shape"]))
        for key, label in (("fast", f"segment() {row['fast']['peak_dtype']}"), ("plain_fp32", "plain fp32 batch-1")):
            r = row[key]
            timed = f"{r['slices_timed']}" + ("" if r["slices_timed"] == row["shape"][0] else "*")
            ratio = f"{row['speedup']}/{row['speedup_network']}" if key == "fast" else ""
            lines.append(f"{shape if key == 'fast' else '':<11} {label:<24} {timed:>6} {r['slices_per_s']:>9.3f} "
                         f"{r['network_slices_per_s']:>9.3f} {r['gflops']:>8.1f} {r['peak_gflops']:>7.1f} "
                         f"{100 * r['fraction_of_peak']:>6.1f}% "
                         f"{r['peak_rss_gib']:>12.3f} {ratio:>9}")
    lines += ["* timed on the first slices only (slices/s is per slice). slices/s: segment() end to end (reading",
              "  excluded); net only: without the volume preparation; speed-up: end to end / net only, each against",
              "  the plain loop (which times the network alone); GFLOP/s and % peak from the net-only rate;",
              "  peak: the matmul GFLOP/s of the path's dtype, measured in the same process just before it"]
    m = results.get("memory")
    if m is not None:
        lines += ["", f"memory: segment() on {'x'.join(map(str, m['shape']))} (width {m['width']}), input "
                  f"{m['input_gib']} GiB, output {m['output_gib']} GiB, peak RSS {m['peak_rss_gib']} GiB, above the "
                  f"RSS before {m['extra_gib']} GiB -> within input + output + 1 GiB: {m['within_target']}"]
    lines += ["", f"{'training':<10} {'slice':>6} {'batch':>6} {'baseline slices/s':>18} {'isdnet slices/s':>16} "
              f"{'isdnet/baseline':>16} {'batch making':>13}"]
    for row in results.get("training", []):
        lines.append(f"{row['dtype']:<10} {row['slice_size']:>6} {row['batch']:>6} "
                     f"{row['baseline_slices_per_s']:>18.3f} {row['isdnet_slices_per_s']:>16.3f} "
                     f"{row['isdnet_over_baseline']:>16.2f} {row['data_ms']:>7.1f} ms "
                     f"{row['data_share_of_isdnet_step']:>5.1%}")
    if results.get("training"):
        lines.append("batch making: loading, copy to the device and augmentation of one isdnet batch, and its share of "
                     "an isdnet step")
    lines += ["", f"{'agreement':<12} {'cases':>5} {'min Dice':>9} {'mean Dice':>10}  (fast path vs float32)"]
    for row in results.get("agreement", []):
        lines.append(f"{row['data']:<12} {row['cases']:>5} {row['min_dice']:>9.4f} {row['mean_dice']:>10.4f}")
    r = results.get("rank")
    if r is not None:
        lines += ["", f"rank: {r['volumes']} {r['data']} volumes, strategy combined ({', '.join(r['signals'])}) in "
                  f"{r['seconds']} s ({r['seconds_per_volume']} s per volume), target {r['target_s']:g} s -> "
                  f"within target: {r['within_target']}"]
    lines.append(f"\nelapsed {results['elapsed_s']} s")
    return "\n".join(lines)
