"""Synthetic "liver with lesions" volumes for the demo and the tests, with a Decathlon-layout writer.

A phantom is a body (an elliptic cylinder with a darker fat rim and a few bright structures such as
vessels or bone) holding an organ (class 1: an ellipsoid deformed by low-frequency noise) that holds
lesions (class 2 and up: ellipsoids at least 4 voxels in radius in-plane, darker than the organ). Each
tissue has its own texture; a smooth multiplicative bias field, partial-volume blur and Rician noise
follow. Lesions have clear contrast against the organ, yet their intensities overlap the background
tissue and the bright structures overlap the organ, so a threshold alone does not segment them: a small
2D U-Net must use context. Everything is drawn from ``np.random.default_rng(seed)``: a seed always gives
the same volume.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Union

import numpy as np
import SimpleITK as sitk

PathLike = Union[str, Path]

AIR, FAT, TISSUE, BRIGHT, NEIGHBOUR, ORGAN, LESION = 0.0, 160.0, 320.0, 650.0, 520.0, 570.0, 350.0
MIN_LESION_RADIUS_VOXELS = 4.0


def _cosine_field(rng: np.random.Generator, coords: list[np.ndarray], waves: int,
                  cycles: tuple[float, float]) -> np.ndarray:
    """A smooth random field with standard deviation about 1: a sum of plane waves of random direction,
    phase and frequency (``cycles`` per unit of ``coords``)."""
    field = np.zeros(np.broadcast_shapes(*(c.shape for c in coords)), np.float32)
    for _ in range(waves):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        frequency = 2 * math.pi * rng.uniform(*cycles)
        phase = rng.uniform(0, 2 * math.pi)
        field += np.cos(frequency * sum(d * c for d, c in zip(direction, coords)) + phase).astype(np.float32)
    return field / math.sqrt(waves / 2)


def _texture(rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...],
             sigma_mm: float) -> np.ndarray:
    """Gaussian-smoothed white noise with standard deviation 1 (a tissue's grain)."""
    image = sitk.GetImageFromArray(rng.standard_normal(shape).astype(np.float32))
    image.SetSpacing(spacing)
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(image, sigma_mm))
    return smooth / max(float(smooth.std()), 1e-6)


def _ellipsoid(coords: list[np.ndarray], centre: np.ndarray, axes: np.ndarray) -> np.ndarray:
    return sum(((c - m) / a) ** 2 for c, m, a in zip(coords, centre, axes)) <= 1.0


