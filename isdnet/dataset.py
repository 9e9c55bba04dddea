"""Dataset folders and cases: Decathlon and nnU-Net v2 layouts (``dataset.json``), listed files, labeled splits.

One reader for every command: training, evaluation and the benchmarks all load a dataset folder here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .config import DATASET_FILE
from .detached import data_files
from .errors import InputError, PathLike

IMAGE_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
NNUNET_CHANNEL_SUFFIX = "_0000"


@dataclass(frozen=True)
class Case:
    """One volume of a dataset: its image file (or DICOM folder) and its label file, None when unlabeled."""

    name: str
    image: Path
    label: Optional[Path]


@dataclass
class DatasetSpec:
    """A dataset folder as read from its dataset.json: label values and names, labeled and unlabeled cases.

    ``colors`` (label value -> [r, g, b], 0..255) comes from an optional ``"colors"`` entry, ``terminology``
    (label value -> a Slicer terminology entry string, as segments carry it) from an optional ``"terminology"``
    entry; both else None.
    """

    root: Path
    labels: dict[int, str]
    cases: list[Case]
    unlabeled: list[Case]
    colors: Optional[dict[int, list[int]]] = None
    terminology: Optional[dict[int, str]] = None


def case_name(path: PathLike) -> str:
    """The case name of an image or label file: its name without the extension and nnU-Net's ``_0000``."""
    name = Path(path).name
    for ext in IMAGE_EXTENSIONS:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    if name.endswith(NNUNET_CHANNEL_SUFFIX):
        name = name[: -len(NNUNET_CHANNEL_SUFFIX)]
    return name


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_EXTENSIONS)


def load_dataset(folder: PathLike) -> DatasetSpec:
    """Read a dataset folder in the Medical Segmentation Decathlon or nnU-Net v2 layout; checks each file."""
    root = Path(os.path.normpath(Path(folder).absolute()))
    if not root.is_dir():
        raise InputError(folder, "the dataset folder does not exist or is not a folder")
    json_path = root / DATASET_FILE
    if not json_path.is_file():
        raise InputError(json_path, "is missing: a dataset folder needs a dataset.json "
                                    "(Decathlon / nnU-Net layout)")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(json_path, f"is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise InputError(json_path, "is not a JSON object (expected keys such as \"labels\", \"training\")")
    labels = _parse_labels(meta.get("labels"), json_path)
    _check_single_channel(meta, json_path)
    if "training" in meta:
        cases = _decathlon_cases(meta["training"], root, json_path)
    else:
        cases = _nnunet_cases(root, meta.get("file_ending", ".nii.gz"), json_path)
    unlabeled = _unlabeled_entries(meta.get("unlabeled", []), root, json_path)
    colors = _parse_colors(meta.get("colors"), labels, json_path)
    terminology = _parse_terminology(meta.get("terminology"), labels, json_path)
    return DatasetSpec(root=root, labels=labels, cases=cases, unlabeled=unlabeled, colors=colors,
                       terminology=terminology)


def _parse_labels(raw: Any, json_path: Path) -> dict[int, str]:
    """Labels in Decathlon form ({"1": "liver"}) or nnU-Net v2 form ({"liver": 1}) as {value: name}."""
    if not isinstance(raw, dict) or not raw:
        raise InputError(json_path, "lists no labels: it needs \"labels\", "
                                    "e.g. {\"0\": \"background\", \"1\": \"liver\"}")
    labels: dict[int, str] = {}
    if all(isinstance(v, str) for v in raw.values()):
        for key, name in raw.items():
            try:
                value = int(key)
            except ValueError:
                raise InputError(json_path, f"label value {key!r} is not a whole number") from None
            labels[value] = name
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in raw.values()):
        for name, value in raw.items():
            if value in labels:
                raise InputError(json_path, f"label value {value} is given twice "
                                            f"({labels[value]!r}, {name!r})")
            labels[value] = name
    else:
        raise InputError(json_path, "\"labels\" must map values to names ({\"1\": \"liver\"}) or names to "
                                    "single values ({\"liver\": 1}); region-based labels are not supported")
    bad = sorted(v for v in labels if not 0 <= v <= 255)
    if bad:
        raise InputError(json_path, f"label values must be 0..255, got {bad}")
    if 0 not in labels:
        raise InputError(json_path, f"has no label 0 (background) among its labels {sorted(labels)}")
    if len(labels) < 2:
        raise InputError(json_path, "lists only the background label: at least one structure is needed")
    return dict(sorted(labels.items()))


def _parse_colors(raw: Any, labels: dict[int, str], json_path: Path) -> Optional[dict[int, list[int]]]:
    """The optional {"value": [r, g, b]} colours of the labels."""
    if raw is None:
        return None
    colors: dict[int, list[int]] = {}
    if not isinstance(raw, dict):
        raise InputError(json_path, "\"colors\" must map label values to [r, g, b] lists")
    for key, rgb in raw.items():
        try:
            value = int(key)
        except ValueError:
            raise InputError(json_path, f"colour key {key!r} is not a label value") from None
        if value not in labels:
            raise InputError(json_path, f"\"colors\" gives a colour for {value}, which is not a listed label")
        if (not isinstance(rgb, list) or len(rgb) != 3
                or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in rgb)):
            raise InputError(json_path, f"the colour of label {value} must be [r, g, b] in 0..255, "
                                        f"got {rgb!r}")
        colors[value] = list(rgb)
    return colors


