"""Volumes on chosen grids, and checks on grids, for the tests of the data stages."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from isdnet.geometry import (
    SliceGeometry,
    choose_slice_axis,
    prepare_volume,
)
from isdnet.infer import to_input_grid_slices, to_input_image

HIPPOCAMPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"

# helpers


def rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """Rotation matrix about ``axis`` (Rodrigues)."""
    k = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    t = math.radians(degrees)
    return np.eye(3) + math.sin(t) * kx + (1 - math.cos(t)) * kx @ kx


def phantom(size_xyz=(40, 36, 12), spacing=(0.7, 0.9, 3.0), origin=(12.5, -30.0, 7.25),
            direction: np.ndarray | None = None, seed: int = 0) -> tuple[sitk.Image, sitk.Image]:
    """A grid fixture: an image and a 3-class label (two ellipsoids, large in voxels) on exactly the given grid,
    down to 8 x 8 x 4 voxels (the engine's anatomy-like phantoms, ``isdnet.phantoms``, need larger volumes)."""
    x, y, z = np.meshgrid(*(np.arange(n) / n for n in size_xyz), indexing="ij")
    label_xyz = np.zeros(size_xyz, dtype=np.uint8)
    label_xyz[((x - 0.35) / 0.25) ** 2 + ((y - 0.45) / 0.3) ** 2 + ((z - 0.5) / 0.4) ** 2 < 1] = 1
    label_xyz[((x - 0.72) / 0.18) ** 2 + ((y - 0.55) / 0.3) ** 2 + ((z - 0.5) / 0.35) ** 2 < 1] = 2
    label_array = np.ascontiguousarray(label_xyz.transpose(2, 1, 0))  # numpy (z, y, x)
    rng = np.random.default_rng(seed)
    image_array = (label_array * 100.0 + rng.normal(0, 5, label_array.shape)).astype(np.float32)
    images = [sitk.GetImageFromArray(image_array), sitk.GetImageFromArray(label_array)]
    for img in images:
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
        if direction is not None:
            img.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    return images[0], images[1]


def oblique_flipped() -> np.ndarray:
    """An oblique (20 degrees about a skew axis), non-LPS (permuted and flipped axes) direction matrix."""
    signed_permutation = np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]], dtype=float)
    return rotation((1.0, 2.0, 0.5), 20.0) @ signed_permutation


def write(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    return 2 * np.count_nonzero(x & y) / (np.count_nonzero(x) + np.count_nonzero(y))


def round_trip(image: sitk.Image, label: sitk.Image, geometry: SliceGeometry) -> sitk.Image:
    """Prepared label -> one-hot -> back to the input slice grid -> argmax -> image on the input grid."""
    prepared = prepare_volume(image, geometry, label)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(prepared.label).long(), 3)
    onehot = onehot.permute(0, 3, 1, 2).float()
    back = to_input_grid_slices(prepared, onehot).argmax(1).numpy().astype(np.uint8)
    return to_input_image(prepared, back)


def assert_same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()


def canonical_in_plane_spacing(image: sitk.Image, rule: str) -> tuple[float, float]:
    canonical = sitk.DICOMOrient(image, "LPS")
    axis = choose_slice_axis(canonical.GetSpacing(), rule)
    rows, cols = (a for a in (0, 1, 2) if a != axis)
    return canonical.GetSpacing()[2 - rows], canonical.GetSpacing()[2 - cols]

