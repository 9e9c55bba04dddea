"""ISDNetTrain's logic on slicer-core: dataset export, progress parsing, and training with a real child process.

One file (about 480 lines) because every test shares the scene fixture and the launcher-like wrapper below.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer_fixture as fx

from isdnet.config import checkpoint_path, log_path, stop_path
from ISDNetLib.export import ExportJob, export_dataset
from ISDNetLib.jobs import TrainingOptions, dataset_folder_for, default_model_path, would_overwrite
from ISDNetLib.train import TrainLogic
from ISDNetLib.volumes import NodeError, ijk_to_ras


@pytest.fixture
def mrml():
    return fx.make_scene()


def ras_matrix_from_itk(image: sitk.Image) -> np.ndarray:
    """The IJK-to-RAS matrix that an ITK image's LPS geometry stands for."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    matrix = np.eye(4)
    flip = np.diag([-1.0, -1.0, 1.0])
    matrix[:3, :3] = flip @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = flip @ np.array(image.GetOrigin())
    return matrix


def labeled_scene(scene, count: int = 2, unlabeled: int = 1, shape=(12, 32, 32)):
    """Volumes of differing geometry and scalar type, the first ``count`` with segmentations."""
    geometries = [((0.8, 0.8, 2.5), (10.0, -20.0, 35.0), fx.rotation(25, 2) @ fx.rotation(10, 0), np.int16),
                  ((1.1, 0.7, 3.0), (-5.0, 4.0, -12.0), fx.rotation(-15, 1), np.float32),
                  ((0.9, 0.9, 2.0), (0.0, 0.0, 0.0), np.eye(3), np.uint16),
                  ((0.6, 0.8, 1.5), (1.0, 2.0, 3.0), fx.rotation(40, 0), np.int16)]
    pairs, others = [], []
    for n in range(count + unlabeled):
        spacing, origin, directions, dtype = geometries[n % len(geometries)]
        image, labels = fx.phantom(shape, seed=n, dtype=dtype)
        volume = fx.add_volume(scene, image, f"case {n}", spacing, origin, directions)
        if n < count:
            pairs.append((volume, fx.add_segmentation(scene, volume, labels, fx.ORGAN_NAMES, fx.ORGAN_COLORS)))
        else:
            others.append(volume)
    return pairs, others


def test_export_keeps_voxels_and_geometry(mrml, tmp_path):
    import slicer.util

    pairs, unlabeled = labeled_scene(mrml.scene, count=2, unlabeled=1)
    nodes_before = mrml.scene.GetNumberOfNodes()
    exported = export_dataset(mrml.scene, pairs, unlabeled, tmp_path / "ds")
    assert mrml.scene.GetNumberOfNodes() == nodes_before, "temporary nodes are left in the scene"
    assert pairs[0][0].GetStorageNode() is None, "export must not change the volume's own storage node"

    spec = json.loads((tmp_path / "ds" / "dataset.json").read_text(encoding="utf-8"))
    assert spec["labels"] == {"0": "background", "1": "liver", "2": "tumor"}
    assert spec["colors"] == {"1": [230, 153, 102], "2": [51, 204, 76]}
    assert exported.labeled_cases == ["case_0", "case_1"] and exported.unlabeled_cases == ["case_2"]
    assert spec["numTraining"] == 2 and spec["file_ending"] == ".nii.gz"
    assert spec["training"][1] == {"image": "./imagesTr/case_1.nii.gz", "label": "./labelsTr/case_1.nii.gz"}
    assert spec["unlabeled"] == ["./imagesUnl/case_2.nii.gz"]

    entries = [(v, spec["training"][i]["image"], spec["training"][i]["label"]) for i, (v, _) in enumerate(pairs)]
    entries.append((unlabeled[0], spec["unlabeled"][0], None))
    for index, (volume, image_file, label_file) in enumerate(entries):
        image = sitk.ReadImage(str(tmp_path / "ds" / image_file))
        voxels = slicer.util.arrayFromVolume(volume)
        assert sitk.GetArrayViewFromImage(image).dtype == voxels.dtype
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), voxels)
        np.testing.assert_allclose(ras_matrix_from_itk(image), ijk_to_ras(volume), atol=1e-4)
        if label_file is None:
            continue
        labels = sitk.ReadImage(str(tmp_path / "ds" / label_file))
        assert labels.GetPixelID() == sitk.sitkUInt8
        assert labels.GetSize() == image.GetSize()
        np.testing.assert_allclose(ras_matrix_from_itk(labels), ijk_to_ras(volume), atol=1e-4)
        _, expected = fx.phantom(voxels.shape, seed=index)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(labels), expected)