def _parse_terminology(raw: Any, labels: dict[int, str], json_path: Path) -> Optional[dict[int, str]]:
    """The optional {"value": "terminology entry"} of the labels (an ISDNet addition to dataset.json)."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not all(isinstance(v, str) and v for v in raw.values()):
        raise InputError(json_path, "\"terminology\" must map label values to terminology entry strings")
    terminology = {}
    for key, entry in raw.items():
        if not str(key).isdigit() or int(key) not in labels:
            raise InputError(json_path, f"\"terminology\" names {key!r}, which is not a listed label value")
        terminology[int(key)] = entry
    return terminology


def _check_single_channel(meta: dict, json_path: Path) -> None:
    """ISDNet takes one image channel; multi-modal datasets are refused early."""
    channels = meta.get("channel_names", meta.get("modality"))
    if isinstance(channels, dict) and len(channels) > 1:
        names = ", ".join(map(str, channels.values()))
        raise InputError(json_path, f"describes {len(channels)} input channels ({names}); "
                                    "ISDNet takes single-channel images")


def _listed_path(entry: Any, root: Path, json_path: Path) -> Path:
    """A path listed in dataset.json, made absolute; refused if it leaves the dataset folder or is missing."""
    if not isinstance(entry, str) or not entry.strip():
        raise InputError(json_path, f"lists {entry!r} where a file path is expected")
    path = Path(os.path.normpath(root / entry))
    if root not in path.parents:
        raise InputError(json_path, f"lists {entry!r}, which is outside the dataset folder {root}; "
                                    "paths must stay inside it")
    if not path.exists():
        raise InputError(path, f"is listed in {json_path} but does not exist")
    _check_data_files(path, root)
    return path


def _check_data_files(path: Path, root: Path) -> None:
    """Refuse a header whose voxels lie in data files outside the dataset folder, as a listed path outside it is."""
    if not path.is_file():
        return  # a DICOM folder: its files are inside it
    for data in data_files(path):
        if root not in data.parents:
            raise InputError(path, f"its header names the data file {data}, which is outside the dataset folder "
                                   f"{root}; the voxels must stay inside it")


def _decathlon_cases(training: Any, root: Path, json_path: Path) -> list[Case]:
    """The labeled cases of a Decathlon ``"training"`` list of {"image": ..., "label": ...}."""
    if not isinstance(training, list):
        raise InputError(json_path, "\"training\" must be a list of {\"image\": ..., \"label\": ...} entries")
    cases = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise InputError(json_path, f"training entry {i} must be {{\"image\": ..., \"label\": ...}}, "
                                        f"got {entry!r}")
        image = _listed_path(entry["image"], root, json_path)
        label = _listed_path(entry["label"], root, json_path)
        cases.append(Case(case_name(image), image, label))
    if not cases:
        raise InputError(json_path, "lists no training cases")
    return cases


def _nnunet_cases(root: Path, file_ending: Any, json_path: Path) -> list[Case]:
    """The labeled cases of an nnU-Net v2 folder: imagesTr/<case>_0000<ending>, labelsTr/<case><ending>."""
    if not isinstance(file_ending, str) or not file_ending.startswith("."):
        raise InputError(json_path, f"\"file_ending\" must be a file extension such as \".nii.gz\", "
                                    f"got {file_ending!r}")
    images_dir = root / "imagesTr"
    suffix = NNUNET_CHANNEL_SUFFIX + file_ending
    images = sorted(p for p in images_dir.glob(f"*{suffix}") if p.is_file()) if images_dir.is_dir() else []
    if not images:
        raise InputError(images_dir, f"holds no training image named <case>{suffix}, and {json_path.name} "
                                     "has no \"training\" list")
    cases = []
    for image in images:
        name = image.name[: -len(suffix)]
        label = root / "labelsTr" / f"{name}{file_ending}"
        if not label.is_file():
            raise InputError(label, f"does not exist: the training image {image.name} has no label")
        for path in (image, label):
            _check_data_files(path, root)
        cases.append(Case(name, image, label))
    return cases


def _unlabeled_entries(raw: Any, root: Path, json_path: Path) -> list[Case]:
    """The optional ``"unlabeled"`` list: paths, or {"image": path} entries."""
    if not isinstance(raw, list):
        raise InputError(json_path, "\"unlabeled\" must be a list of paths or of {\"image\": ...} entries")
    cases = []
    for entry in raw:
        path = entry["image"] if isinstance(entry, dict) and "image" in entry else entry
        image = _listed_path(path, root, json_path)
        cases.append(Case(case_name(image), image, None))
    return cases


def _existing(path: PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist")
    return path


def cases_from_files(images: Sequence[PathLike],
                     labels: Optional[Sequence[Optional[PathLike]]]) -> list[Case]:
    """Cases from parallel lists of image and label paths (a label may be None); each file must exist."""
    if labels is None:
        labels = [None] * len(images)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels: give one label (or None) per image")
    return [Case(case_name(image), _existing(image), None if label is None else _existing(label))
            for image, label in zip(images, labels)]


def unlabeled_cases(paths: Optional[Sequence[PathLike]]) -> list[Case]:
    """Unlabeled cases from image files or folders: a folder of image files gives one case per file, any
    other folder is taken as one DICOM series."""
    cases = []
    for path in map(_existing, paths or []):
        files = sorted(p for p in path.iterdir() if _is_image_file(p)) if path.is_dir() else [path]
        cases += [Case(case_name(p), p, None) for p in files]
    return cases


def split_labeled(cases: Sequence[Case], fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Keep the labels of a seeded random ``fraction`` of the cases (at least one); the others lose theirs.

    Both lists keep the input order.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"the labeled fraction must be in (0, 1], got {fraction}")
    order = list(range(len(cases)))
    random.Random(seed).shuffle(order)
    keep = set(order[: max(1, round(fraction * len(cases)))])
    labeled = [c for i, c in enumerate(cases) if i in keep]
    unlabeled = [dataclasses.replace(c, label=None) for i, c in enumerate(cases) if i not in keep]
    return labeled, unlabeled

