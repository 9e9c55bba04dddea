"""The contract every front end shares, importable without torch: the training options with their choices and
defaults, the files the engine writes, and the progress events it emits.

The CLI's ``isdnet train`` options are generated from ``TrainConfig`` (``add_train_arguments``); the Slicer
modules and the web app take their choices and defaults from here and turn their settings back into command-line
options with ``train_arguments``. Nothing here may be copied into a front end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

METHODS = ("baseline", "adv", "adv-classifier", "hung", "isdnet")  # the rows of the paper's Tables 1 and 3
SLICE_AXES = ("auto", "x", "y", "z")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "bf16", "fp32")
DICE_FORMS = ("pooled", "per-class")  # how (2) combines the classes: see losses.WeightedDiceLoss
LR_SCHEDULES = ("constant", "poly")
MODEL_SELECTIONS = ("best", "final")
PSEUDO_LABELS = ("prediction", "unaugmented")
DISCRIMINATOR_STRIDES = (1, 2, 4, 8, 16, 32)
# The options only D, D0 and the unlabeled terms read: a baseline run is the same whatever their values.
SEMI_SUPERVISED_OPTIONS = ("lambda_adv", "lambda_semi", "t_semi", "semi_rampup_epochs", "pseudo_labels",
                           "confidence_on_unlabeled", "discriminator", "discriminator_channels",
                           "discriminator_stride", "discriminator_temperature", "discriminator_learning_rate",
                           "discriminator_betas", "importance_channels")


def option(default: Any, help: str, **argparse_options: Any) -> Any:
    """A TrainConfig field with the help text (and any other argparse settings) of its ``isdnet train`` option."""
    return dataclasses.field(default=default, metadata=dict(help=help, **argparse_options))


@dataclass
class TrainConfig:
    """Every option of a training run; the defaults are the paper's where it gives one."""

    method: str = option("isdnet", "which row of the paper's Tables 1 and 3 to train", choices=METHODS)
    epochs: int = option(40, "passes over the labeled slices (see --steps-per-epoch)", type=int)
    steps_per_epoch: Optional[int] = option(None, "iterations per epoch (default: one pass over the labeled "
                                            "slices)", type=int)
    total_steps: Optional[int] = option(None, "a budget of steps of S instead of --epochs: the nearest whole "
                                        "number of epochs", type=int)
    batch_size: int = option(8, "labeled slices per step (as many unlabeled ones join them)", type=int)
    learning_rate: float = option(1e-4, "Adam's rate for S (the paper: 1e-4)", type=float)
    discriminator_learning_rate: Optional[float] = option(None, "Adam's rate for D and D0 (default: "
                                                          "--learning-rate, as in the paper)", type=float)
    discriminator_betas: tuple[float, float] = option((0.9, 0.999), "Adam's betas for D and D0 (Hung et al.: "
                                                      "0.9 0.99)", type=float, nargs=2, metavar=("BETA1", "BETA2"))
    lr_schedule: str = option("constant", "poly decays every rate by (1 - step/steps)**0.9 (Hung et al.)",
                              choices=LR_SCHEDULES)
    cross_entropy: float = option(1.0, "weight of a cross-entropy term added to L_Dice on labeled slices (not "
                                  "in the paper: 0 gives its loss, Dice alone; the term keeps S from collapsing "
                                  "to background, docs/results.md)", type=float)
    model_selection: str = option("best", "keep the epoch with the best validation Dice, or the final one",
                                  choices=MODEL_SELECTIONS)
    patience: Optional[int] = option(None, "stop when the validation Dice has not improved for this many epochs "
                                     "(after the warm-up; default: train every planned epoch)", type=int)
    min_delta: float = option(0.0, "the gain in validation Dice that counts as an improvement for --patience",
                              type=float)
    max_minutes: Optional[float] = option(None, "stop after this many minutes of training (all sessions of a "
                                          "resumed run together), ending the epoch there and writing the model",
                                          type=float)
    foreground_fraction: float = option(0.0, "at least this share of each labeled batch are slices that contain "
                                        "foreground (0: plain shuffling)", type=float)
    lambda_adv: float = option(0.001, "weight of the adversarial loss (the paper: 0.001)", type=float)
    lambda_semi: float = option(1.0, "weight of the semi-supervised loss (the paper: 1)", type=float)
    t_semi: float = option(0.1, "confidence a pixel needs to count in the semi-supervised loss (the paper: 0.1)",
                           type=float)
    warmup_epochs: int = option(5, "epochs on labeled data before the unlabeled terms start (the paper: 5)",
                                type=int)
    semi_rampup_epochs: int = option(0, "lambda_semi grows linearly over this many epochs after the warm-up "
                                     "(not in the paper)", type=int)
    pseudo_labels: str = option("prediction", "the pseudo-labels of L_semi: the argmax of the prediction itself "
                                "(the paper), or of S on the unlabeled slice before augmentation, warped with it "
                                "(a consistency variant, not in the paper)", choices=PSEUDO_LABELS)
    confidence_on_unlabeled: bool = option(False, "D also learns S's unlabeled predictions as fakes (Hung et "
                                           "al.'s code; not in the paper)")
    class_weights: Optional[list[float]] = option(None, "one weight per class for the Dice losses (default: "
                                                  "plain Dice)", type=float, nargs="+")
    dice_form: str = option("per-class", "how the weighted Dice (2) combines the classes (see "
                            "isdnet/losses.py)", choices=DICE_FORMS)
    base_channels: int = option(32, "width of S's first level (the paper: 32)", type=int)
    discriminator: Optional[str] = option(None, "D's registered network class (see isdnet/networks.py; default: "
                                          "ConfidenceNet, ImageClassifierDiscriminator for adv-classifier)")
    discriminator_channels: int = option(64, "width of D's first layer (Hung et al.: 64)", type=int)
    discriminator_stride: int = option(32, "downsampling of D's confidence map (Hung et al.: 32); lower it for "
                                       "small slices", type=int, choices=DISCRIMINATOR_STRIDES)
    discriminator_temperature: float = option(1.0, "D sees S's softmax at this temperature, softmax(logits / T) "
                                              "(not in the paper, whose D sees T = 1)", type=float)
    importance_channels: int = option(128, "width of D0", type=int)
    slice_axis: str = option("auto", "the axis to cut slices along (auto: the acquisition axis)",
                             choices=SLICE_AXES)
    slice_spacing: Optional[list[float]] = option(None, "in-plane spacing of the model's slices (default: the "
                                                  "median of the training cases)", type=float, nargs=2,
                                                  metavar=("ROW_MM", "COL_MM"))
    slice_size: Optional[list[int]] = option(None, "training slice size (default: the largest slice, rounded "
                                             "up to 16)", type=int, nargs=2, metavar=("ROWS", "COLS"))
    validation_fraction: float = option(0.2, "share of the labeled cases held out to validate each epoch",
                                        type=float)
    augment: bool = option(True, "random rotation, scaling, flips and intensity changes of training slices")
    init_from: Optional[str] = option(None, "start from the networks of this model file (fine-tuning): its classes "
                                      "must be the data's, and its slice geometry is kept", metavar="MODEL")
    seed: int = option(0, "draws the labeled subset, the validation cases and the initial weights", type=int)
    checkpoint_minutes: float = option(5.0, "also write a checkpoint within an epoch when this many minutes passed "
                                       "since the last one, so a crash loses minutes, not the epoch", type=float)
    device: str = option("auto", "where to train (auto: CUDA, then Apple MPS, then the CPU)", choices=DEVICES)
    precision: str = option("auto", "bf16 or fp32 (auto: bf16 on GPUs that have it, fp32 on CPUs)",
                            choices=PRECISIONS)

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        for name, allowed in (("method", METHODS), ("lr_schedule", LR_SCHEDULES), ("pseudo_labels", PSEUDO_LABELS),
                              ("model_selection", MODEL_SELECTIONS), ("dice_form", DICE_FORMS),
                              ("slice_axis", SLICE_AXES), ("device", DEVICES), ("precision", PRECISIONS),
                              ("discriminator_stride", DISCRIMINATOR_STRIDES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        positive = dict(epochs=self.epochs, batch_size=self.batch_size, learning_rate=self.learning_rate,
                        base_channels=self.base_channels, checkpoint_minutes=self.checkpoint_minutes)
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0 < self.discriminator_temperature <= 100:
            raise ValueError(f"discriminator_temperature must be in (0, 100], got {self.discriminator_temperature}")
        if self.discriminator_learning_rate is not None and not self.discriminator_learning_rate > 0:
            raise ValueError(f"discriminator_learning_rate must be positive, got {self.discriminator_learning_rate}")
        for name in ("steps_per_epoch", "total_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lambda_adv < 0 or self.lambda_semi < 0 or self.cross_entropy < 0:
            raise ValueError("lambda_adv, lambda_semi and cross_entropy must be non-negative")
        if not 0 <= self.t_semi <= 1:
            raise ValueError(f"t_semi must lie in [0, 1], got {self.t_semi}")
        if self.warmup_epochs < 0 or self.semi_rampup_epochs < 0:
            raise ValueError("warmup_epochs and semi_rampup_epochs must be non-negative")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must lie in [0, 1), got {self.validation_fraction}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be at least 1, got {self.patience}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive, got {self.max_minutes}")
        if not self.min_delta >= 0:
            raise ValueError(f"min_delta must be non-negative, got {self.min_delta}")
        if not 0 <= self.foreground_fraction <= 1:
            raise ValueError(f"foreground_fraction must lie in [0, 1], got {self.foreground_fraction}")

    @property
    def discriminator_name(self) -> str:
        """The network class D is built from."""
        if self.discriminator:
            return self.discriminator
        return "ImageClassifierDiscriminator" if self.method == "adv-classifier" else "ConfidenceNet"

    @property
    def uses_discriminator(self) -> bool:
        return self.method != "baseline"

    @property
    def uses_unlabeled(self) -> bool:
        return self.method in ("hung", "isdnet")

    @property
    def uses_importance(self) -> bool:
        return self.method == "isdnet"

    def as_json(self) -> dict[str, Any]:
        """The options as a JSON document holds them (tuples become lists), for checkpoints and records."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per TrainConfig field, with its default, choices and help."""
    for f in dataclasses.fields(TrainConfig):
        extra = dict(f.metadata)
        if f.default is True or f.default is False:
            extra["action"] = argparse.BooleanOptionalAction
        extra["help"] = f"{extra['help']} (default: {_shown(f.default)})"
        parser.add_argument(_flag(f.name), dest=f.name, default=f.default, **extra)


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


def config_from_arguments(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed ``add_train_arguments`` options."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["discriminator_betas"] = tuple(values["discriminator_betas"])
    return TrainConfig(**values)


def train_arguments(**values: Any) -> list[str]:
    """The ``isdnet train`` options that set these TrainConfig fields (values equal to the default are left out,
    so a command line stays short and follows later defaults)."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    arguments: list[str] = []
    for name, value in values.items():
        if name not in fields:
            raise ValueError(f"unknown training option {name!r}")
        default = fields[name].default
        if value == default or (isinstance(value, (list, tuple)) and list(value) == list(default or [])):
            continue
        if isinstance(value, bool):
            arguments.append(_flag(name) if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            arguments += [_flag(name), *map(str, value)]
        elif value is not None:
            arguments += [_flag(name), repr(value) if isinstance(value, float) else str(value)]
    return arguments


# ----------------------------------------------------------------------------------------------------
# Which volume to annotate next (isdnet rank) and where to look (per-voxel uncertainty): docs/active.md

# Per-voxel uncertainty maps, each in [0, 1] on the input's grid (isdnet/uncertainty.py):
#   confidence: 1 - D's confidence map (needs a model with its confidence network)
#   entropy:    S's softmax entropy, divided by log(number of classes)
#   flip:       total variation between S's probabilities and S's on the slice flipped along its columns
#               (left-right for axial and coronal slices), flipped back
UNCERTAINTIES = ("confidence", "entropy", "flip")
# Ranking strategies: the volume's mean of a map over S's predicted foreground ("confidence": the share of its
# predicted foreground whose D confidence is below LOW_CONFIDENCE), "combined" the mean rank over the available
# signals, "random" a seeded random order (the benchmark's reference).
RANK_STRATEGIES = (*UNCERTAINTIES, "combined", "random")
# The default is the strategy isdnet-bench active measures best against random, or random itself when none beats
# it (docs/active.md); RANK_DEFAULT_REASON says why in one sentence, which the front ends show after the order.
DEFAULT_RANK_STRATEGY = "random"
RANK_DEFAULT_REASON = ("No uncertainty ranking beat a random pick on the hippocampus benchmark (paired seeds, "
                       "docs/active.md), so the order is random.")
RANK_STRATEGY_TITLES = {"confidence": "share of low-confidence pixels (D) in the predicted foreground",
                        "entropy": "mean segmenter entropy (S) over the predicted foreground",
                        "flip": "mean left-right flip disagreement (S) over the predicted foreground",
                        "combined": "mean rank over the available signals", "random": "a seeded random order"}
# The map a front end shows for review unless told otherwise: flip disagreement found S's errors best of the three
# on every hippocampus model measured (docs/active.md, "Review").
DEFAULT_UNCERTAINTY = "flip"
# Slicer-side logics compute up to this many voxels in Slicer's process, larger volumes in an engine child.
IN_PROCESS_MAX_VOXELS = 2**22
LOW_CONFIDENCE = 0.5  # D's confidence below which a predicted foreground pixel counts as low-confidence
UNCERTAINTY_TITLES = {"confidence": "1 - confidence network (D)", "entropy": "segmenter entropy (S)",
                      "flip": "left-right flip disagreement (S)"}

# ----------------------------------------------------------------------------------------------------
# Files

MODEL_SUFFIX = ".safetensors"
CHECKPOINT_SUFFIX = ".checkpoint.safetensors"
PREVIOUS_SUFFIX = ".prev"  # the checkpoint before the newest: name.checkpoint.prev.safetensors
LOG_SUFFIX = ".log"
STOP_SUFFIX = ".stop"
JOB_SUFFIX = ".job.json"
DATASET_FILE = "dataset.json"
VOLUME_ENDING = ".nii.gz"  # the volumes the engine and the front ends write: images, label maps, confidence maps
SEGMENTATION_ENDING = ".seg.nrrd"
CONFIDENCE_SUFFIX = "_confidence"  # <case>_confidence.nii.gz beside <case>.nii.gz
UNCERTAINTY_SUFFIX = "_uncertainty"  # <case>_uncertainty.nii.gz beside <case>.nii.gz (segment --uncertainty MAP)
MAP_SUFFIXES = (CONFIDENCE_SUFFIX, UNCERTAINTY_SUFFIX)  # the maps written beside a label map: never label maps
RANK_FILE = "rank.json"  # what isdnet rank writes when a front end asks it for JSON
LOCK_SUFFIX = ".lock"  # the training lock beside a model: name.safetensors.lock
TEMPORARY_MARKER = ".isdnet-tmp"  # in every temporary the engine writes: .<target>.<random hex><marker><ending>


def model_stem(model_path: Path) -> str:
    """A model file's name without ``.safetensors``."""
    name = Path(model_path).name
    return name[:-len(MODEL_SUFFIX)] if name.endswith(MODEL_SUFFIX) else name


def checkpoint_path(model_path: Path) -> Path:
    """The resumable checkpoint written beside a model: ``name.checkpoint.safetensors``."""
    return Path(model_path).with_name(model_stem(model_path) + CHECKPOINT_SUFFIX)


def previous_checkpoint_path(checkpoint: Path) -> Path:
    """Where the checkpoint before ``checkpoint`` is kept: ``name.checkpoint.prev.safetensors``."""
    return checkpoint.with_name(model_stem(checkpoint) + PREVIOUS_SUFFIX + MODEL_SUFFIX)


def has_checkpoint(model_path: Path) -> bool:
    """True when a training of this model left a checkpoint to resume from (the newest or the previous one)."""
    newest = checkpoint_path(model_path)
    return newest.is_file() or previous_checkpoint_path(newest).is_file()


def stop_path(model_path: Path) -> Path:
    """The file whose appearance asks a running training of this model to stop: ``name.stop``. Creating it works
    on every system and reaches the trainer even through a launcher process (PythonSlicer)."""
    return Path(model_path).with_name(model_stem(model_path) + STOP_SUFFIX)


def job_path(model_path: Path) -> Path:
    """Where a front end keeps what it trained this model on (dataset folder and options), for Resume later."""
    return Path(model_path).with_name(model_stem(model_path) + JOB_SUFFIX)


def log_path(model_path: Path) -> Path:
    """The training log the front ends write beside a model: ``name.log``."""
    return Path(model_path).with_name(model_stem(model_path) + LOG_SUFFIX)


def lock_path(model_path: Path) -> Path:
    """The lock a training holds on its model: ``name.safetensors.lock``."""
    return Path(model_path).with_name(Path(model_path).name + LOCK_SUFFIX)


def training_files(model_path: Path) -> list[Path]:
    """Every file a training writes beside its model (the model, its checkpoints, lock and log), temporaries aside."""
    checkpoint = checkpoint_path(model_path)
    return [Path(model_path), checkpoint, previous_checkpoint_path(checkpoint), lock_path(model_path),
            log_path(model_path)]


# ----------------------------------------------------------------------------------------------------
# Progress events: one JSON object per line on stdout with ``--progress-json``


class Event:
    """The ``event`` values and what each carries."""

    START = "start"  # epochs, iterations_per_epoch, start_epoch, start_iteration, device, precision, method, ...
    ITERATION = "iteration"  # epoch, iteration, iterations, losses, eta_s
    EPOCH = "epoch"  # epoch, epochs, losses, val_dice, best_val_dice, elapsed_s, train_s, eta_s
    CHECKPOINT = "checkpoint"  # epoch (the last complete one), path; iteration when written within an epoch
    STOPPED = "stopped"  # epoch, iteration, message
    DONE = "done"  # model, best_val_dice, best_epoch, and reason, message when it ended early (train); out (segment)
    ERROR = "error"  # message
    MESSAGE = "message"  # message: a notice for the user
    NONFINITE = "nonfinite"  # epoch, iteration, message: an update was discarded
    ROLLBACK = "rollback"  # epoch, message: weights went back to the last good state
    SLICES = "slices"  # case, done, total (segment)
    CASE = "case"  # case, index, cases, outputs (segment)
    RANKED = "ranked"  # case, index, cases, score (rank: one volume scored)
    NOTICES = (MESSAGE, NONFINITE, ROLLBACK)  # the events whose message a front end shows as it is


# The per-epoch losses an ``epoch`` event may carry, with the titles the front ends plot them under.
LOSS_TITLES = {"dice": "Dice loss", "ce": "cross-entropy", "adv": "adversarial loss",
               "semi": "semi-supervised loss", "d": "confidence net loss", "d0": "importance net loss",
               "confident_fraction": "confident unlabeled pixels", "w_mean": "mean importance weight"}
VAL_DICE = "val_dice"  # the epoch event's validation Dice


def parse_event(line: str) -> Optional[dict[str, Any]]:
    """The progress event a stdout line carries, or None for plain log text."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("event"), str) else None

