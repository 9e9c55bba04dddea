"""ISDNetSegment: segment a volume with a trained ISDNet model into a segmentation node.

The widget is thin: it loads Resources/UI/ISDNetSegment.ui, keeps its choices in a parameter node and hands the
work to its logic, ``ISDNetLib.segment.SegmentLogic``. Large volumes are segmented by a child process that a
timer polls, so Slicer stays responsive and Apply turns into Cancel.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from isdnet import PAPER, PAPER_URL
from isdnet.config import DEFAULT_UNCERTAINTY, DEVICES, UNCERTAINTIES, UNCERTAINTY_TITLES
from isdnet.modelheader import read_header
from ISDNetLib.dependencies import ENGINE_PACKAGES, check_dependencies, ensure_dependencies_in_slicer
from ISDNetLib.nodes import PREDICTION, output_kind, use_as_training_label
from ISDNetLib.review import VIEW_AXES, jump_to_slice
from ISDNetLib.segment import SegmentLogic, describe_model

POLL_INTERVAL_MS = 300


class ISDNetSegment(ScriptedLoadableModule):
    """Module description shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "ISDNet Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["ISDNet for 3D Slicer developers (SlicerISDNet project)"]
        self.parent.helpText = (
            "Segment a volume with an ISDNet model trained in ISDNet Train (or with the isdnet command). The "
            "result is a segmentation with one segment per class of the model, ready for the Segment Editor.")
        self.parent.acknowledgementText = f'Based on <a href="{PAPER_URL}">{PAPER}</a>. Uses PyTorch.'


@parameterNodeWrapper
class ISDNetSegmentParameterNode:
    """The module's state: model, input, where the result goes and what else to load."""

    inputVolume: vtkMRMLScalarVolumeNode
    modelPath: Path
    outputSegmentation: vtkMRMLSegmentationNode
    addToExisting: bool = False
    loadConfidence: bool = False
    device: Annotated[str, Choice(list(DEVICES))] = "auto"


