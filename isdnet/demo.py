"""The demo: the whole job on synthetic phantoms, with nothing to download.

Phantom volumes (an organ with lesions, noise and a bias field) are generated, half of the training volumes
keep their labels, ISDNet trains on them and the unlabeled rest, held-out volumes are segmented and evaluated,
and a figure shows image, ground truth, prediction and confidence side by side.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from .config import TrainConfig
from .dataset import load_dataset, split_labeled
from .infer import segment
from .losses import PAPER_LIVER_WEIGHTS
from .metrics import evaluate_cases
from .modelfile import load_model
from .outputs import write_segmentation
from .phantoms import write_phantom_dataset
from .progress import Progress
from .train import train

DEMO_TRAIN_CASES = 12
DEMO_TEST_CASES = 4
DEMO_EPOCHS = 14


def demo_config(epochs: Optional[int], seed: int) -> TrainConfig:
    """ISDNet with the paper's losses and weights, sized for 2 CPU cores: 14 epochs, a 4-epoch warm-up and a
    learning rate of 1e-3 instead of the paper's 1e-4, so that the demo converges within its 5-minute budget."""
    return TrainConfig(method="isdnet", epochs=epochs or DEMO_EPOCHS, warmup_epochs=4, batch_size=8,
                       learning_rate=1e-3, class_weights=list(PAPER_LIVER_WEIGHTS), seed=seed)


def run_demo(out: Path, epochs: Optional[int] = None, seed: int = 0) -> dict:
    """Run the demo into ``out`` and return its metrics (also written to ``out/metrics.json``)."""
    started = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"generating {DEMO_TRAIN_CASES + DEMO_TEST_CASES} phantom volumes in {out / 'data'}")
    spec = load_dataset(write_phantom_dataset(out / "data", DEMO_TRAIN_CASES + DEMO_TEST_CASES, seed=seed))
    train_cases, test_cases = spec.cases[:DEMO_TRAIN_CASES], spec.cases[DEMO_TRAIN_CASES:]
    labeled, unlabeled = split_labeled(train_cases, 0.5, seed)
    model_path = out / "model.safetensors"
    print(f"training ISDNet on {len(labeled)} labeled and {len(unlabeled)} unlabeled volumes")
    train(labeled, unlabeled, spec.labels, model_path, demo_config(epochs, seed), progress=Progress())

    model = load_model(model_path)
    seg_dir = out / "segmentations"
    seg_dir.mkdir(exist_ok=True)
    pairs, figure_inputs = [], None
    for case in test_cases:
        image = sitk.ReadImage(str(case.image))
        result = segment(image, model, confidence=True)
        write_segmentation(result, model.header, seg_dir, case.name)
        truth = sitk.ReadImage(str(case.label))
        pairs.append((case.name, result.labels, truth))
        if figure_inputs is None:
            figure_inputs = (image, truth, result.labels, result.confidence)
    metrics = evaluate_cases(pairs, sorted(spec.labels))
    metrics["elapsed_s"] = round(time.monotonic() - started, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    figure = out / "demo.png"
    save_figure(figure, *figure_inputs)
    print(f"model:          {model_path}")
    print(f"segmentations:  {seg_dir} (.seg.nrrd for 3D Slicer, .nii.gz label maps, confidence maps)")
    print(f"figure:         {figure}")
    print(f"metrics:        {out / 'metrics.json'}")
    print(f"mean Dice per case over the foreground classes on {len(test_cases)} held-out phantoms: "
          f"{metrics['dice']:.3f} ({metrics['elapsed_s']:.0f} s in all)")
    return metrics


def save_figure(path: Path, image: sitk.Image, truth: sitk.Image, prediction: sitk.Image,
                confidence: sitk.Image) -> None:
    """Image, ground truth, prediction and confidence map of the slice with the most foreground."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth_array = sitk.GetArrayViewFromImage(truth)
    k = int(np.argmax((truth_array > 0).sum(axis=(1, 2))))
    panels = [
        ("image", sitk.GetArrayViewFromImage(image)[k], "gray"),
        ("ground truth", truth_array[k], "viridis"),
        ("ISDNet prediction", sitk.GetArrayViewFromImage(prediction)[k], "viridis"),
        ("confidence map", sitk.GetArrayViewFromImage(confidence)[k], "magma"),
    ]
    spacing = image.GetSpacing()
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    for ax, (title, array, cmap) in zip(axes, panels):
        vmax = 2 if cmap == "viridis" else None
        ax.imshow(array, cmap=cmap, vmin=0 if vmax else None, vmax=vmax, aspect=spacing[1] / spacing[0])
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
