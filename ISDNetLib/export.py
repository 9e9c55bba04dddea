"""Export volumes and segmentation nodes of a scene to a dataset folder in the Decathlon layout.

Label maps come from the Segmentations logic, in each volume's own geometry; voxels of both images and label
maps go to disk with SimpleITK, the geometry converted from Slicer's RAS to ITK's LPS (``volumes.lps_geometry``).
Class k (k = 1, 2, ...) is the k-th segment of the first labeled segmentation; every labeled segmentation must
hold the same segment names, otherwise the export stops and names the volume and the differing names.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import SimpleITK as sitk
import slicer
import slicer.util
import vtk

from isdnet.config import DATASET_FILE, VOLUME_ENDING
from isdnet.modelheader import MAX_CLASSES

from .volumes import NodeError, image_from_volume, require_image_data, temporary_nodes

MAX_SEGMENTS = MAX_CLASSES - 1  # the classes a model holds, background aside


@dataclass
class SegmentClass:
    """One class of the dataset: its label value, and the segment name, colour (0-255) and terminology entry (empty
    when the segment has none) it came from."""

    value: int
    name: str
    color: tuple[int, int, int]
    terminology: str = ""


@dataclass
class ExportedDataset:
    """What ``export_dataset`` wrote: the folder, the classes and the case names."""

    folder: Path
    classes: list[SegmentClass]
    labeled_cases: list[str]
    unlabeled_cases: list[str]


def segment_names(segmentation_node: Any) -> list[str]:
    """The segment names of a segmentation node, in the node's order."""
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def dataset_classes(labeled: Sequence[tuple[Any, Any]]) -> list[SegmentClass]:
    """The classes of the labeled pairs, checked to agree; raises NodeError naming what disagrees."""
    if not labeled:
        raise ValueError("at least one labeled volume (a volume with a segmentation) is needed for training")
    reference_volume, reference = labeled[0]
    names = _checked_names(reference_volume, reference)
    for volume, segmentation_node in labeled[1:]:
        other = _checked_names(volume, segmentation_node)
        if set(other) != set(names):
            missing = sorted(set(names) - set(other))
            extra = sorted(set(other) - set(names))
            details = "; ".join(part for part in (
                f"missing {', '.join(map(repr, missing))}" if missing else "",
                f"not in the others {', '.join(map(repr, extra))}" if extra else "") if part)
            raise NodeError(volume, f"its segmentation '{segmentation_node.GetName()}' has segments {other}, "
                                    f"but '{reference.GetName()}' (of '{reference_volume.GetName()}') has {names}: "
                                    f"{details}. Rename the segments so that all labeled volumes use the same names.")
    segmentation = reference.GetSegmentation()
    classes = []
    for value, name in enumerate(names, start=1):
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))
        color = tuple(int(round(255 * max(0.0, min(1.0, c)))) for c in segment.GetColor())
        terminology = vtk.mutable("")
        segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology)
        classes.append(SegmentClass(value, name, color, str(terminology)))  # type: ignore[arg-type]
    return classes


def _checked_names(volume: Any, segmentation_node: Any) -> list[str]:
    if segmentation_node is None:
        raise NodeError(volume, "a labeled volume needs a segmentation node")
    names = segment_names(segmentation_node)
    if not names:
        raise NodeError(segmentation_node, f"the segmentation of '{volume.GetName()}' has no segments")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise NodeError(segmentation_node, f"segment names must be unique, repeated: {duplicates}")
    if "background" in (n.lower() for n in names):
        raise NodeError(segmentation_node, "a segment is named 'background', which is reserved for label 0")
    if len(names) > MAX_SEGMENTS:
        raise NodeError(segmentation_node, f"{len(names)} segments; at most {MAX_SEGMENTS} are supported")
    return names


def label_array(scene: Any, volume: Any, segmentation_node: Any, names: Sequence[str]) -> np.ndarray:
    """The segments ``names`` as one uint8 label map (k, j, i) on exactly ``volume``'s grid; name k-1 gets k.

    Where segments overlap, the later name wins.
    """
    segmentation = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    for name in names:
        ids.InsertNextValue(segmentation.GetSegmentIdBySegmentName(name))
    with temporary_nodes(scene):
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__isdnet_export__")
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, volume):
            raise NodeError(segmentation_node, f"its segments could not be exported on the grid of "
                                               f"'{volume.GetName()}'")
        labels = slicer.util.arrayFromVolume(labelmap)
    expected = slicer.util.arrayFromVolume(volume).shape
    if labels.shape != expected:
        raise NodeError(segmentation_node, f"exported label map {labels.shape} differs from the volume {expected}")
    if not labels.any():
        raise NodeError(segmentation_node, f"the segmentation is empty inside '{volume.GetName()}': paint at least "
                                           "one segment within the volume, or use the volume as unlabeled")
    return labels.astype(np.uint8)


def case_names(volumes: Sequence[Any]) -> list[str]:
    """File-safe, unique case names from the volumes' names."""
    names: list[str] = []
    for volume in volumes:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", volume.GetName()).strip("._") or "case"
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


@dataclass
class _Item:
    """One volume to write: where, and for a labeled one its segmentation."""

    volume: Any
    segmentation: Any
    case: str
    folder: str  # imagesTr or imagesUnl