def test_export_job_goes_a_volume_a_step_and_cancel_removes_what_it_wrote(mrml, tmp_path):
    pairs, unlabeled = labeled_scene(mrml.scene, count=2, unlabeled=1)
    job = ExportJob(mrml.scene, pairs, unlabeled, tmp_path / "ds")
    fractions = []
    while not job.step():
        fractions.append(job.fraction)
        assert not (tmp_path / "ds" / "dataset.json").exists(), "the description comes last"
    assert fractions == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert job.result.labeled_cases == ["case_0", "case_1"] and (tmp_path / "ds" / "dataset.json").is_file()
    assert len(list((tmp_path / "ds").rglob("*.nii.gz"))) == 5

    cancelled = ExportJob(mrml.scene, pairs, unlabeled, tmp_path / "other")
    cancelled.step()
    cancelled.cancel()
    assert cancelled.step() and cancelled.result is None
    assert not list((tmp_path / "other").rglob("*.nii.gz")) and not (tmp_path / "other" / "dataset.json").exists()


def test_export_orders_classes_by_the_first_segmentation(mrml, tmp_path):
    scene = mrml.scene
    image, labels = fx.phantom(seed=0)
    first = fx.add_volume(scene, image, "a")
    seg_a = fx.add_segmentation(scene, first, labels, ("liver", "tumor"), fx.ORGAN_COLORS)
    second = fx.add_volume(scene, image, "b")
    swapped = np.where(labels == 1, 2, np.where(labels == 2, 1, 0)).astype(np.uint8)
    seg_b = fx.add_segmentation(scene, second, swapped, ("tumor", "liver"), fx.ORGAN_COLORS[::-1])
    export_dataset(scene, [(first, seg_a), (second, seg_b)], [], tmp_path)
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labelsTr" / "a.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labelsTr" / "b.nii.gz")))
    np.testing.assert_array_equal(a, b)


def test_mismatched_segment_names_are_reported(mrml, tmp_path):
    scene = mrml.scene
    image, labels = fx.phantom()
    first = fx.add_volume(scene, image, "first")
    seg_a = fx.add_segmentation(scene, first, labels, ("liver", "tumor"), fx.ORGAN_COLORS)
    second = fx.add_volume(scene, image, "second")
    seg_b = fx.add_segmentation(scene, second, labels, ("liver", "lesion"), fx.ORGAN_COLORS)
    with pytest.raises(NodeError, match=r"second: .*missing 'tumor'.*not in the others 'lesion'"):
        export_dataset(scene, [(first, seg_a), (second, seg_b)], [], tmp_path / "ds")
    assert not (tmp_path / "ds").exists(), "nothing may be written when the check fails"


def test_empty_segmentation_and_volume_without_voxels_are_reported(mrml, tmp_path):
    scene = mrml.scene
    image, labels = fx.phantom()
    volume = fx.add_volume(scene, image, "ct")
    no_segments = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing")
    with pytest.raises(NodeError, match="nothing: the segmentation of 'ct' has no segments"):
        export_dataset(scene, [(volume, no_segments)], [], tmp_path)
    empty = fx.add_segmentation(scene, volume, np.zeros_like(labels), fx.ORGAN_NAMES, fx.ORGAN_COLORS, "blank")
    with pytest.raises(NodeError, match="blank: the segmentation is empty inside 'ct'"):
        export_dataset(scene, [(volume, empty)], [], tmp_path)
    with pytest.raises(ValueError, match="at least one labeled volume"):
        export_dataset(scene, [], [volume], tmp_path)
    hollow = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "hollow")
    seg = fx.add_segmentation(scene, volume, labels, fx.ORGAN_NAMES, fx.ORGAN_COLORS)
    with pytest.raises(NodeError, match="hollow: the volume has no image data"):
        export_dataset(scene, [(volume, seg)], [hollow], tmp_path)


