"""Segmentation metrics: Dice per class, pooled ("global") Dice and the 95th-percentile Hausdorff distance.

The Hausdorff distance follows MONAI's definition (``compute_hausdorff_distance(..., percentile=95)``) so
numbers are comparable with published results: surface voxels are the voxels of a mask with a face
neighbour outside it (the image border counts as outside); every surface voxel of one mask gets the
Euclidean distance in mm to the nearest surface voxel of the other; the 95th percentile (linear
interpolation) of each directed set is taken, and the larger of the two is the result.

Reports use label values as JSON strings (``"1"``) for keys, and ``None`` where a value is undefined, so
``json.dumps`` writes them without loss and strict JSON readers accept them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import SimpleITK as sitk

from .config import DATASET_FILE, MAP_SUFFIXES, VOLUME_ENDING
from .dataset import load_dataset
from .errors import InputError
from .images import label_values, read_label_map

PathLike = Union[str, Path]


def _dice_counts(prediction: np.ndarray, truth: np.ndarray,
                 labels: Sequence[int]) -> dict[int, tuple[int, int, int]]:
    """(|A∩B|, |A|, |B|) per label, counted without float copies of the volumes."""
    counts = {}
    for label in labels:
        p = prediction == label
        t = truth == label
        counts[int(label)] = (int(np.count_nonzero(p & t)), int(np.count_nonzero(p)),
                              int(np.count_nonzero(t)))
    return counts


def _dice_from_counts(intersection: int, size_prediction: int, size_truth: int) -> float:
    total = size_prediction + size_truth
    return 1.0 if total == 0 else 2.0 * intersection / total


def dice_per_class(prediction: np.ndarray, truth: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice 2|A∩B| / (|A|+|B|) of each label between two integer label arrays of equal shape.

    A label absent from both arrays gets Dice 1.0: the prediction agrees with the truth that it is not there.
    """
    prediction, truth = np.asarray(prediction), np.asarray(truth)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction and truth have different shapes: {prediction.shape} and {truth.shape}")
    return {label: _dice_from_counts(*c) for label, c in _dice_counts(prediction, truth, labels).items()}