class ISDNetSegmentLogic(ScriptedLoadableModuleLogic, SegmentLogic):
    """The module's logic is ``ISDNetLib.segment.SegmentLogic`` on Slicer's scene; Slicer's base adds the
    parameter node."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        SegmentLogic.__init__(self, slicer.mrmlScene)

    def getParameterNode(self) -> ISDNetSegmentParameterNode:
        return ISDNetSegmentParameterNode(super().getParameterNode())


class ISDNetSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Model and input choice, model description, Apply/Cancel and progress."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[ISDNetSegmentLogic] = None
        self._parameterNode: Optional[ISDNetSegmentParameterNode] = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ISDNetSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ISDNetSegmentLogic()
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onTimer)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyOrCancel)
        self.ui.useAsLabelButton.connect("clicked(bool)", self.onUseAsLabel)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.updateModelInfo)
        for kind in UNCERTAINTIES:
            self.ui.uncertaintyComboBox.addItem(UNCERTAINTY_TITLES[kind], kind)
        self.ui.uncertaintyComboBox.setCurrentIndex(UNCERTAINTIES.index(DEFAULT_UNCERTAINTY))
        for view in VIEW_AXES:
            self.ui.reviewViewComboBox.addItem(view)
        self.ui.reviewButton.connect("clicked(bool)", self.onReview)
        self.ui.uncertainSlicesList.connect("itemClicked(QListWidgetItem*)", self.onUncertainSliceClicked)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.updateModelInfo()

    def cleanup(self) -> None:
        self.timer.stop()
        if self.logic is not None and self.logic.is_running:
            self.logic.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode: Optional[ISDNetSegmentParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self.updateButtons()

    def useModel(self, modelPath: str) -> None:
        """Select a model (ISDNet Train calls this when a training ends) and remember it among recent ones."""
        self.ui.modelPathLineEdit.currentPath = str(modelPath)
        self.ui.modelPathLineEdit.addCurrentPathToHistory()

    def updateModelInfo(self, *args) -> None:
        """Show the chosen model's classes (with their colours) and training provenance."""
        path = self.ui.modelPathLineEdit.currentPath
        table = self.ui.classesTable
        table.setRowCount(0)
        if not path or not Path(path).is_file():
            self.ui.modelInfoLabel.text = "Choose a model file (.safetensors) trained with ISDNet."
            return
        if ENGINE_PACKAGES["jsonschema"] in check_dependencies().missing:  # the header is read without torch
            self.ui.modelInfoLabel.text = "Apply will first offer to install PyTorch and the packages ISDNet needs."
            return
        try:
            header = read_header(Path(path))
        except Exception as error:  # noqa: BLE001 - any unreadable file is reported the same way
            self.ui.modelInfoLabel.text = f"This file cannot be used: {error}"
            return
        self.ui.modelInfoLabel.text = describe_model(header)
        classes = [c for c in header["classes"] if int(c["value"]) != 0]
        table.setRowCount(len(classes))
        for row, cls in enumerate(classes):
            table.setItem(row, 0, qt.QTableWidgetItem(str(cls["value"])))
            table.setItem(row, 1, qt.QTableWidgetItem(cls["name"]))
            swatch = qt.QTableWidgetItem()
            swatch.setBackground(qt.QBrush(qt.QColor(*cls["color"])))
            table.setItem(row, 2, swatch)

    def updateButtons(self, *args) -> None:
        if self.logic is None or self._parameterNode is None:
            return
        running = self.logic.is_running
        p = self._parameterNode
        ready = bool(p.inputVolume) and p.modelPath is not None and Path(p.modelPath).is_file()
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.applyButton.enabled = running or ready
        result = self.logic.status.segmentation_node
        self.ui.useAsLabelButton.enabled = not running and result is not None and output_kind(result) == PREDICTION
        self.ui.addToExistingCheckBox.enabled = p.outputSegmentation is not None
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.reviewButton.enabled = not running and ready

    def onApplyOrCancel(self) -> None:
        if self.logic.is_running:
            self.logic.cancel()
            self.onTimer()
            return
        if not ensure_dependencies_in_slicer():
            return
        p = self._parameterNode
        options = dict(device=p.device, confidence=p.loadConfidence, segmentation_node=p.outputSegmentation,
                       replace=not p.addToExisting)
        with slicer.util.tryWithErrorDisplay("Segmentation could not start.", waitCursor=True):
            # Every volume, small or large, is segmented by a child process: Slicer stays responsive and Cancel
            # works; the timer imports the result when it is done.
            self.logic.start(p.inputVolume, p.modelPath, **options)
            self.timer.start()
        self.onTimer()

    def onReview(self) -> None:
        """Review low-confidence regions: the chosen uncertainty over the input, and its most uncertain slices."""
        if not ensure_dependencies_in_slicer():
            return
        p = self._parameterNode
        kind = self.ui.uncertaintyComboBox.currentData
        view = self.ui.reviewViewComboBox.currentText
        self.ui.uncertainSlicesList.clear()
        with slicer.util.tryWithErrorDisplay("The uncertainty could not be computed.", waitCursor=True):
            # A large volume is reviewed by a child process (None now); the timer lists its slices when done.
            slices = self.logic.review(p.inputVolume, p.modelPath, uncertainty=kind, device=p.device, view=view)
            if slices is None:
                self.ui.reviewStatusLabel.text = f"Computing the {UNCERTAINTY_TITLES[kind]} in a separate process..."
                self.timer.start()
                self.onTimer()
            else:
                self.showReview(slices)

    def showReview(self, slices: list) -> None:
        """List the reviewed view's most uncertain slices (a click jumps there)."""
        kind = self.ui.uncertaintyComboBox.currentData
        self.ui.reviewStatusLabel.text = (f"Shown: {UNCERTAINTY_TITLES[kind]}, 0 (certain) to 1. The "
                                          f"{self.ui.reviewViewComboBox.currentText} view's slices with the most "
                                          "uncertain area, most first:")
        for index, area in slices:
            item = qt.QListWidgetItem(f"slice {index}: {area / 100:.1f} cm² uncertain")
            item.setData(qt.Qt.UserRole, index)
            self.ui.uncertainSlicesList.addItem(item)

    def onUncertainSliceClicked(self, item) -> None:
        """Show the clicked slice in the view whose slices were listed."""
        node = self.logic.status.uncertainty_node
        if node is not None:
            jump_to_slice(slicer.mrmlScene, self.ui.reviewViewComboBox.currentText, node, item.data(qt.Qt.UserRole))

    def onUseAsLabel(self) -> None:
        """The user corrected the segmentation in the Segment Editor: ISDNet Train offers it as the label of its
        volume from now on, ready for the next (fine-tuning) training."""
        node = self.logic.status.segmentation_node
        if node is None:
            return
        use_as_training_label(node)
        self.ui.statusLabel.text = (f"'{node.GetName()}' is now offered by ISDNet Train as the label of "
                                    f"'{self._parameterNode.inputVolume.GetName()}'.")
        self.updateButtons()

    def onTimer(self) -> None:
        status = self.logic.poll()
        self.ui.progressBar.value = int(round(100 * status.fraction))
        self.ui.statusLabel.text = status.message.split("\n")[0]
        self.updateButtons()
        if status.state == "running":
            return
        self.timer.stop()
        if status.state == "failed":
            slicer.util.errorDisplay(status.message, windowTitle="ISDNet segmentation failed")
        elif status.state == "done" and status.slices is not None:
            self.showReview(status.slices)  # a review that ran in a child process
        elif status.state == "done":
            self.showResult()

    def showResult(self) -> None:
        """Show the input with the new segmentation (and the confidence map as foreground, if loaded)."""
        status = self.logic.status
        self.ui.progressBar.value = 100
        self.ui.statusLabel.text = status.message
        self.ui.modelPathLineEdit.addCurrentPathToHistory()
        confidence = status.confidence_node
        slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume,
                                         foreground=confidence, foregroundOpacity=0.4 if confidence else None)
        self.updateButtons()


