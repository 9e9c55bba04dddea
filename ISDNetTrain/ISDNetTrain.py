"""ISDNetTrain: train an ISDNet model on the scene's volumes, labeled (with a segmentation) and unlabeled.

The widget is thin: it loads Resources/UI/ISDNetTrain.ui, keeps its options in a parameter node and hands the
work to its logic, ``ISDNetLib.train.TrainLogic``, which exports the data and runs training in a child process
that a timer polls, so Slicer never blocks.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from isdnet.config import DEVICES, METHODS, SLICE_AXES, TrainConfig, model_stem
from ISDNetLib.dependencies import ensure_dependencies_in_slicer
from ISDNetLib.train import TrainingOptions, TrainLogic

DEFAULTS = TrainConfig()

POLL_INTERVAL_MS = 500
LOG_LINES_SHOWN = 400


class ISDNetTrain(ScriptedLoadableModule):
    """Module description shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "ISDNet Train"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["ISDNet for 3D Slicer contributors"]
        self.parent.helpText = (
            "Train an ISDNet segmentation model (importance-guided semi-supervised adversarial learning) on the "
            "volumes of the scene. Volumes with a segmentation are labeled; volumes without are used as unlabeled "
            "data. Classes are the segment names. Training runs in a separate process; Stop and Resume keep the "
            "last checkpoint.")
        self.parent.acknowledgementText = "Based on ISDNet (Ning, Zhao and Qian). Uses PyTorch."


@parameterNodeWrapper
class ISDNetTrainParameterNode:
    """The module's state: which volumes take part, and the training options."""

    labeledVolumes: list[vtkMRMLScalarVolumeNode]
    labeledSegmentations: list[vtkMRMLSegmentationNode]
    unlabeledVolumes: list[vtkMRMLScalarVolumeNode]
    method: Annotated[str, Choice(list(METHODS))] = DEFAULTS.method
    epochs: Annotated[int, WithinRange(1, 100000)] = DEFAULTS.epochs
    lambdaAdv: Annotated[float, WithinRange(0.0, 100.0)] = DEFAULTS.lambda_adv
    lambdaSemi: Annotated[float, WithinRange(0.0, 100.0)] = DEFAULTS.lambda_semi
    tSemi: Annotated[float, WithinRange(0.0, 1.0)] = DEFAULTS.t_semi
    sliceAxis: Annotated[str, Choice(list(SLICE_AXES))] = DEFAULTS.slice_axis
    device: Annotated[str, Choice(list(DEVICES))] = DEFAULTS.device
    outputModelPath: Path = Path(os.path.expanduser("~")) / "ISDNet" / "model.safetensors"
    keepTrainingOnExit: bool = False


