"""The workflow behind the web page: volumes and their labels in a Slicer scene, training, segmentation and the
suggested next volume to annotate.

Training, segmentation and ranking are ISDNetLib's TrainLogic, SegmentLogic and SuggestLogic; this class only
loads files into nodes, keeps which volume is labeled, and names the files in the workspace. No trame here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import slicer

from isdnet.config import CHECKPOINT_SUFFIX, MODEL_SUFFIX, SEGMENTATION_ENDING, training_files
from ISDNetLib.jobs import TrainingOptions
from ISDNetLib.segment import SegmentLogic, SegmentStatus
from ISDNetLib.suggest import SuggestLogic
from ISDNetLib.suggestions import rank_request
from ISDNetLib.train import TrainingStatus, TrainLogic
from ISDNetLib.volumes import temporary_nodes

from .security import SAFE_NAME, Workspace, WorkspaceError

ROLES = ("labeled", "unlabeled", "skip")
# Colours of label values 1, 2, ... read from label maps (a .seg.nrrd brings its own).
LABEL_COLORS = ((0.1, 0.85, 0.2), (1.0, 0.85, 0.1), (0.2, 0.6, 1.0), (1.0, 0.3, 0.8), (1.0, 0.5, 0.1))
CONFIDENCE_COLORS = "vtkMRMLColorTableNodeRainbow"


@dataclass
class VolumeEntry:
    """A loaded volume, its role in training, its annotation and the last result of a model on it."""

    node: Any
    source: str
    role: str = "unlabeled"
    label: Any = None
    result: Any = None
    confidence: Any = None

    def row(self) -> dict[str, Any]:
        """What the page lists for this volume."""
        return {"id": self.node.GetID(), "name": self.node.GetName(), "source": self.source, "role": self.role,
                "label": self.label.GetName() if self.label is not None else "",
                "segmented": self.result is not None}


def model_name(text: str) -> str:
    """A file-safe model name from what the user typed."""
    name = SAFE_NAME.sub("_", text.strip()).strip("._")
    if not name:
        raise WorkspaceError("give the model a name (letters, digits, '_', '-', '.')")
    return name[:80]


class WebSession:
    """One scene's volumes and the two logics that train on them and segment them."""

    def __init__(self, scene: Any, volumes_logic: Any, workspace: Workspace, train_arguments: list[str],
                 device: str = "auto"):
        self.scene = scene
        self.volumes_logic = volumes_logic
        self.workspace = workspace
        self.train_arguments = list(train_arguments)
        self.device = device
        self.train = TrainLogic(scene)
        self.segment = SegmentLogic(scene)
        self.suggest = SuggestLogic(scene)
        self.volumes: dict[str, VolumeEntry] = {}
        self._segmenting: Optional[VolumeEntry] = None

    # ----- data
    def load_image(self, path: Path, source: str) -> VolumeEntry:
        """Load an image file (that one file, never a series of its neighbours) as a new volume (unlabeled until
        a label is attached)."""
        name = path.name[:-len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem
        node = self.volumes_logic.AddArchetypeVolume(str(path), name, self.volumes_logic.SingleFile, None)
        if node is None or node.GetImageData() is None:
            if node is not None:
                self.scene.RemoveNode(node)
            raise WorkspaceError(f"'{path.name}' could not be read as an image volume")
        entry = VolumeEntry(node, source)
        self.volumes[node.GetID()] = entry
        return entry

    def entry(self, volume_id: Any) -> VolumeEntry:
        """The loaded volume with this node ID; raises WorkspaceError when there is none."""
        if not isinstance(volume_id, str) or volume_id not in self.volumes:
            raise WorkspaceError("choose a loaded volume first")
        return self.volumes[volume_id]

    def load_label(self, path: Path, volume_id: str) -> VolumeEntry:
        """Attach a label map or ``.seg.nrrd`` to a volume, which becomes labeled."""
        entry = self.entry(volume_id)
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{entry.node.GetName()} label")
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(entry.node)
        try:
            if path.name.lower().endswith(".seg.nrrd"):
                self._read_segmentation(path, node)
            else:
                self._read_label_map(path, node)
        except WorkspaceError:
            self.scene.RemoveNode(node)
            raise
        node.CreateClosedSurfaceRepresentation()
        if entry.label is not None:
            self.scene.RemoveNode(entry.label)
        entry.label, entry.role = node, "labeled"
        return entry

    @staticmethod
    def _read_segmentation(path: Path, node: Any) -> None:
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(path))
        if not storage.ReadData(node) or node.GetSegmentation().GetNumberOfSegments() == 0:
            raise WorkspaceError(f"'{path.name}' could not be read as a segmentation with segments")

    def _read_label_map(self, path: Path, node: Any) -> None:
        segmentation = node.GetSegmentation()
        with temporary_nodes(self.scene):
            labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__isdnet_web_label__")
            storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
            storage.SetFileName(str(path))
            storage.SetSingleFile(1)  # this file alone, not a series of its neighbours
            if not storage.ReadData(labelmap) or labelmap.GetImageData() is None:
                raise WorkspaceError(f"'{path.name}' could not be read as a label map")
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node):
                raise WorkspaceError(f"'{path.name}' could not be imported as a segmentation")
        if segmentation.GetNumberOfSegments() == 0:
            raise WorkspaceError(f"'{path.name}' holds no labels (all voxels are 0)")
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            value = segment.GetLabelValue()
            segment.SetName(f"label {value}")  # the same names in every file, so the classes agree
            segment.SetColor(LABEL_COLORS[(value - 1) % len(LABEL_COLORS)])

    def set_role(self, volume_id: str, role: str) -> None:
        """Mark a volume labeled (it needs a label), unlabeled, or left out of training (skip)."""
        entry = self.entry(volume_id)
        if role not in ROLES:
            raise WorkspaceError(f"role must be one of {', '.join(ROLES)}")
        if role == "labeled" and entry.label is None:
            raise WorkspaceError(f"'{entry.node.GetName()}' has no label: load its label file first")
        entry.role = role

    # ----- training
    def start_training(self, name: str, method: str, epochs: int) -> Path:
        """Export the labeled and unlabeled volumes and start TrainLogic; returns the model path.

        Refused while a training runs (its dataset and status stay as they are), and when the dataset folder, or
        a file the training writes, would lead outside the workspace.
        """
        if self.train.is_running:
            raise WorkspaceError("a training is running already: wait for it, or stop it, before starting another")
        name = model_name(name)
        labeled = [(e.node, e.label) for e in self.volumes.values() if e.role == "labeled"]
        unlabeled = [e.node for e in self.volumes.values() if e.role == "unlabeled"]
        options = TrainingOptions(dict(method=method, epochs=epochs, device=self.device), self.train_arguments)
        options.validate()
        folder = self.workspace.inside_tree(self.workspace.folder("datasets") / name)
        model = self.workspace.folder("models") / f"{name}{MODEL_SUFFIX}"
        for path in training_files(model):
            self.workspace.inside(path)
        self.train.export_dataset(labeled, unlabeled, folder)
        self.train.start(folder, model, options)
        return model

    def models(self) -> list[str]:
        """Model files in the workspace (checkpoints left out)."""
        return [p for p in self.workspace.files((MODEL_SUFFIX,)) if not p.endswith(CHECKPOINT_SUFFIX)]

    def model_path(self, relative: str) -> Path:
        """A model file in the workspace; raises WorkspaceError when it is not one."""
        path = self.workspace.resolve(relative)
        if not path.is_file() or not path.name.endswith(MODEL_SUFFIX):
            raise WorkspaceError(f"'{relative}' is not a model file in the workspace")
        return path

    # ----- segmentation
    def start_segmentation(self, volume_id: str, model: str) -> None:
        """Segment a volume with a workspace model in a child process, with its confidence map."""
        entry = self.entry(volume_id)
        path = self.model_path(model)
        if self.segment.is_running:
            raise WorkspaceError("a segmentation is already running")
        self._segmenting = entry
        self.segment.start(entry.node, path, device=self.device, confidence=True,
                           segmentation_node=entry.result)

    # ----- suggested next
    def start_suggestion(self, model: str) -> None:
        """Rank the unlabeled volumes with a workspace model in a child process (``self.suggest.poll`` follows)."""
        if self.suggest.is_running:
            raise WorkspaceError("a ranking is already running")
        path = self.model_path(model)
        volumes = [e.node for e in self.volumes.values() if e.role == "unlabeled"]
        self.suggest.start(rank_request([str(path)], volumes), volumes, device=self.device)

    def poll(self) -> tuple[TrainingStatus, SegmentStatus]:
        """Advance both logics; a finished segmentation is attached to its volume, with a 3D surface."""
        train = self.train.poll()
        before = self.segment.status.state
        status = self.segment.poll()
        if before == "running" and status.state != "running" and self._segmenting is not None:
            entry, self._segmenting = self._segmenting, None
            if status.state == "done":
                if entry.confidence is not None and entry.confidence is not status.confidence_node:
                    self.scene.RemoveNode(entry.confidence)
                entry.result, entry.confidence = status.segmentation_node, status.confidence_node
                entry.result.CreateClosedSurfaceRepresentation()
                display = entry.confidence.GetDisplayNode() if entry.confidence is not None else None
                if display is not None:
                    display.SetAndObserveColorNodeID(CONFIDENCE_COLORS)
                    display.AutoWindowLevelOff()
                    display.SetWindowLevelMinMax(0.0, 1.0)
        return train, status

    def segmentation_file(self, volume_id: str) -> Path:
        """Write the volume's result as ``<volume>.seg.nrrd`` in the workspace's segmentations folder."""
        entry = self.entry(volume_id)
        if entry.result is None:
            raise WorkspaceError(f"'{entry.node.GetName()}' has not been segmented yet")
        stem = SAFE_NAME.sub("_", entry.node.GetName()).strip("._") or "segmentation"
        path = self.workspace.inside(self.workspace.folder("segmentations") / f"{stem}{SEGMENTATION_ENDING}")
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(path))
        if not storage.WriteData(entry.result):
            raise WorkspaceError(f"the segmentation could not be written to {self.workspace.relative(path)}")
        return path

    def close(self) -> None:
        """End any running child process: a training is asked to save its checkpoint and stop (killed if it does
        not), so that resume loses nothing."""
        self.train.on_application_exit()
        self.segment.cancel()
        self.suggest.cancel()
