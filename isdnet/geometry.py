"""Volumes as model slices: the canonical LPS grid, the slice axis and in-plane spacing a model uses, resampling and
per-volume normalisation (``prepare_volume``).

Every volume is put in a canonical LPS orientation (an exact permutation/flip of its axes), cut into slices along
its acquisition axis and resampled in-plane to one spacing; ``PreparedVolume`` keeps what inference needs to map
per-slice results back onto the input's exact grid (``infer.to_input_image``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import SimpleITK as sitk

from .config import SLICE_AXES
from .errors import InputError, PathLike

NORMALISATION = {"method": "percentile-zscore", "lower_percentile": 0.5, "upper_percentile": 99.5}
SIZE_MULTIPLE = 16
MAX_SLICE_SIDE = 8192  # model slices larger than this come from a spacing mix-up, not from real data
PERCENTILE_SAMPLE = 2**24  # voxels: exact percentiles up to this, an evenly strided sample beyond
NORMALISE_CHUNK = 2**22  # voxels per float64 temporary while normalising
RESAMPLE_SLAB_PIXELS = 2**23  # output pixels per resampled slab (32 MiB of float32)

# numpy axis of the canonical (z, y, x) array for each forced slice axis name
_NUMPY_AXIS = {"z": 0, "y": 1, "x": 2}


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


def slice_count(image: Any, slice_axis: str = "auto") -> int:
    """How many slices a volume (an image or its ``ImageGrid``) gives along ``slice_axis``."""
    sizes, spacings = _canonical_layout(image)
    return int(sizes[2 - choose_slice_axis(spacings, slice_axis)])


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

