"""Resuming a training: unusable checkpoints fall back to the previous one, other data is named and refused
unless allowed, and a crash before the first checkpoint or inside a long epoch loses little."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from isdnet.checkpoint import read_checkpoint, save_checkpoint
from isdnet.cli import main
from isdnet.config import TrainConfig, checkpoint_path
from isdnet.config import previous_checkpoint_path as previous_path
from isdnet.dataset import load_dataset
from isdnet.phantoms import write_phantom_dataset
from isdnet.progress import Progress
from isdnet.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--base-channels", "4", "--discriminator-channels", "4", "--importance-channels", "8", "--batch-size", "4",
        "--precision", "fp32", "--device", "cpu", "--seed", "1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("resume"), 5, seed=5, shape=(12, 48, 48),
                                 spacing=(1.5, 1.5, 3.0))


def config(epochs: int) -> TrainConfig:
    return TrainConfig(method="isdnet", epochs=epochs, steps_per_epoch=2, warmup_epochs=1, base_channels=4,
                       discriminator_channels=4, importance_channels=8, batch_size=4, precision="fp32", device="cpu")


@pytest.fixture(scope="module")
def two_epochs(dataset, tmp_path_factory) -> Path:
    """A folder with a model trained for two epochs, with its newest and previous checkpoints."""
    spec = load_dataset(dataset)
    out = tmp_path_factory.mktemp("trained") / "m.safetensors"
    train(spec.cases[:3], spec.cases[3:], spec.labels, out, config(2), progress=Progress(json_lines=True,
                                                                                       stream=open(os.devnull, "w")))
    return out


def damage_meta(meta):
    del meta["header"]


def null_config(meta):
    meta["config"] = None


def bad_state(meta):
    meta["state"]["epoch"] = "two"


def bad_header(meta):
    meta["header"]["architecture"]["segmenter"]["depth"] = 0


@pytest.mark.slow
@pytest.mark.parametrize("damage, problem", [
    (damage_meta, "'header' is a required property"),
    (null_config, "config is invalid: None is not of type 'object'"),
    (bad_state, "state.epoch is invalid"),
    (bad_header, "its model header is invalid"),
    ("shape", r"tensor net\.S\.head\.weight has shape \(5, 4, 1, 1\)"),
    ("extra", "tensor net.S.extra belongs to no network"),
])
def test_an_unusable_newest_checkpoint_falls_back_to_the_previous(dataset, two_epochs, tmp_path, damage, problem):
    """A checkpoint whose checksum holds but whose content cannot be resumed (written by another version, or a
    bug) is treated like a corrupt one: the previous checkpoint is used, and the message says why."""
    out = tmp_path / "m.safetensors"
    for path in (two_epochs, checkpoint_path(two_epochs), previous_path(checkpoint_path(two_epochs))):
        shutil.copy(path, tmp_path / path.name)
    tensors, meta = read_checkpoint(checkpoint_path(out))
    if damage == "shape":
        tensors["net.S.head.weight"] = torch.zeros(5, 4, 1, 1)
    elif damage == "extra":
        tensors["net.S.extra"] = torch.zeros(1)
    else:
        damage(meta)
    save_checkpoint(checkpoint_path(out), tensors, meta)  # the sound epoch-2 checkpoint becomes the previous one
    spec = load_dataset(dataset)
    progress = Progress(json_lines=True, stream=open(tmp_path / "resume.log", "w"))
    result = train(spec.cases[:3], spec.cases[3:], spec.labels, out, config(3), progress=progress, resume=True)
    assert result.epochs_run == 3 and not result.stopped
    start = next(e for e in progress.events if e["event"] == "start")
    assert start["start_epoch"] == 3
    messages = [e["message"] for e in progress.events if e["event"] == "message"]
    assert any("is not a usable checkpoint" in m and "previous checkpoint" in m for m in messages), messages
    assert re.search(problem, messages[0]), messages[0]


@pytest.mark.slow
def test_resuming_on_other_cases_names_them_and_needs_allow_new_data(dataset, tmp_path, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()

    def put(name, source):
        shutil.copy(dataset / "imagesTr" / f"{source}.nii.gz", cases / f"{name}.nii.gz")
        shutil.copy(dataset / "labelsTr" / f"{source}.nii.gz", cases / f"{name}_label.nii.gz")

    def command(names, epochs, *extra):
        return ["train", "--images", *[str(cases / f"{n}.nii.gz") for n in names],
                "--labels", *[str(cases / f"{n}_label.nii.gz") for n in names], "--out", str(out),
                "--epochs", str(epochs), "--steps-per-epoch", "2", "--validation-fraction", "0", *TINY, *extra]

    out = tmp_path / "model" / "m.safetensors"
    out.parent.mkdir()
    put("a", "phantom_000")
    put("b", "phantom_001")
    assert main(command("ab", 1)) == 0
    put("b", "phantom_003")  # the same name, other voxels
    put("c", "phantom_002")
    capsys.readouterr()
    assert main(command("abc", 2, "--resume")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"isdnet train: error: {checkpoint_path(out)}: the checkpoint was "
                                                   "made on other cases (labeled added: c; labeled changed: b); "
                                                   "resume with --allow-new-data")
    assert read_checkpoint(checkpoint_path(out))[1]["state"]["epoch"] == 1  # untouched
    assert main(command("abc", 2, "--resume", "--allow-new-data", "--progress-json")) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert any("other cases than the checkpoint's: labeled added: c" in e.get("message", "") for e in events)
    assert events[-1]["event"] == "done"
    assert read_checkpoint(checkpoint_path(out))[1]["data"]["labeled"].keys() == {"a", "b", "c"}


@pytest.mark.slow
def test_a_crash_before_the_first_checkpoint_or_inside_a_long_epoch_resumes(dataset, tmp_path):
    """SIGKILL before any checkpoint: the same command with --resume starts afresh, with a notice. Checkpoints
    are also written by time within an epoch, so a kill inside the first epoch resumes from where it was."""
    out = tmp_path / "m.safetensors"
    command = [sys.executable, "-m", "isdnet", "train", str(dataset), "--out", str(out), "--epochs", "1",
               "--steps-per-epoch", "40", "--checkpoint-minutes", "0.002", "--progress-json", *TINY]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run_until(arguments, stop):
        """Start the command and SIGKILL it at the first event for which ``stop`` is true; returns the events."""
        process = subprocess.Popen(arguments, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        events = []
        for line in process.stdout:
            events.append(json.loads(line))
            if stop(events[-1]):
                process.kill()
                break
        process.wait()
        return events

    run_until(command, lambda e: e["event"] == "start")
    assert not checkpoint_path(out).exists() and not out.exists()
    events = run_until([*command, "--resume"], lambda e: e["event"] == "checkpoint" and e.get("iteration", 0) >= 3)
    assert any("no checkpoint yet" in e.get("message", "") for e in events)
    saved = read_checkpoint(checkpoint_path(out))[1]["state"]
    assert saved["epoch"] == 0 and saved["iteration"] >= 3  # inside the first epoch
    events = run_until([*command, "--resume"], lambda e: False)
    start = next(e for e in events if e["event"] == "start")
    assert (start["start_epoch"], start["start_iteration"]) == (1, saved["iteration"] + 1)
    assert events[-1]["event"] == "done" and out.exists()
