"""Data for ISDNet: dataset folders, checked volumes, the 2D slice geometry, training slices and augmentation.

Every volume is first put in a canonical LPS orientation (an exact permutation/flip of its axes), cut into
slices along its acquisition axis and resampled in-plane to one spacing; ``PreparedVolume`` keeps what is
needed to map per-slice results back onto the input's exact grid. User-caused problems raise ``InputError``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .config import DATASET_FILE, SLICE_AXES
from .errors import InputError, PathLike
from .nifti import check_nifti, is_nifti

NORMALISATION = {"method": "percentile-zscore", "lower_percentile": 0.5, "upper_percentile": 99.5}
IMAGE_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
NNUNET_CHANNEL_SUFFIX = "_0000"
SIZE_MULTIPLE = 16

# Tolerances for "the label is on the image's grid": relative for spacing, in units of the largest spacing
# for the origin, absolute for the direction cosines.
SPACING_TOLERANCE = 1e-3
ORIGIN_TOLERANCE = 1e-3
DIRECTION_TOLERANCE = 1e-3

# Memory per input voxel, in bytes, that reading and preparing a volume may take at its peak: the stored
# voxels, float32 copies for the cast, the LPS reorientation, the resampling and the normalisation, then the
# uint8 labels and their reorientation back. segment() was measured at about 15 bytes per voxel (peak RSS,
# 40x512x512 int16, native in-plane spacing); 28 leaves room for in-plane upsampling. A label map takes its
# stored voxels and uint8 copies. Checked against the free memory before any voxel is read.
MIN_SPACING_MM, MAX_SPACING_MM = 1e-4, 1e4  # 0.1 micrometre to 10 m: beyond this a header is wrong
MAX_SLICE_SIDE = 8192  # model slices larger than this come from a spacing mix-up, not from real data
PERCENTILE_SAMPLE = 2**24  # voxels: exact percentiles up to this, an evenly strided sample beyond
NORMALISE_CHUNK = 2**22  # voxels per float64 temporary while normalising
RESAMPLE_SLAB_PIXELS = 2**23  # output pixels per resampled slab (32 MiB of float32)
IMAGE_BYTES_PER_VOXEL = 28
LABEL_BYTES_PER_VOXEL = 10
MEMORY_OVERRIDE_ENV = "ISDNET_AVAILABLE_MEMORY"

# numpy axis of the canonical (z, y, x) array for each forced slice axis name
_NUMPY_AXIS = {"z": 0, "y": 1, "x": 2}


# ----------------------------------------------------------------------------------------------------
# Cases and dataset folders


@dataclass(frozen=True)
class Case:
    """One volume of a dataset: its image file (or DICOM folder) and its label file, None when unlabeled."""

    name: str
    image: Path
    label: Optional[Path]


@dataclass
class DatasetSpec:
    """A dataset folder as read from its dataset.json: label values and names, labeled and unlabeled cases.

    ``colors`` (label value -> [r, g, b], 0..255) comes from an optional ``"colors"`` entry, else None.
    """

    root: Path
    labels: dict[int, str]
    cases: list[Case]
    unlabeled: list[Case]
    colors: Optional[dict[int, list[int]]] = None


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
    return DatasetSpec(root=root, labels=labels, cases=cases, unlabeled=unlabeled, colors=colors)


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
    return path


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


# ----------------------------------------------------------------------------------------------------
# Reading volumes


def _short(error: Exception) -> str:
    """The useful part of a SimpleITK/ITK exception message, which runs over many lines of source locations,
    object addresses and, for NRRD, a stack of teem "trouble" lines whose last ones say what is wrong."""
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and not line.strip().startswith("Exception thrown in SimpleITK")]
    if not lines:
        return repr(error)[:300]
    teem = [re.sub(r"^\[\w+\] \w+:+ ", "", line) for line in lines if line.startswith("[")]
    if teem:
        return ": ".join(teem[-2:])[:300]
    text = re.sub(r"^(sitk::ERROR|itk::ERROR|ITK ERROR):\s*(\w+\(0x[0-9a-fA-F]+\):\s*)?", "", lines[0])
    if text.startswith("Unable to determine ImageIO reader"):
        return "its format is not one ITK reads (NIfTI, NRRD, MetaImage, ...) or its header is damaged"
    return text[:300]


def available_memory() -> Optional[int]:
    """Bytes of memory free for a new allocation, or None where it cannot be told.

    ``ISDNET_AVAILABLE_MEMORY`` (bytes) overrides the measurement, for tests. On Linux this is MemAvailable of
    /proc/meminfo, capped by the cgroup (container) limit; elsewhere the free physical pages from ``os.sysconf``
    where the platform has them (macOS has not, Windows neither: there the check is skipped).
    """
    forced = os.environ.get(MEMORY_OVERRIDE_ENV)
    if forced:
        return int(forced)
    free: Optional[int] = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit != "max":
            free = min(free, max(0, int(limit) - int(used)))
    except (OSError, ValueError):
        pass
    return free


def check_memory(path: PathLike, needed_bytes: int) -> None:
    """Refuse up front, with InputError naming ``path``, work needing more memory than is free, rather than
    being killed by the operating system halfway."""
    free = available_memory()
    if free is not None and needed_bytes > free:
        raise InputError(path, f"needs about {needed_bytes / 1e9:.1f} GB of memory but only {free / 1e9:.1f} GB "
                               "are free; close other programs, use a machine with more memory, or crop or "
                               "downsample the volume")


def _check_header(path: Path, bytes_per_voxel: int) -> None:
    """Read only the file's header, and refuse a volume too large for the memory left (see ``check_memory``)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(path, f"cannot be read as an image: {_short(e)}") from None
    voxels = math.prod(reader.GetSize()) * max(1, reader.GetNumberOfComponents())
    check_memory(path, voxels * bytes_per_voxel)


