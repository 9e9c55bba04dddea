"""The training job: cases on disk to a model file, epoch by epoch, with validation, checkpoints, stop and resume.

Each iteration is ``trainer.Trainer.train_step``; this module prepares the data once, feeds the epoch's batches
(``slices.epoch_batches``), keeps the best or the final model, and writes checkpoints from which ``resume``
continues mid-epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .checkpoint import DATA_ROLES, check_meta, data_changes, load_latest, save_checkpoint
from .config import TrainConfig, checkpoint_path, has_checkpoint, stop_path, training_files
from .dataset import Case
from .distributed import ProcessGroup, init_from_environment, shutdown
from .errors import InputError, TrainingError
from .estimate import planned_steps
from .files import OutputLock, check_outputs_apart
from .geometry import NORMALISATION, ImageGrid, PreparedVolume, SliceGeometry, plan_geometry, prepare_volume
from .images import read_image, read_label
from .modelfile import LoadedModel, default_colors, load_model, make_header, save_model
from .progress import Progress
from .runtime import resolve_device, resolve_precision
from .slices import SliceDataset, cache_volumes, epoch_batches
from .stopping import (
    CONVERGED,
    TIME_BUDGET,
    StopRequest,
    budget_message,
    budget_spent,
    converged_epochs,
    converged_message,
)
from .trainer import Trainer
from .validation import split_validation, validation_dice

RESUMABLE_CHANGES = ("epochs", "device", "precision", "checkpoint_minutes", "patience", "min_delta",
                     "max_minutes")  # options a resumed run may change


@dataclass
class TrainResult:
    """Where the model went and how the run went."""

    model: Path
    best_val_dice: Optional[float]
    best_epoch: int
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False
    steps_per_epoch: int = 0
    reason: str = ""  # why it ended before its planned epochs: stopping.CONVERGED or TIME_BUDGET
    train_s: float = 0.0  # seconds of training, earlier sessions of a resumed run included


def _label_indices(label: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Map label values (which need not be 0..C-1) to class indices."""
    lookup = np.zeros(256, dtype=np.uint8)
    lookup[list(values)] = np.arange(len(values), dtype=np.uint8)
    return lookup[label]