def auroc(scores: np.ndarray, positives: np.ndarray) -> Optional[float]:
    """Area under the ROC curve of ``scores`` for telling ``positives`` (bool) from the rest: the Mann-Whitney
    probability that a random positive scores above a random negative, ties counting half. None if either
    group is empty."""
    scores, positives = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(positives, dtype=bool).ravel()
    n_pos = int(positives.sum())
    n_neg = positives.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mean rank of each distinct score
    rank_sum = float(average_rank[inverse][positives].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one face neighbour outside it; outside the array counts as outside."""
    padded = np.pad(mask, 1)
    interior = mask.copy()
    for axis in range(mask.ndim):
        for start in (0, 2):
            window = [slice(1, -1)] * mask.ndim
            window[axis] = slice(start, start + mask.shape[axis])
            interior &= padded[tuple(window)]
    return mask & ~interior


def _directed_distances(source: np.ndarray, target: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance in mm from each voxel of ``source`` to the nearest voxel of ``target`` (both boolean arrays).

    Every voxel of ``target`` lies on its own contour (it is a surface), so the absolute signed Maurer
    distance is the exact Euclidean distance to the nearest target voxel centre. The arrays are padded with
    background first because ITK does not count the outside of the image as background.
    """
    source, target = np.pad(source, 1), np.pad(target, 1)
    image = sitk.GetImageFromArray(target.astype(np.uint8))
    image.SetSpacing([float(s) for s in spacing])
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    return np.abs(sitk.GetArrayViewFromImage(distance)[source])


def hausdorff95(prediction: sitk.Image, truth: sitk.Image, label: int) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between the masks of ``label`` (MONAI's definition).

    Distances use ``truth``'s spacing, anisotropic or not. Returns nan when either mask is empty, where the
    distance is undefined.
    """
    if prediction.GetSize() != truth.GetSize():
        raise ValueError(f"prediction and truth have different sizes: {prediction.GetSize()} and "
                         f"{truth.GetSize()}")
    p = sitk.GetArrayViewFromImage(prediction) == label
    t = sitk.GetArrayViewFromImage(truth) == label
    if not p.any() or not t.any():
        return math.nan
    # Crop to the union's bounding box plus one voxel: distances between surfaces do not change.
    union = p | t
    box = []
    for axis in range(union.ndim):
        present = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(max(int(present[0]) - 1, 0), int(present[-1]) + 2))
    surface_p, surface_t = _surface(p[tuple(box)]), _surface(t[tuple(box)])
    spacing = truth.GetSpacing()
    to_truth = _directed_distances(surface_p, surface_t, spacing)
    to_prediction = _directed_distances(surface_t, surface_p, spacing)
    return float(max(np.percentile(to_truth, 95), np.percentile(to_prediction, 95)))


@dataclass
class CaseMetrics:
    """Metrics of one case: Dice per label and HD95 (mm, nan where undefined) per foreground label."""

    name: str
    dice: dict[int, float]
    hd95: dict[int, float]

    @property
    def mean_dice(self) -> float:
        """Mean Dice over the foreground labels (all labels but 0)."""
        return float(np.mean([v for label, v in self.dice.items() if label != 0]))


def _json_number(value: float) -> Optional[float]:
    return None if math.isnan(value) else float(value)


def evaluate_cases(pairs: Iterable[tuple[str, sitk.Image, sitk.Image]],
                   labels: Sequence[int]) -> dict[str, Any]:
    """Score (name, prediction, truth) label maps and summarise them in a JSON-ready dict.

    Dice is reported for every label in ``labels``, HD95 and means for the foreground ones (all but 0).
    ``global_dice`` pools the voxels of all cases before dividing, as LiTS reports it, so large cases weigh
    more. Keys are label values as strings; undefined values (HD95 of an empty mask) are ``None``.
    """
    labels = [int(label) for label in labels]
    foreground = [label for label in labels if label != 0]
    if not foreground:
        raise ValueError("labels must contain at least one foreground label (a value other than 0)")
    cases: list[CaseMetrics] = []
    pooled = {label: [0, 0, 0] for label in labels}
    for name, prediction, truth in pairs:
        if prediction.GetSize() != truth.GetSize():
            raise InputError(name, f"the prediction has size {prediction.GetSize()} but the ground truth has "
                                   f"size {truth.GetSize()}; they must be on the same grid")
        if not np.allclose(prediction.GetSpacing(), truth.GetSpacing(), rtol=1e-3):
            raise InputError(name, f"the prediction has spacing {prediction.GetSpacing()} but the ground "
                                   f"truth has spacing {truth.GetSpacing()}; they must be on the same grid")
        counts = _dice_counts(sitk.GetArrayViewFromImage(prediction), sitk.GetArrayViewFromImage(truth),
                              labels)
        for label, c in counts.items():
            pooled[label] = [a + b for a, b in zip(pooled[label], c)]
        dice = {label: _dice_from_counts(*c) for label, c in counts.items()}
        hd95 = {label: hausdorff95(prediction, truth, label) for label in foreground}
        cases.append(CaseMetrics(name, dice, hd95))
    if not cases:
        raise ValueError("no cases to evaluate")
    global_dice = {label: _dice_from_counts(*pooled[label]) for label in labels}
    hd95_means = {}
    for label in foreground:
        defined = [c.hd95[label] for c in cases if not math.isnan(c.hd95[label])]
        hd95_means[str(label)] = float(np.mean(defined)) if defined else None
    return {
        "cases": [{"name": c.name,
                   "dice": {str(k): v for k, v in c.dice.items()},
                   "hd95": {str(k): _json_number(v) for k, v in c.hd95.items()},
                   "mean_dice": c.mean_dice} for c in cases],
        "dice_per_class": {str(label): float(np.mean([c.dice[label] for c in cases])) for label in labels},
        "dice": float(np.mean([c.mean_dice for c in cases])),
        "global_dice": {str(label): v for label, v in global_dice.items()},
        "global_dice_mean": float(np.mean([global_dice[label] for label in foreground])),
        "hd95": hd95_means,
    }


def _case_name(path: Path) -> str:
    return path.name[: -len(VOLUME_ENDING)]


def _label_maps(folder: Path) -> list[Path]:
    """The ``<case>.nii.gz`` files of a folder; hidden ones (such as a killed writer's temporaries) left out."""
    return sorted(p for p in folder.glob("*" + VOLUME_ENDING) if not p.name.startswith("."))


def evaluate_folders(pred_dir: PathLike, truth: PathLike,
                     labels: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Evaluate every ``<case>.nii.gz`` label map of ``pred_dir`` against its ground truth.

    ``truth`` is a folder of label maps with the same file names, or a Decathlon dataset folder
    (``dataset.json`` and ``labelsTr/``). Without ``labels``, the foreground labels come from
    ``dataset.json`` or, for a plain folder, from the values found in the ground truth files.
    Returns ``evaluate_cases``'s report.
    """
    pred_dir, truth = Path(pred_dir), Path(truth)
    for folder in (pred_dir, truth):
        if not folder.is_dir():
            raise InputError(folder, "is not a folder")
    predictions = [p for p in _label_maps(pred_dir) if not _case_name(p).endswith(MAP_SUFFIXES)]
    if not predictions:
        raise InputError(pred_dir, f"contains no {VOLUME_ENDING} label maps")
    if (truth / DATASET_FILE).is_file():
        spec = load_dataset(truth)
        truth_files = {case.name: case.label for case in spec.cases if case.label is not None}
        labels = sorted(v for v in spec.labels if v != 0) if labels is None else labels
    else:
        truth_files = {_case_name(p): p for p in _label_maps(truth)}
    missing = [_case_name(p) for p in predictions if _case_name(p) not in truth_files]
    if missing:
        raise InputError(truth, f"has no ground truth for the predicted case(s) {', '.join(missing)}")
    if labels is None:
        found: set[int] = set()
        for p in predictions:
            found.update(label_values(read_label_map(truth_files[_case_name(p)])))
        labels = sorted(found - {0})
        if not labels:
            raise InputError(truth, "the ground truth label maps contain no foreground label")
    # A generator, so that only one case is in memory at a time.
    pairs = ((_case_name(p), read_label_map(p), read_label_map(truth_files[_case_name(p)]))
             for p in predictions)
    return evaluate_cases(pairs, labels)
