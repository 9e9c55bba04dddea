"""The engine end to end on phantoms: training that learns, resume, inference geometry, the CLI, bad input."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from isdnet.cli import main
from isdnet.config import TrainConfig, checkpoint_path
from isdnet.dataset import load_dataset, split_labeled
from isdnet.errors import InputError, ModelFileError
from isdnet.infer import segment
from isdnet.modelfile import load_model
from isdnet.modelheader import read_header
from isdnet.networks import ConfidenceNet, ImageConditionedConfidenceNet, register
from isdnet.phantoms import write_phantom_dataset
from isdnet.progress import Progress
from isdnet.train import train

HIPPOCAMPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"
PHANTOM = dict(shape=(12, 48, 48), spacing=(1.5, 1.5, 3.0))
SMALL = dict(base_channels=8, discriminator_channels=8, importance_channels=16, batch_size=8,
             learning_rate=3e-3, precision="fp32", device="cpu")


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), 10, seed=3, **PHANTOM)


@pytest.fixture(scope="session")
def trained(phantoms, tmp_path_factory):
    """An ISDNet model (width 16) trained on 4 labeled + 4 unlabeled phantoms; 2 held out for testing."""
    spec = load_dataset(phantoms)
    labeled, unlabeled = split_labeled(spec.cases[:8], 0.5, seed=0)
    out = tmp_path_factory.mktemp("model") / "model.safetensors"
    progress = Progress(json_lines=True, stream=open(out.with_suffix(".log"), "w", encoding="utf-8"))
    config = TrainConfig(method="isdnet", epochs=12, warmup_epochs=3, steps_per_epoch=10,
                         **{**SMALL, "base_channels": 16, "learning_rate": 2e-3})
    result = train(labeled, unlabeled, spec.labels, out, config, progress=progress)
    return result, progress.events, spec


@pytest.mark.slow
def test_isdnet_training_learns_the_phantoms(trained):
    result, events, _ = trained
    epochs = [e for e in events if e["event"] == "epoch"]
    assert len(epochs) == 12
    assert epochs[0]["val_dice"] < result.best_val_dice
    assert result.best_val_dice > 0.6, f"validation Dice only {result.best_val_dice:.3f}"
    # the semi-supervised phase ran after the warm-up, with importance weights in (0, 1)
    semi = [e for e in epochs if "semi" in e["losses"]]
    assert [e["epoch"] for e in semi] == list(range(4, 13))
    assert all(0 < e["losses"]["w_mean"] < 1 for e in semi)
    header = read_header(result.model)
    assert header["provenance"]["method"] == "isdnet"
    assert header["provenance"]["validation"]["dice"] == pytest.approx(result.best_val_dice)
    assert [c["name"] for c in header["classes"]] == ["background", "organ", "lesion"]


@pytest.mark.slow
def test_segment_held_out_phantoms(trained):
    result, _, spec = trained
    model = load_model(result.model)
    for case in spec.cases[8:]:
        out = segment(case.image, model, confidence=True, device="cpu")
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
        pred = sitk.GetArrayFromImage(out.labels)
        organ, lesion = (2 * np.sum((pred == c) & (truth == c)) / (np.sum(pred == c) + np.sum(truth == c))
                         for c in (1, 2))
        assert organ > 0.75 and lesion > 0.6, (case.name, organ, lesion)
        conf = sitk.GetArrayFromImage(out.confidence)
        assert conf.min() >= 0 and conf.max() <= 1


@pytest.mark.slow
def test_baseline_method_runs_and_resume_continues_from_the_checkpoint(phantoms, tmp_path):
    spec = load_dataset(phantoms)
    out = tmp_path / "base.safetensors"
    config = TrainConfig(method="baseline", epochs=2, steps_per_epoch=3, seed=1, **SMALL)
    first = Progress(json_lines=True, stream=open(tmp_path / "a.log", "w", encoding="utf-8"))
    train(spec.cases[:4], [], spec.labels, out, config, progress=first)
    assert checkpoint_path(out).exists()
    config.epochs = 3
    again = Progress(json_lines=True, stream=open(tmp_path / "b.log", "w", encoding="utf-8"))
    result = train(spec.cases[:4], [], spec.labels, out, config, progress=again, resume=True)
    start = next(e for e in again.events if e["event"] == "start")
    assert start["start_epoch"] == 3
    assert [e["epoch"] for e in again.events if e["event"] == "epoch"] == [3]
    assert result.epochs_run == 3 and len(result.history) == 3


@pytest.mark.slow
def test_a_step_budget_sets_whole_epochs_and_the_final_model_is_kept(phantoms, tmp_path):
    spec = load_dataset(phantoms)
    out, best = tmp_path / "final.safetensors", tmp_path / "best.safetensors"
    # 3 training cases of 12 slices at batch 8: 5 steps a pass; 12 steps round to 2 passes
    config = TrainConfig(method="baseline", total_steps=12, validation_fraction=0.25, model_selection="final",
                         lr_schedule="poly", seed=1, **SMALL)
    result = train(spec.cases[:4], [], spec.labels, out, config, best_out=best)
    assert (result.epochs_run, result.steps_per_epoch) == (2, 5)
    final, kept_best = read_header(out)["provenance"], read_header(best)["provenance"]
    assert final["validation"]["epoch"] == 2, "the final model is the last epoch's"
    assert kept_best["validation"]["epoch"] == result.best_epoch
    assert kept_best["validation"]["dice"] == pytest.approx(result.best_val_dice)


@register
class WideConfidenceNet(ConfidenceNet):
    """A discriminator added the way a user would: one subclass, one registration."""

    @classmethod
    def from_config(cls, config, channels):
        return cls(channels, 2 * config.discriminator_channels, config.discriminator_stride)


@pytest.mark.slow
@pytest.mark.parametrize("network, width", [(WideConfidenceNet, 16), (ImageConditionedConfidenceNet, 8)])
def test_a_registered_discriminator_is_trained_saved_and_gives_confidence_maps(phantoms, tmp_path, network, width):
    spec = load_dataset(phantoms)
    out = tmp_path / "custom.safetensors"
    config = TrainConfig(method="isdnet", discriminator=network.__name__, epochs=2, warmup_epochs=1,
                         steps_per_epoch=3, **SMALL)
    train(spec.cases[:2], spec.cases[2:4], spec.labels, out, config)
    model = load_model(out)
    assert type(model.confidence) is network and model.confidence.config["base_channels"] == width
    assert read_header(out)["architecture"]["confidence"]["name"] == network.__name__
    assert main(["segment", str(spec.cases[9].image), "--model", str(out), "--out", str(tmp_path / "seg"),
                 "--confidence", "--device", "cpu"]) == 0
    written = tmp_path / "seg" / f"{spec.cases[9].name}_confidence.nii.gz"
    confidence = sitk.GetArrayFromImage(sitk.ReadImage(str(written)))
    assert 0 <= confidence.min() and confidence.max() <= 1
    with pytest.raises(ValueError, match="unknown network 'NoSuchNet'"):
        train(spec.cases[:2], [], spec.labels, tmp_path / "x.safetensors", TrainConfig(discriminator="NoSuchNet",
                                                                                         **SMALL))


@pytest.mark.slow
def test_fine_tuning_starts_from_a_model_with_the_same_classes(trained, phantoms, tmp_path):
    result, _, spec = trained
    out = tmp_path / "tuned.safetensors"
    config = TrainConfig(method="isdnet", init_from=str(result.model), epochs=1, steps_per_epoch=1,
                         warmup_epochs=0, **{**SMALL, "base_channels": 16, "learning_rate": 1e-12})
    train(spec.cases[:2], spec.cases[2:4], spec.labels, out, config)
    start, tuned = load_model(result.model), load_model(out)
    assert tuned.header["geometry"] == start.header["geometry"], "the model's slice geometry is kept"
    for net in ("segmenter", "confidence"):
        before, after = getattr(start, net).state_dict(), getattr(tuned, net).state_dict()
        assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before), f"{net} did not start there"
    other = {**spec.labels, 2: "tumour"}
    with pytest.raises(InputError, match="2: 'lesion' in the model, 'tumour' in the data"):
        train(spec.cases[:2], [], other, tmp_path / "x.safetensors", config)
    with pytest.raises(ModelFileError, match="base-channels"):
        train(spec.cases[:2], [], spec.labels, tmp_path / "y.safetensors",
              TrainConfig(method="baseline", init_from=str(result.model), epochs=1, **SMALL))


def oblique_volume(seed=0):
    """A phantom resampled onto an anisotropic, shifted, obliquely rotated grid."""
    image, label = write_phantom_pair(seed)
    rotation = sitk.VersorTransform((0.3, 0.2, 0.9), 0.35)
    direction = np.array(rotation.GetMatrix()).reshape(3, 3) @ np.diag([-1, 1, 1])
    reference = sitk.Image([40, 44, 14], sitk.sitkFloat32)
    reference.SetSpacing((1.3, 1.1, 3.4))
    reference.SetOrigin((-31.5, 12.25, 7.0))
    reference.SetDirection(direction.flatten().tolist())
    centre = reference.TransformContinuousIndexToPhysicalPoint([s / 2 for s in reference.GetSize()])
    source_centre = image.TransformContinuousIndexToPhysicalPoint([s / 2 for s in image.GetSize()])
    shift = sitk.TranslationTransform(3, [a - b for a, b in zip(source_centre, centre)])
    return sitk.Resample(image, reference, shift, sitk.sitkLinear, 0.0, sitk.sitkInt16), reference


def write_phantom_pair(seed):
    from isdnet.phantoms import make_phantom

    return make_phantom(seed, shape=PHANTOM["shape"], spacing=PHANTOM["spacing"])


@pytest.mark.slow
def test_segment_returns_labels_on_exactly_the_input_grid(trained):
    result, _, _ = trained
    image, reference = oblique_volume()
    out = segment(image, result.model, confidence=True, probabilities=True, device="cpu")
    for output in (out.labels, out.confidence, out.probabilities):
        assert output.GetSize() == image.GetSize()
        assert output.GetSpacing() == image.GetSpacing()
        assert output.GetOrigin() == image.GetOrigin()
        assert output.GetDirection() == image.GetDirection()
    assert out.labels.GetPixelID() == sitk.sitkUInt8
    assert out.probabilities.GetNumberOfComponentsPerPixel() == 3
    probs = sitk.GetArrayFromImage(out.probabilities)
    assert np.allclose(probs.sum(-1), 1, atol=1e-4)
    assert np.array_equal(probs.argmax(-1), sitk.GetArrayFromImage(out.labels))


@pytest.mark.slow
def test_cli_segment_matches_library_and_writes_slicer_segmentations(trained, tmp_path):
    result, _, spec = trained
    case = spec.cases[9]
    assert main(["segment", "--model", str(result.model), str(case.image), "--out", str(tmp_path),
                 "--confidence", "--device", "cpu"]) == 0
    written = sitk.ReadImage(str(tmp_path / f"{case.name}.nii.gz"))
    library = segment(case.image, result.model, device="cpu").labels
    assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(library))
    seg = sitk.ReadImage(str(tmp_path / f"{case.name}.seg.nrrd"))
    assert seg.GetMetaData("Segment0_Name") == "organ"
    assert seg.GetMetaData("Segment1_Name") == "lesion"
    assert seg.GetMetaData("Segment1_LabelValue") == "2"
    assert (tmp_path / f"{case.name}_confidence.nii.gz").exists()

    metrics_file = tmp_path / "metrics.json"
    assert main(["evaluate", "--pred", str(tmp_path), "--truth", str(phantom_truth(spec, case, tmp_path)),
                 "--json", str(metrics_file)]) == 0
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    assert 0.5 < metrics["dice"] <= 1.0


def phantom_truth(spec, case, tmp_path):
    folder = tmp_path / "truth"
    folder.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(case.label)), str(folder / f"{case.name}.nii.gz"))
    return folder


@pytest.mark.slow
def test_cli_train_progress_json(phantoms, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    code = main(["train", str(phantoms), "--out", str(out), "--labeled-fraction", "0.5", "--epochs", "2",
                 "--steps-per-epoch", "2", "--warmup-epochs", "1", "--base-channels", "8", "--batch-size", "4",
                 "--device", "cpu", "--progress-json"])
    assert code == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert kinds.count("iteration") == 4 and kinds.count("epoch") == 2
    epoch = next(e for e in events if e["event"] == "epoch")
    assert {"epoch", "epochs", "losses", "val_dice", "eta_s"} <= set(epoch)
    assert math.isfinite(epoch["losses"]["dice"])
    assert load_model(out).header["provenance"]["labeled_cases"] + \
        load_model(out).header["provenance"]["validation_cases"] == 5


def test_cli_reports_bad_input_plainly_and_writes_nothing(tmp_path, capsys):
    data = write_phantom_dataset(tmp_path / "data", 2, seed=0, **PHANTOM)
    (data / "labelsTr" / "phantom_001.nii.gz").unlink()
    out = tmp_path / "model.safetensors"
    assert main(["train", str(data), "--out", str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "phantom_001.nii.gz" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["segment", "--model", str(tmp_path / "missing.safetensors"), str(data / "imagesTr" / "x.nii.gz"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_handles_spaces_and_non_ascii_paths_and_stops_at_a_bad_input(trained, tmp_path, capsys):
    result, _, spec = trained
    folder = tmp_path / "Patienten Müller – 東京"
    folder.mkdir()
    good = folder / "scan ü 1.nii.gz"
    good.write_bytes(spec.cases[9].image.read_bytes())
    bad = folder / "scan ü 2.nii.gz"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    inputs = {p: p.read_bytes() for p in (good, bad)}
    out = tmp_path / "Ergebnisse ø"
    assert main(["segment", "--model", str(result.model), str(good), str(bad), "--out", str(out),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "scan ü 2.nii.gz" in err and "truncated" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["scan ü 1.nii.gz", "scan ü 1.seg.nrrd"]  # no temporaries
    written = sitk.ReadImage(str(out / "scan ü 1.nii.gz"))
    assert written.GetSize() == sitk.ReadImage(str(good)).GetSize()
    assert {p: p.read_bytes() for p in inputs} == inputs


def test_failed_segmentation_write_leaves_no_partial_files(trained, tmp_path, monkeypatch):
    from isdnet.errors import InputError
    from isdnet.outputs import write_segmentation

    result, _, spec = trained
    segmentation = segment(spec.cases[9].image, result.model, device="cpu")
    calls = []
    real_write = sitk.WriteImage

    def failing_second_write(image, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            real_write(image, path, *args, **kwargs)  # the .seg.nrrd is half done when the disk fills up
            raise RuntimeError("itk::ERROR: No space left on device")
        real_write(image, path, *args, **kwargs)

    monkeypatch.setattr(sitk, "WriteImage", failing_second_write)
    with pytest.raises(InputError, match="cannot write the segmentation of case: .*No space left on device"):
        write_segmentation(segmentation, load_model(result.model).header, tmp_path, "case")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(not HIPPOCAMPUS.exists(), reason="../shared/data/hippocampus is not present")
def test_cli_on_real_hippocampus_cases(tmp_path):
    names = ["hippocampus_001", "hippocampus_003", "hippocampus_004"]
    images = [str(HIPPOCAMPUS / "imagesTr" / f"{n}.nii.gz") for n in names]
    labels = [str(HIPPOCAMPUS / "labelsTr" / f"{n}.nii.gz") for n in names]
    out = tmp_path / "hippo.safetensors"
    assert main(["train", "--images", *images, "--labels", *labels, "--label-names", "background", "Anterior",
                 "Posterior", "--out", str(out), "--method", "baseline", "--epochs", "1", "--steps-per-epoch", "2",
                 "--base-channels", "8", "--device", "cpu"]) == 0
    assert main(["segment", "--model", str(out), images[0], "--out", str(tmp_path / "seg"), "--device", "cpu"]) == 0
    pred = sitk.ReadImage(str(tmp_path / "seg" / f"{names[0]}.nii.gz"))
    image = sitk.ReadImage(images[0])
    assert pred.GetSize() == image.GetSize() and pred.GetOrigin() == image.GetOrigin()
    assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2}


@pytest.mark.slow
def test_demo_writes_every_output(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    for name in ("model.safetensors", "demo.png", "metrics.json"):
        assert (tmp_path / name).exists() and str(tmp_path / name) in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert 0.0 <= metrics["dice"] <= 1.0 and len(metrics["cases"]) == 4
    segs = sorted(p.name for p in (tmp_path / "segmentations").glob("*.seg.nrrd"))
    assert len(segs) == 4