FAKE_TRAINING = r'''
import json, os, subprocess, sys, time
def emit(**event):
    print(json.dumps(event), flush=True)
mode = sys.argv[1]
if mode == "ok":
    emit(event="start", epochs=2, iterations_per_epoch=2, start_epoch=1, device="cpu")
    print("plain log text", flush=True)
    for epoch in (1, 2):
        for it in (1, 2):
            emit(event="iteration", epoch=epoch, iteration=it, iterations=2, losses={"dice": 0.5}, eta_s=3.0)
        emit(event="epoch", epoch=epoch, epochs=2, losses={"dice": 0.5 / epoch, "adv": 0.7, "d": 1.3},
             val_dice=0.4 * epoch, best_val_dice=0.4 * epoch, eta_s=0.0, elapsed_s=1.0)
    emit(event="done", model="m.safetensors", best_val_dice=0.8)
elif mode == "slow":  # honours the stop file beside the model, as the engine does
    emit(event="start", epochs=1, iterations_per_epoch=1, start_epoch=1, device="cpu")
    stop = sys.argv[2][:-len(".safetensors")] + ".stop"
    for _ in range(30):
        time.sleep(0.1)
        if os.path.exists(stop):
            emit(event="stopped", epoch=1, iteration=1, message="training stopped; resume continues from here")
            sys.exit(0)
    with open(sys.argv[2], "w") as model:
        model.write("weights")
    print("model written after", 3, "s", flush=True)
    emit(event="done", model=sys.argv[2], best_val_dice=0.5)
elif mode == "converged":
    emit(event="start", epochs=9, iterations_per_epoch=1, start_epoch=1, device="cpu")
    emit(event="epoch", epoch=4, epochs=9, losses={"dice": 0.5}, val_dice=0.6, best_val_dice=0.7, eta_s=5.0,
         elapsed_s=1.0)
    note = "converged after 0.1 min at epoch 4: validation Dice has not improved for 3 epochs"
    emit(event="message", message=note)
    emit(event="done", model="m.safetensors", best_val_dice=0.7, best_epoch=1, reason="converged", message=note)
elif mode == "fail":
    print("loading the data", file=sys.stderr, flush=True)
    print("Traceback: something deep went wrong", file=sys.stderr, flush=True)
    emit(event="error", message="imagesTr/a.nii.gz: cannot be read")
    sys.exit(2)
elif mode == "crash":
    print("Segmentation fault in a library", file=sys.stderr, flush=True)
    os._exit(139)
else:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    emit(event="start", epochs=5, iterations_per_epoch=1, start_epoch=1, grandchild=child.pid)
    time.sleep(60)
'''


class FakeTrainLogic(TrainLogic):
    """TrainLogic whose child is a small script, to test the progress reading without the engine."""

    def __init__(self, scene, script: Path, mode: str):
        super().__init__(scene, python=sys.executable)
        self.script, self.mode = script, mode

    def command(self, dataset_folder, model_path, options, resume=False):
        return [sys.executable, str(self.script), self.mode, str(model_path)]


def run_fake(mrml, tmp_path, mode: str) -> FakeTrainLogic:
    script = tmp_path / "fake.py"
    script.write_text(FAKE_TRAINING, encoding="utf-8")
    (tmp_path / "dataset.json").write_text("{}", encoding="utf-8")
    logic = FakeTrainLogic(mrml.scene, script, mode)
    logic.start(tmp_path, tmp_path / "m.safetensors", TrainingOptions(dict(epochs=2)))
    return logic


