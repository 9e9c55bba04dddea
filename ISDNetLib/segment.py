"""SegmentLogic: run a trained ISDNet model on a volume node and put the result in a segmentation node.

Small volumes are segmented in this process; large ones by ``isdnet segment`` in a child process (started with
``start`` and followed with ``poll``, so Slicer stays responsive and Cancel works). ``review`` does the same for an
uncertainty map: in this process up to ``config.IN_PROCESS_MAX_VOXELS``, else by ``isdnet segment --uncertainty``.
Either way the label map is imported through the Segmentations logic, on exactly the input's grid, one segment
per class with the model's names, colours and terminology, the segmentation referencing the input's geometry and
placed beside it in the subject hierarchy.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import slicer
import slicer.util

from isdnet.config import (
    CONFIDENCE_SUFFIX,
    DEFAULT_UNCERTAINTY,
    IN_PROCESS_MAX_VOXELS,
    UNCERTAINTY_SUFFIX,
    UNCERTAINTY_TITLES,
    VOLUME_ENDING,
    Event,
)
from isdnet.modelheader import read_header
from isdnet.threads import without_spinning

from .child import ChildJobLogic
from .nodes import CONFIDENCE, PREDICTION, UNCERTAINTY, mark, output_of
from .review import show_overlay, uncertain_slices
from .runner import ProcessRunner, engine_environment
from .volumes import (
    NodeError,
    array_on_volume_grid,
    image_from_volume,
    require_image_data,
    temporary_nodes,
    volume_from_image,
    write_volume,
)


def foreground_classes(header: dict[str, Any]) -> list[dict[str, Any]]:
    """The model's classes other than background (value 0), by label value."""
    return sorted((c for c in header["classes"] if int(c["value"]) != 0), key=lambda c: int(c["value"]))


def describe_model(header: dict[str, Any]) -> str:
    """A few lines on the model for the module: its classes and how it was trained."""
    lines = ["Classes: " + ", ".join(f"{c['value']} {c['name']}" for c in foreground_classes(header))]
    for key, value in (header.get("provenance") or {}).items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        lines.append(f"{key.replace('_', ' ').capitalize()}: {value}")
    return "\n".join(lines)


@dataclass
class SegmentStatus:
    """Where a background segmentation stands; ``state`` is idle, running, done, cancelled or failed."""

    state: str = "idle"
    fraction: float = 0.0
    message: str = ""
    segmentation_node: Any = None
    confidence_node: Any = None
    uncertainty_node: Any = None
    slices: Optional[list[tuple[int, float]]] = None  # a review's most uncertain slices, (index, mm²)


@dataclass
class _Job:
    volume_node: Any
    header: dict[str, Any]
    folder: Path
    confidence: bool
    segmentation_node: Any
    replace: bool
    review: Optional[tuple[str, str, int]] = None  # a review's uncertainty, view and count