class ISDNetSegmentTest(ScriptedLoadableModuleTest):
    """Slicer self-test: train a tiny model on phantoms, segment an oblique float volume, save and reload."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_segment_save_reload()

    def test_segment_save_reload(self) -> None:
        if not ensure_dependencies_in_slicer():
            self.skipTest("the engine's Python packages (torch) are not installed")
        import SimpleITK as sitk
        import sitkUtils

        from isdnet.config import TrainConfig
        from isdnet.dataset import load_dataset
        from isdnet.phantoms import make_phantom, write_phantom_dataset
        from isdnet.train import train

        folder = Path(tempfile.mkdtemp(prefix="ISDNetSegmentTest-"))
        self.delayDisplay("Training a tiny model on phantoms")
        spec = load_dataset(write_phantom_dataset(folder / "phantoms", 3, seed=0, shape=(12, 32, 32)))
        model = folder / "model.safetensors"
        train(spec.cases[:2], spec.cases[2:], spec.labels, model,
              TrainConfig(epochs=1, base_channels=8, batch_size=4, slice_size=[32, 32], precision="fp32"))

        self.delayDisplay("Segmenting a float volume with other spacing and orientation")
        image, _ = make_phantom(7, shape=(12, 40, 40), spacing=(0.6, 1.1, 3.0))
        rotation = sitk.VersorTransform((0.2, 0.1, 0.9), 0.5).GetMatrix()
        image.SetDirection(rotation)
        volume = sitkUtils.PushVolumeToSlicer(sitk.Cast(image, sitk.sitkFloat32), name="patient")
        node = ISDNetSegmentLogic().segment(volume, model)
        segmentation = node.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, [spec.labels[v] for v in sorted(spec.labels) if v != 0])
        self.assertIs(node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()), volume)

        self.delayDisplay("Saving and reloading as .seg.nrrd")
        path = folder / "patient.seg.nrrd"
        self.assertTrue(slicer.util.saveNode(node, str(path)))
        reloaded = slicer.util.loadSegmentation(str(path))
        segmentation = reloaded.GetSegmentation()
        self.assertEqual([segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())],
                         names)
        for name in names:
            before = slicer.util.arrayFromSegmentBinaryLabelmap(
                node, node.GetSegmentation().GetSegmentIdBySegmentName(name), volume)
            after = slicer.util.arrayFromSegmentBinaryLabelmap(
                reloaded, segmentation.GetSegmentIdBySegmentName(name), volume)
            np.testing.assert_array_equal(before, after)
        self.delayDisplay("Test passed")