def _read_any(path: PathLike, what: str, bytes_per_voxel: int = IMAGE_BYTES_PER_VOXEL) -> sitk.Image:
    """Read an image file or a DICOM series folder as a 3D scalar image, in its stored pixel type.

    A file's header is read first and the volume refused if ``bytes_per_voxel`` times its voxels exceeds the
    free memory.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, f"does not exist (expected {what})")
    if path.is_file() and is_nifti(path):
        check_nifti(path)  # before ITK, which hangs on some damaged headers and pads truncated data
    try:
        if path.is_file():
            _check_header(path, bytes_per_voxel)
        if path.is_dir():
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise InputError(path, "is a folder without a DICOM series "
                                       "(give an image file or a DICOM folder)")
            if len(series) > 1:
                raise InputError(path, f"holds {len(series)} DICOM series; give the folder of one series")
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0]))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InputError(path, f"cannot be read as an image: {_short(e)}") from None
    size = list(image.GetSize())
    if image.GetDimension() == 4 and size[3] == 1:
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    if image.GetDimension() != 3:
        raise InputError(path, f"is a {image.GetDimension()}D image of size {tuple(size)}, not a 3D volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, f"has {image.GetNumberOfComponentsPerPixel()} components per voxel (a colour, "
                               "vector or multi-layer image); a single-component 3D volume is needed")
    if 0 in size:
        raise InputError(path, f"is empty (size {tuple(size)})")
    spacing = image.GetSpacing()
    if not all(MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing):
        raise InputError(path, f"has the voxel spacing {_tuple(spacing)} mm, outside {MIN_SPACING_MM:g} to "
                               f"{MAX_SPACING_MM:g} mm: its header's spacing is wrong")
    if 1 in image.GetSize():
        raise InputError(path, f"is a single slice (size {image.GetSize()}), not a 3D volume: a stack of "
                               "slices is needed")
    return image


def read_image(path: PathLike) -> sitk.Image:
    """Read a 3D image (NRRD, NIfTI, MHA, ... or a DICOM series folder) as float32, refusing unusable ones."""
    image = _read_any(path, "an image file or DICOM folder")
    try:
        image = sitk.Cast(image, sitk.sitkFloat32)
    except RuntimeError as e:
        raise InputError(path, f"has voxels of type {image.GetPixelIDTypeAsString()} that cannot be used as "
                               f"intensities: {_short(e)}") from None
    array = sitk.GetArrayViewFromImage(image)
    bad = sum(int(s.size - np.count_nonzero(np.isfinite(s))) for s in array)
    if bad:
        raise InputError(path, f"contains {bad} NaN/infinite voxels")
    return image


def _tuple(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def read_label(path: PathLike, reference: sitk.Image, label_values: Collection[int]) -> sitk.Image:
    """Read a label map for ``reference`` (the image it annotates) as uint8 on exactly the image's grid.

    Refuses a label on another grid, with non-integer values, with values not in ``label_values``, or empty.
    """
    allowed = sorted(int(v) for v in label_values)
    if not allowed or allowed[0] < 0 or allowed[-1] > 255:
        raise ValueError(f"label values must be given and lie in 0..255, got {allowed}")
    path = Path(path)
    label = _read_any(path, "a label file", LABEL_BYTES_PER_VOXEL)
    if label.GetSize() != reference.GetSize():
        raise InputError(path, f"has size {label.GetSize()} but its image has size {reference.GetSize()}")
    problems = []
    spacing_l, spacing_i = np.array(label.GetSpacing()), np.array(reference.GetSpacing())
    if np.any(np.abs(spacing_l - spacing_i) > SPACING_TOLERANCE * spacing_i):
        problems.append(f"spacing {_tuple(spacing_l)} vs {_tuple(spacing_i)} mm")
    origin_l, origin_i = np.array(label.GetOrigin()), np.array(reference.GetOrigin())
    if np.linalg.norm(origin_l - origin_i) > ORIGIN_TOLERANCE * spacing_i.max():
        problems.append(f"origin {_tuple(origin_l)} vs {_tuple(origin_i)} mm")
    direction_l, direction_i = np.array(label.GetDirection()), np.array(reference.GetDirection())
    if np.max(np.abs(direction_l - direction_i)) > DIRECTION_TOLERANCE:
        problems.append(f"direction {_tuple(direction_l)} vs {_tuple(direction_i)}")
    if problems:
        raise InputError(path, "is not on its image's grid: " + "; ".join(problems) + " (label vs image)")
    counts, others, non_integer = _label_histogram(sitk.GetArrayViewFromImage(label))
    if non_integer:
        raise InputError(path, f"holds {non_integer} voxels with non-integer values; "
                               "a label map holds whole numbers")
    present = sorted(set(np.flatnonzero(counts).tolist()) | others)
    unknown = [v for v in present if v not in allowed]
    if unknown:
        raise InputError(path, f"holds label values {unknown} that are not among the allowed values "
                               f"{allowed} (the dataset's labels)")
    if not counts[1:].any():
        raise InputError(path, "the label is empty: no voxel holds a structure (all are 0)")
    label = sitk.Cast(label, sitk.sitkUInt8)
    label.CopyInformation(reference)
    return label


def _label_histogram(array: np.ndarray) -> tuple[np.ndarray, set[int], int]:
    """Voxel counts of values 0..255, the set of other integer values, and the number of non-integer voxels.

    Works one slice at a time so a large label map is never copied whole.
    """
    counts = np.zeros(256, dtype=np.int64)
    others: set[int] = set()
    non_integer = 0
    for plane in array:
        if plane.dtype.kind == "f":
            whole = np.isfinite(plane) & (plane == np.round(plane))
            non_integer += int(plane.size - np.count_nonzero(whole))
            plane = plane[whole]
        values = plane.astype(np.int64).ravel()
        inside = (values >= 0) & (values <= 255)
        counts += np.bincount(values[inside], minlength=256)
        if not inside.all():
            others |= set(np.unique(values[~inside]).tolist())
    return counts, others, non_integer


# ----------------------------------------------------------------------------------------------------
# Slice geometry


def _round_up(n: int, multiple: int = SIZE_MULTIPLE) -> int:
    return max(multiple, -(-n // multiple) * multiple)


@dataclass
class SliceGeometry:
    """How volumes become model slices: the slice axis rule, in-plane spacing (rows, cols) in mm and the
    training slice size (rows, cols), each a multiple of 16. Axes are those of the canonical LPS image."""

    slice_axis: str
    spacing: tuple[float, float]
    size: tuple[int, int]

    def __post_init__(self) -> None:
        if self.slice_axis not in SLICE_AXES:
            raise ValueError(f"slice_axis must be one of {SLICE_AXES}, got {self.slice_axis!r}")
        self.spacing = _spacing_pair(self.spacing)
        self.size = _size_pair(self.size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for the model header."""
        return {"slice_axis": self.slice_axis, "spacing": list(self.spacing), "size": list(self.size)}

    @classmethod
    def from_dict(cls, d: Any) -> SliceGeometry:
        """Rebuild from ``to_dict``'s form; ValueError on missing or bad content."""
        if not isinstance(d, dict) or set(d) != {"slice_axis", "spacing", "size"}:
            raise ValueError(f"a slice geometry needs exactly slice_axis, spacing and size, got {d!r}")
        return cls(d["slice_axis"], d["spacing"], d["size"])


