"""Review low-confidence regions: an uncertainty volume as an overlay, the slices with the most uncertain area, and
a slice view (Red, Yellow or Green) jumped to one of them.

A slice's uncertain area is the sum of the uncertainty (each voxel in [0, 1]) times the voxel's in-plane area, in
mm²: a fully uncertain square centimetre counts 100, no threshold needed. Slices are those of the volume's axis
nearest the view's normal (axial for Red, sagittal for Yellow, coronal for Green).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import slicer
import slicer.util

from .volumes import NodeError, ijk_to_ras

VIEW_AXES = {"Red": 2, "Yellow": 0, "Green": 1}  # the RAS axis (R, A, S) each default view looks along
OVERLAY_OPACITY = 0.5
OVERLAY_COLORS = "vtkMRMLColorTableNodeRainbow"  # blue certain .. red uncertain


def _view_axis(view: str) -> int:
    if view not in VIEW_AXES:
        raise ValueError(f"unknown slice view {view!r}; choose one of {', '.join(VIEW_AXES)}")
    return VIEW_AXES[view]


def slice_axis(volume_node: Any, view: str) -> int:
    """The volume's IJK axis (0 = I, 1 = J, 2 = K) closest to the normal of ``view``'s slices."""
    directions = ijk_to_ras(volume_node)[:3, :3]
    directions = directions / np.linalg.norm(directions, axis=0)
    return int(np.argmax(np.abs(directions[_view_axis(view)])))


def uncertain_slices(uncertainty_node: Any, view: str = "Red", count: int = 10) -> list[tuple[int, float]]:
    """(slice index, uncertain area in mm²) of the ``count`` most uncertain slices for ``view``, most first."""
    voxels = slicer.util.arrayFromVolume(uncertainty_node)  # numpy (k, j, i)
    if voxels is None or voxels.ndim != 3:
        raise NodeError(uncertainty_node, "holds no 3D uncertainty map")
    axis = slice_axis(uncertainty_node, view)
    spacing = uncertainty_node.GetSpacing()
    pixel_area = math.prod(spacing[a] for a in range(3) if a != axis)
    numpy_axis = 2 - axis
    areas = voxels.sum(axis=tuple(a for a in range(3) if a != numpy_axis), dtype=np.float64) * pixel_area
    ranked = sorted(range(len(areas)), key=lambda i: (-areas[i], i))[:count]
    return [(i, float(areas[i])) for i in ranked if areas[i] > 0]


def slice_centre(volume_node: Any, view: str, index: int) -> tuple[float, float, float]:
    """The RAS position of the centre of slice ``index`` along the volume axis of ``view``."""
    axis = slice_axis(volume_node, view)
    dimensions = volume_node.GetImageData().GetDimensions()
    if not 0 <= index < dimensions[axis]:
        raise NodeError(volume_node, f"has no slice {index} along that view (it has {dimensions[axis]})")
    ijk = [(n - 1) / 2 for n in dimensions]
    ijk[axis] = index
    r, a, s, _ = ijk_to_ras(volume_node) @ np.array([*ijk, 1.0])
    return float(r), float(a), float(s)


def slice_view_node(scene: Any, view: str) -> Any:
    """The slice node of the view named ``view`` (its layout name)."""
    _view_axis(view)
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
        if node.GetLayoutName() == view:
            return node
    raise ValueError(f"the scene has no {view} slice view")


def jump_to_slice(scene: Any, view: str, volume_node: Any, index: int) -> Any:
    """Move ``view``'s slice to slice ``index`` of ``volume_node`` (its offset, not its orientation); returns the
    slice node."""
    node = slice_view_node(scene, view)
    node.JumpSliceByOffsetting(*slice_centre(volume_node, view, index))
    return node


def show_overlay(scene: Any, volume_node: Any, uncertainty_node: Any) -> None:
    """Show ``uncertainty_node`` over ``volume_node`` in every slice view, coloured 0 (certain) .. 1."""
    display = uncertainty_node.GetDisplayNode()
    if display is None:
        uncertainty_node.CreateDefaultDisplayNodes()
        display = uncertainty_node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    if scene.GetNodeByID(OVERLAY_COLORS) is not None:
        display.SetAndObserveColorNodeID(OVERLAY_COLORS)
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        composite.SetBackgroundVolumeID(volume_node.GetID())
        composite.SetForegroundVolumeID(uncertainty_node.GetID())
        composite.SetForegroundOpacity(OVERLAY_OPACITY)
