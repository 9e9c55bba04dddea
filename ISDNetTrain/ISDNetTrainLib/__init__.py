"""ISDNetTrain's logic: export a scene to a dataset, run the engine's training as a child process, plot it."""

from .dataset import ExportedDataset, SegmentClass, dataset_classes, export_dataset
from .logic import TrainingOptions, TrainingStatus, TrainLogic

__all__ = [
    "ExportedDataset",
    "SegmentClass",
    "TrainLogic",
    "TrainingOptions",
    "TrainingStatus",
    "dataset_classes",
    "export_dataset",
]
