"""Training that ends by itself: convergence (--patience), a time budget (--max-minutes), and resuming after
either; the rules themselves on hand-made histories."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from isdnet.config import TrainConfig, add_train_arguments, checkpoint_path, config_from_arguments, train_arguments
from isdnet.dataset import load_dataset
from isdnet.modelfile import load_model
from isdnet.phantoms import write_phantom_dataset
from isdnet.progress import Progress
from isdnet.stopping import (
    CONVERGED,
    TIME_BUDGET,
    budget_spent,
    converged_epochs,
    epochs_without_improvement,
    minutes_text,
)
from isdnet.train import train


@pytest.mark.parametrize("values, delta, stale", [
    ([0.5, 0.6, 0.7], 0.0, 0), ([0.5, 0.7, 0.6, 0.65], 0.0, 2), ([0.5, 0.5, 0.5], 0.0, 2),
    ([0.5, 0.505, 0.509], 0.01, 2), ([0.5, 0.52, 0.5], 0.01, 1), ([None, None], 0.0, 0), ([None, 0.3], 0.0, 0),
    ([0.0, 0.0, 0.0], 0.0, 0), ([0.0, 0.0, 0.3, 0.2, None], 0.0, 2), ([], 0.0, 0)])
def test_epochs_without_improvement(values, delta, stale):
    assert epochs_without_improvement(values, delta) == stale


def test_convergence_counts_only_epochs_after_the_warm_up_when_unlabeled_terms_start_then():
    history = [{"epoch": e, "val_dice": v} for e, v in enumerate([0.8, 0.7, 0.7, 0.7, 0.7], start=1)]
    config = TrainConfig(patience=3, warmup_epochs=3)
    assert converged_epochs(history, config, semi=False) == 4
    assert converged_epochs(history, config, semi=True) is None, "only 2 epochs had the unlabeled terms"
    assert converged_epochs(history + [{"epoch": 6, "val_dice": 0.75}], config, semi=True) == 3
    assert converged_epochs(history, TrainConfig(), semi=False) is None, "no patience, no early end"
    assert converged_epochs([{"epoch": 1, "val_dice": None}] * 5, TrainConfig(patience=1), semi=False) is None
    assert budget_spent(61.0, TrainConfig(max_minutes=1)) and not budget_spent(59.0, TrainConfig(max_minutes=1))
    assert not budget_spent(1e9, TrainConfig())
    assert (minutes_text(540), minutes_text(90)) == ("9 min", "1.5 min")


@pytest.mark.parametrize("options, problem", [
    (dict(patience=0), "patience"), (dict(max_minutes=0), "max_minutes"), (dict(min_delta=-0.1), "min_delta"),
    (dict(foreground_fraction=1.5), "foreground_fraction")])
def test_bad_stopping_options_are_named(options, problem):
    with pytest.raises(ValueError, match=problem):
        TrainConfig(**options).validate()


def test_the_options_reach_the_command_line_and_back():
    import argparse

    arguments = train_arguments(patience=4, min_delta=0.002, max_minutes=15.0, foreground_fraction=0.5)
    assert arguments == ["--patience", "4", "--min-delta", "0.002", "--max-minutes", "15.0",
                         "--foreground-fraction", "0.5"]
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    config = config_from_arguments(parser.parse_args(arguments))
    assert (config.patience, config.min_delta, config.max_minutes, config.foreground_fraction) == (4, 0.002, 15.0, 0.5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("early"), 4, seed=3, shape=(12, 32, 32),
                                 spacing=(1.5, 1.5, 3.0))


def tiny(**options) -> TrainConfig:
    """Baseline runs of width 4, two steps an epoch; learning rate 1e-12 leaves the weights (and so the
    validation Dice) as they start, so the run converges after its first epoch."""
    values = dict(method="baseline", epochs=10, steps_per_epoch=2, base_channels=4, batch_size=4, precision="fp32",
                  device="cpu", learning_rate=1e-12, validation_fraction=0.34)
    return TrainConfig(**{**values, **options})


def run(dataset: Path, out: Path, config: TrainConfig, resume: bool = False):
    spec = load_dataset(dataset)
    stream = io.StringIO()
    result = train(spec.cases[:3], spec.cases[3:], spec.labels, out, config, resume=resume,
                   progress=Progress(json_lines=True, stream=stream))
    return result, [json.loads(line) for line in stream.getvalue().splitlines()]


def test_patience_ends_a_converged_run_says_so_and_resume_keeps_the_decision(dataset, tmp_path):
    out = tmp_path / "m.safetensors"
    result, events = run(dataset, out, tiny(patience=2))
    assert (result.epochs_run, result.reason, result.stopped) == (3, CONVERGED, False)
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2, 3]
    done = events[-1]
    assert done["event"] == "done" and done["reason"] == CONVERGED and done["best_epoch"] == 1
    assert "at epoch 3: validation Dice has not improved for 2 epochs" in done["message"]
    assert done["message"].startswith("converged after ")
    assert any(e["event"] == "message" and e["message"] == done["message"] for e in events)
    assert load_model(out).header["provenance"]["validation"]["epoch"] == 1, "the best model, as model_selection"
    # Resuming a converged run trains nothing; with more patience it goes on, and stops again.
    again, events = run(dataset, out, tiny(patience=2), resume=True)
    assert (again.epochs_run, again.reason) == (3, CONVERGED) and not any(e["event"] == "epoch" for e in events)
    more, events = run(dataset, out, tiny(patience=4), resume=True)
    assert (more.epochs_run, more.reason) == (5, CONVERGED)
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [4, 5]
    assert more.train_s >= result.train_s > 0


def test_max_minutes_ends_the_epoch_at_once_writes_the_model_and_resume_goes_on_with_a_larger_budget(dataset,
                                                                                                      tmp_path):
    out = tmp_path / "m.safetensors"
    config = tiny(epochs=3, steps_per_epoch=4, learning_rate=1e-3, max_minutes=1e-6, model_selection="final")
    result, events = run(dataset, out, config)
    assert (result.epochs_run, result.reason) == (1, TIME_BUDGET)
    assert result.history[0]["iterations"] == 1, "stopped at the first iteration boundary past the budget"
    assert events[-1]["reason"] == TIME_BUDGET and "--max-minutes" in events[-1]["message"]
    assert out.is_file() and checkpoint_path(out).is_file()
    assert load_model(out).header["provenance"]["validation"]["epoch"] == 1
    resumed, events = run(dataset, out, TrainConfig(**{**config.__dict__, "max_minutes": 60.0}), resume=True)
    assert (resumed.epochs_run, resumed.reason) == (3, "")
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [2, 3]
    assert [len(e) for e in resumed.history] == [len(resumed.history[0]), len(resumed.history[0]) - 1,
                                                  len(resumed.history[0]) - 1], "only the cut epoch is marked"
    assert os.path.getsize(out) > 0
