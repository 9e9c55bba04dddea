"""How long a training will take, before it starts: the planned steps, and their time from a measured (or a
reference) cost per step. No torch at import: the Slicer logic uses it before torch is installed; only the timing
probe (``probe_step_cost``) needs torch.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from .config import TrainConfig

# The reference cost, measured on the 2-core development machine (docs/speed.md, "Baseline step, float32 vs
# bf16"): a float32 baseline step of a width-32 SU-Net on 8 slices of 128 x 128 took 1.000 s, and on that CPU a
# step grows about linearly with the slice's pixels and the width (width 16: 0.511 s; 48 x 48: 0.172 s). An isdnet
# step (D and D0 beside S) cost 1.24 baseline steps of as many slices; the other adversarial methods do less.
REFERENCE_STEP_S, REFERENCE_WIDTH, REFERENCE_PIXELS, REFERENCE_BATCH = 1.0, 32, 128 * 128, 8
ADVERSARIAL_STEP_RATIO = 1.24
VALIDATION_SHARE = 1 / 3  # a validated slice (forward only) costs about a third of a trained one


def validation_indices(cases: int, fraction: float, seed: int) -> set[int]:
    """Which of ``cases`` labeled cases (by index) are held out to validate: ``fraction`` of them drawn with the
    seed, at least one when there are two or more, never all."""
    if fraction == 0 or cases < 2:
        return set()
    order = list(range(cases))
    random.Random(seed + 1).shuffle(order)
    return set(order[:min(cases - 1, max(1, round(fraction * cases)))])


def planned_steps(labeled_slices: int, config: TrainConfig) -> tuple[int, int]:
    """(iterations per epoch, epochs) a training plans: one pass over the labeled slices an epoch unless
    ``steps_per_epoch`` is set; ``total_steps`` rounded to the nearest whole number of epochs, else ``epochs``."""
    steps = config.steps_per_epoch or max(1, math.ceil(labeled_slices / config.batch_size))
    epochs = max(1, round(config.total_steps / steps)) if config.total_steps else config.epochs
    return steps, epochs


@dataclass(frozen=True)
class StepCost:
    """Seconds of one iteration: on labeled slices only (warm-up epochs, methods without unlabeled data), and
    with the unlabeled slices beside them (a batch of each)."""

    labeled_s: float
    semi_s: float
    measured: bool = False  # probed on this machine, rather than scaled from the reference


@dataclass(frozen=True)
class TrainingEstimate:
    """A training's plan and its expected duration (an upper bound when ``patience`` may end it sooner)."""

    steps_per_epoch: int
    epochs: int
    seconds: float
    capped: bool  # the time budget (``max_minutes``) is what limits it
    may_end_sooner: bool  # ``patience`` is set
    measured: bool

    def describe(self) -> str:
        """One line for a front end, e.g. "about 12 min (230 epochs of 13 steps; sooner if it converges)"."""
        minutes = self.seconds / 60
        text = f"about {minutes:.0f} min" if minutes >= 2 else f"about {max(1, round(self.seconds))} s"
        plan = f"{self.epochs} epochs of {self.steps_per_epoch} steps"
        notes = [plan] + (["the time budget"] if self.capped else []) + \
            (["sooner if it converges"] if self.may_end_sooner else []) + \
            ([] if self.measured else ["from a reference CPU's speed"])
        return f"{text} ({'; '.join(notes)})"


def reference_cost(config: TrainConfig, slice_size: Sequence[int]) -> StepCost:
    """A step's cost scaled from the reference machine's: linear in pixels, width and slices per batch."""
    labeled = (REFERENCE_STEP_S * slice_size[0] * slice_size[1] / REFERENCE_PIXELS
               * config.base_channels / REFERENCE_WIDTH * config.batch_size / REFERENCE_BATCH)
    ratio = ADVERSARIAL_STEP_RATIO if config.uses_discriminator else 1.0
    return StepCost(labeled * ratio, 2 * labeled * ratio if config.uses_unlabeled else labeled * ratio)


def estimate_training(labeled_slices: int, validation_slices: int, slice_size: Sequence[int], config: TrainConfig,
                      cost: Optional[StepCost] = None, unlabeled: bool = True) -> TrainingEstimate:
    """The duration of a training on ``labeled_slices`` training slices, validating ``validation_slices`` after
    each epoch, from ``cost`` (a ``probe_step_cost`` measurement) or the reference cost; ``unlabeled``: whether
    there are unlabeled slices for the methods that use them."""
    steps, epochs = planned_steps(labeled_slices, config)
    cost = cost or reference_cost(config, slice_size)
    semi_epochs = max(0, epochs - config.warmup_epochs) if config.uses_unlabeled and unlabeled else 0
    seconds = steps * ((epochs - semi_epochs) * cost.labeled_s + semi_epochs * cost.semi_s)
    seconds += epochs * validation_slices * VALIDATION_SHARE * cost.labeled_s / config.batch_size
    budget = 60.0 * config.max_minutes if config.max_minutes is not None else math.inf
    return TrainingEstimate(steps, epochs, min(seconds, budget), budget < seconds, config.patience is not None,
                            cost.measured)


def volume_slices(grids: Sequence[Any], config: TrainConfig) -> tuple[list[int], tuple[int, int]]:
    """Slices per volume and the slice size a training on these volumes (images or ``geometry.ImageGrid``s, no
    voxels needed) plans, by the engine's own planning (``geometry.plan_geometry``)."""
    from .geometry import plan_geometry, slice_count

    geometry = plan_geometry(grids, config.slice_axis, spacing=config.slice_spacing, size=config.slice_size)
    return [slice_count(g, config.slice_axis) for g in grids], tuple(geometry.size)


def probe_step_cost(config: TrainConfig, num_classes: int, slice_size: Sequence[int], steps: int = 3,
                    device: Any = None) -> StepCost:
    """Time ``steps`` iterations (after one untimed) of this configuration's networks on random slices of
    ``slice_size``, labeled only and with unlabeled ones: the median of each, as ``estimate_training`` takes it."""
    import torch

    from .runtime import resolve_device, resolve_precision
    from .trainer import Trainer

    device = device or resolve_device(config.device)
    trainer = Trainer(config, num_classes, device, resolve_precision(config.precision, device, training=True))
    generator = torch.Generator().manual_seed(config.seed)
    shape = (config.batch_size, 1, *slice_size)
    x = torch.randn(shape, generator=generator).to(device)
    y = torch.randint(0, num_classes, (config.batch_size, *slice_size), generator=generator).to(device)

    def median(unlabeled: Optional[torch.Tensor]) -> float:
        times = []
        for index in range(steps + 1):
            started = time.perf_counter()
            trainer.train_step(x, y, unlabeled)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index:
                times.append(time.perf_counter() - started)
        return statistics.median(times)

    labeled = median(None)
    semi = median(torch.randn(shape, generator=generator).to(device)) if config.uses_unlabeled else labeled
    return StepCost(labeled, semi, measured=True)