def train(labeled: Sequence[Case], unlabeled: Sequence[Case], labels: dict[int, str], out: Path,
          config: TrainConfig, *, colors: Optional[dict[int, list[int]]] = None,
          terminology: Optional[dict[int, str]] = None, progress: Optional[Progress] = None,
          resume: bool = False, allow_new_data: bool = False, cache_dir: Optional[Path] = None,
          best_out: Optional[Path] = None) -> TrainResult:
    """Train on labeled and unlabeled cases and write the best model to ``out`` (safetensors + JSON header).

    A checkpoint is written atomically after every epoch, every ``checkpoint_minutes`` within one, and when a
    stop is requested (``config.stop_path(out)`` appearing, SIGTERM, SIGINT); ``resume`` continues from it,
    mid-epoch included, and gives the same run as an uninterrupted one. With no checkpoint yet it starts from the
    beginning; from a checkpoint made on other cases it continues only with ``allow_new_data``.
    """
    config.validate()
    progress = progress or Progress(json_lines=False)
    out = Path(out)
    if not labeled:
        raise TrainingError("no labeled case: ISDNet needs at least one annotated volume")
    if not out.parent.is_dir():
        raise InputError(out.parent, "the output folder does not exist")
    if sorted(labels)[0] != 0:
        raise TrainingError(f"the labels must include 0 (background), got {sorted(labels)}")
    check_outputs_apart([*training_files(out), *([Path(best_out)] if best_out else [])],
                        [p for case in [*labeled, *unlabeled] for p in (case.image, case.label) if p is not None])
    group = init_from_environment(config.device)
    if not group.is_main:
        progress = Progress(json_lines=True, stream=open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115 - rank 0 reports
    try:
        with OutputLock(out) if group.is_main else contextlib.nullcontext(), StopRequest(stop_path(out)) as stop, \
                tempfile.TemporaryDirectory(prefix="isdnet-cache-", dir=cache_dir) as cache:
            run = _TrainingRun(labeled, unlabeled, labels, out, config, colors, progress, Path(cache), group)
            for cls in run.header["classes"]:  # the segments' terminology goes with the model
                if terminology and cls["value"] in terminology:
                    cls["terminology"] = terminology[cls["value"]]
            run.best_out = best_out
            return run.run(resume, stop, allow_new_data)
    finally:
        shutdown(group)


class _TrainingRun:
    """One training job: the data prepared once, then epochs of iterations with validation and checkpoints."""

    def __init__(self, labeled: Sequence[Case], unlabeled: Sequence[Case], labels: dict[int, str], out: Path,
                 config: TrainConfig, colors: Optional[dict[int, list[int]]], progress: Progress, cache: Path,
                 group: ProcessGroup):
        self.started = time.monotonic()
        self.group = group
        self.config, self.out, self.progress = config, out, progress
        self.best_out: Optional[Path] = None  # where the best epoch on validation also goes, if anywhere
        self.values = sorted(labels)
        self.device = resolve_device(config.device)
        self.dtype = resolve_precision(config.precision, self.device, training=True)
        unlabeled = list(unlabeled) if config.uses_unlabeled else []
        train_cases, val_cases = split_validation(labeled, config.validation_fraction, config.seed)
        self.data: dict[str, dict[str, str]] = {role: {} for role in DATA_ROLES}  # case name -> digest of its slices
        # Two passes, one volume in memory at a time: grids to plan the slice geometry, then slices to the cache.
        start = _starting_model(config, labels)
        if start is not None and config.slice_spacing is None and config.slice_size is None:
            self.geometry = SliceGeometry.from_dict(start.header["geometry"])  # the features it learnt need it
        else:
            grids = [ImageGrid.of(read_image(case.image)) for case in [*train_cases, *unlabeled]]
            self.geometry = plan_geometry(grids, config.slice_axis, spacing=config.slice_spacing,
                                          size=config.slice_size)
        self.labeled_set = SliceDataset(cache_volumes(self._prepared(train_cases, "labeled"), cache / "labeled"),
                                        self.geometry.size, labeled=True, random_crop=True, seed=config.seed)
        unlabeled_volumes = cache_volumes(self._prepared(unlabeled, "unlabeled"), cache / "unlabeled")
        self.unlabeled_set = (SliceDataset(unlabeled_volumes, self.geometry.size, labeled=False, random_crop=True,
                                           seed=config.seed) if unlabeled_volumes else None)
        self.val_volumes = list(self._prepared(val_cases, "validation"))
        self.trainer = Trainer(config, len(self.values), self.device, self.dtype, group)
        if start is not None:
            self.trainer.start_from(start, Path(str(config.init_from)))
        self.steps, self.epochs = planned_steps(len(self.labeled_set), config)
        self.header = _model_header(config, labels, colors, self.geometry, self.trainer, dict(
            labeled_cases=len(train_cases), validation_cases=len(val_cases), unlabeled_cases=len(unlabeled),
            labeled_slices=len(self.labeled_set),
            unlabeled_slices=len(self.unlabeled_set) if self.unlabeled_set else 0))
        # epoch: last complete epoch; iteration/sums: progress inside the next one (after a stop)
        self.state: dict[str, Any] = dict(epoch=0, iteration=0, sums={}, best_val_dice=None, best_epoch=0,
                                          history=[])
        self.checkpointed = time.monotonic()
        self.session_started, self.earlier_s = time.monotonic(), 0.0  # training seconds of earlier sessions

    def _prepared(self, cases: Sequence[Case], role: str) -> Iterator[PreparedVolume]:
        """Each case read, checked and cut into model slices, one at a time; the slices' digest kept in ``data``."""
        for case in cases:
            image = read_image(case.image)
            label = read_label(case.label, image, self.values) if case.label is not None else None
            volume = prepare_volume(image, self.geometry, label, source=case.image)
            if volume.label is not None:
                volume.label = _label_indices(volume.label, self.values)
            digest = hashlib.sha256(np.ascontiguousarray(volume.image).data)
            if volume.label is not None:
                digest.update(np.ascontiguousarray(volume.label).data)
            self.data[role][case.name] = digest.hexdigest()
            yield volume

    def run(self, resume: bool, stop: StopRequest, allow_new_data: bool = False) -> TrainResult:
        if resume:
            self._resume(allow_new_data)
        config, state = self.config, self.state
        self.progress.emit(
            "start", epochs=self.epochs, iterations_per_epoch=self.steps, start_epoch=state["epoch"] + 1,
            start_iteration=state["iteration"] + 1, labeled_slices=len(self.labeled_set),
            unlabeled_slices=self.header["provenance"]["unlabeled_slices"], validation_cases=len(self.val_volumes),
            device=str(self.device), precision=str(self.dtype).split(".")[-1], method=config.method,
            setup_s=round(time.monotonic() - self.started, 2))
        self.session_started, self.earlier_s = time.monotonic(), float(state.get("train_s", 0.0))
        if config.patience is not None and not self.val_volumes:
            self.progress.emit("message", message="no validation case, so --patience cannot tell when training "
                               "converges: every planned epoch runs")
        ended = self._ending(state["epoch"]) if state["epoch"] else None  # resumed after it ended early
        if ended:
            return self._done(*ended)
        good = {k: v.clone() for k, v in self.trainer.state_tensors().items()}
        run_started, run_steps = time.monotonic(), 0
        total_steps = (self.epochs - state["epoch"]) * self.steps - state["iteration"]
        for epoch in range(state["epoch"] + 1, self.epochs + 1):
            batches = epoch_batches(self.labeled_set, self.unlabeled_set, config, epoch, self.device, self.group)
            for iteration in range(1, self.steps + 1):
                x_l, y_l, x_u, augmentation_u = next(batches)
                if iteration <= state["iteration"]:
                    continue  # replayed to restore the data order of a stopped epoch; no compute
                self.trainer.set_progress(((epoch - 1) * self.steps + iteration - 1) / (self.epochs * self.steps))
                if config.semi_rampup_epochs:
                    ramp = (epoch - 1 - config.warmup_epochs + (iteration - 1) / self.steps) / config.semi_rampup_epochs
                    self.trainer.semi_scale = min(1.0, max(0.0, ramp))
                losses = self.trainer.train_step(x_l, y_l, x_u, augmentation_u)
                if "discarded" in losses:
                    self.progress.emit("nonfinite", epoch=epoch, iteration=iteration,
                                       message=f"non-finite loss or gradient at epoch {epoch}, iteration "
                                               f"{iteration}: that update was discarded")
                for key, value in losses.items():
                    if math.isfinite(value):
                        state["sums"][key] = state["sums"].get(key, 0.0) + value
                state["iteration"] = iteration
                run_steps += 1
                eta = self._eta((time.monotonic() - run_started) / run_steps * (total_steps - run_steps))
                self.progress.emit("iteration", epoch=epoch, iteration=iteration, iterations=self.steps,
                                   losses=_rounded(losses), eta_s=round(eta, 1))
                if iteration == self.steps:
                    continue  # the epoch's end checkpoints and stops
                if self.group.any(stop.requested, self.device):
                    self._checkpoint(epoch - 1)
                    self.progress.emit("stopped", epoch=epoch, iteration=iteration,
                                       message="training stopped; resume continues from here")
                    return self._result(stopped=True)
                if self.group.any(budget_spent(self._train_seconds(), config), self.device):
                    break  # the time budget ends the epoch here: validated, saved and checkpointed as any epoch
                due = time.monotonic() - self.checkpointed >= 60 * config.checkpoint_minutes
                if self.group.any(due, self.device):  # a crash in a long epoch then loses minutes, not the epoch
                    path = self._checkpoint(epoch - 1)
                    self.progress.emit("checkpoint", epoch=epoch - 1, iteration=iteration, path=str(path))
            if not self.trainer.weights_are_finite():
                self.trainer.load_state_tensors({k: v.clone() for k, v in good.items()})
                self.progress.emit("rollback", epoch=epoch, message=f"non-finite weights after epoch {epoch}: "
                                   "rolled back to the last good state")
            good = {k: v.clone() for k, v in self.trainer.state_tensors().items()}
            self._end_epoch(epoch, run_started, run_steps, total_steps)
            ended = self._ending(epoch) if epoch < self.epochs or "iterations" in state["history"][-1] else None
            if ended:
                return self._done(*ended)
            if self.group.any(stop.requested, self.device) and epoch < self.epochs:
                self.progress.emit("stopped", epoch=epoch, iteration=self.steps,
                                   message="training stopped; resume continues from here")
                return self._result(stopped=True)
        return self._done()

    def _train_seconds(self) -> float:
        """Seconds of training so far (data preparation aside), earlier sessions of a resumed run included."""
        return self.earlier_s + time.monotonic() - self.session_started

    def _eta(self, seconds: float) -> float:
        """The time left, capped by what remains of the time budget."""
        if self.config.max_minutes is None:
            return seconds
        return max(0.0, min(seconds, 60.0 * self.config.max_minutes - self._train_seconds()))

    def _ending(self, epoch: int) -> Optional[tuple[str, str]]:
        """(reason, message) when the run ends after ``epoch``: converged (``patience``) or its time budget
        spent; None to go on. Every rank takes the same decision (only rank 0 validates)."""
        config, seconds = self.config, self._train_seconds()
        stale = converged_epochs(self.state["history"], config, self.unlabeled_set is not None) \
            if self.group.is_main else None
        if self.group.any(stale is not None, self.device):
            return CONVERGED, converged_message(seconds, epoch, stale or config.patience or 0)
        if self.group.any(budget_spent(seconds, config), self.device):
            return TIME_BUDGET, budget_message(seconds, epoch, config)
        return None

    def _done(self, reason: str = "", message: str = "") -> TrainResult:
        """Report the end: the model written (the best or the final one, as ``model_selection`` says) and, when
        the run ended before its planned epochs, why."""
        state = self.state
        if message:
            self.progress.emit("message", message=message)
        self.progress.emit("done", model=str(self.out), best_val_dice=state["best_val_dice"],
                           best_epoch=state["best_epoch"], **(dict(reason=reason, message=message) if reason else {}))
        return dataclasses.replace(self._result(stopped=False), reason=reason)

    def _end_epoch(self, epoch: int, run_started: float, run_steps: int, total_steps: int) -> None:
        """Validate, keep the best model, checkpoint, report."""
        state, config = self.state, self.config
        iterations = state["iteration"] or self.steps  # fewer when the time budget cut the epoch
        means = {k: v / iterations for k, v in state["sums"].items()}
        val = None
        if self.val_volumes and self.group.is_main:
            val = validation_dice(self.trainer.segmenter, self.val_volumes, len(self.values), self.device,
                                  self.dtype, config.batch_size, self.geometry.size)
        best = val is None or state["best_val_dice"] is None or val > state["best_val_dice"]
        if best:
            state["best_val_dice"], state["best_epoch"] = val, epoch
        if self.group.is_main:
            self.header["provenance"]["validation"] = {"dice": val, "epoch": epoch}
            self.header["provenance"]["training_time_s"] = round(time.monotonic() - self.started, 1)
            confidence = self.trainer.confidence_net
            if best and self.best_out is not None:
                save_model(self.best_out, self.header, self.trainer.segmenter, confidence)
            if best or config.model_selection == "final":
                save_model(self.out, self.header, self.trainer.segmenter, confidence)
        state["history"].append({"epoch": epoch, "losses": _rounded(means), "val_dice": val,
                                 "semi": self.unlabeled_set is not None and epoch > config.warmup_epochs,
                                 **({"iterations": iterations} if iterations < self.steps else {})})
        state["iteration"], state["sums"] = 0, {}
        path = self._checkpoint(epoch)
        self.progress.emit("checkpoint", epoch=epoch, path=str(path))
        elapsed = time.monotonic() - run_started
        self.progress.emit("epoch", epoch=epoch, epochs=self.epochs, losses=_rounded(means), val_dice=val,
                           best_val_dice=state["best_val_dice"], elapsed_s=round(time.monotonic() - self.started, 1),
                           train_s=state["train_s"],
                           eta_s=round(self._eta(elapsed / max(run_steps, 1) * (total_steps - run_steps)), 1))

    def _checkpoint(self, epoch: int) -> Path:
        """Write the checkpoint (rank 0 only; the others wait so that none runs ahead of a stop)."""
        self.state["epoch"] = epoch
        self.state["train_s"] = round(self._train_seconds(), 2)
        path = checkpoint_path(self.out)
        if self.group.is_main:
            meta = {"config": dataclasses.asdict(self.config), "header": self.header, "state": self.state,
                    "data": self.data}
            save_checkpoint(path, self.trainer.state_tensors(), meta)
        self.group.barrier()
        self.checkpointed = time.monotonic()
        return path

    def _resume(self, allow_new_data: bool) -> None:
        """Restore the newest sound checkpoint; it must come from a run with the same options and data (other
        cases only with ``allow_new_data``). Without one, the run starts from the beginning."""
        if not has_checkpoint(self.out):
            self.progress.emit("message", message=f"{checkpoint_path(self.out)}: no checkpoint yet (the run ended "
                               "before its first one); training starts from the beginning")
            return
        tensors, meta, path = load_latest(checkpoint_path(self.out), check=self._check_checkpoint,
                                          report=lambda text: self.progress.emit("message", message=text))
        saved, current = meta["config"], json.loads(json.dumps(dataclasses.asdict(self.config)))  # as saved
        changed = [k for k in current if k not in RESUMABLE_CHANGES and k in saved and saved[k] != current[k]]
        if changed:
            raise InputError(path, f"the checkpoint was made with other options ({', '.join(changed)}); "
                                   "resume with the same options or start a new training")
        if meta["header"]["geometry"] != self.header["geometry"] or \
                meta["header"]["classes"] != self.header["classes"]:
            raise InputError(path, "the checkpoint was made on other data (slice geometry or classes differ)")
        changes = data_changes(meta["data"], self.data)
        if changes and not allow_new_data:
            raise InputError(path, f"the checkpoint was made on other cases ({changes}); resume with "
                                   "--allow-new-data to go on training it on these, or start a new training")
        if changes:
            self.progress.emit("message", message=f"resuming on other cases than the checkpoint's: {changes}")
        self.trainer.load_state_tensors({k: v.to(self.device) for k, v in tensors.items()})
        self.state = meta["state"]
        if "validation" in meta["header"]["provenance"]:
            self.header["provenance"]["validation"] = meta["header"]["provenance"]["validation"]

    def _check_checkpoint(self, tensors: dict[str, torch.Tensor], meta: Any) -> None:
        """Raise ValueError unless the checkpoint holds what ``_checkpoint`` writes, restorable into this trainer."""
        check_meta(meta)
        self.trainer.check_state_tensors(tensors)

    def _result(self, stopped: bool) -> TrainResult:
        s = self.state
        return TrainResult(self.out, s["best_val_dice"], s["best_epoch"], s["epoch"], s["history"], stopped,
                           self.steps, train_s=float(s.get("train_s", 0.0)))


def _starting_model(config: TrainConfig, labels: dict[int, str]) -> Optional[LoadedModel]:
    """The model ``init_from`` names, after checking that its classes are the data's (values and names)."""
    if not config.init_from:
        return None
    path = Path(config.init_from)
    model = load_model(path)
    theirs = {int(c["value"]): c["name"] for c in model.header["classes"]}
    if theirs != labels:
        differing = [f"{v}: {theirs.get(v, '(none)')!r} in the model, {labels.get(v, '(none)')!r} in the data"
                     for v in sorted(set(theirs) | set(labels)) if theirs.get(v) != labels.get(v)]
        raise InputError(path, "its classes differ from the data's, so training cannot start from it: "
                               + "; ".join(differing))
    return model


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in values.items()}


def _model_header(config: TrainConfig, labels: dict[int, str], colors: Optional[dict[int, list[int]]],
                  geometry: SliceGeometry, trainer: Trainer, counts: dict[str, int]) -> dict[str, Any]:
    """The model file's JSON header: everything inference and a reader of provenance need."""
    values = sorted(labels)
    palette = default_colors(len(values))
    confidence = trainer.confidence_net
    header = make_header([labels[v] for v in values], dict(NORMALISATION), geometry.to_dict(), trainer.segmenter,
                         confidence, method=config.method,
                         colors=[list((colors or {}).get(v, palette[i])) for i, v in enumerate(values)],
                         hyperparameters=dataclasses.asdict(config), **counts)
    for cls, value in zip(header["classes"], values):
        cls["value"] = value
    return header

