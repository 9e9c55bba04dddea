"""How long a training will take, before it starts: the planned steps, and their time from a measured (or a
reference) cost per step. No torch at import: the Slicer logic uses it before torch is installed; only the timing
probe (``probe_step_seconds``) needs torch.
"""

from __future__ import annotations

import math

from .config import TrainConfig


def planned_steps(labeled_slices: int, config: TrainConfig) -> tuple[int, int]:
    """(iterations per epoch, epochs) a training plans: one pass over the labeled slices an epoch unless
    ``steps_per_epoch`` is set; ``total_steps`` rounded to the nearest whole number of epochs, else ``epochs``."""
    steps = config.steps_per_epoch or max(1, math.ceil(labeled_slices / config.batch_size))
    epochs = max(1, round(config.total_steps / steps)) if config.total_steps else config.epochs
    return steps, epochs
