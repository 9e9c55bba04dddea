"""Nothing lost: atomic writes, checksummed checkpoints, locks, discarded non-finite steps, stop/resume, kills."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import safetensors.torch
import SimpleITK as sitk
import torch

from isdnet.checkpoint import load_latest, read_checkpoint, save_checkpoint
from isdnet.config import TEMPORARY_MARKER, TrainConfig, checkpoint_path
from isdnet.config import previous_checkpoint_path as previous_path
from isdnet.dataset import load_dataset
from isdnet.errors import InputError, TrainingError
from isdnet.files import OutputLock, remove_stale_temporaries, write_atomically, write_image_atomically
from isdnet.modelfile import load_model
from isdnet.phantoms import write_phantom_dataset
from isdnet.progress import Progress
from isdnet.train import train
from isdnet.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
PHANTOM = dict(shape=(12, 48, 48), spacing=(1.5, 1.5, 3.0))
TINY = dict(base_channels=4, discriminator_channels=4, importance_channels=8, batch_size=4, precision="fp32",
            device="cpu", learning_rate=1e-3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("resilience"), 6, seed=5, **PHANTOM)


def tensors(value=1.0):
    return {"a": torch.full((3, 2), value), "b": torch.arange(4, dtype=torch.float32)}


def test_checkpoint_round_trip_and_previous_kept(tmp_path):
    path = tmp_path / "m.checkpoint.safetensors"
    save_checkpoint(path, tensors(1.0), {"epoch": 1})
    save_checkpoint(path, tensors(2.0), {"epoch": 2})
    loaded, meta = read_checkpoint(path)
    assert meta == {"epoch": 2} and torch.equal(loaded["a"], tensors(2.0)["a"])
    assert read_checkpoint(previous_path(path))[1] == {"epoch": 1}


def test_the_newest_checkpoint_exists_at_every_moment_of_a_save(tmp_path, monkeypatch):
    """A kill while the next checkpoint is being written must not leave only the previous one behind."""
    path = tmp_path / "m.checkpoint.safetensors"
    save_checkpoint(path, tensors(1.0), {"epoch": 1})
    seen = []
    real_replace = os.replace

    def watching_replace(source, target):
        seen.append((Path(target).name, path.is_file()))  # is the newest checkpoint there just before each rename?
        if Path(target) == path:
            raise KeyboardInterrupt  # killed at the last moment, with the new data fully written
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", watching_replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, tensors(2.0), {"epoch": 2})
    monkeypatch.undo()
    assert seen and all(present for _, present in seen)
    assert read_checkpoint(path)[1] == {"epoch": 1} and read_checkpoint(previous_path(path))[1] == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, previous_path(path).name])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "checksum", "metadata"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    path = tmp_path / "m.checkpoint.safetensors"
    save_checkpoint(path, tensors(1.0), {"epoch": 1})
    save_checkpoint(path, tensors(2.0), {"epoch": 2})
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(data)))
    else:  # a well-formed file whose tensors or metadata no longer match the checksum it carries
        with safetensors.safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        if damage == "metadata":
            metadata["isdnet-checkpoint"] = json.dumps({"epoch": 7})
        safetensors.torch.save_file(tensors(9.0 if damage == "checksum" else 2.0), str(path), metadata=metadata)
    with pytest.raises(InputError, match="checksum" if damage in ("checksum", "metadata") else "not a complete"):
        read_checkpoint(path)
    reports = []
    loaded, meta, used = load_latest(path, report=reports.append)
    assert meta == {"epoch": 1} and used == previous_path(path)
    assert reports and path.name in reports[0]


def test_missing_checkpoint_says_so(tmp_path):
    with pytest.raises(InputError, match="no checkpoint to resume from"):
        load_latest(tmp_path / "m.checkpoint.safetensors")


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    path = tmp_path / "m.checkpoint.safetensors"
    with pytest.raises(ValueError, match="non-finite"):
        save_checkpoint(path, {"a": torch.tensor([1.0, float("nan")])}, {})
    assert not path.exists()


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old contents")

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(InputError, match="No space left on device") as error:
        write_atomically(path, b"new contents")
    assert str(path) in str(error.value)
    assert path.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def _writer_killed_mid_write(target: Path) -> subprocess.Popen:
    """A child process writing ``target`` with write_image_atomically, stopped mid-write (ITK's write made slow)."""
    code = ("import sys, time, SimpleITK as sitk\n"
            "from isdnet import files\n"
            "def slow(image, name, useCompression=True):\n"
            "    open(name, 'wb').write(b'half of a volume')\n"
            "    print('writing', flush=True)\n"
            "    time.sleep(120)\n"
            "sitk.WriteImage = slow\n"
            "files.write_image_atomically(sitk.Image(4, 4, 4, sitk.sitkUInt8), sys.argv[1])\n")
    writer = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert writer.stdout.readline().strip() == "writing"
    return writer


def test_a_killed_writers_temporary_is_removed_and_a_live_writers_is_not(tmp_path):
    """kill -9 mid-write leaves a temporary among the outputs: evaluate ignores it, the next write removes it,
    and no write ever removes the temporary of a writer still at work."""
    from isdnet.metrics import evaluate_folders

    out = tmp_path / "out"
    out.mkdir()
    label = sitk.Image(4, 4, 4, sitk.sitkUInt8)
    label[1, 1, 1] = 1
    sitk.WriteImage(label, str(out / "done.nii.gz"))
    writer = _writer_killed_mid_write(out / "big.nii.gz")
    try:
        (temporary,) = [p for p in out.iterdir() if p.name.startswith(".big.nii.gz.")]
        remove_stale_temporaries(out / "big.nii.gz")
        assert temporary.exists(), "the temporary of a live writer was deleted"
    finally:
        writer.kill()
        writer.wait()
    assert temporary.exists() and temporary.name.endswith(".nii.gz")
    assert [c["name"] for c in evaluate_folders(out, out)["cases"]] == ["done"]  # the leftover is no prediction
    write_image_atomically(label, out / "big.nii.gz")
    assert sorted(p.name for p in out.iterdir()) == ["big.nii.gz", "done.nii.gz"]


def test_only_this_outputs_own_temporaries_are_ever_removed(tmp_path):
    """Other files that look like temporaries (a user's .m-notes.tmp, another model's checkpoint mid-write, the
    old naming) are never deleted, by the lock or by a write."""
    others = [".mynotes.tmp", ".m2.safetensors.abcd1234.tmp", ".m.safetensors.x.tmp", ".m2.safetensors.0123456789ab"
              ".isdnet-tmp", ".m.safetensors.0123456789ab.isdnet-tmp.gz.tar.bz"]
    for name in others:
        (tmp_path / name).write_bytes(b"keep me")
    abandoned = tmp_path / ".m.safetensors.0123456789ab.isdnet-tmp"
    abandoned.write_bytes(b"left by a killed writer")
    with OutputLock(tmp_path / "m.safetensors"):
        write_atomically(tmp_path / "m.safetensors", b"model")
    assert not abandoned.exists()
    assert all((tmp_path / name).read_bytes() == b"keep me" for name in others)


def test_two_trainings_cannot_write_the_same_output(tmp_path):
    out = tmp_path / "model.safetensors"
    with OutputLock(out):
        with pytest.raises(TrainingError, match="another training is writing this model"):
            with OutputLock(out):
                pass
    with OutputLock(out):  # released again
        pass


def test_non_finite_loss_discards_the_update():
    trainer = Trainer(TrainConfig(method="isdnet", **TINY), 3, torch.device("cpu"), torch.float32)
    before = {k: v.clone() for k, v in trainer.state_tensors().items()}
    x = torch.randn(2, 1, 32, 32)
    x[0, 0, 3, 3] = float("nan")
    losses = trainer.train_step(x, torch.zeros(2, 32, 32, dtype=torch.long), torch.randn(2, 1, 32, 32))
    assert losses["discarded"] >= 1
    assert trainer.weights_are_finite()
    after = trainer.state_tensors()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("net.S."))


