"""A Slicer scene without the Slicer application, for testing the modules' logic on slicer-core.

``make_scene()`` builds a ``vtkMRMLScene`` with an application logic and the Colors, Volumes, Segmentations and
SubjectHierarchy logics registered by name, as Slicer does at startup. The node builders (small
volumes with anisotropic spacing and oblique directions, segmentation nodes on them) come from
``slicer_nodes`` beside this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import slicer
import vtk
from slicer_nodes import (  # noqa: F401 - re-exported for the tests
    ORGAN_COLORS,
    ORGAN_NAMES,
    TINY_TRAINING,
    add_segmentation,
    add_slice_views,
    add_volume,
    phantom,
    rotation,
)


@dataclass
class SceneWithLogics:
    """A scene and the module logics registered on its application logic (kept alive here)."""

    scene: Any
    application: Any
    logics: dict[str, Any] = field(default_factory=dict)


def make_scene() -> SceneWithLogics:
    """A fresh scene with the Colors, Volumes, Segmentations and SubjectHierarchy logics."""
    vtk.vtkObject.GlobalWarningDisplayOff()
    scene = slicer.vtkMRMLScene()
    application = slicer.vtkSlicerApplicationLogic()
    application.SetMRMLScene(scene)
    application.SetSliceLogics(vtk.vtkCollection())
    application.SetViewLogics(vtk.vtkCollection())
    result = SceneWithLogics(scene, application)
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLApplicationLogic(application)
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    application.SetModuleLogic("Colors", colors)
    result.logics["Colors"] = colors
    for name, cls in (("Volumes", slicer.vtkSlicerVolumesLogic),
                      ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(application)
        logic.SetMRMLScene(scene)
        application.SetModuleLogic(name, logic)
        result.logics[name] = logic  # the application logic does not keep its module logics alive
    return result