class ISDNetTrainLogic(ScriptedLoadableModuleLogic, TrainLogic):
    """The module's logic is ``ISDNetLib.train.TrainLogic`` on Slicer's scene; Slicer's base adds the parameter
    node."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        TrainLogic.__init__(self, slicer.mrmlScene)

    def getParameterNode(self) -> ISDNetTrainParameterNode:
        return ISDNetTrainParameterNode(super().getParameterNode())


class ISDNetTrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Volume table, options, Train/Stop, Resume, progress, chart and log."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode: Optional[ISDNetTrainParameterNode] = None
        self._parameterNodeGuiTag = None
        self._segmentationSelectors: list = []
        self._tableUpdatePending = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ISDNetTrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ISDNetTrainLogic()
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onTimer)

        self.ui.trainButton.connect("clicked(bool)", self.onTrainOrStop)
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.refreshVolumesButton.connect("clicked(bool)", self.updateVolumeTable)
        self.ui.volumesTable.connect("itemChanged(QTableWidgetItem*)", lambda item: self.saveChoices())
        self.ui.showChartButton.connect("clicked(bool)", self.showChart)
        self.ui.logCollapsibleButton.connect("contentsCollapsed(bool)", lambda collapsed: self.updateLog())
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onSceneNodesChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onSceneNodesChanged)
        self.initializeParameterNode()
        self.updateButtons()

    def cleanup(self) -> None:
        """When Slicer closes: stop the timer, and stop a running training unless the user chose to keep it."""
        self.timer.stop()
        if self.logic is not None:
            keep = bool(self._parameterNode and self._parameterNode.keepTrainingOnExit)
            message = self.logic.on_application_exit(keep_running=keep)
            if message:
                logging.info(message)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.updateVolumeTable()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()
            self.updateVolumeTable()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onSceneNodesChanged(self, caller, event, node) -> None:
        """Rebuild the table (once, after the current event) when a volume or segmentation comes or goes."""
        relevant = node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode") \
            or node.IsA("vtkMRMLSegmentationNode")
        if relevant and self.parent.isEntered and not self._tableUpdatePending:
            self._tableUpdatePending = True
            qt.QTimer.singleShot(0, self.updateVolumeTable)

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode: Optional[ISDNetTrainParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    # ----- the volume table
    def updateVolumeTable(self) -> None:
        """One row per scalar volume: use it or not, and its segmentation (none means unlabeled)."""
        self._tableUpdatePending = False
        table = self.ui.volumesTable
        state = self.tableChoices() if table.rowCount else self.savedChoices()
        volumes = [v for v in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                   if not v.IsA("vtkMRMLLabelMapVolumeNode")]
        wasBlocked = table.blockSignals(True)
        table.setRowCount(len(volumes))
        self._segmentationSelectors = []
        for row, volume in enumerate(volumes):
            item = qt.QTableWidgetItem(volume.GetName())
            item.setData(qt.Qt.UserRole, volume.GetID())
            item.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
            used, segmentation = state.get(volume.GetID(), (True, self.guessSegmentation(volume)))
            item.setCheckState(qt.Qt.Checked if used else qt.Qt.Unchecked)
            table.setItem(row, 0, item)
            selector = slicer.qMRMLNodeComboBox()
            selector.nodeTypes = ["vtkMRMLSegmentationNode"]
            selector.noneEnabled = True
            selector.noneDisplay = "(none: unlabeled)"
            selector.addEnabled = False
            selector.removeEnabled = False
            selector.setMRMLScene(slicer.mrmlScene)
            selector.setCurrentNode(segmentation)
            selector.connect("currentNodeChanged(vtkMRMLNode*)", lambda node: self.saveChoices())
            table.setCellWidget(row, 1, selector)
            self._segmentationSelectors.append(selector)
        table.blockSignals(wasBlocked)
        self.saveChoices()

    @staticmethod
    def guessSegmentation(volume):
        """The segmentation drawn on this volume, if there is exactly one."""
        role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        matches = [s for s in slicer.util.getNodesByClass("vtkMRMLSegmentationNode")
                   if s.GetNodeReference(role) is volume]
        return matches[0] if len(matches) == 1 else None

    def tableChoices(self) -> dict:
        """volume ID -> (used, segmentation node or None), as the table shows it."""
        table, choices = self.ui.volumesTable, {}
        for row in range(table.rowCount):
            item = table.item(row, 0)
            if item is not None and row < len(self._segmentationSelectors):
                choices[item.data(qt.Qt.UserRole)] = (item.checkState() == qt.Qt.Checked,
                                                      self._segmentationSelectors[row].currentNode())
        return choices

    def savedChoices(self) -> dict:
        """The table state kept in the parameter node (volumes not listed there are unused)."""
        if not self._parameterNode:
            return {}
        p = self._parameterNode
        choices = {v.GetID(): (True, s) for v, s in zip(p.labeledVolumes, p.labeledSegmentations)}
        choices.update({v.GetID(): (True, None) for v in p.unlabeledVolumes})
        return choices

    def saveChoices(self) -> None:
        if not self._parameterNode:
            return
        labeled, unlabeled = self.selectedData()
        self._parameterNode.labeledVolumes = [v for v, _ in labeled]
        self._parameterNode.labeledSegmentations = [s for _, s in labeled]
        self._parameterNode.unlabeledVolumes = unlabeled
        self.ui.volumesSummaryLabel.text = f"{len(labeled)} labeled, {len(unlabeled)} unlabeled volumes"
        self.updateButtons()

    def selectedData(self) -> tuple[list, list]:
        """(labeled (volume, segmentation) pairs, unlabeled volumes) of the checked rows."""
        labeled, unlabeled = [], []
        for volumeID, (used, segmentation) in self.tableChoices().items():
            volume = slicer.mrmlScene.GetNodeByID(volumeID)
            if used and volume is not None:
                if segmentation is not None:
                    labeled.append((volume, segmentation))
                else:
                    unlabeled.append(volume)
        return labeled, unlabeled

    # ----- training
    def options(self) -> TrainingOptions:
        p = self._parameterNode
        return TrainingOptions(dict(method=p.method, epochs=p.epochs, lambda_adv=p.lambdaAdv, lambda_semi=p.lambdaSemi,
                                    t_semi=p.tSemi, slice_axis=p.sliceAxis, device=p.device))

    def onTrainOrStop(self) -> None:
        if self.logic.is_running:
            self.logic.stop()
            self.onTimer()
            return
        if not ensure_dependencies_in_slicer():
            return
        labeled, unlabeled = self.selectedData()
        model = Path(self._parameterNode.outputModelPath)
        dataset = model.with_name(model_stem(model) + "_dataset")
        with slicer.util.tryWithErrorDisplay("Training could not start.", waitCursor=True):
            self.ui.statusLabel.text = "Exporting the volumes and segmentations..."
            slicer.app.processEvents()
            self.logic.export_dataset(labeled, unlabeled, dataset)
            self.logic.start(dataset, model, self.options())
            self.showChart()
            self.timer.start()
        self.onTimer()

    def onResume(self) -> None:
        with slicer.util.tryWithErrorDisplay("Training could not be resumed.", waitCursor=True):
            self.logic.resume()
            self.showChart()
            self.timer.start()
        self.onTimer()

    def onTimer(self) -> None:
        """Read the child's progress into the progress bar, the status line, the chart and the log."""
        status = self.logic.poll()
        self.ui.progressBar.value = int(round(100 * status.fraction))
        self.ui.progressBar.setFormat(status.describe() or "%p%")
        self.ui.statusLabel.text = status.message.split("\n")[0]
        self.updateLog()
        self.updateButtons()
        if status.state == "running":
            return
        self.timer.stop()
        if status.state == "failed":
            slicer.util.errorDisplay(status.message, windowTitle="ISDNet training failed")
        elif status.state == "done":
            self.offerModelToSegment(status.model_path)

    def offerModelToSegment(self, modelPath: str) -> None:
        """Hand the new model to ISDNetSegment (it goes to its recent models) and offer to switch there."""
        segmentWidget = slicer.modules.isdnetsegment.widgetRepresentation().self()
        segmentWidget.useModel(modelPath)
        if slicer.util.confirmYesNoDisplay(f"Training finished. The model is saved as\n{modelPath}\n\n"
                                           "Open it in ISDNet Segment now?", windowTitle="ISDNet"):
            slicer.util.selectModule("ISDNetSegment")

    def showChart(self) -> None:
        if self.logic.chart_node is not None:
            slicer.modules.plots.logic().ShowChartInLayout(self.logic.chart_node)

    def updateLog(self) -> None:
        if not self.ui.logCollapsibleButton.collapsed:
            self.ui.logTextEdit.setPlainText("\n".join(self.logic.runner.log_tail(LOG_LINES_SHOWN)))
            self.ui.logTextEdit.verticalScrollBar().setValue(self.ui.logTextEdit.verticalScrollBar().maximum)

    def updateButtons(self) -> None:
        if self.logic is None:
            return
        running = self.logic.is_running
        labeled, _ = self.selectedData()
        self.ui.trainButton.text = "Stop" if running else "Train"
        self.ui.trainButton.toolTip = ("End the training process; the last checkpoint is kept for Resume."
                                       if running else "Export the data and start training.")
        self.ui.trainButton.enabled = running or bool(labeled)
        self.ui.resumeButton.enabled = self.logic.can_resume()
        self.ui.optionsCollapsibleButton.enabled = not running
        self.ui.volumesCollapsibleButton.enabled = not running


