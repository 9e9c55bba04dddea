"""How long a training of scene volumes will take, before anything is exported: the engine's own planning
(``isdnet.estimate``) on the volume nodes' grids, so the Train module can show it before Start."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

from isdnet.estimate import StepCost, TrainingEstimate, estimate_training, validation_indices, volume_slices

from .volumes import lps_geometry, require_image_data

if TYPE_CHECKING:
    from .jobs import TrainingOptions


def node_grid(volume_node: Any) -> Any:
    """The node's grid (size, LPS spacing and direction) as the engine's planning reads an image's."""
    from isdnet.geometry import ImageGrid

    require_image_data(volume_node)
    spacing, _, direction = lps_geometry(volume_node)
    return ImageGrid(tuple(volume_node.GetImageData().GetDimensions()), spacing, direction)


def estimate_volumes(labeled: Sequence[tuple[Any, Any]], unlabeled: Sequence[Any], options: TrainingOptions,
                     cost: Optional[StepCost] = None) -> TrainingEstimate:
    """The expected duration of training on (volume, segmentation) pairs and unlabeled volumes with these options:
    the validation cases held out as the engine draws them, ``cost`` from ``isdnet.estimate.probe_step_cost`` or
    the reference machine's."""
    options.validate()
    if not labeled:
        raise ValueError("at least one labeled volume is needed to estimate a training")
    config = options.config
    volumes = [volume for volume, _ in labeled] + (list(unlabeled) if config.uses_unlabeled else [])
    counts, size = volume_slices([node_grid(v) for v in volumes], config)
    held = validation_indices(len(labeled), config.validation_fraction, config.seed)
    train_slices = sum(n for i, n in enumerate(counts[:len(labeled)]) if i not in held)
    validation_slices = sum(counts[i] for i in held)
    return estimate_training(train_slices, validation_slices, size, config, cost,
                             unlabeled=len(volumes) > len(labeled))
