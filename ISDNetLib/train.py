"""TrainLogic: export the scene, run ``isdnet train`` as a child process, follow its progress in plot nodes.

The logic never blocks: ``start``/``resume`` launch the child through a process runner, and the caller (a QTimer
in the widget, a loop in the tests) calls ``poll()``, which reads the new JSON progress lines, updates
``status`` and fills a table node with one row per epoch, drawn by plot series in a chart node.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import vtk

from isdnet.config import (
    DATASET_FILE,
    LOSS_TITLES,
    VAL_DICE,
    Event,
    checkpoint_path,
    has_checkpoint,
    log_path,
    parse_event,
    stop_path,
)
from isdnet.estimate import StepCost, TrainingEstimate

from .child import LOG_TAIL_LINES
from .estimate import estimate_volumes
from .export import ExportedDataset, export_dataset
from .jobs import TrainingOptions, read_job, write_job
from .runner import ProcessRunner, engine_environment, python_executable

STOPPING_MESSAGE = "Stopping: saving checkpoint..."
STOP_TIMEOUT_S = 900.0  # how long a stopping training may take to write its checkpoint before it is killed
SERIES_COLORS = ((0.85, 0.2, 0.2), (0.2, 0.45, 0.85), (0.2, 0.7, 0.3), (0.85, 0.55, 0.1), (0.55, 0.3, 0.75),
                 (0.4, 0.4, 0.4))


@dataclass
class TrainingStatus:
    """Where the training stands, for the widget's progress bar and messages.

    ``state`` is one of idle, running, done, stopped, failed, detached (left running as the application closed);
    ``stopping`` is set while a running training saves its checkpoint after Stop.
    """

    state: str = "idle"
    stopping: bool = False
    epoch: int = 0
    epochs: int = 0
    iteration: int = 0
    iterations: int = 0
    eta_s: Optional[float] = None
    elapsed_s: Optional[float] = None
    best_val_dice: Optional[float] = None
    model_path: Optional[str] = None
    message: str = ""

    @property
    def fraction(self) -> float:
        """Share of the work done, 0 to 1."""
        if self.state == "done":
            return 1.0
        if not self.epochs or not self.iterations:
            return 0.0
        return min(1.0, ((self.epoch - 1) + self.iteration / self.iterations) / self.epochs)

    def describe(self) -> str:
        """One line for the progress bar: epoch, iteration and time left."""
        if self.stopping:
            return STOPPING_MESSAGE
        if self.state != "running" or not self.epochs:
            return self.message
        text = f"Epoch {max(self.epoch, 1)}/{self.epochs}"
        if self.iterations:
            text += f", iteration {self.iteration}/{self.iterations}"
        if self.eta_s is not None:
            minutes, seconds = divmod(int(round(self.eta_s)), 60)
            hours, minutes = divmod(minutes, 60)
            text += f", {hours}h{minutes:02d}m left" if hours else f", {minutes}m{seconds:02d}s left"
        return text


class TrainLogic:
    """Runs one training at a time for a scene; the plot nodes it makes are reused across runs."""

    def __init__(self, scene: Any, runner: Optional[ProcessRunner] = None, python: Optional[str] = None):
        self.scene = scene
        self.runner = runner or ProcessRunner()
        self.python = python or python_executable()
        self.status = TrainingStatus()
        self.history: dict[int, dict[str, float]] = {}
        self.table_node: Any = None
        self.chart_node: Any = None
        self._job: Optional[tuple[Path, Path, TrainingOptions]] = None
        self._error_message = ""
        self._ended_early = ""
        self._stopped = False

    # ----- data
    def export_dataset(self, labeled: Sequence[tuple[Any, Any]], unlabeled: Sequence[Any], folder: Path
                       ) -> ExportedDataset:
        """Write the dataset folder (Decathlon layout) the engine trains on; see ``dataset.export_dataset``."""
        return export_dataset(self.scene, labeled, unlabeled, Path(folder))

    def estimate(self, labeled: Sequence[tuple[Any, Any]], unlabeled: Sequence[Any], options: TrainingOptions,
                 cost: Optional[StepCost] = None) -> TrainingEstimate:
        """How long training these volumes will take (``estimate.estimate_volumes``), to show before Start."""
        return estimate_volumes(labeled, unlabeled, options, cost)

    # ----- the child process
    def command(self, dataset_folder: Path, model_path: Path, options: TrainingOptions, resume: bool = False
                ) -> list[str]:
        """The command line of the training child."""
        args = [self.python, "-m", "isdnet", "train", str(dataset_folder), "--out", str(model_path),
                "--progress-json", *options.arguments()]
        return args + ["--resume"] if resume else args

    def start(self, dataset_folder: Path, model_path: Path, options: TrainingOptions, resume: bool = False) -> None:
        """Start training on an exported dataset folder; with ``resume``, continue from the last checkpoint."""
        options.validate()
        if not (Path(dataset_folder) / DATASET_FILE).is_file():
            raise ValueError(f"{dataset_folder}: no {DATASET_FILE} here; export the dataset first")
        if resume and not has_checkpoint(model_path):
            raise ValueError(f"{checkpoint_path(model_path)}: there is no checkpoint to resume from")
        Path(model_path).parent.mkdir(parents=True, exist_ok=True)
        stop_path(model_path).unlink(missing_ok=True)  # from an earlier run; a Stop from now on is this run's
        if not resume:
            self.history.clear()
        kept = TrainingOptions(dict(options.values), list(options.extra_arguments))  # later edits leave the job alone
        self._job = (Path(dataset_folder), Path(model_path), kept)
        write_job(*self._job)
        self._error_message = ""
        self._ended_early = ""
        self._stopped = False
        self._stop_requested = 0.0
        self.status = TrainingStatus(state="running", epochs=options.config.epochs, model_path=str(model_path),
                                     message="Resuming training..." if resume else "Starting training...")
        self._update_table()  # the chart exists (empty, or with the epochs kept for a resume) from the start
        self.runner.start(self.command(dataset_folder, model_path, options, resume), env=engine_environment(),
                          log_path=str(log_path(model_path)))

    def can_resume(self, model_path: Optional[Path] = None) -> bool:
        """True when nothing runs and a training of ``model_path`` (default: this logic's last one) left a
        checkpoint and its job file, also from an earlier Slicer session."""
        model = Path(model_path) if model_path is not None else (self._job[1] if self._job else None)
        if model is None or self.runner.is_running or (model_path is None and self.status.state == "done"):
            return False
        if not has_checkpoint(model):
            return False
        if self._job is not None and self._job[1] == model:
            return (self._job[0] / DATASET_FILE).is_file()
        return self.exported_data(model) is not None

    def resume(self, model_path: Optional[Path] = None) -> None:
        """Continue a training from its checkpoint with the same data and options: this logic's last one, or the
        one that trained ``model_path`` (read from the job file beside it)."""
        if model_path is not None and (self._job is None or self._job[1] != Path(model_path)):
            self._job = read_job(Path(model_path))
        if self._job is None:
            raise ValueError("no training to resume: start one first")
        dataset_folder, model, options = self._job
        self.start(dataset_folder, model, options, resume=True)

    def exported_data(self, model_path: Path) -> Optional[Path]:
        """The dataset folder (copies of the patient images) a training of ``model_path`` was exported to, if it
        is still there."""
        try:
            folder = read_job(Path(model_path))[0]
        except ValueError:
            return None
        return folder if (folder / DATASET_FILE).is_file() or (folder / "imagesTr").is_dir() else None

    def delete_exported_data(self, model_path: Path) -> Optional[Path]:
        """Delete the exported copies of the patient images of a training of ``model_path`` (not while it runs);
        the model stays, Resume is no longer possible. Returns the folder deleted, or None."""
        folder = self.exported_data(model_path)
        if folder is None:
            return None
        if self.runner.is_running and self._job is not None and self._job[0] == folder:
            raise ValueError(f"{folder}: the training that reads these images is still running; stop it first")
        shutil.rmtree(folder)
        return folder

    def stop(self) -> None:
        """Ask the training to stop: it writes a checkpoint at the iteration it reached and exits, so ``resume``
        loses nothing. ``poll`` reports the stopping meanwhile, and kills the process tree only when the training
        has not ended ``STOP_TIMEOUT_S`` after the request (then the last epoch's checkpoint stays)."""
        if self.runner.is_running and self._job is not None and not self.status.stopping:
            self._stopped = True
            stop_path(self._job[1]).touch()
            self._stop_requested = time.monotonic()
            self.status.stopping = True
        self.poll()

    def stop_now(self) -> None:
        """Stop at once, killing the process tree (the last checkpoint written stays for ``resume``)."""
        if self.runner.is_running:
            self._stopped = True
            self.runner.kill()
        self.poll()

    def on_application_exit(self, keep_running: bool = False) -> Optional[str]:
        """Slicer is closing: stop a running training (its checkpoint stays for Resume), or, with
        ``keep_running``, leave it to finish on its own and write its model. Returns what happened, or None."""
        if not self.runner.is_running:
            return None
        model = self._job[1] if self._job else None
        if not keep_running:
            self.stop()
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while self.runner.is_running and time.monotonic() < deadline:  # the application waits for the save
                time.sleep(0.2)
            self.stop_now()
            return f"ISDNet training stopped as the application closed; its checkpoint is beside {model}."
        pid = self.runner.detach()
        self.status.state = "detached"
        self.status.message = (f"Training goes on in process {pid} after the application closes; it writes "
                               f"{model} when done and logs to {log_path(model)}.")
        return self.status.message

    @property
    def is_running(self) -> bool:
        return self.runner.is_running

    def poll(self) -> TrainingStatus:
        """Read the progress that arrived since the last call; updates ``status`` and the plot table."""
        for line in self.runner.poll():
            event = parse_event(line)
            if event is not None:
                self._handle(event)
        if self.status.stopping and time.monotonic() - self._stop_requested > STOP_TIMEOUT_S:
            self.runner.kill()
        if self.status.state == "running" and not self.runner.is_running and self.runner.returncode is not None:
            self._finish(self.runner.returncode)
        return self.status

    def _handle(self, event: dict[str, Any]) -> None:
        kind, s = event["event"], self.status
        if kind == Event.START:
            s.epochs = int(event.get("epochs", s.epochs))
            s.iterations = int(event.get("iterations_per_epoch", 0))
            s.epoch = int(event.get("start_epoch", 1))
            for epoch in [e for e in self.history if e >= s.epoch]:
                del self.history[epoch]
            self._update_table()
            s.message = f"Training on {event.get('device', 'the chosen device')}..."
        elif kind == Event.ITERATION:
            s.epoch, s.iteration = int(event["epoch"]), int(event["iteration"])
            s.iterations = int(event.get("iterations", s.iterations))
            s.eta_s = event.get("eta_s", s.eta_s)
        elif kind == Event.EPOCH:
            s.epoch, s.iteration = int(event["epoch"]), s.iterations
            s.eta_s, s.elapsed_s = event.get("eta_s", s.eta_s), event.get("elapsed_s", s.elapsed_s)
            s.best_val_dice = event.get("best_val_dice", s.best_val_dice)
            row = {k: float(v) for k, v in (event.get("losses") or {}).items() if v is not None}
            if event.get("val_dice") is not None:
                row[VAL_DICE] = float(event["val_dice"])
            self.history[s.epoch] = row
            self._update_table()
        elif kind == Event.DONE:
            s.model_path = str(event.get("model", s.model_path))
            s.best_val_dice = event.get("best_val_dice", s.best_val_dice)
            self._ended_early = str(event.get("message", ""))  # converged, or the time budget spent
        elif kind == Event.ERROR:
            self._error_message = str(event.get("message", ""))
        elif kind in Event.NOTICES:
            s.message = str(event.get("message", ""))  # the engine's own plain-words notice

    def _finish(self, returncode: int) -> None:
        s = self.status
        s.stopping = False
        s.eta_s = 0.0 if returncode == 0 else s.eta_s
        if self._stopped:
            s.state = "stopped"
            s.message = (f"Training stopped during epoch {s.epoch} of {s.epochs}. "
                         + ("Resume continues from the last checkpoint." if self.can_resume() else
                            "No epoch was completed, so there is no checkpoint to resume from."))
        elif returncode == 0:
            s.state = "done"
            dice = "" if s.best_val_dice is None else f" (best validation Dice {s.best_val_dice:.3f})"
            early = f" Ended before its planned epochs: {self._ended_early}." if self._ended_early else ""
            s.message = f"Training finished{dice}.{early} Model written to {s.model_path}."
        else:
            s.state = "failed"
            reason = self._error_message or f"the training process ended unexpectedly (exit status {returncode})"
            s.message = f"Training failed: {reason}\n\nLast lines of the log:\n" + "\n".join(self.log_tail())

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        """The last lines the training wrote, JSON progress left out."""
        text = [line for line in self.runner.log_tail(lines * 20) if parse_event(line) is None]
        return text[-lines:]

    # ----- plots
    def _update_table(self) -> None:
        """Rewrite the table from ``history`` (one row per epoch) and make sure a series draws each column."""
        if self.table_node is None or self.scene.GetNodeByID(self.table_node.GetID()) is None:
            self.table_node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", "ISDNet training")
        keys = [k for k in LOSS_TITLES if any(k in row for row in self.history.values())]
        keys += sorted({k for row in self.history.values() for k in row} - set(keys) - {VAL_DICE})
        if any(VAL_DICE in row for row in self.history.values()):
            keys.append(VAL_DICE)
        table = vtk.vtkTable()
        for name in ["epoch", *keys]:
            column = vtk.vtkDoubleArray()
            column.SetName(name)
            table.AddColumn(column)
        epochs = sorted(self.history)
        table.SetNumberOfRows(len(epochs))
        for r, epoch in enumerate(epochs):
            table.SetValue(r, 0, vtk.vtkVariant(float(epoch)))
            for c, key in enumerate(keys, start=1):
                table.SetValue(r, c, vtk.vtkVariant(self.history[epoch].get(key, float("nan"))))
        self.table_node.SetAndObserveTable(table)
        self._update_chart(keys)

    def _update_chart(self, keys: list[str]) -> None:
        if self.chart_node is None or self.scene.GetNodeByID(self.chart_node.GetID()) is None:
            self.chart_node = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "ISDNet training chart")
            self.chart_node.SetTitle("ISDNet training")
            self.chart_node.SetXAxisTitle("epoch")
            self.chart_node.SetYAxisTitle("loss / Dice")
        present = {self.chart_node.GetNthPlotSeriesNode(i).GetYColumnName()
                   for i in range(self.chart_node.GetNumberOfPlotSeriesNodes())}
        for key in keys:
            if key in present:
                continue
            series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", LOSS_TITLES.get(key, key)
                                                  if key != VAL_DICE else "validation Dice")
            series.SetAndObserveTableNodeID(self.table_node.GetID())
            series.SetXColumnName("epoch")
            series.SetYColumnName(key)
            series.SetPlotType(series.PlotTypeScatter)
            series.SetMarkerStyle(series.MarkerStyleCircle)
            series.SetColor(*SERIES_COLORS[self.chart_node.GetNumberOfPlotSeriesNodes() % len(SERIES_COLORS)])
            if key == VAL_DICE:
                series.SetLineStyle(series.LineStyleDash)
            self.chart_node.AddAndObservePlotSeriesNodeID(series.GetID())