class SegmentLogic(ChildJobLogic):
    """Segments volume nodes of one scene with ISDNet model files."""

    what = "Segmentation"

    def __init__(self, scene: Any, runner: Optional[ProcessRunner] = None, python: Optional[str] = None):
        super().__init__(scene, runner, python)
        self.status = SegmentStatus()
        self._job: Optional[_Job] = None

    # ----- in this process
    def segment(self, volume_node: Any, model_path: Path, *, device: str = "auto", confidence: bool = False,
                segmentation_node: Any = None, replace: bool = True,
                progress: Optional[Callable[[int, int], None]] = None) -> Any:
        """Segment ``volume_node`` with the model now and return the segmentation node.

        With ``segmentation_node``, the result goes into that node, replacing its segments (``replace``) or added
        beside them; otherwise a new node named after the input is made. With ``confidence``, the confidence
        map is also loaded as a scalar volume (``self.status.confidence_node``).
        """
        from isdnet.infer import segment
        from isdnet.modelfile import load_model

        require_image_data(volume_node)
        self.status = SegmentStatus("running", 0.0, f"Segmenting '{volume_node.GetName()}'...")
        model = load_model(Path(model_path))
        with without_spinning():
            result = segment(image_from_volume(volume_node), model, device=device, confidence=confidence,
                             progress=progress)
        node = self.import_result(volume_node, result.labels, model.header, result.confidence,
                                  segmentation_node, replace)
        self.status.state, self.status.fraction, self.status.segmentation_node = "done", 1.0, node
        self.status.message = f"Segmented '{volume_node.GetName()}'."
        return node

    def review(self, volume_node: Any, model_path: Path, *, uncertainty: str = DEFAULT_UNCERTAINTY,
               device: str = "auto", view: str = "Red", count: int = 10,
               in_process_max_voxels: int = IN_PROCESS_MAX_VOXELS) -> Optional[list[tuple[int, float]]]:
        """Review low-confidence regions: the model's ``uncertainty`` map of ``volume_node`` as a volume node shown
        over it (``self.status.uncertainty_node``, replacing an earlier one), and the slices of ``view`` with the
        most uncertain area, most first, as (index, mm²), also kept in ``self.status.slices``.

        A volume of up to ``in_process_max_voxels`` voxels is reviewed now and its slices returned; a larger one by
        an ``isdnet segment --uncertainty`` child (Slicer stays responsive, Cancel works): None is returned, and
        ``poll`` shows the map when the child is done.
        """
        require_image_data(volume_node)
        if math.prod(volume_node.GetImageData().GetDimensions()) > in_process_max_voxels:
            self._start_child(volume_node, Path(model_path), device, review=(uncertainty, view, count))
            return None
        from isdnet.uncertainty import analyse

        with without_spinning():
            result = analyse(image_from_volume(volume_node), Path(model_path), kinds=[uncertainty], device=device)
        return self._show_review(volume_node, result.maps[uncertainty], uncertainty, view, count)

    def _show_review(self, volume_node: Any, image: Any, uncertainty: str, view: str, count: int
                     ) -> list[tuple[int, float]]:
        """The uncertainty map (a SimpleITK image on the input's grid) into the scene, over the input."""
        previous = output_of(self.scene, volume_node, UNCERTAINTY)
        if previous is not None:
            self.scene.RemoveNode(previous)
        node = volume_from_image(self.scene, image, volume_node, f"{volume_node.GetName()} uncertainty ({uncertainty})")
        mark(node, UNCERTAINTY, volume_node)
        node.SetAttribute("ISDNet.Uncertainty", uncertainty)
        self._place_beside(volume_node, node)
        show_overlay(self.scene, volume_node, node)
        self.status.uncertainty_node = node
        self.status.message = f"Uncertainty shown: {UNCERTAINTY_TITLES[uncertainty]}."
        self.status.slices = uncertain_slices(node, view, count)
        return self.status.slices

    # ----- in a child process
    def command(self, input_path: Path, model_path: Path, output_folder: Path, device: str, confidence: bool,
                uncertainty: Optional[str] = None) -> list[str]:
        """The command line of the segmentation child (with ``uncertainty``, also writing that map)."""
        args = [self.python, "-m", "isdnet", "segment", str(input_path), "--model", str(model_path),
                "--out", str(output_folder), "--device", device, "--progress-json"]
        args += ["--confidence"] if confidence else []
        return args + ["--uncertainty", uncertainty] if uncertainty else args

    def start(self, volume_node: Any, model_path: Path, *, device: str = "auto", confidence: bool = False,
              segmentation_node: Any = None, replace: bool = True) -> None:
        """Start segmenting ``volume_node`` in a child process; follow it with ``poll``, end it with ``cancel``."""
        require_image_data(volume_node)
        self._start_child(volume_node, Path(model_path), device, confidence, segmentation_node, replace)

    def _start_child(self, volume_node: Any, model_path: Path, device: str, confidence: bool = False,
                     segmentation_node: Any = None, replace: bool = True,
                     review: Optional[tuple[str, str, int]] = None) -> None:
        header = read_header(model_path)
        folder = Path(tempfile.mkdtemp(prefix="isdnet-segment-"))
        write_volume(volume_node, folder / "input.nrrd")
        self._job = _Job(volume_node, header, folder, confidence, segmentation_node, replace, review)
        self._started()
        what = "Computing the uncertainty of" if review else "Segmenting"
        previous = self.status  # a review leaves the last segmentation (and "Use as training label") as it was
        self.status = SegmentStatus("running", 0.0, f"{what} '{volume_node.GetName()}'...")
        if review:
            self.status.segmentation_node, self.status.confidence_node = (previous.segmentation_node,
                                                                          previous.confidence_node)
        self.runner.start(self.command(folder / "input.nrrd", model_path, folder / "out", device, confidence,
                                       review[0] if review else None),
                          env=engine_environment(), log_path=str(folder / "segment.log"))

    def _progress(self, event: dict[str, Any]) -> None:
        if event["event"] == Event.SLICES and event.get("total"):
            self.status.fraction = min(0.99, float(event["done"]) / float(event["total"]))

    def _finish(self, returncode: int) -> None:
        job, status = self._job, self.status
        assert job is not None
        try:
            if self.ended_without_result(returncode):
                return
            import SimpleITK as sitk

            out = job.folder / "out"
            if job.review:
                uncertainty = sitk.ReadImage(str(out / f"input{UNCERTAINTY_SUFFIX}{VOLUME_ENDING}"))
                self._show_review(job.volume_node, uncertainty, *job.review)
                status.state, status.fraction = "done", 1.0
                return
            labels = sitk.ReadImage(str(out / f"input{VOLUME_ENDING}"))
            confidence = (sitk.ReadImage(str(out / f"input{CONFIDENCE_SUFFIX}{VOLUME_ENDING}"))
                          if job.confidence else None)
            node = self.import_result(job.volume_node, labels, job.header, confidence, job.segmentation_node,
                                      job.replace)
            status.state, status.fraction, status.segmentation_node = "done", 1.0, node
            status.message = f"Segmented '{job.volume_node.GetName()}'."
        finally:
            shutil.rmtree(job.folder, ignore_errors=True)
            self._job = None

    # ----- into the scene
    def import_result(self, volume_node: Any, labels: Any, header: dict[str, Any], confidence: Any = None,
                      segmentation_node: Any = None, replace: bool = True) -> Any:
        """Put a label map (a SimpleITK image on the input's grid) into a segmentation node; see ``segment``."""
        voxels = array_on_volume_grid(labels, volume_node, "label map").astype(np.uint8, copy=False)
        classes = foreground_classes(header)
        unknown = sorted(set(np.unique(voxels).tolist()) - {0} - {int(c["value"]) for c in classes})
        if unknown:
            raise NodeError(volume_node, f"the label map holds values {unknown} that the model does not name")
        node = segmentation_node or output_of(self.scene, volume_node, PREDICTION)  # a second Apply reuses it
        if node is None:
            node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} segmentation")
            mark(node, PREDICTION, volume_node)
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        segmentation = node.GetSegmentation()
        if replace:
            segmentation.RemoveAllSegments()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        transform = volume_node.GetParentTransformNode()
        node.SetAndObserveTransformNodeID(transform.GetID() if transform is not None else None)

        before = {segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())}
        with temporary_nodes(self.scene):
            labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__isdnet_result__")
            slicer.util.updateVolumeFromArray(labelmap, voxels)
            labelmap.CopyOrientation(volume_node)
            if transform is not None:
                labelmap.SetAndObserveTransformNodeID(transform.GetID())
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node):
                raise NodeError(node, "the label map could not be imported into the segmentation")
        imported = {}
        for i in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(i)
            if segment_id not in before:
                imported[segmentation.GetSegment(segment_id).GetLabelValue()] = segment_id
        first_index = len(before)
        for index, cls in enumerate(classes):
            color = [float(c) / 255.0 for c in cls["color"]]
            segment_id = imported.get(int(cls["value"]))
            if segment_id is None:  # a class absent from this volume still gets its (empty) segment
                segment_id = segmentation.AddEmptySegment("", cls["name"], color)
            segment = segmentation.GetSegment(segment_id)
            segment.SetName(cls["name"])
            segment.SetColor(color)
            if cls.get("terminology"):
                segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), str(cls["terminology"]))
            segmentation.SetSegmentIndex(segment_id, first_index + index)
        node.CreateClosedSurfaceRepresentation()  # shown in 3D, as the other AI extensions do
        self._place_beside(volume_node, node)
        if confidence is not None:
            previous = output_of(self.scene, volume_node, CONFIDENCE)
            if previous is not None:
                self.scene.RemoveNode(previous)
            self.status.confidence_node = volume_from_image(self.scene, confidence, volume_node,
                                                            f"{volume_node.GetName()} confidence")
            mark(self.status.confidence_node, CONFIDENCE, volume_node)
            self._place_beside(volume_node, self.status.confidence_node)
        return node

    def _place_beside(self, volume_node: Any, node: Any) -> None:
        """Give ``node`` the same parent as the input volume in the subject hierarchy."""
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        volume_item = hierarchy.GetItemByDataNode(volume_node)
        if not volume_item:
            volume_item = hierarchy.CreateItem(hierarchy.GetSceneItemID(), volume_node)
        parent = hierarchy.GetItemParent(volume_item)
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, parent)
        else:
            hierarchy.CreateItem(parent, node)
