"""ISDNetTrain: train an ISDNet model on the scene's volumes, labeled (with a segmentation) and unlabeled.

The widget is thin: it loads Resources/UI/ISDNetTrain.ui, keeps its options in a parameter node and hands the
work to its logic, ``ISDNetLib.train.TrainLogic``, which exports the data and runs training in a child process
that a timer polls, so Slicer never blocks.

Its length (about 560 lines) is the widget's many controls, each wired once to the parameter node and the
logic; splitting it would scatter one panel's wiring over several files.
"""

from __future__ import annotations

import datetime
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

from isdnet import PAPER, PAPER_URL
from isdnet.config import DEVICES, METHODS, SLICE_AXES, TrainConfig
from ISDNetLib.dependencies import ensure_dependencies_in_slicer
from ISDNetLib.export import ExportJob
from ISDNetLib.jobs import TrainingOptions, dataset_folder_for, default_model_path, would_overwrite
from ISDNetLib.nodes import corrected_label, training_volumes, uncorrected_predictions
from ISDNetLib.suggest import SuggestLogic
from ISDNetLib.suggestions import annotate_top, describe, rank_request, suggested_text, top_volume
from ISDNetLib.train import TrainLogic

DEFAULTS = TrainConfig()
TRAININGS_ROOT = Path(os.path.expanduser("~")) / "ISDNet"  # each training gets a folder of its own here

POLL_INTERVAL_MS = 500
LOG_LINES_SHOWN = 400


class ISDNetTrain(ScriptedLoadableModule):
    """Module description shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "ISDNet Train"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["ISDNet for 3D Slicer developers (SlicerISDNet project)"]
        self.parent.helpText = (
            "Train an ISDNet segmentation model (importance-guided semi-supervised adversarial learning) on the "
            "volumes of the scene. Volumes with a segmentation are labeled; volumes without are used as unlabeled "
            "data. Classes are the segment names. Training runs in a separate process; Stop and Resume keep the "
            "last checkpoint. Once a model is trained, it suggests which unlabeled volume to annotate next.")
        self.parent.acknowledgementText = f'Based on <a href="{PAPER_URL}">{PAPER}</a>. Uses PyTorch.'


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
    outputModelPath: str = ""  # empty: a new folder for each training under TRAININGS_ROOT
    initModelPath: str = ""  # a model to start from (fine-tuning); empty: from scratch
    keepTrainingOnExit: bool = False


class ISDNetTrainLogic(ScriptedLoadableModuleLogic, TrainLogic):
    """The module's logic is ``ISDNetLib.train.TrainLogic`` on Slicer's scene; Slicer's base adds the parameter
    node."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        TrainLogic.__init__(self, slicer.mrmlScene)

    def getParameterNode(self) -> ISDNetTrainParameterNode:
        return ISDNetTrainParameterNode(super().getParameterNode())


