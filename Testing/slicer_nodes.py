"""Node builders for the tests of the Slicer-side logic: volumes and segmentations on a given scene (no
``slicer.mrmlScene``), so they run on slicer-core, and the engine's phantoms as arrays for them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import SimpleITK as sitk
import slicer
import slicer.util
import vtk

from isdnet.phantoms import make_phantom

ORGAN_NAMES = ("liver", "tumor")
ORGAN_COLORS = ((0.9, 0.6, 0.4), (0.2, 0.8, 0.3))
# Engine options that make a network small enough to train in seconds on two CPU cores (bf16 is slower than fp32
# for networks this small).
TINY_TRAINING = dict(base_channels=8, batch_size=4, slice_size=[32, 32], seed=0, precision="fp32")


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


def add_slice_views(scene: Any) -> dict[str, Any]:
    """The Red (axial), Yellow (sagittal) and Green (coronal) slice nodes with their composite nodes, as Slicer's
    layout makes them; returns the slice nodes by name."""
    views = {}
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        node = slicer.vtkMRMLSliceNode()
        node.SetLayoutName(name)
        node.SetSingletonTag(name)
        for preset, fill in (("Axial", node.GetAxialSliceToRASMatrix), ("Sagittal", node.GetSagittalSliceToRASMatrix),
                             ("Coronal", node.GetCoronalSliceToRASMatrix)):
            matrix = vtk.vtkMatrix3x3()
            fill(matrix)
            node.AddSliceOrientationPreset(preset, matrix)
        scene.AddNode(node)
        node.SetOrientation(orientation)
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(name)
        composite.SetSingletonTag(name)
        scene.AddNode(composite)
        views[name] = node
    return views


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


def phantom(shape: Sequence[int] = (12, 32, 32), seed: int = 0, dtype: Any = np.int16) -> tuple[np.ndarray, np.ndarray]:
    """The engine's phantom (``isdnet.phantoms.make_phantom``) as arrays (k, j, i): an image of ``dtype`` and its
    label map (1 organ, 2 lesion)."""
    image, labels = make_phantom(seed, shape=tuple(shape))
    voxels = np.clip(sitk.GetArrayFromImage(image), 0, None)
    return voxels.astype(dtype), sitk.GetArrayFromImage(labels)
