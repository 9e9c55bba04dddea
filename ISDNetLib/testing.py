"""Phantoms and node builders shared by the modules' Slicer self-tests and the pytest suite.

Everything takes the scene as an argument (no ``slicer.mrmlScene``), so it runs in Slicer and on slicer-core.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import slicer
import slicer.util
import vtk

ORGAN_NAMES = ("liver", "tumor")
ORGAN_COLORS = ((0.9, 0.6, 0.4), (0.2, 0.8, 0.3))
# Engine options that make a network small enough to train in seconds on two CPU cores.
TINY_TRAINING = ["--base-channels", "8", "--batch-size", "4", "--slice-size", "32", "32", "--seed", "0",
                 "--precision", "fp32"]  # bf16 is slower than fp32 for networks this small


def rotation(angle_deg: float, axis: int) -> np.ndarray:
    """A 3x3 rotation about one axis, for oblique volume directions."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def add_volume(scene: Any, voxels: np.ndarray, name: str, spacing: Sequence[float] = (1.0, 1.0, 1.0),
               origin: Sequence[float] = (0.0, 0.0, 0.0), directions: Optional[np.ndarray] = None) -> Any:
    """A scalar volume node from a (k, j, i) array, with RAS geometry."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, voxels)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    node.SetIJKToRASDirections(np.eye(3) if directions is None else np.asarray(directions))
    node.CreateDefaultDisplayNodes()
    return node


def add_segmentation(scene: Any, volume: Any, labels: np.ndarray, names: Sequence[str],
                     colors: Sequence[Sequence[float]], name: Optional[str] = None) -> Any:
    """A segmentation node on ``volume``'s grid whose segment k-1 holds the voxels where ``labels == k``."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{volume.GetName()} segmentation")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation = node.GetSegmentation()
    for value, (segment_name, color) in enumerate(zip(names, colors), start=1):
        segment_id = segmentation.AddEmptySegment(f"segment_{value}", segment_name, list(color))
        mask = (labels == value).astype(np.uint8)
        _set_segment_voxels(scene, node, segment_id, mask, volume)
    return node


def _set_segment_voxels(scene: Any, node: Any, segment_id: str, mask: np.ndarray, volume: Any) -> None:
    """slicer.util.updateSegmentBinaryLabelmapFromArray without slicer.mrmlScene."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__fixture__")
    slicer.util.updateVolumeFromArray(labelmap, mask)
    labelmap.CopyOrientation(volume)
    image = slicer.vtkOrientedImageData()
    image.DeepCopy(labelmap.GetImageData())
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    scene.RemoveNode(labelmap)


def phantom(shape: Sequence[int] = (12, 32, 32), seed: int = 0, dtype: Any = np.int16,
            center_shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """An image (k, j, i) of a bright 'organ' holding a brighter 'lesion', and its label map (1 organ, 2 lesion)."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    organ = (k / 0.9) ** 2 + ((j - center_shift) / 0.6) ** 2 + (i / 0.7) ** 2 < 1
    lesion = (k / 0.6) ** 2 + ((j - 0.15 - center_shift) / 0.25) ** 2 + ((i + 0.1) / 0.25) ** 2 < 1
    labels = np.zeros(shape, np.uint8)
    labels[organ] = 1
    labels[lesion & organ] = 2
    image = 20.0 + 80.0 * (labels == 1) + 160.0 * (labels == 2) + rng.normal(0, 8, shape)
    return image.astype(dtype), labels