def _spacing_pair(spacing: Any) -> tuple[float, float]:
    """A positive finite (rows, cols) spacing from one number or a pair."""
    values = [spacing, spacing] if isinstance(spacing, (int, float)) else spacing
    if (not isinstance(values, (list, tuple)) or len(values) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            or not all(math.isfinite(v) and v > 0 for v in values)):
        raise ValueError(f"the slice spacing must be two positive numbers (mm), got {spacing!r}")
    return float(values[0]), float(values[1])


def _size_pair(size: Any) -> tuple[int, int]:
    """A (rows, cols) slice size from one integer or a pair, each a positive multiple of 16."""
    values = [size, size] if isinstance(size, int) and not isinstance(size, bool) else size
    if (not isinstance(values, (list, tuple)) or len(values) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values)
            or not all(v > 0 and v % SIZE_MULTIPLE == 0 for v in values)):
        raise ValueError(f"the slice size must be two positive multiples of {SIZE_MULTIPLE}, got {size!r}")
    return int(values[0]), int(values[1])


def choose_slice_axis(spacing_xyz: Sequence[float], rule: str) -> int:
    """numpy axis (0=z, 1=y, 2=x) to slice a canonical (LPS) grid of this spacing along: ``rule`` "x"/"y"/"z", or
    "auto" for the acquisition axis (the largest spacing; ties go to z, then y)."""
    if rule in _NUMPY_AXIS:
        return _NUMPY_AXIS[rule]
    if rule != "auto":
        raise ValueError(f"slice axis must be one of {SLICE_AXES}, got {rule!r}")
    largest = max(spacing_xyz)
    return next(a for a in (0, 1, 2) if spacing_xyz[2 - a] >= largest * (1 - 1e-6))