def _depth_inside(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance in mm from each voxel of ``mask`` to the outside of it (negative outside)."""
    image = sitk.GetImageFromArray(np.pad(mask, 1).astype(np.uint8))
    image.SetSpacing(spacing)
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=True, squaredDistance=False,
                                            useImageSpacing=True)
    return sitk.GetArrayFromImage(distance)[1:-1, 1:-1, 1:-1]


def _place_lesions(rng: np.random.Generator, coords: list[np.ndarray], organ: np.ndarray,
                   spacing: tuple[float, ...], num_classes: int) -> np.ndarray:
    """Lesion labels (2..num_classes-1, 0 elsewhere): 1-3 lesions of class 2, 1-2 of each further class.

    Each lesion is an ellipsoid whose whole bounding sphere lies at least 1 mm inside the organ and apart
    from the other lesions; in-plane semi-axes are at least ``MIN_LESION_RADIUS_VOXELS`` voxels.
    """
    labels = np.zeros(organ.shape, np.uint8)
    depth = _depth_inside(organ, spacing)
    in_plane = min(spacing[0], spacing[1])
    placed: list[tuple[np.ndarray, float]] = []
    for label in range(2, num_classes):
        for _ in range(int(rng.integers(1, 4 if label == 2 else 3))):
            radius = rng.uniform(6.0, 9.0)  # in-plane voxels, before the per-axis factors
            factors = rng.uniform(0.85, 1.2, 3)
            while radius * 0.85 >= MIN_LESION_RADIUS_VOXELS:
                # Semi-axes in mm, (z, y, x): in-plane ones hold radius * factor voxels, z is as long in mm.
                axes = radius * factors * np.array([in_plane, spacing[1], spacing[0]])
                extent = float(axes.max())
                room = depth >= extent + 1.0
                for centre, other in placed:
                    room &= sum((c - m) ** 2 for c, m in zip(coords, centre)) > (extent + other + 2.0) ** 2
                candidates = np.flatnonzero(room)
                if candidates.size:
                    index = np.unravel_index(candidates[rng.integers(candidates.size)], organ.shape)
                    centre = np.array([coords[axis].ravel()[index[axis]] for axis in range(3)])
                    labels[_ellipsoid(coords, centre, axes) & organ] = label
                    placed.append((centre, extent))
                    break
                radius *= 0.9
        if not np.any(labels == label):
            raise ValueError(f"the volume is too small to hold a lesion of class {label} at least "
                             f"{MIN_LESION_RADIUS_VOXELS:g} voxels in radius; use a larger shape")
    return labels


def make_phantom(seed: int, shape: tuple[int, int, int] = (32, 64, 64),
                 spacing: tuple[float, float, float] = (1.0, 1.0, 2.5),
                 num_classes: int = 3) -> tuple[sitk.Image, sitk.Image]:
    """A synthetic CT-like volume (float32, about 0-1000) and its uint8 label map, the same for a given seed.

    ``shape`` is numpy's (z, y, x); ``spacing`` is SimpleITK's (x, y, z) in mm. Class 1 is the organ
    (15-30 % of the volume); with ``num_classes`` 3 or more, classes 2.. are lesions inside it. Both images
    share a random non-zero origin and the identity direction.
    """
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes of at least 8 voxels, got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers, got {spacing}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 (background and organ), got {num_classes}")
    rng = np.random.default_rng(seed)
    spacing = tuple(float(s) for s in spacing)
    size_mm = np.array(shape) * np.array(spacing[::-1])
    # Physical coordinates in mm, centred on the volume, as open grids in (z, y, x) order.
    coords = [((np.arange(n) - (n - 1) / 2) * s).reshape([-1 if a == i else 1 for a in range(3)])
              for i, (n, s) in enumerate(zip(shape, spacing[::-1]))]

    body_axes = size_mm[1:] * rng.uniform(0.46, 0.49, 2)
    body_level = (coords[1] / body_axes[0]) ** 2 + (coords[2] / body_axes[1]) ** 2
    body = np.broadcast_to(body_level <= 1.0, shape)
    rim_width = rng.uniform(0.1, 0.18)  # of the body's radius
    rim = body & (body_level > (1 - rim_width) ** 2)
    inner = body & (body_level <= (1 - rim_width - 0.05) ** 2)

    # Organ: a deformed ellipsoid, long in z, its size set by a quantile so that it fills the drawn fraction;
    # it stays clear of the fat rim.
    centre = rng.uniform(-0.06, 0.06, 3) * size_mm
    axes = size_mm * rng.uniform([0.42, 0.28, 0.28], [0.52, 0.36, 0.36])
    relative = [(c - m) / a for c, m, a in zip(coords, centre, axes)]
    level = np.sqrt(sum(r**2 for r in relative)) * (1 + 0.15 * _cosine_field(rng, relative, 6, (0.2, 0.5)))
    fraction = rng.uniform(0.16, 0.25)
    organ = inner & (level <= np.quantile(level[inner], min(fraction / inner.mean(), 1.0)))
    labels = np.where(organ, np.uint8(1), np.uint8(0))
    if num_classes > 2:
        lesions = _place_lesions(rng, coords, organ, spacing, num_classes)
        labels[lesions > 0] = lesions[lesions > 0]

    # Intensities: tissues with their own grain, a fat rim, a neighbour organ and bright structures (vessels,
    # bone) outside the organ.
    image = np.full(shape, AIR, np.float32)
    image[body] = TISSUE
    image += np.where(body, 45.0 * _texture(rng, shape, spacing, 2.0), 0.0).astype(np.float32)
    image[rim] = FAT + 20.0 * rng.standard_normal(int(rim.sum())).astype(np.float32)
    # An unlabelled neighbour organ of nearly the organ's brightness (as the spleen is to the liver), kept
    # 3 mm or more from it: only shape and position tell them apart.
    neighbour_axes = rng.uniform(0.12, 0.2, 3) * size_mm
    distance_to_organ = _depth_inside(~organ, spacing)
    away = inner & (distance_to_organ >= 3.0)
    room = np.flatnonzero(away & (distance_to_organ >= 0.5 * neighbour_axes.max()))
    if room.size:
        index = np.unravel_index(room[rng.integers(room.size)], shape)
        centre = np.array([coords[axis].ravel()[index[axis]] for axis in range(3)])
        neighbour = _ellipsoid(coords, centre, neighbour_axes) & away
        image[neighbour] = NEIGHBOUR + 15.0 * rng.standard_normal(int(neighbour.sum())).astype(np.float32)
    for _ in range(int(rng.integers(4, 9))):
        blob = _ellipsoid(coords, rng.uniform(-0.35, 0.35, 3) * size_mm, rng.uniform(3.0, 8.0, 3))
        image[blob & body & ~organ] = BRIGHT + rng.uniform(-80.0, 80.0)
    image[organ] = ORGAN + 25.0 * _texture(rng, shape, spacing, 1.5)[organ]
    lesion_texture = _texture(rng, shape, spacing, 1.0)
    for label in range(2, num_classes):
        inside = labels == label
        mean = LESION + 60.0 * (label - 2) + rng.uniform(-30.0, 30.0)
        image[inside] = mean + 30.0 * lesion_texture[inside]

    blurred = sitk.GetImageFromArray(image)
    blurred.SetSpacing(spacing)
    image = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(blurred, [0.5 * s for s in spacing]))
    normalised = [c / size_mm.max() for c in coords]
    image *= np.exp(0.15 * _cosine_field(rng, normalised, 4, (0.3, 1.0)))
    sigma = rng.uniform(22.0, 32.0)
    real = image + sigma * rng.standard_normal(shape).astype(np.float32)
    imaginary = sigma * rng.standard_normal(shape).astype(np.float32)
    image = np.clip(np.sqrt(real**2 + imaginary**2), 0.0, 1000.0).astype(np.float32)

    origin = tuple(float(v) for v in rng.uniform(-250.0, 250.0, 3))
    images = []
    for array in (image, labels):
        result = sitk.GetImageFromArray(array)
        result.SetSpacing(spacing)
        result.SetOrigin(origin)
        images.append(result)
    return images[0], images[1]


def class_names(num_classes: int) -> dict[str, str]:
    """Decathlon-style label names: background, organ, lesion, then lesion2, lesion3..."""
    names = {"0": "background", "1": "organ"}
    for label in range(2, num_classes):
        names[str(label)] = "lesion" if label == 2 else f"lesion{label - 1}"
    return names


def write_phantom_dataset(folder: PathLike, num_cases: int, seed: int = 0, **phantom_options: Any) -> Path:
    """Write ``num_cases`` phantoms as a Decathlon dataset (``dataset.json``, ``imagesTr/``, ``labelsTr/``).

    Case i uses a seed derived from ``seed`` and i alone, so a larger dataset starts with the same cases.
    ``phantom_options`` go to ``make_phantom``. Returns the folder.
    """
    if num_cases < 1:
        raise ValueError(f"num_cases must be at least 1, got {num_cases}")
    folder = Path(folder)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(num_cases)):
        image, labels = make_phantom(int(child.generate_state(1)[0]), **phantom_options)
        entry = {"image": f"./imagesTr/phantom_{i:03d}.nii.gz", "label": f"./labelsTr/phantom_{i:03d}.nii.gz"}
        sitk.WriteImage(image, str(folder / entry["image"]), True)
        sitk.WriteImage(labels, str(folder / entry["label"]), True)
        training.append(entry)
    dataset = {
        "name": "ISDNetPhantoms",
        "description": "synthetic ISDNet phantoms",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": class_names(phantom_options.get("num_classes", 3)),
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
        "training": training,
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n", encoding="utf-8")
    return folder