class ISDNetTrainTest(ScriptedLoadableModuleTest):
    """Slicer self-test: load phantoms, train a tiny model in a child process, stop, resume, finish."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_train_stop_resume()

    def test_train_stop_resume(self) -> None:
        if not ensure_dependencies_in_slicer():
            self.skipTest("the engine's Python packages (torch) are not installed")
        from isdnet.phantoms import write_phantom_dataset

        self.delayDisplay("Making phantoms")
        folder = Path(tempfile.mkdtemp(prefix="ISDNetTrainTest-"))
        phantoms = write_phantom_dataset(folder / "phantoms", 4, seed=0, shape=(12, 32, 32), spacing=(0.8, 0.8, 2.5))
        images = sorted((phantoms / "imagesTr").iterdir())
        labels = sorted((phantoms / "labelsTr").iterdir())
        pairs = [(slicer.util.loadVolume(str(image)), slicer.util.loadSegmentation(str(label)))
                 for image, label in zip(images[:3], labels[:3])]
        unlabeled = [slicer.util.loadVolume(str(images[3]))]
        logic = ISDNetTrainLogic()
        logic.export_dataset(pairs, unlabeled, folder / "dataset")
        model = folder / "model.safetensors"
        options = TrainingOptions(dict(epochs=3, warmup_epochs=1, base_channels=8, batch_size=4, slice_size=[32, 32],
                                       precision="fp32"))
        self.delayDisplay("Training")
        logic.start(folder / "dataset", model, options)
        self._waitFor(logic, lambda s: s.state != "running" or (1 in logic.history and s.epoch >= 2))
        logic.stop()
        self.assertEqual(logic.status.state, "stopped")
        self.assertTrue(logic.can_resume())
        self.delayDisplay("Resuming")
        logic.resume()
        self._waitFor(logic, lambda s: s.state != "running")
        self.assertEqual(logic.status.state, "done", logic.status.message)
        self.assertTrue(model.is_file())
        self.assertEqual(logic.table_node.GetTable().GetNumberOfRows(), 3)
        self.delayDisplay("Test passed")

    @staticmethod
    def _waitFor(logic, condition, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition(logic.poll()):
            if time.monotonic() > deadline:
                raise AssertionError("timed out:\n" + "\n".join(logic.log_tail()))
            slicer.app.processEvents()
            time.sleep(0.1)
