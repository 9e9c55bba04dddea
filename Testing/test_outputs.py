"""What the CLI writes: never over an input or among the inputs, never two cases into one file, one plain line
where it cannot write, and every file with the user's umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from isdnet.checkpoint import save_checkpoint
from isdnet.cli import main
from isdnet.geometry import NORMALISATION
from isdnet.modelfile import make_header, save_model
from isdnet.networks import ConfidenceNet, SUNet
from isdnet.phantoms import write_phantom_dataset
from isdnet.uncertainty import analyse


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("outputs") / "ds", 2, seed=0, shape=(12, 32, 32))


def tiny_model(path: Path) -> Path:
    """An untrained tiny model with a confidence network: what it predicts does not matter here, only where and
    how its outputs are written."""
    torch.manual_seed(0)
    segmenter, confidence = SUNet(1, 3, base_channels=4, depth=2, groups=2), ConfidenceNet(3, base_channels=4)
    header = make_header(["background", "organ", "lesion"], dict(NORMALISATION),
                         {"slice_axis": "z", "spacing": [2.0, 2.0], "size": [16, 16]}, segmenter, confidence,
                         method="isdnet")
    return save_model(path, header, segmenter, confidence)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("model") / "m.safetensors")


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, *argv: str) -> str:
    """Run the command, which must fail with status 2 and one line of error; returns that line."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_segment_never_writes_over_or_beside_its_input(dataset, model, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    image = folder / "a.nii.gz"
    image.write_bytes((dataset / "imagesTr" / "phantom_000.nii.gz").read_bytes())
    before = contents(folder)
    for out in (folder, folder / ".." / "scans"):
        err = refused(capsys, "segment", "--model", str(model), str(image), "--out", str(out), "--device", "cpu")
        assert "a.nii.gz" in err and "apart from the inputs" in err
    assert contents(folder) == before


def test_train_never_writes_into_its_dataset(dataset, tmp_path, capsys):
    before = contents(dataset)
    label = dataset / "labelsTr" / "phantom_000.nii.gz"
    for out in (label, dataset / "labelsTr" / "x.nii.gz", dataset / "imagesTr" / "m.safetensors"):
        err = refused(capsys, "train", str(dataset), "--out", str(out), "--epochs", "1")
        assert str(out) in err and "apart from the inputs" in err
    refused(capsys, "train", "--images", str(dataset / "imagesTr" / "phantom_000.nii.gz"), "--labels", str(label),
            "--out", str(label.with_name("model.safetensors")), "--epochs", "1")
    assert contents(dataset) == before


def test_inputs_whose_outputs_would_collide_are_refused(dataset, model, tmp_path, capsys):
    source = (dataset / "imagesTr" / "phantom_000.nii.gz").read_bytes()
    pairs = (("a/case.nii.gz", "b/case.nii.gz"),  # the same case name from two folders
             ("a/case.nii.gz", "b/case_0000.nii.gz"),  # nnU-Net's channel suffix gives the same name
             ("a/case.nii.gz", "a/case_confidence.nii.gz"),  # one would pass for the other's confidence map
             ("a/case.nii.gz", "b/case_uncertainty.nii.gz"),  # ... or for its uncertainty map
             ("a/Case.nii.gz", "b/case.nii.gz"))  # one file on Windows and macOS
    for first, second in pairs:
        for name in (first, second):
            (tmp_path / name).parent.mkdir(exist_ok=True)
            (tmp_path / name).write_bytes(source)
        err = refused(capsys, "segment", "--model", str(model), str(tmp_path / first), str(tmp_path / second),
                      "--out", str(tmp_path / "out"), "--device", "cpu")
        assert second in err and first in err and "collide" in err
        assert not (tmp_path / "out").exists()