def _in_plane_axes(axis: int) -> tuple[int, int]:
    """numpy axes (rows, cols) of the slices cut along numpy ``axis``."""
    rows, cols = (a for a in (0, 1, 2) if a != axis)
    return rows, cols


@dataclass(frozen=True)
class CanonicalGrid:
    """The grid ``DICOMOrient(image, "LPS")`` would give (x, y, z order), found without copying any voxel."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]


def canonical_grid(image: Any) -> CanonicalGrid:
    """The LPS-reoriented grid of ``image`` (a SimpleITK image or an ``ImageGrid``), read off a tiny probe image
    with the same spacing and direction: DICOMOrient only permutes and flips axes, so the probe's sizes say
    which axis went where and its direction which were flipped."""
    probe = sitk.Image([2, 3, 4], sitk.sitkUInt8)
    probe.SetSpacing(image.GetSpacing())
    probe.SetDirection(image.GetDirection())
    oriented = sitk.DICOMOrient(probe, "LPS")
    source = [(2, 3, 4).index(n) for n in oriented.GetSize()]
    size = tuple(image.GetSize()[s] for s in source)
    old = np.array(image.GetDirection()).reshape(3, 3)
    new = np.array(oriented.GetDirection()).reshape(3, 3)
    flipped = [float(new[:, j] @ old[:, source[j]]) < 0 for j in range(3)]
    origin: tuple[float, ...] = ()
    if isinstance(image, sitk.Image):
        corner = [0, 0, 0]
        for j in range(3):
            corner[source[j]] = image.GetSize()[source[j]] - 1 if flipped[j] else 0
        origin = image.TransformIndexToPhysicalPoint(corner)
    return CanonicalGrid(size, oriented.GetSpacing(), origin, oriented.GetDirection())


def _canonical_layout(image: Any) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Size and spacing (x, y, z) the image would have after ``DICOMOrient(image, "LPS")``."""
    grid = canonical_grid(image)
    return grid.size, grid.spacing


def _resampled_extent(size: int, old_spacing: float, new_spacing: float) -> int:
    return max(1, round(size * old_spacing / new_spacing))