class StopAt(Progress):
    """Progress that sends this process SIGTERM at a given (epoch, iteration), like the Slicer module's Stop."""

    def __init__(self, stream, at):
        super().__init__(json_lines=True, stream=stream)
        self.at = at

    def emit(self, event, **fields):
        super().emit(event, **fields)
        if event == "iteration" and (fields["epoch"], fields["iteration"]) == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def epoch_losses(events):
    return [(e["epoch"], e["losses"]) for e in events if e["event"] == "epoch"]


@pytest.mark.slow
def test_stop_mid_epoch_then_resume_equals_an_uninterrupted_run(dataset, tmp_path):
    spec = load_dataset(dataset)
    labeled, unlabeled = spec.cases[:3], spec.cases[3:]
    config = TrainConfig(method="isdnet", epochs=3, steps_per_epoch=4, warmup_epochs=1, seed=2, **TINY)
    straight = Progress(json_lines=True, stream=open(tmp_path / "straight.log", "w", encoding="utf-8"))
    train(labeled, unlabeled, spec.labels, tmp_path / "a.safetensors", config, progress=straight)

    out = tmp_path / "b.safetensors"
    stopping = StopAt(open(tmp_path / "stop.log", "w", encoding="utf-8"), at=(2, 2))
    first = train(labeled, unlabeled, spec.labels, out, config, progress=stopping)
    assert first.stopped and first.epochs_run == 1
    assert any(e["event"] == "stopped" for e in stopping.events)
    resumed = Progress(json_lines=True, stream=open(tmp_path / "resumed.log", "w", encoding="utf-8"))
    second = train(labeled, unlabeled, spec.labels, out, config, progress=resumed, resume=True)
    assert not second.stopped and second.epochs_run == 3
    start = next(e for e in resumed.events if e["event"] == "start")
    assert (start["start_epoch"], start["start_iteration"]) == (2, 3)

    expected = epoch_losses(straight.events)
    got = epoch_losses(stopping.events) + epoch_losses(resumed.events)
    assert [e for e, _ in got] == [1, 2, 3]
    for (_, a), (_, b) in zip(expected, got):
        assert a.keys() == b.keys()
        assert all(a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6) for k in a)
    wa = load_model(tmp_path / "a.safetensors").segmenter.state_dict()
    wb = load_model(out).segmenter.state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def kill_at_a_random_point(process: subprocess.Popen, rng: random.Random) -> bool:
    """Kill a training process during start-up or a little after one of its first progress events.

    Kill points are tied to progress rather than to the clock, so that each killed run advances at most a couple
    of epochs on any machine, and twenty kills always land before the run can finish.
    """
    events_to_wait = rng.randrange(-1, 4)
    if events_to_wait < 0:
        time.sleep(rng.uniform(0.2, 2.5))  # during imports, data loading or the lock
    else:
        for _ in range(events_to_wait + 1):
            if not process.stdout.readline():
                break
        time.sleep(rng.uniform(0.0, 0.1))  # inside a step, a checkpoint write or a model write
    if process.poll() is not None:
        return False
    process.kill()
    return True