class QuitGuard(qt.QObject):
    """Asks, when Slicer is about to close while a training runs: keep training, stop and keep the checkpoint, or
    cancel the quit (an event filter on the main window, which can refuse its close event)."""

    def __init__(self, widget: ISDNetTrainWidget) -> None:
        qt.QObject.__init__(self)
        self.widget = widget

    def eventFilter(self, watched, event) -> bool:
        logic = self.widget.logic
        if event.type() != qt.QEvent.Close or logic is None or not logic.is_running:
            return False
        box = qt.QMessageBox(qt.QMessageBox.Question, "ISDNet", "An ISDNet training is running. What should happen "
                             "to it when Slicer closes?", qt.QMessageBox.NoButton, slicer.util.mainWindow())
        keep = box.addButton("Keep training", qt.QMessageBox.AcceptRole)
        stop = box.addButton("Stop and keep the checkpoint", qt.QMessageBox.DestructiveRole)
        box.addButton("Cancel closing", qt.QMessageBox.RejectRole)
        box.exec_()
        if box.clickedButton() not in (keep, stop):
            event.ignore()
            return True  # Slicer stays open
        message = logic.on_application_exit(keep_running=box.clickedButton() == keep)
        if message:
            logging.info(message)
        return False


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
        self._export: Optional[ExportJob] = None
        self._exportModel: Optional[Path] = None

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

        self.exportTimer = qt.QTimer()
        self.exportTimer.setInterval(0)  # a volume a tick, events in between
        self.exportTimer.connect("timeout()", self.onExportStep)
        self.suggestLogic = SuggestLogic(slicer.mrmlScene)
        self.suggestTimer = qt.QTimer()
        self.suggestTimer.setInterval(POLL_INTERVAL_MS)
        self.suggestTimer.connect("timeout()", self.onSuggestTimer)
        self.ui.suggestButton.connect("clicked(bool)", self.onSuggestOrCancel)
        self.ui.annotateTopButton.connect("clicked(bool)", self.onAnnotateTop)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainOrStop)
        self.ui.deleteExportedDataButton.connect("clicked(bool)", self.onDeleteExportedData)
        self.ui.outputModelPathLineEdit.connect("currentPathChanged(QString)", self.onPathsChanged)
        self.ui.initModelPathLineEdit.connect("currentPathChanged(QString)", self.onPathsChanged)
        self.quitGuard = QuitGuard(self)
        slicer.util.mainWindow().installEventFilter(self.quitGuard)
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
        self.exportTimer.stop()
        self.suggestTimer.stop()
        self.suggestLogic.cancel()
        slicer.util.mainWindow().removeEventFilter(self.quitGuard)
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
            # The two paths may be empty, which the parameter node's Path connector cannot say: kept by hand.
            self.ui.outputModelPathLineEdit.currentPath = self._parameterNode.outputModelPath
            self.ui.initModelPathLineEdit.currentPath = self._parameterNode.initModelPath

    def onPathsChanged(self, *args) -> None:
        if self._parameterNode:
            self._parameterNode.outputModelPath = self.ui.outputModelPathLineEdit.currentPath
            self._parameterNode.initModelPath = self.ui.initModelPathLineEdit.currentPath
        self.updateButtons()

    # ----- the volume table
    def updateVolumeTable(self) -> None:
        """One row per scalar volume: use it or not, and its segmentation (none means unlabeled)."""
        self._tableUpdatePending = False
        table = self.ui.volumesTable
        state = self.tableChoices() if table.rowCount else self.savedChoices()
        volumes = training_volumes(slicer.mrmlScene)  # ISDNet's own outputs are never training data
        hidden = [node.GetID() for node in uncorrected_predictions(slicer.mrmlScene)]  # nor its predictions labels
        wasBlocked = table.blockSignals(True)
        table.setRowCount(len(volumes))
        self._segmentationSelectors = []
        for row, volume in enumerate(volumes):
            item = qt.QTableWidgetItem(volume.GetName())
            item.setData(qt.Qt.UserRole, volume.GetID())
            item.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
            # Only a segmentation the user chose (here, or by "Use as training label" in ISDNet Segment) makes a
            # volume labeled; none is guessed.
            used, segmentation = state.get(volume.GetID(), (True, corrected_label(slicer.mrmlScene, volume)))
            item.setCheckState(qt.Qt.Checked if used else qt.Qt.Unchecked)
            table.setItem(row, 0, item)
            selector = slicer.qMRMLNodeComboBox()
            selector.nodeTypes = ["vtkMRMLSegmentationNode"]
            selector.noneEnabled = True
            selector.noneDisplay = "(none: unlabeled)"
            selector.addEnabled = False
            selector.removeEnabled = False
            selector.setMRMLScene(slicer.mrmlScene)
            selector.sortFilterProxyModel().hiddenNodeIDs = hidden
            selector.setCurrentNode(segmentation)
            selector.connect("currentNodeChanged(vtkMRMLNode*)", lambda node: self.saveChoices())
            table.setCellWidget(row, 1, selector)
            self._segmentationSelectors.append(selector)
            suggested = qt.QTableWidgetItem(suggested_text(self.suggestLogic.status, volume))
            suggested.setFlags(qt.Qt.ItemIsEnabled)
            suggested.setToolTip("Place in the last suggested order (1 = annotate first) and the strategy's score")
            table.setItem(row, 2, suggested)
        table.blockSignals(wasBlocked)
        self.saveChoices()

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
        summary = f"{len(labeled)} labeled, {len(unlabeled)} unlabeled volumes"
        if labeled:
            try:  # before Start: how long these volumes will train with the options chosen
                summary += "; training takes " + self.logic.estimate(labeled, unlabeled, self.options()).describe()
            except ValueError:
                pass  # an option out of range or a volume without voxels: Train says what is wrong
        self.ui.volumesSummaryLabel.text = summary
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
        values = dict(method=p.method, epochs=p.epochs, lambda_adv=p.lambdaAdv, lambda_semi=p.lambdaSemi,
                      t_semi=p.tSemi, slice_axis=p.sliceAxis, device=p.device)
        if p.initModelPath:
            values["init_from"] = p.initModelPath
        return TrainingOptions(values)

    def chosenModelPath(self, labeled: list) -> Path:
        """The model to write: the one chosen, or a new folder of its own for this training."""
        if self._parameterNode.outputModelPath:
            return Path(self._parameterNode.outputModelPath)
        first = labeled[0][0].GetName() if labeled else "volumes"
        return default_model_path(TRAININGS_ROOT, first, datetime.datetime.now())

    def onTrainOrStop(self) -> None:
        if self.logic.is_running:
            self.logic.stop()  # asks; the trainer saves its checkpoint and exits
            self.onTimer()
            return
        if self._export is not None:  # the button is Cancel while exporting
            self._export.cancel()
            self._export = None
            self.exportTimer.stop()
            self.ui.statusLabel.text = "Export cancelled; nothing was trained and the files written were removed."
            self.updateButtons()
            return
        if not ensure_dependencies_in_slicer():
            return
        labeled, unlabeled = self.selectedData()
        model = self.chosenModelPath(labeled)
        if would_overwrite(model) and not slicer.util.confirmOkCancelDisplay(
                f"{model} already holds a model or a checkpoint. Training replaces them. Continue?",
                windowTitle="ISDNet"):
            return
        with slicer.util.tryWithErrorDisplay("Training could not start.", waitCursor=True):
            self._export = ExportJob(slicer.mrmlScene, labeled, unlabeled, dataset_folder_for(model))
            self._exportModel = model
            self.exportTimer.start()
        self.updateButtons()

    def onExportStep(self) -> None:
        """One volume of the export per tick, so Slicer stays responsive; then training starts."""
        job = self._export
        if job is None:
            return
        try:
            done = job.step()
        except Exception as error:  # noqa: BLE001 - shown to the user, the export is abandoned
            self._export = None
            self.exportTimer.stop()
            slicer.util.errorDisplay(f"The volumes could not be exported: {error}", windowTitle="ISDNet")
            self.updateButtons()
            return
        self.ui.progressBar.value = int(round(100 * job.fraction))
        self.ui.progressBar.setFormat(f"Exporting volumes {int(round(100 * job.fraction))}%")
        if not done:
            return
        self.exportTimer.stop()
        self._export = None
        with slicer.util.tryWithErrorDisplay("Training could not start.", waitCursor=True):
            self.logic.start(job.folder, self._exportModel, self.options())
            self.ui.outputModelPathLineEdit.currentPath = str(self._exportModel)  # Resume and the log find it again
            self.showChart()
            self.timer.start()
        self.onTimer()

    def onResume(self) -> None:
        with slicer.util.tryWithErrorDisplay("Training could not be resumed.", waitCursor=True):
            self.logic.resume(self.resumableModel())
            self.showChart()
            self.timer.start()
        self.onTimer()

    def resumableModel(self) -> Optional[Path]:
        """The chosen output model, if a training of it can be resumed (also one from an earlier session)."""
        path = self._parameterNode.outputModelPath if self._parameterNode else ""
        return Path(path) if path and self.logic.can_resume(Path(path)) else None

    def onDeleteExportedData(self) -> None:
        """Delete the copies of the patient images exported for the chosen model's training."""
        model = Path(self._parameterNode.outputModelPath)
        folder = self.logic.exported_data(model)
        if folder is None or not slicer.util.confirmOkCancelDisplay(
                f"Delete the images exported for training, in\n{folder}?\nThe model stays; the training can then "
                "no longer be resumed.", windowTitle="ISDNet"):
            return
        with slicer.util.tryWithErrorDisplay("The exported images could not be deleted."):
            self.logic.delete_exported_data(model)
        self.updateButtons()

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

    # ----- suggested next volume
    def onSuggestOrCancel(self) -> None:
        """Rank the ticked unlabeled volumes with the model in a child process (a timer follows it), or cancel."""
        if self.suggestLogic.is_running:
            self.suggestLogic.cancel()
            self.onSuggestTimer()
            return
        if not ensure_dependencies_in_slicer():
            return
        status = self.logic.status
        trained = status.model_path if status.state == "done" else None
        with slicer.util.tryWithErrorDisplay("The volumes could not be ranked.", waitCursor=True):
            model = rank_request([trained, self._parameterNode.outputModelPath], self.selectedData()[1])
            self.suggestLogic.start(model, self.selectedData()[1], device=self._parameterNode.device)
            self.suggestTimer.start()
        self.onSuggestTimer()

    def onSuggestTimer(self) -> None:
        status = self.suggestLogic.poll()
        self.ui.suggestStatusLabel.text = describe(slicer.mrmlScene, status)
        self.updateButtons()
        if status.state == "running":
            return
        self.suggestTimer.stop()
        self.updateVolumeTable()  # the Suggested column
        if status.state == "failed":
            slicer.util.errorDisplay(status.message, windowTitle="ISDNet ranking failed")

    def onAnnotateTop(self) -> None:
        """Open the first suggested volume in the Segment Editor and switch there."""
        with slicer.util.tryWithErrorDisplay("The volume could not be opened for annotation."):
            annotate_top(slicer.mrmlScene, self.suggestLogic.status)
            slicer.util.selectModule("SegmentEditor")

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
        running, exporting, stopping = self.logic.is_running, self._export is not None, self.logic.status.stopping
        labeled, _ = self.selectedData()
        self.ui.trainButton.text = "Stopping..." if stopping else "Stop" if running else (
            "Cancel" if exporting else "Train")
        self.ui.trainButton.toolTip = ("Stop training: it saves a checkpoint where it is, for Resume." if running else
                                       "Stop exporting and remove the files written." if exporting else
                                       "Export the data and start training.")
        self.ui.trainButton.enabled = (running and not stopping) or exporting or bool(labeled)
        self.ui.resumeButton.enabled = not exporting and self.resumableModel() is not None
        self.ui.optionsCollapsibleButton.enabled = not running and not exporting
        self.ui.volumesCollapsibleButton.enabled = not running and not exporting
        model = self._parameterNode.outputModelPath if self._parameterNode else ""
        folder = self.logic.exported_data(Path(model)) if model else None
        self.ui.exportedDataLabel.text = (f"Patient images exported for training: {folder}" if folder else
                                          "No exported images for the chosen model.")
        self.ui.deleteExportedDataButton.enabled = folder is not None and not running
        ranking = self.suggestLogic.is_running
        self.ui.suggestButton.text = "Cancel ranking" if ranking else "Suggest next volume to annotate"
        self.ui.suggestButton.enabled = ranking or not (running or exporting)
        self.ui.annotateTopButton.enabled = not ranking and top_volume(slicer.mrmlScene,
                                                                       self.suggestLogic.status) is not None


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
        logic.stop()  # asks; the training writes its checkpoint and exits
        self._waitFor(logic, lambda s: s.state != "running")
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