@dataclass(frozen=True)
class ImageGrid:
    """An image's grid without its voxels: all ``plan_geometry`` reads, so planning never holds whole volumes."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> ImageGrid:
        return cls(image.GetSize(), image.GetSpacing(), image.GetDirection())

    def GetSize(self) -> tuple[int, ...]:  # noqa: N802 - the SimpleITK names, so an ImageGrid stands in for an image
        return self.size

    def GetSpacing(self) -> tuple[float, ...]:  # noqa: N802
        return self.spacing

    def GetDirection(self) -> tuple[float, ...]:  # noqa: N802
        return self.direction


def plan_geometry(images: Sequence[sitk.Image], slice_axis: str = "auto", spacing: Any = None,
                  size: Any = None, max_size: int = 512) -> SliceGeometry:
    """Slice geometry for a training set: the median in-plane spacing and the largest resampled extent
    (rounded up to a multiple of 16, at most ``max_size``) unless ``spacing`` / ``size`` are given."""
    if slice_axis not in SLICE_AXES:
        raise ValueError(f"slice_axis must be one of {SLICE_AXES}, got {slice_axis!r}")
    layouts = []
    for image in images:
        sizes, spacings = _canonical_layout(image)
        rows, cols = _in_plane_axes(choose_slice_axis(spacings, slice_axis))
        layouts.append(((sizes[2 - rows], sizes[2 - cols]), (spacings[2 - rows], spacings[2 - cols])))
    if spacing is None:
        if not layouts:
            raise ValueError("no image to plan the slice geometry from")
        spacing = tuple(float(np.median([sp[k] for _, sp in layouts])) for k in (0, 1))
    spacing = _spacing_pair(spacing)
    if size is None:
        if not layouts:
            raise ValueError("no image to plan the slice geometry from")
        cap = max(SIZE_MULTIPLE, max_size // SIZE_MULTIPLE * SIZE_MULTIPLE)
        size = tuple(min(cap, _round_up(max(_resampled_extent(n[k], sp[k], spacing[k]) for n, sp in layouts)))
                     for k in (0, 1))
    return SliceGeometry(slice_axis, spacing, _size_pair(size))


# ----------------------------------------------------------------------------------------------------
# Prepared volumes


def normalise_in_place(volume: np.ndarray) -> None:
    """Per-volume normalisation (see ``NORMALISATION``) of a float32 (N, ...) array in the memory it already holds:
    clip to the 0.5th/99.5th percentiles, then z-score; a constant volume becomes all zeros.

    The percentiles are exact up to ``PERCENTILE_SAMPLE`` voxels and taken on an evenly strided sample of that
    many beyond (as nnU-Net samples voxels for its statistics); mean and SD are accumulated in float64 over
    chunks of slices.
    """
    if volume.size == 0:
        raise ValueError("cannot normalise an empty array")
    if volume.dtype != np.float32 or not volume.flags.c_contiguous:
        raise ValueError("normalise_in_place needs a C-contiguous float32 array")
    flat = volume.reshape(-1)
    sample = flat if flat.size <= PERCENTILE_SAMPLE else flat[:: -(-flat.size // PERCENTILE_SAMPLE)]
    lo, hi = (float(v) for v in np.percentile(sample, (NORMALISATION["lower_percentile"],
                                                        NORMALISATION["upper_percentile"])))
    chunks = [flat[i:i + NORMALISE_CHUNK] for i in range(0, flat.size, NORMALISE_CHUNK)]
    total = 0.0
    for chunk in chunks:
        np.clip(chunk, lo, hi, out=chunk)
        total += float(chunk.sum(dtype=np.float64))
    mean = total / flat.size
    squares = sum(float(np.square(chunk - mean, dtype=np.float64).sum()) for chunk in chunks)
    std = math.sqrt(squares / flat.size)
    if not std > 1e-6 * max(abs(lo), abs(hi)):
        std = 1.0
    for chunk in chunks:
        chunk -= np.float32(mean)
        chunk /= np.float32(std)


@dataclass
class PreparedVolume:
    """A volume as model slices, ``image`` (N, H, W) float32 normalised and ``label`` (N, H, W) uint8 or None,
    with what is needed to map per-slice results back onto the input's exact grid.

    "Canonical" is the LPS-reoriented input; ``slice_axis`` is its numpy axis (0=z, 1=y, 2=x) the slices are
    cut along; ``input_slice_spacing``/``input_slice_size`` are the canonical in-plane (rows, cols) spacing
    and size before resampling to ``slice_spacing``.
    """

    image: np.ndarray
    label: Optional[np.ndarray]
    slice_axis: int
    slice_spacing: tuple[float, float]
    input_slice_spacing: tuple[float, float]
    input_slice_size: tuple[int, int]
    canonical_spacing: tuple[float, ...]
    canonical_origin: tuple[float, ...]
    canonical_direction: tuple[float, ...]
    input_orientation: str
    input_size: tuple[int, ...]
    input_spacing: tuple[float, ...]
    input_origin: tuple[float, ...]
    input_direction: tuple[float, ...]
    minimum: float = field(default=0.0)

    @property
    def num_slices(self) -> int:
        """Number of slices N."""
        return int(self.image.shape[0])

    def to_input_grid_slices(self, values: torch.Tensor) -> torch.Tensor:
        """Per-slice maps (B, K, H, W) on the prepared grid -> (B, K, H0, W0) float32 on the canonical input
        slice grid, by bilinear interpolation with the exact index mapping j = i * old_spacing / new_spacing.

        Done in torch rather than SimpleITK so inference streams batches of slices and never holds float32
        probabilities for a whole volume.
        """
        if values.dim() != 4 or tuple(values.shape[-2:]) != tuple(self.image.shape[1:]):
            raise ValueError(f"expected (B, K, {self.image.shape[1]}, {self.image.shape[2]}) maps on the "
                             f"prepared grid, got {tuple(values.shape)}")
        coords = []
        for k in (0, 1):
            old_n, new_n = self.input_slice_size[k], values.shape[2 + k]
            ratio = self.input_slice_spacing[k] / self.slice_spacing[k]
            j = torch.arange(old_n, dtype=torch.float64) * ratio
            coords.append(2 * j / (new_n - 1) - 1 if new_n > 1 else torch.zeros_like(j))
        rows, cols = torch.meshgrid(coords[0], coords[1], indexing="ij")
        grid = torch.stack((cols, rows), dim=-1).to(device=values.device, dtype=torch.float32)
        grid = grid.unsqueeze(0).expand(values.shape[0], -1, -1, -1)
        return F.grid_sample(values.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)

    def to_input_image(self, slices: np.ndarray) -> sitk.Image:
        """An (N, H0, W0) array on the canonical input slice grid (uint8 labels or float32 maps) as an image
        on exactly the input's grid (size, spacing, origin, direction)."""
        expected = (self.num_slices, *self.input_slice_size)
        if tuple(slices.shape) != expected:
            raise ValueError(f"expected slices of shape {expected} on the input slice grid, "
                             f"got {slices.shape}")
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(slices, 0, self.slice_axis)))
        image.SetSpacing(self.canonical_spacing)
        image.SetOrigin(self.canonical_origin)
        image.SetDirection(self.canonical_direction)
        image = sitk.DICOMOrient(image, self.input_orientation)
        if (image.GetSize() != self.input_size
                or not np.allclose(image.GetDirection(), self.input_direction, atol=1e-6)):
            raise RuntimeError("reorienting back to the input did not restore its grid; this is a bug")
        image.SetSpacing(self.input_spacing)
        image.SetOrigin(self.input_origin)
        image.SetDirection(self.input_direction)
        return image