def poll_until(logic, condition, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = logic.poll()
        if condition(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"timed out; status {logic.status}, log:\n" + "\n".join(logic.runner.log_tail(40)))


def test_progress_fills_status_and_plot_nodes(mrml, tmp_path):
    logic = run_fake(mrml, tmp_path, "ok")
    status = poll_until(logic, lambda s: s.state != "running", 30)
    assert status.state == "done", status.message
    assert status.fraction == 1.0 and status.best_val_dice == 0.8 and status.epoch == 2
    assert "best validation Dice 0.800" in status.message
    table = logic.table_node.GetTable()
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert columns == ["epoch", "dice", "adv", "d", "val_dice"]
    assert table.GetNumberOfRows() == 2
    assert table.GetValue(1, 1).ToDouble() == pytest.approx(0.25)
    assert table.GetValue(1, 4).ToDouble() == pytest.approx(0.8)
    chart = logic.chart_node
    assert chart.GetNumberOfPlotSeriesNodes() == 4
    series = chart.GetNthPlotSeriesNode(3)
    assert series.GetTableNodeID() == logic.table_node.GetID() and series.GetYColumnName() == "val_dice"
    assert (tmp_path / "m.log").read_text(encoding="utf-8").count("plain log text") == 1


def test_the_duration_is_estimated_from_the_scene_before_anything_is_exported(mrml, tmp_path):
    from isdnet.estimate import StepCost

    pairs, unlabeled = labeled_scene(mrml.scene, count=3, unlabeled=1, shape=(12, 32, 32))
    logic = TrainLogic(mrml.scene)
    options = TrainingOptions(dict(method="isdnet", epochs=10, batch_size=4, warmup_epochs=2,
                                   validation_fraction=0.34))
    nodes_before = mrml.scene.GetNumberOfNodes()
    # 12 slices per volume: 2 labeled volumes train (6 steps an epoch), 1 validates; 2 warm-up epochs at 1 s a
    # step, 8 at 2 s, and 12 validation slices an epoch at a third of 1 s per 4
    estimate = logic.estimate(pairs, unlabeled, options, StepCost(1.0, 2.0, measured=True))
    assert (estimate.steps_per_epoch, estimate.epochs) == (6, 10)
    assert estimate.seconds == pytest.approx(6 * (2 + 16) + 10)
    assert estimate.describe() == "about 118 s (10 epochs of 6 steps)"
    assert mrml.scene.GetNumberOfNodes() == nodes_before and not list(tmp_path.iterdir()), "nothing exported"
    without = logic.estimate(pairs, [], options, StepCost(1.0, 2.0, measured=True))
    assert without.seconds == pytest.approx(6 * 10 + 10), "no unlabeled volume: every epoch on labeled slices"
    guess = logic.estimate(pairs, unlabeled, TrainingOptions(dict(base_channels=8, patience=5)))
    assert not guess.measured and guess.may_end_sooner and guess.describe().endswith("from a reference CPU's speed)")
    with pytest.raises(ValueError, match="patience"):
        logic.estimate(pairs, unlabeled, TrainingOptions(dict(patience=0)))
    with pytest.raises(ValueError, match="at least one labeled volume"):
        logic.estimate([], unlabeled, options)


def test_a_training_that_converged_early_says_so_when_done(mrml, tmp_path):
    status = poll_until(run_fake(mrml, tmp_path, "converged"), lambda s: s.state != "running", 30)
    assert status.state == "done" and status.fraction == 1.0
    assert status.message == ("Training finished (best validation Dice 0.700). Ended before its planned epochs: "
                              "converged after 0.1 min at epoch 4: validation Dice has not improved for 3 epochs. "
                              "Model written to m.safetensors.")


def test_each_training_gets_its_own_folder_and_its_exported_images_can_be_deleted(mrml, tmp_path):
    model = default_model_path(tmp_path, "Patient 7: T1 (axial)", datetime.datetime(2026, 12, 1, 9, 5, 7))
    assert model == tmp_path / "2026-12-01-090507-Patient_7_T1_axial" / "model.safetensors"
    assert not would_overwrite(model)
    pairs, unlabeled = labeled_scene(mrml.scene, count=1, unlabeled=1)
    export_dataset(mrml.scene, pairs, unlabeled, dataset_folder_for(model))
    script = tmp_path / "fake.py"
    script.write_text(FAKE_TRAINING, encoding="utf-8")
    logic = FakeTrainLogic(mrml.scene, script, "ok")
    logic.start(dataset_folder_for(model), model, TrainingOptions())
    assert poll_until(logic, lambda s: s.state != "running", 30).state == "done"
    assert TrainLogic(mrml.scene).exported_data(model) == model.parent / "dataset", "found again from the job file"
    model.write_text("weights", encoding="utf-8")
    assert would_overwrite(model)
    assert logic.delete_exported_data(model) == model.parent / "dataset"
    assert not (model.parent / "dataset").exists() and model.is_file(), "the images go, the model stays"
    assert logic.exported_data(model) is None and logic.delete_exported_data(model) is None


def test_status_text_while_running():
    from ISDNetLib.train import TrainingStatus

    status = TrainingStatus(state="running", epoch=3, epochs=10, iteration=5, iterations=10, eta_s=125)
    assert status.fraction == pytest.approx(0.25)
    assert status.describe() == "Epoch 3/10, iteration 5/10, 2m05s left"


@pytest.mark.parametrize("mode, reason", [("fail", "Training failed: imagesTr/a.nii.gz: cannot be read"),
                                          ("crash", "ended unexpectedly (exit status 139)")])
def test_failure_is_said_in_plain_words_with_the_log(mrml, tmp_path, mode, reason):
    logic = run_fake(mrml, tmp_path, mode)
    status = poll_until(logic, lambda s: s.state != "running", 30)
    assert status.state == "failed"
    assert reason in status.message
    assert "Last lines of the log:" in status.message
    assert ("Traceback: something deep went wrong" if mode == "fail" else "Segmentation fault") in status.message
    assert '{"event"' not in status.message


def test_stop_now_ends_the_whole_process_tree(mrml, tmp_path):
    import os

    logic = run_fake(mrml, tmp_path, "hang")
    grandchild = []
    deadline = time.monotonic() + 30
    while not grandchild and time.monotonic() < deadline:
        grandchild = [json.loads(line)["grandchild"] for line in logic.runner.poll() if "grandchild" in line]
        time.sleep(0.05)
    assert grandchild, "the fake training did not start"
    logic.stop_now()
    assert logic.status.state == "stopped" and not logic.is_running
    assert "no checkpoint to resume from" in logic.status.message
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild[0], 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the training's own child survived Stop")


def test_closing_the_application_stops_the_training_by_default(mrml, tmp_path):
    logic = run_fake(mrml, tmp_path, "slow")
    poll_until(logic, lambda s: s.epochs == 1, 30)
    message = logic.on_application_exit(keep_running=False)
    assert "stopped as the application closed" in message
    assert logic.status.state == "stopped" and not logic.is_running
    time.sleep(4)
    assert not (tmp_path / "m.safetensors").exists()
    assert logic.on_application_exit() is None  # nothing left to stop


def test_closing_the_application_can_leave_the_training_to_finish(mrml, tmp_path):
    logic = run_fake(mrml, tmp_path, "slow")
    poll_until(logic, lambda s: s.epochs == 1, 30)
    message = logic.on_application_exit(keep_running=True)
    assert logic.status.state == "detached" and not logic.is_running
    assert str(tmp_path / "m.safetensors") in message and str(tmp_path / "m.log") in message
    deadline = time.monotonic() + 30
    while not (tmp_path / "m.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "m.safetensors").read_text(encoding="utf-8") == "weights"
    time.sleep(0.5)
    assert "model written after 3 s" in (tmp_path / "m.log").read_text(encoding="utf-8")


def test_a_detached_training_outlives_its_parent_process(tmp_path):
    """The runner's child holds no pipe to the parent: it finishes and logs after the parent has exited."""
    script = tmp_path / "fake.py"
    script.write_text(FAKE_TRAINING, encoding="utf-8")
    model, log = tmp_path / "model weights.safetensors", tmp_path / "train.log"
    parent = (f"import sys; sys.path[:0] = {sys.path!r}\n"
              "from ISDNetLib.runner import ProcessRunner\n"
              "runner = ProcessRunner()\n"
              f"runner.start([sys.executable, {str(script)!r}, 'slow', {str(model)!r}], log_path={str(log)!r})\n"
              "print(runner.detach())\n")
    import subprocess

    done = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=60, encoding="utf-8")
    assert done.returncode == 0 and int(done.stdout) > 0, done.stderr
    assert not model.exists()  # the parent is gone and the child is still working
    deadline = time.monotonic() + 30
    while not model.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert model.read_text(encoding="utf-8") == "weights"
    time.sleep(0.5)
    text = log.read_text(encoding="utf-8")
    assert "[left running when the application closed]" in text and "model written after 3 s" in text


def test_options_become_the_engines_command_line():
    options = TrainingOptions(dict(method="hung", epochs=40, lambda_semi=0.5, augment=False, slice_size=[32, 48]),
                              ["--seed", "3"])
    assert options.arguments() == ["--method", "hung", "--lambda-semi", "0.5", "--no-augment", "--slice-size", "32",
                                   "48", "--seed", "3"], "defaults (40 epochs) are left to the engine"
    with pytest.raises(ValueError, match="t_semi must lie in"):
        TrainingOptions(dict(t_semi=1.5)).validate()
    with pytest.raises(ValueError, match="unknown training option"):
        TrainingOptions(dict(lambda_sem=1.0)).validate()


@pytest.mark.slow
def test_training_end_to_end_with_stop_and_resume(mrml, tmp_path):
    """The real ``python -m isdnet train`` on phantoms: progress, plots, stop mid-way, resume, a model file."""
    pairs, unlabeled = labeled_scene(mrml.scene, count=2, unlabeled=1)
    logic = TrainLogic(mrml.scene, python=sys.executable)
    logic.export_dataset(pairs, unlabeled, tmp_path / "ds")
    model = tmp_path / "model.safetensors"
    options = TrainingOptions(dict(epochs=2, warmup_epochs=1, **fx.TINY_TRAINING))
    logic.start(tmp_path / "ds", model, options)
    poll_until(logic, lambda s: s.state != "running" or (1 in logic.history and s.epoch >= 2), 300)
    assert logic.status.state == "running", logic.status.message
    logic.stop()
    assert logic.status.stopping and logic.status.describe() == "Stopping: saving checkpoint..."
    poll_until(logic, lambda s: s.state != "running", 300)
    assert logic.status.state == "stopped"
    assert checkpoint_path(model).is_file() and logic.can_resume()
    assert "Resume continues from the last checkpoint" in logic.status.message

    logic.resume()
    status = poll_until(logic, lambda s: s.state != "running", 300)
    assert status.state == "done", status.message
    assert model.is_file() and status.model_path == str(model)
    assert sorted(logic.history) == [1, 2]
    assert logic.table_node.GetTable().GetNumberOfRows() == 2
    names = [logic.chart_node.GetNthPlotSeriesNode(i).GetYColumnName()
             for i in range(logic.chart_node.GetNumberOfPlotSeriesNodes())]
    assert {"dice", "adv", "semi", "d", "d0", "val_dice"} <= set(names)
    log = log_path(model).read_text(encoding="utf-8")
    assert "--resume" in log and "training stopped; resume continues from here" in log


SLOW_TRAINING = ("import sys, time\n"
                 "import isdnet.trainer as t\n"
                 "step = t.Trainer.train_step\n"
                 "t.Trainer.train_step = lambda *a, **k: (time.sleep(6), step(*a, **k))[1]\n"
                 "from isdnet.cli import main\n"
                 "sys.exit(main(sys.argv[1:]))")
LAUNCHER = f"""#!{sys.executable}
# Like PythonSlicer (a CTKAppLauncher): runs the real Python as a child and exits at once on SIGTERM. Here the
# child's training steps take 6 s each, longer than any fixed grace period a runner could give.
import signal, subprocess, sys
args = sys.argv[1:]
if args[:2] == ["-m", "isdnet"]:
    args = ["-c", {SLOW_TRAINING!r}, *args[2:]]
child = subprocess.Popen([sys.executable, *args])
signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
sys.exit(child.wait())
"""


@pytest.mark.slow
def test_stop_through_a_launcher_keeps_the_work_however_slow_a_step(mrml, tmp_path):
    """Stop asks the training behind the launcher to stop (a stop file), waits for its checkpoint and never kills
    it: a stop mid-epoch 1 leaves a checkpoint, and the job file lets another logic (a restarted Slicer) resume."""
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(LAUNCHER, encoding="utf-8")
    launcher.chmod(0o755)
    pairs, unlabeled = labeled_scene(mrml.scene, count=2, unlabeled=1)
    logic = TrainLogic(mrml.scene, python=str(launcher))
    logic.export_dataset(pairs, unlabeled, tmp_path / "ds")
    model = tmp_path / "model.safetensors"
    options = TrainingOptions(dict(epochs=1, steps_per_epoch=4, warmup_epochs=0, **fx.TINY_TRAINING))
    logic.start(tmp_path / "ds", model, options)
    poll_until(logic, lambda s: s.state != "running" or s.iteration >= 1, 300)
    logic.stop()
    status = poll_until(logic, lambda s: s.state != "running", 120)
    assert status.state == "stopped", status.message
    assert checkpoint_path(model).is_file(), "the stopped training saved where it was, in its first epoch"
    assert not stop_path(model).exists()
    assert "[stopped by the user]" not in log_path(model).read_text(encoding="utf-8"), "nothing was killed"

    restarted = TrainLogic(mrml.scene, python=sys.executable)  # Slicer restarted: the job comes from its file
    assert restarted.can_resume(model)
    restarted.resume(model)
    status = poll_until(restarted, lambda s: s.state != "running", 300)
    assert status.state == "done", status.message
    assert model.is_file() and not restarted.can_resume()


def test_dependencies_install_only_what_is_missing(monkeypatch):
    """torch is only ever installed when absent (an installed CUDA build is never replaced); the rest by pip."""
    import importlib.metadata

    import ISDNetLib.dependencies as deps

    calls: list[str] = []
    fake = dict(confirm=lambda text: calls.append("asked") or True, status=calls.append,
                pip_install=lambda req: calls.append(f"pip {req}"),
                install_torch=lambda: calls.append("torch") or True)
    assert deps.check_dependencies().ready
    assert deps.ensure_dependencies(**fake) and calls == [], "nothing may be installed when all is there"

    real_version, real_find_spec = importlib.metadata.version, deps.importlib.util.find_spec

    def no_torch(name):
        if name == "torch":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(deps.importlib.metadata, "version", no_torch)
    monkeypatch.setattr(deps.importlib.util, "find_spec",
                        lambda name: None if name == "jsonschema" else real_find_spec(name))
    report = deps.check_dependencies()
    assert report.torch_version is None and report.missing == ["jsonschema>=4.0"]
    assert not deps.ensure_dependencies(**fake)  # still "missing" here, since the fakes install nothing
    assert calls[0] == "asked" and "torch" in calls and "pip jsonschema>=4.0" in calls
    assert not any("numpy" in c or "SimpleITK" in c or "vtk" in c for c in calls)

    calls.clear()
    declined = dict(fake, confirm=lambda text: False)
    assert not deps.ensure_dependencies(**declined)
    assert "torch" not in calls and not any(c.startswith("pip") for c in calls)
