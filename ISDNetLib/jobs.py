"""What a training is asked for and where it lives: ``TrainingOptions``, the folder of its own each training gets
(model, exported dataset beside it) and the job file kept beside the model so that Resume works after a restart.

Split from ``train.TrainLogic``, which runs the training; the front ends import these from here.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isdnet.config import MODEL_SUFFIX, TrainConfig, has_checkpoint, job_path, train_arguments


@dataclass
class TrainingOptions:
    """What a front end asks of a training: engine options by TrainConfig field name (the rest keep the engine's
    defaults), plus any other ``isdnet train`` options as they would be typed."""

    values: dict[str, Any] = field(default_factory=dict)
    extra_arguments: list[str] = field(default_factory=list)

    @property
    def config(self) -> TrainConfig:
        """The engine's options these settings give (raises ValueError for an unknown option)."""
        return TrainConfig(**self.values)

    def validate(self) -> None:
        """Raise ValueError naming the first option out of range."""
        try:
            self.config.validate()
        except TypeError as error:
            raise ValueError(f"unknown training option: {error}") from None

    def arguments(self) -> list[str]:
        """The ``isdnet train`` options for these settings."""
        return [*train_arguments(**self.values), *self.extra_arguments]


MODEL_FILE_NAME = "model" + MODEL_SUFFIX
DATASET_FOLDER_NAME = "dataset"


def default_model_path(root: Path, first_volume: str, now: datetime.datetime) -> Path:
    """A folder of its own for each training, so nothing earlier is overwritten: ``root/<date>-<time>-<first
    volume>/model.safetensors``, the exported dataset beside the model in ``dataset/``."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", first_volume).strip("._") or "volumes"
    return Path(root) / f"{now:%Y-%m-%d-%H%M%S}-{name}" / MODEL_FILE_NAME


def dataset_folder_for(model_path: Path) -> Path:
    """Where the data a model is trained on is exported: beside it."""
    return Path(model_path).parent / DATASET_FOLDER_NAME


def would_overwrite(model_path: Path) -> bool:
    """True when training into ``model_path`` would replace a model or a checkpoint already there."""
    return Path(model_path).exists() or has_checkpoint(Path(model_path))


def write_job(dataset_folder: Path, model_path: Path, options: TrainingOptions) -> None:
    """Keep beside the model what it is trained on, so that Resume works after Slicer is restarted."""
    job = {"dataset": str(dataset_folder), "model": str(model_path), "options": options.values,
           "extra_arguments": options.extra_arguments}
    job_path(model_path).write_text(json.dumps(job, indent=2), encoding="utf-8")


def read_job(model_path: Path) -> tuple[Path, Path, TrainingOptions]:
    """The dataset folder, model and options ``write_job`` kept for ``model_path``; ValueError if there are none."""
    path = job_path(model_path)
    try:
        job = json.loads(path.read_text(encoding="utf-8"))
        options = TrainingOptions(dict(job["options"]), list(job["extra_arguments"]))
        return Path(job["dataset"]), Path(model_path), options
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: no training to resume here ({error})") from None