def prepare_volume(image: sitk.Image, geometry: SliceGeometry, label: Optional[sitk.Image] = None,
                   source: Optional[PathLike] = None) -> PreparedVolume:
    """Reorient to LPS, cut along the slice axis, resample in-plane to the geometry's spacing (linear for the
    image, nearest for the label) and normalise: the model's view of one volume, full extent (no crop/pad).

    ``source`` names the image's file in the InputError raised when its slices would be absurdly large.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("prepare_volume needs a 3D single-component image")
    if label is not None and label.GetSize() != image.GetSize():
        raise ValueError(f"label size {label.GetSize()} differs from image size {image.GetSize()}")
    orientation = sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(image.GetDirection())
    canonical = canonical_grid(image)
    axis = choose_slice_axis(canonical.spacing, geometry.slice_axis)
    rows, cols = _in_plane_axes(axis)
    old_spacing, old_size = canonical.spacing, canonical.size
    new_spacing, new_size = list(old_spacing), list(old_size)
    for k, a in enumerate((rows, cols)):
        new_spacing[2 - a] = geometry.spacing[k]
        new_size[2 - a] = _resampled_extent(old_size[2 - a], old_spacing[2 - a], geometry.spacing[k])
        if new_size[2 - a] > MAX_SLICE_SIDE:
            raise InputError(source or "the volume",
                             f"{old_size[2 - a]} voxels of {old_spacing[2 - a]:g} mm would become "
                             f"{new_size[2 - a]} pixels at the model's {geometry.spacing[k]:g} mm, more than "
                             f"{MAX_SLICE_SIDE}; check the spacing in the file's header")
    output = _ResampledGrid(canonical, axis, tuple(new_size), tuple(new_spacing))
    slices = output.resample(image, sitk.sitkLinear, np.float32)
    normalise_in_place(slices)
    label_slices = None if label is None else output.resample(label, sitk.sitkNearestNeighbor, np.uint8)
    return PreparedVolume(
        image=slices, label=label_slices, slice_axis=axis,
        slice_spacing=geometry.spacing,
        input_slice_spacing=(old_spacing[2 - rows], old_spacing[2 - cols]),
        input_slice_size=(old_size[2 - rows], old_size[2 - cols]),
        canonical_spacing=old_spacing, canonical_origin=canonical.origin,
        canonical_direction=canonical.direction, input_orientation=orientation,
        input_size=image.GetSize(), input_spacing=image.GetSpacing(), input_origin=image.GetOrigin(),
        input_direction=image.GetDirection(), minimum=float(slices.min()))


@dataclass(frozen=True)
class _ResampledGrid:
    """The model's slice grid of one volume: the canonical grid with the in-plane spacing and size replaced."""

    canonical: CanonicalGrid
    axis: int  # numpy axis of the canonical grid the slices are cut along
    size: tuple[int, ...]  # x, y, z
    spacing: tuple[float, ...]

    def resample(self, image: sitk.Image, interpolator: int, dtype: type) -> np.ndarray:
        """``image`` on this grid as (N, H, W) slices, resampled straight from the input grid (the resampler
        works in physical space, so no reoriented copy is made) in slabs of slices written into one array."""
        d = 2 - self.axis  # the slice axis in SimpleITK's (x, y, z) order
        in_plane = math.prod(self.size) // self.size[d]
        out = np.empty((self.size[d], *np.delete(self.size[::-1], self.axis)), dtype=dtype)
        step = np.array(self.canonical.direction).reshape(3, 3)[:, d] * self.spacing[d]
        resampler = sitk.ResampleImageFilter()
        resampler.SetOutputSpacing(self.spacing)
        resampler.SetOutputDirection(self.canonical.direction)
        resampler.SetUseNearestNeighborExtrapolator(True)
        resampler.SetInterpolator(interpolator)
        resampler.SetOutputPixelType(sitk.sitkFloat32 if dtype == np.float32 else sitk.sitkUInt8)
        slab = max(1, RESAMPLE_SLAB_PIXELS // in_plane)
        for start in range(0, self.size[d], slab):
            stop = min(start + slab, self.size[d])
            size = list(self.size)
            size[d] = stop - start
            resampler.SetSize(size)
            resampler.SetOutputOrigin(tuple(np.array(self.canonical.origin) + start * step))
            part = resampler.Execute(image)
            out[start:stop] = np.moveaxis(sitk.GetArrayViewFromImage(part), self.axis, 0)
            del part  # the view above borrowed its buffer; it is copied into ``out`` before this
        return out


# ----------------------------------------------------------------------------------------------------
# Training slices


@dataclass
class CachedVolume:
    """A prepared volume's slices memory-mapped from a cache: ``image`` float16, ``label`` uint8 or None."""

    image: np.ndarray
    label: Optional[np.ndarray]
    minimum: float

    @property
    def num_slices(self) -> int:
        """Number of slices N."""
        return int(self.image.shape[0])


def cache_volumes(volumes: Iterable[Any], folder: PathLike) -> list[CachedVolume]:
    """Write each volume's slices to ``folder`` (image float16, label uint8 .npy) and map them back
    read-only, so a training set larger than memory only loads the slices in use."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cached = []
    for i, volume in enumerate(volumes):
        image_path = folder / f"{i:05d}_image.npy"
        np.save(image_path, np.asarray(volume.image).astype(np.float16))
        label_path = None
        if volume.label is not None:
            label_path = folder / f"{i:05d}_label.npy"
            np.save(label_path, np.asarray(volume.label, dtype=np.uint8))
        image = np.load(image_path, mmap_mode="r")
        cached.append(CachedVolume(image=image, minimum=float(image.min()),
                                   label=None if label_path is None else np.load(label_path, mmap_mode="r")))
    return cached


class SliceDataset(torch.utils.data.Dataset):
    """The 2D slices of prepared (or cached) volumes, cropped or padded to ``size``: items are
    ``(image (1, H, W) float32, label (H, W) int64)`` when ``labeled``, else ``(image,)``.

    Larger slices are cropped (random offsets when ``random_crop``, from a generator seeded by ``seed``; else
    centred); smaller ones are padded, centred, with the volume's minimum value (labels with 0).
    ``slice_volume_index[i]`` is the volume slice i comes from.
    """

    def __init__(self, volumes: Sequence[Any], size: Any, labeled: bool, random_crop: bool, seed: int = 0):
        self.volumes = list(volumes)
        pair = [size, size] if isinstance(size, int) else list(size)
        if len(pair) != 2 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in pair):
            raise ValueError(f"slice size must be two positive integers, got {size!r}")
        self.size = (int(pair[0]), int(pair[1]))
        self.labeled = labeled
        self.random_crop = random_crop
        self.rng = np.random.default_rng(seed)
        if labeled and any(v.label is None for v in self.volumes):
            raise ValueError("a labeled slice dataset needs a label for every volume")
        self.minimums = [float(v.minimum) if hasattr(v, "minimum") else float(np.min(v.image))
                         for v in self.volumes]
        self.slice_volume_index: list[int] = []
        self.slice_index: list[int] = []
        for vi, volume in enumerate(self.volumes):
            n = int(volume.image.shape[0])
            self.slice_volume_index += [vi] * n
            self.slice_index += range(n)

    def __len__(self) -> int:
        return len(self.slice_index)

    def reseed(self, seed: int) -> None:
        """Restart the random crops from ``seed``, so an epoch's crops do not depend on the epochs before it."""
        self.rng = np.random.default_rng(seed)

    def _window(self, have: int, want: int) -> tuple[int, int, int]:
        """(start in the slice, length taken, offset in the output) along one axis."""
        if have > want:
            start = int(self.rng.integers(0, have - want + 1)) if self.random_crop else (have - want) // 2
            return start, want, 0
        return 0, have, (want - have) // 2

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        vi, si = self.slice_volume_index[i], self.slice_index[i]
        volume = self.volumes[vi]
        height, width = volume.image.shape[1:]
        (r0, rn, ro), (c0, cn, co) = self._window(height, self.size[0]), self._window(width, self.size[1])
        image = np.full(self.size, self.minimums[vi], dtype=np.float32)
        image[ro:ro + rn, co:co + cn] = volume.image[si, r0:r0 + rn, c0:c0 + cn]
        if not self.labeled:
            return (torch.from_numpy(image)[None],)
        label = np.zeros(self.size, dtype=np.int64)
        label[ro:ro + rn, co:co + cn] = volume.label[si, r0:r0 + rn, c0:c0 + cn]
        return torch.from_numpy(image)[None], torch.from_numpy(label)


def augment(images: torch.Tensor, labels: Optional[torch.Tensor], generator: torch.Generator, *,
            max_rotation_deg: float = 15.0, scale_range: tuple[float, float] = (0.9, 1.1),
            flip_prob: float = 0.5, gain_range: tuple[float, float] = (0.9, 1.1), max_bias: float = 0.1
            ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Random rotation, scaling and column flip (one affine per sample, applied alike to image and label:
    bilinear and nearest), then intensity gain and bias on the normalised values.

    Reproducible from ``generator`` (a CPU generator: the parameters are drawn on the CPU, the warp runs on the
    images' device, so a GPU run does not stall on host-side resampling); unlabeled batches pass ``labels=None``.
    """
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (B, 1, H, W), got {tuple(images.shape)}")
    if labels is not None and tuple(labels.shape) != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"labels must be (B, H, W) matching the images, got {tuple(labels.shape)}")
    b, _, h, w = images.shape
    u = torch.rand(b, 5, generator=generator, dtype=torch.float64)
    angle = (2 * u[:, 0] - 1) * math.radians(max_rotation_deg)
    scale = scale_range[0] + (scale_range[1] - scale_range[0]) * u[:, 1]
    flip = torch.where(u[:, 2] < flip_prob, -1.0, 1.0).to(torch.float64)
    gain = gain_range[0] + (gain_range[1] - gain_range[0]) * u[:, 3]
    bias = (2 * u[:, 4] - 1) * max_bias
    # Output -> input map in pixel units is R(angle) / scale with x flipped; conjugate by the pixel size so
    # the rotation stays a rotation on non-square slices in affine_grid's normalised coordinates.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin * h / w
    theta[:, 1, 0] = sin * flip * w / h
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta.to(images.device, torch.float32), [b, 1, h, w], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out * gain.to(out).view(b, 1, 1, 1) + bias.to(out).view(b, 1, 1, 1)
    out = out.to(images.dtype)
    if labels is not None:
        moved = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="border",
                              align_corners=False)
        labels = moved[:, 0].round().long()
    return out, labels
