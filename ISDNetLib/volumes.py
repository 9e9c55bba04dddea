"""Volume nodes to files and SimpleITK images and back, keeping voxels and geometry.

Slicer's nodes are in RAS, ITK images in LPS: the first two axes of direction and origin change sign.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import slicer.util
import vtk

GEOMETRY_TOLERANCE = 1e-4  # NIfTI keeps geometry in float32


class NodeError(ValueError):
    """A node of the scene cannot be used; the message names the node and says why."""

    def __init__(self, node: Any, problem: str):
        self.node_name = node.GetName() if node is not None else "(none)"
        super().__init__(f"{self.node_name}: {problem}")


def require_image_data(volume_node: Any) -> None:
    """Raise NodeError unless ``volume_node`` is a scalar 3D volume with voxels, all of them finite.

    A volume with a single slice (or a single row) is refused, like a 2D image file in the engine; so are NaN
    or infinite voxels, which would make every loss NaN.
    """
    if volume_node is None:
        raise NodeError(None, "no volume selected")
    image = volume_node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise NodeError(volume_node, "the volume has no image data (load or create its voxels first)")
    if image.GetNumberOfScalarComponents() != 1:
        raise NodeError(volume_node, f"the volume has {image.GetNumberOfScalarComponents()} components per "
                                     "voxel; ISDNet needs a scalar (single-component) volume")
    dims = image.GetDimensions()
    if min(dims) == 1:
        raise NodeError(volume_node, f"the volume is a single slice ({dims[0]} x {dims[1]} x {dims[2]} voxels), "
                                     "not a 3D volume; ISDNet needs a stack of slices")
    voxels = slicer.util.arrayFromVolume(volume_node)
    if voxels.dtype.kind == "f":
        bad = sum(int(plane.size - np.count_nonzero(np.isfinite(plane))) for plane in voxels)
        if bad:
            raise NodeError(volume_node, f"the volume has {bad} NaN or infinite voxels; replace them (for "
                                         "example with Filtering > Threshold) before using it")


def ijk_to_ras(volume_node: Any) -> np.ndarray:
    """The node's 4x4 IJK-to-RAS matrix as a numpy array."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def lps_geometry(volume_node: Any) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, origin, direction) of the node in ITK's LPS convention."""
    matrix = ijk_to_ras(volume_node)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    flip = np.diag([-1.0, -1.0, 1.0])
    direction = flip @ (matrix[:3, :3] / spacing)
    origin = flip @ matrix[:3, 3]
    return tuple(spacing.tolist()), tuple(origin.tolist()), tuple(direction.ravel().tolist())


def image_from_volume(volume_node: Any) -> Any:
    """A SimpleITK image with the node's voxels (same scalar type) and geometry."""
    import SimpleITK as sitk

    require_image_data(volume_node)
    image = sitk.GetImageFromArray(slicer.util.arrayFromVolume(volume_node))
    spacing, origin, direction = lps_geometry(volume_node)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def array_on_volume_grid(image: Any, volume_node: Any, what: str) -> np.ndarray:
    """The voxels of ``image`` as a (k, j, i) array after checking it lies on exactly the node's grid."""
    import SimpleITK as sitk

    expected = tuple(reversed(slicer.util.arrayFromVolume(volume_node).shape))
    if tuple(image.GetSize()) != expected:
        raise NodeError(volume_node, f"the {what} has size {image.GetSize()}, the volume {expected}")
    spacing, origin, direction = lps_geometry(volume_node)
    for name, got, want in (("spacing", image.GetSpacing(), spacing), ("origin", image.GetOrigin(), origin),
                            ("direction", image.GetDirection(), direction)):
        if not np.allclose(got, want, atol=GEOMETRY_TOLERANCE * max(1.0, float(np.abs(want).max()))):
            raise NodeError(volume_node, f"the {what} has {name} {tuple(got)}, the volume {tuple(want)}")
    return sitk.GetArrayViewFromImage(image).copy()


def volume_from_image(scene: Any, image: Any, like: Any, name: str, class_name: str = "vtkMRMLScalarVolumeNode"
                      ) -> Any:
    """A new volume node in ``scene`` holding ``image``'s voxels on the grid of the volume node ``like``."""
    voxels = array_on_volume_grid(image, like, name)
    node = scene.AddNewNodeByClass(class_name, name)
    slicer.util.updateVolumeFromArray(node, voxels)
    node.CopyOrientation(like)
    if like.GetParentTransformNode() is not None:
        node.SetAndObserveTransformNodeID(like.GetParentTransformNode().GetID())
    node.CreateDefaultDisplayNodes()
    return node


def write_volume(volume_node: Any, path: Path) -> None:
    """Write the node to ``path`` (.nii.gz, .nrrd, ...) through Slicer's own volume writer.

    A stand-alone storage node is used, so the node in the scene keeps its own storage node and file name.
    """
    require_image_data(volume_node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(True)
    if not storage.WriteData(volume_node):
        raise NodeError(volume_node, f"could not be written to {path}")


@contextlib.contextmanager
def temporary_nodes(scene: Any) -> Iterator[None]:
    """Remove every node added to ``scene`` inside the block: temporary label maps and the display and colour
    table nodes that Slicer adds for them."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        for node in [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]:
            if node.GetID() not in before:
                scene.RemoveNode(node)
