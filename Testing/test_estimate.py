"""The estimate of a training's duration (isdnet.estimate): the plan, the arithmetic, the probe."""

from __future__ import annotations

import pytest

from isdnet.config import TrainConfig
from isdnet.estimate import (
    StepCost,
    estimate_training,
    planned_steps,
    probe_step_cost,
    reference_cost,
    validation_indices,
)
from isdnet.validation import split_validation


def test_the_plan_is_the_trainings_own():
    assert planned_steps(100, TrainConfig(batch_size=8)) == (13, 40)
    assert planned_steps(100, TrainConfig(batch_size=8, total_steps=3000)) == (13, 231)
    assert planned_steps(5, TrainConfig(steps_per_epoch=7, epochs=2)) == (7, 2)
    cases = list("abcdefghij")
    held = validation_indices(10, 0.2, seed=3)
    assert len(held) == 2 and split_validation(cases, 0.2, 3)[1] == [cases[i] for i in sorted(held)]
    assert validation_indices(1, 0.5, 0) == set() and len(validation_indices(2, 0.9, 0)) == 1


def test_estimate_adds_warm_up_semi_supervised_epochs_and_validation_and_honours_the_budget():
    config = TrainConfig(method="isdnet", epochs=10, batch_size=4, warmup_epochs=2)
    cost = StepCost(labeled_s=1.0, semi_s=2.0, measured=True)
    # 3 steps an epoch: 2 warm-up epochs at 1 s a step, 8 at 2 s; validating 12 slices, a third of 1 s per 4
    estimate = estimate_training(12, 12, (32, 32), config, cost)
    assert (estimate.steps_per_epoch, estimate.epochs) == (3, 10)
    assert estimate.seconds == pytest.approx(3 * (2 * 1 + 8 * 2) + 10 * 12 / 3 / 4)
    assert estimate.describe() == "about 64 s (10 epochs of 3 steps)"
    assert estimate_training(12, 0, (32, 32), config, cost, unlabeled=False).seconds == pytest.approx(30)
    capped = estimate_training(12, 12, (32, 32), TrainConfig(**{**config.__dict__, "max_minutes": 0.5,
                                                               "patience": 3}), cost)
    assert capped.seconds == 30 and capped.capped and capped.may_end_sooner
    assert capped.describe() == "about 30 s (10 epochs of 3 steps; the time budget; sooner if it converges)"


def test_reference_cost_scales_with_pixels_width_and_batch():
    base = reference_cost(TrainConfig(method="baseline", base_channels=32, batch_size=8), (128, 128))
    assert (base.labeled_s, base.semi_s, base.measured) == (1.0, 1.0, False)
    isdnet = reference_cost(TrainConfig(method="isdnet", base_channels=16, batch_size=8), (64, 128))
    assert isdnet.labeled_s == pytest.approx(0.25 * 1.24) and isdnet.semi_s == pytest.approx(0.5 * 1.24)


def test_the_probe_times_real_steps():
    config = TrainConfig(method="isdnet", base_channels=4, discriminator_channels=4, importance_channels=8,
                         batch_size=2, precision="fp32", device="cpu")
    cost = probe_step_cost(config, 3, (16, 16), steps=1)
    assert cost.measured and 0 < cost.labeled_s < 30 and 0 < cost.semi_s < 30