def test_segment_writes_the_uncertainty_map_beside_the_segmentation_on_the_inputs_grid(dataset, model, tmp_path,
                                                                                        capsys):
    image = sitk.ReadImage(str(dataset / "imagesTr" / "phantom_001.nii.gz"))
    image.SetSpacing((0.7, 1.3, 2.9))  # a grid of its own, oblique, for the map to come back to
    image.SetOrigin((4.0, -7.5, 12.0))
    image.SetDirection(sitk.VersorTransform((0.3, 0.1, 0.9), 0.4).GetMatrix())
    (tmp_path / "in").mkdir()
    sitk.WriteImage(image, str(tmp_path / "in" / "oblique.nii.gz"))
    for kind in ("entropy", "flip"):
        out = tmp_path / kind
        assert main(["segment", "--model", str(model), str(tmp_path / "in" / "oblique.nii.gz"), "--out", str(out),
                     "--uncertainty", kind, "--device", "cpu"]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["oblique.nii.gz", "oblique.seg.nrrd",
                                                         "oblique_uncertainty.nii.gz"]
        written = sitk.ReadImage(str(out / "oblique_uncertainty.nii.gz"))
        assert written.GetSize() == image.GetSize() and written.GetPixelID() == sitk.sitkFloat32
        for a, b in ((written.GetSpacing(), image.GetSpacing()), (written.GetOrigin(), image.GetOrigin()),
                     (written.GetDirection(), image.GetDirection())):
            np.testing.assert_allclose(a, b, atol=1e-5)
        values = sitk.GetArrayFromImage(written)
        assert values.min() >= 0.0 and values.max() <= 1.0 and values.max() > 0.0
        expected = analyse(tmp_path / "in" / "oblique.nii.gz", model, kinds=[kind], device="cpu").maps[kind]
        np.testing.assert_allclose(values, sitk.GetArrayFromImage(expected), atol=1e-6)
    out = tmp_path / "evaluated"
    assert main(["segment", "--model", str(model), str(dataset / "imagesTr" / "phantom_000.nii.gz"), "--out",
                 str(out), "--uncertainty", "entropy", "--confidence", "--device", "cpu"]) == 0
    assert (out / "phantom_000_uncertainty.nii.gz").is_file() and (out / "phantom_000_confidence.nii.gz").is_file()
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(out), "--truth", str(dataset)]) == 0
    report = capsys.readouterr().out  # the maps beside the label map are no predictions to evaluate
    assert '"phantom_000"' in report and "_uncertainty" not in report and "_confidence" not in report

    torch.manual_seed(0)
    segmenter = SUNet(1, 3, base_channels=4, depth=2, groups=2)
    header = make_header(["background", "organ", "lesion"], dict(NORMALISATION),
                         {"slice_axis": "z", "spacing": [2.0, 2.0], "size": [16, 16]}, segmenter, method="supervised")
    without_d = save_model(tmp_path / "no-d.safetensors", header, segmenter)
    err = refused(capsys, "segment", "--model", str(without_d), str(tmp_path / "in" / "oblique.nii.gz"), "--out",
                  str(tmp_path / "none"), "--uncertainty", "confidence", "--device", "cpu")
    assert "no-d.safetensors" in err and "no confidence network" in err and not (tmp_path / "none").exists()


def test_places_that_cannot_be_written_are_one_line(dataset, model, tmp_path, capsys):
    image = str(dataset / "imagesTr" / "phantom_000.nii.gz")
    a_file = tmp_path / "a file"
    a_file.write_text("not a folder")
    for out in (a_file, a_file / "below", Path("/proc/isdnet-cannot-be-made")):
        err = refused(capsys, "segment", "--model", str(model), image, "--out", str(out), "--device", "cpu")
        assert str(out) in err and "output folder" in err
    err = refused(capsys, "evaluate", "--pred", str(dataset / "labelsTr"), "--truth", str(dataset),
                  "--json", str(tmp_path / "missing" / "metrics.json"))
    assert "metrics.json: cannot be written" in err
    not_images = [a_file, tmp_path, tmp_path / "missing.nii.gz", dataset / "dataset.json"]
    for label in not_images:
        err = refused(capsys, "train", "--images", image, "--labels", str(label), "--out",
                      str(tmp_path / "m.safetensors"), "--epochs", "1")
        assert str(label) in err


def test_every_output_follows_the_umask(dataset, model, tmp_path):
    previous = os.umask(0o027)
    try:
        assert main(["segment", "--model", str(model), str(dataset / "imagesTr" / "phantom_000.nii.gz"), "--out",
                     str(tmp_path / "out"), "--confidence", "--device", "cpu"]) == 0
        written = sorted((tmp_path / "out").iterdir())
        assert len(written) == 3
        written.append(tiny_model(tmp_path / "model.safetensors"))
        checkpoint = tmp_path / "model.checkpoint.safetensors"
        for value in (1.0, 2.0):  # the second save keeps the first as the previous checkpoint
            save_checkpoint(checkpoint, {"a": torch.full((2,), value)}, {"epoch": int(value)})
        written += [checkpoint, tmp_path / "model.checkpoint.prev.safetensors"]
    finally:
        os.umask(previous)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {p.name: "0o640" for p in written}