class ExportJob:
    """The export of a dataset folder, one volume a ``step()``, so that a front end stays responsive (a timer calls
    ``step``; ``cancel`` removes what was written).

    Everything is checked before anything is written. Each step copies one volume's voxels (and label map) out of
    the scene, on the caller's thread, which MRML needs; compressing and writing the NIfTI files runs on a worker
    thread meanwhile, with SimpleITK (no MRML there). ``dataset.json`` is written last, so a folder without it is
    an export that did not finish.
    """

    def __init__(self, scene: Any, labeled: Sequence[tuple[Any, Any]], unlabeled: Sequence[Any], folder: Path,
                 name: str = "ISDNet"):
        self.scene, self.folder, self.name = scene, Path(folder), name
        self.classes = dataset_classes(labeled)
        volumes = [volume for volume, _ in labeled] + list(unlabeled)
        if len({id(v) for v in volumes}) != len(volumes):
            raise ValueError("a volume is listed more than once (as labeled and unlabeled, or twice)")
        for volume in volumes:
            require_image_data(volume)
        names = case_names(volumes)
        self.labeled_cases, self.unlabeled_cases = names[:len(labeled)], names[len(labeled):]
        self._items = [_Item(v, s, c, "imagesTr") for (v, s), c in zip(labeled, self.labeled_cases)]
        self._items += [_Item(v, None, c, "imagesUnl") for v, c in zip(unlabeled, self.unlabeled_cases)]
        self._next = 0
        self._writes: list[concurrent.futures.Future] = []
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="isdnet-export")
        self.result: Optional[ExportedDataset] = None
        self.cancelled = False

    @property
    def fraction(self) -> float:
        """Share of the volumes handed to the writer so far."""
        return self._next / max(1, len(self._items))

    def step(self) -> bool:
        """Take the next volume out of the scene and queue its files; True once the whole export is written."""
        if self.result is not None or self.cancelled:
            return True
        if self._next == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / DATASET_FILE).unlink(missing_ok=True)
            for sub in ("imagesTr", "labelsTr", "imagesUnl"):
                shutil.rmtree(self.folder / sub, ignore_errors=True)
                (self.folder / sub).mkdir()
        for future in [f for f in self._writes if f.done()]:
            future.result()  # a failed write stops the export here, with its error
        if self._next < len(self._items):
            item = self._items[self._next]
            image = image_from_volume(item.volume)
            files = [(image, self.folder / item.folder / f"{item.case}{VOLUME_ENDING}")]
            if item.segmentation is not None:
                labels = sitk.GetImageFromArray(
                    label_array(self.scene, item.volume, item.segmentation, [c.name for c in self.classes]))
                labels.CopyInformation(image)
                files.append((labels, self.folder / "labelsTr" / f"{item.case}{VOLUME_ENDING}"))
            self._writes += [self._writer.submit(sitk.WriteImage, i, str(path), True) for i, path in files]
            self._next += 1
            return False
        for future in self._writes:
            future.result()
        self._writer.shutdown()
        self._write_description()
        self.result = ExportedDataset(self.folder, self.classes, self.labeled_cases, self.unlabeled_cases)
        return True

    def run(self) -> ExportedDataset:
        """The whole export at once (scripts and tests)."""
        while not self.step():
            pass
        assert self.result is not None
        return self.result

    def cancel(self) -> None:
        """Stop exporting and remove the files written so far (the scene is left as it was)."""
        self.cancelled = True
        self._writer.shutdown(wait=True, cancel_futures=True)
        if self._next:
            for sub in ("imagesTr", "labelsTr", "imagesUnl"):
                shutil.rmtree(self.folder / sub, ignore_errors=True)

    def _write_description(self) -> None:
        training = [{"image": f"./imagesTr/{case}{VOLUME_ENDING}", "label": f"./labelsTr/{case}{VOLUME_ENDING}"}
                    for case in self.labeled_cases]
        description = {
            "name": self.name,
            "description": "Exported from 3D Slicer by ISDNetTrain",
            "tensorImageSize": "3D",
            "channel_names": {"0": "image"},
            "labels": {"0": "background", **{str(c.value): c.name for c in self.classes}},
            "colors": {str(c.value): list(c.color) for c in self.classes},
            "terminology": {str(c.value): c.terminology for c in self.classes if c.terminology},
            "numTraining": len(training),
            "file_ending": VOLUME_ENDING,
            "training": training,
            "unlabeled": [f"./imagesUnl/{case}{VOLUME_ENDING}" for case in self.unlabeled_cases],
        }
        (self.folder / DATASET_FILE).write_text(json.dumps(description, indent=2), encoding="utf-8")


def export_dataset(scene: Any, labeled: Sequence[tuple[Any, Any]], unlabeled: Sequence[Any], folder: Path,
                   name: str = "ISDNet") -> ExportedDataset:
    """Write ``folder``/dataset.json, imagesTr/, labelsTr/ and imagesUnl/ from the scene's nodes, at once.

    ``labeled``: (volume node, segmentation node) pairs; ``unlabeled``: volume nodes. Everything is checked
    before anything is written, and an earlier export in the folder is replaced. ``ExportJob`` does the same a
    volume at a time.
    """
    return ExportJob(scene, labeled, unlabeled, folder, name).run()