@pytest.mark.slow
def test_sigkill_at_random_points_twenty_times_then_the_run_completes(dataset, tmp_path):
    """Fault injection: kill the training process 20 times at random moments, resume each time."""
    out = tmp_path / "model.safetensors"
    epochs = 40
    base = [sys.executable, "-m", "isdnet", "train", str(dataset), "--out", str(out), "--labeled-fraction", "0.5",
            "--epochs", str(epochs), "--steps-per-epoch", "2", "--warmup-epochs", "2", "--base-channels", "4",
            "--batch-size", "4", "--precision", "fp32", "--device", "cpu", "--seed", "1", "--progress-json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rng = random.Random(7)
    kills = 0
    for _ in range(60):
        resumable = checkpoint_path(out).exists() or previous_path(checkpoint_path(out)).exists()
        command = base + (["--resume"] if resumable else [])
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                                   encoding="utf-8")
        if kills < 20:
            kills += kill_at_a_random_point(process, rng)
            process.communicate()
            if out.exists():  # whenever a model exists, it is complete and valid
                load_model(out)
            continue
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-2000:]
        events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        assert events[-1]["event"] == "done"
        break
    assert kills == 20
    model = load_model(out)
    assert model.header["provenance"]["method"] == "isdnet"
    state = read_checkpoint(checkpoint_path(out))[1]["state"]
    assert state["epoch"] == epochs and [h["epoch"] for h in state["history"]] == list(range(1, epochs + 1))
    assert not list(tmp_path.glob(f".*{TEMPORARY_MARKER}*"))


def test_a_stop_pressed_while_training_starts_is_honoured_and_an_old_one_is_not(tmp_path):
    """The stop file may appear before the trainer has imported torch (Stop right after Start): it is honoured.
    One older than the trainer's process was left by a killed run and is removed, so it cannot stop a new run."""
    from isdnet.stopping import StopRequest

    fresh = tmp_path / "fresh.stop"
    fresh.touch()
    assert StopRequest(fresh).requested and fresh.exists()
    stale = tmp_path / "stale.stop"
    stale.touch()
    started = psutil.Process().create_time()
    os.utime(stale, (started - 60, started - 60))
    request = StopRequest(stale)
    assert not request.requested and not stale.exists()
