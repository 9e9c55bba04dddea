"""Reading volumes and label maps, checked: the file named in every error, the memory checked before any voxel
is read, labels refused unless they lie on their image's grid and hold only the dataset's values."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from .detached import data_files
from .errors import InputError, PathLike
from .nifti import check_nifti, is_nifti
from .segfiles import flatten_layers, is_segmentation_file

# Tolerances for "the label is on the image's grid": relative for spacing, in units of the largest spacing
# for the origin, absolute for the direction cosines.
SPACING_TOLERANCE = 1e-3
ORIGIN_TOLERANCE = 1e-3
DIRECTION_TOLERANCE = 1e-3
MIN_SPACING_MM, MAX_SPACING_MM = 1e-4, 1e4  # 0.1 micrometre to 10 m: beyond this a header is wrong

# Memory per input voxel, in bytes, that reading and preparing a volume may take at its peak: the stored
# voxels, float32 copies for the cast, the LPS reorientation, the resampling and the normalisation, then the
# uint8 labels and their reorientation back. segment() was measured at about 15 bytes per voxel (peak RSS,
# 40x512x512 int16, native in-plane spacing); 28 leaves room for in-plane upsampling. A label map takes its
# stored voxels and uint8 copies. Checked against the free memory before any voxel is read.
IMAGE_BYTES_PER_VOXEL = 28
LABEL_BYTES_PER_VOXEL = 10
MEMORY_OVERRIDE_ENV = "ISDNET_AVAILABLE_MEMORY"


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
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
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
        limit = Path("/sys/fs/cgroup/memory.max").read_text(encoding="utf-8").strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text(encoding="utf-8").strip()
        if limit != "max":
            free = min(free, max(0, int(limit) - int(used)))
    except (OSError, ValueError):
        pass
    return free


def check_memory(path: PathLike, needed_bytes: int, remedy: str = "crop or downsample the volume") -> None:
    """Refuse up front, with InputError naming ``path``, work needing more memory than is free, rather than
    being killed by the operating system halfway."""
    free = available_memory()
    if free is not None and needed_bytes > free:
        raise InputError(path, f"needs about {needed_bytes / 1e9:.1f} GB of memory but only {free / 1e9:.1f} GB "
                               f"are free; close other programs, use a machine with more memory, or {remedy}")


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


def check_volume_file(path: PathLike, bytes_per_voxel: int = IMAGE_BYTES_PER_VOXEL) -> None:
    """What can be checked of a volume file before any voxel is read: a NIfTI header and length (ITK hangs on
    some damaged headers and pads truncated data), the data files a NRRD or MetaImage header names (regular
    files only, never a device or a pipe), and the memory that ``bytes_per_voxel`` times its voxels need."""
    path = Path(path)
    if is_nifti(path):
        check_nifti(path)
    for data in data_files(path):
        if not data.is_file():
            problem = "is not a regular file" if data.exists() else "does not exist"
            raise InputError(path, f"its header names the data file {data}, which {problem}")
    _check_header(path, bytes_per_voxel)


def _read_any(path: PathLike, what: str, bytes_per_voxel: int = IMAGE_BYTES_PER_VOXEL,
              layers: bool = False) -> sitk.Image:
    """Read an image file or a DICOM series folder as a 3D scalar image, in its stored pixel type (with ``layers``,
    several components a voxel pass: the layers of a segmentation file), after ``check_volume_file``."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, f"does not exist (expected {what})")
    if not path.is_file() and not path.is_dir():
        raise InputError(path, f"is neither a file nor a folder (expected {what})")
    try:
        if path.is_file():
            check_volume_file(path, bytes_per_voxel)
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
    if image.GetNumberOfComponentsPerPixel() != 1 and not layers:
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


def read_label_map(path: PathLike) -> sitk.Image:
    """Read a label map on its own (ground truth to score against, a prediction, a label file listed for
    training) as uint8, refusing non-integer values and values outside 0..255."""
    path = Path(path)
    segmentation = is_segmentation_file(path)
    label = _read_any(path, "a label file", LABEL_BYTES_PER_VOXEL, layers=segmentation)
    if label.GetNumberOfComponentsPerPixel() > 1:
        label = flatten_layers(label, path)
    _, others, non_integer = _label_histogram(sitk.GetArrayViewFromImage(label))
    if non_integer:
        raise InputError(path, f"holds {non_integer} voxels with non-integer values; "
                               "a label map holds whole numbers")
    if others:
        raise InputError(path, f"holds label values {sorted(others)[:5]} outside 0..255")
    return sitk.Cast(label, sitk.sitkUInt8)


def label_values(label: sitk.Image) -> list[int]:
    """The values present in a uint8 label map, counted a slice at a time."""
    counts = np.zeros(256, dtype=np.int64)
    for plane in sitk.GetArrayViewFromImage(label):
        counts += np.bincount(plane.ravel(), minlength=256)
    return np.flatnonzero(counts).tolist()


def read_label(path: PathLike, reference: sitk.Image, allowed_values: Collection[int]) -> sitk.Image:
    """Read a label map for ``reference`` (the image it annotates) as uint8 on exactly the image's grid.

    Refuses a label on another grid, with non-integer values, with values not in ``allowed_values``, or empty.
    """
    allowed = sorted(int(v) for v in allowed_values)
    if not allowed or allowed[0] < 0 or allowed[-1] > 255:
        raise ValueError(f"label values must be given and lie in 0..255, got {allowed}")
    path = Path(path)
    label = read_label_map(path)
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
    present = label_values(label)
    unknown = [v for v in present if v not in allowed]
    if unknown:
        raise InputError(path, f"holds label values {unknown} that are not among the allowed values "
                               f"{allowed} (the dataset's labels)")
    if present == [0]:
        raise InputError(path, "the label is empty: no voxel holds a structure (all are 0)")
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

