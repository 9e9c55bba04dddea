"""Data stages: dataset folders (isdnet.dataset), checked reading (images), slice geometry round trips (geometry,
infer's inverse mapping), training slices and augmentation (slices)."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from isdnet import geometry
from isdnet.dataset import Case, case_name, cases_from_files, load_dataset, split_labeled, unlabeled_cases
from isdnet.errors import InputError
from isdnet.geometry import (
    NORMALISATION,
    SliceGeometry,
    canonical_grid,
    choose_slice_axis,
    plan_geometry,
    prepare_volume,
)
from isdnet.images import read_image, read_label
from isdnet.infer import to_input_grid_slices, to_input_image
from isdnet.slices import SliceDataset, augment, cache_volumes

HIPPOCAMPUS = Path("/work/shared/data/hippocampus")


# ----------------------------------------------------------------------------------------------------------
# helpers


def rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """Rotation matrix about ``axis`` (Rodrigues)."""
    k = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    t = math.radians(degrees)
    return np.eye(3) + math.sin(t) * kx + (1 - math.cos(t)) * kx @ kx


def phantom(size_xyz=(40, 36, 12), spacing=(0.7, 0.9, 3.0), origin=(12.5, -30.0, 7.25),
            direction: np.ndarray | None = None, seed: int = 0) -> tuple[sitk.Image, sitk.Image]:
    """An image and a 3-class label (two ellipsoids) on the given grid; the ellipsoids are large in voxels."""
    x, y, z = np.meshgrid(*(np.arange(n) / n for n in size_xyz), indexing="ij")
    label_xyz = np.zeros(size_xyz, dtype=np.uint8)
    label_xyz[((x - 0.35) / 0.25) ** 2 + ((y - 0.45) / 0.3) ** 2 + ((z - 0.5) / 0.4) ** 2 < 1] = 1
    label_xyz[((x - 0.72) / 0.18) ** 2 + ((y - 0.55) / 0.3) ** 2 + ((z - 0.5) / 0.35) ** 2 < 1] = 2
    label_array = np.ascontiguousarray(label_xyz.transpose(2, 1, 0))  # numpy (z, y, x)
    rng = np.random.default_rng(seed)
    image_array = (label_array * 100.0 + rng.normal(0, 5, label_array.shape)).astype(np.float32)
    images = [sitk.GetImageFromArray(image_array), sitk.GetImageFromArray(label_array)]
    for img in images:
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
        if direction is not None:
            img.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    return images[0], images[1]


def oblique_flipped() -> np.ndarray:
    """An oblique (20 degrees about a skew axis), non-LPS (permuted and flipped axes) direction matrix."""
    signed_permutation = np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]], dtype=float)
    return rotation((1.0, 2.0, 0.5), 20.0) @ signed_permutation


def write(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    return 2 * np.count_nonzero(x & y) / (np.count_nonzero(x) + np.count_nonzero(y))


def round_trip(image: sitk.Image, label: sitk.Image, geometry: SliceGeometry) -> sitk.Image:
    """Prepared label -> one-hot -> back to the input slice grid -> argmax -> image on the input grid."""
    prepared = prepare_volume(image, geometry, label)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(prepared.label).long(), 3)
    onehot = onehot.permute(0, 3, 1, 2).float()
    back = to_input_grid_slices(prepared, onehot).argmax(1).numpy().astype(np.uint8)
    return to_input_image(prepared, back)


def assert_same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()


def canonical_in_plane_spacing(image: sitk.Image, rule: str) -> tuple[float, float]:
    canonical = sitk.DICOMOrient(image, "LPS")
    axis = choose_slice_axis(canonical.GetSpacing(), rule)
    rows, cols = (a for a in (0, 1, 2) if a != axis)
    return canonical.GetSpacing()[2 - rows], canonical.GetSpacing()[2 - cols]


# ----------------------------------------------------------------------------------------------------------
# dataset folders


def decathlon_folder(root: Path, n: int = 3, extra: dict | None = None) -> Path:
    image, label = phantom(size_xyz=(8, 8, 4))
    training = []
    for i in range(n):
        write(image, root / "imagesTr" / f"case_{i}.nii.gz")
        write(label, root / "labelsTr" / f"case_{i}.nii.gz")
        training.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    meta = {"labels": {"0": "background", "1": "left", "2": "right"}, "training": training, **(extra or {})}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_decathlon_dataset_with_unlabeled_list(tmp_path):
    image, _ = phantom(size_xyz=(8, 8, 4))
    write(image, tmp_path / "imagesUn" / "u1.nrrd")
    write(image, tmp_path / "imagesUn" / "u2.mha")
    extra = {"unlabeled": ["imagesUn/u1.nrrd", {"image": "./imagesUn/u2.mha"}], "colors": {"1": [255, 0, 0]}}
    root = decathlon_folder(tmp_path, extra=extra)
    spec = load_dataset(root)
    assert spec.labels == {0: "background", 1: "left", 2: "right"}
    assert [c.name for c in spec.cases] == ["case_0", "case_1", "case_2"]
    assert spec.cases[1].image == tmp_path / "imagesTr" / "case_1.nii.gz"
    assert spec.cases[1].label == tmp_path / "labelsTr" / "case_1.nii.gz"
    assert [(c.name, c.image.name, c.label) for c in spec.unlabeled] == [("u1", "u1.nrrd", None),
                                                                        ("u2", "u2.mha", None)]
    assert spec.colors == {1: [255, 0, 0]}


def test_nnunet_v2_dataset(tmp_path):
    image, label = phantom(size_xyz=(8, 8, 4))
    for name in ("liver_7", "liver_3"):
        write(image, tmp_path / "imagesTr" / f"{name}_0000.nrrd")
        write(label, tmp_path / "labelsTr" / f"{name}.nrrd")
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
            "numTraining": 2, "file_ending": ".nrrd"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    spec = load_dataset(tmp_path)
    assert spec.labels == {0: "background", 1: "liver", 2: "tumour"}
    assert [(c.name, c.image.name, c.label.name) for c in spec.cases] == [
        ("liver_3", "liver_3_0000.nrrd", "liver_3.nrrd"), ("liver_7", "liver_7_0000.nrrd", "liver_7.nrrd")]
    assert spec.unlabeled == []


@pytest.mark.skipif(not (HIPPOCAMPUS / "dataset.json").is_file(), reason="the hippocampus dataset is absent")
def test_hippocampus_dataset():
    spec = load_dataset(HIPPOCAMPUS)
    assert len(spec.cases) == 260
    assert set(spec.labels) == {0, 1, 2}
    assert spec.cases[0].name == "hippocampus_001"
    assert all(c.label is not None and c.label.is_file() for c in spec.cases)


@pytest.mark.parametrize("name, expected", [
    ("a/b/liver_12_0000.nii.gz", "liver_12"), ("x.seg.nrrd", "x"), ("x.nii", "x"), ("scan.MHA", "scan"),
    ("scan.mhd", "scan"), ("scan.nrrd", "scan"), ("case_0001.nii.gz", "case_0001")])
def test_case_names(name, expected):
    assert case_name(name) == expected


@pytest.mark.parametrize("mutate, problem", [
    (lambda root: (root / "dataset.json").unlink(), "is missing"),
    (lambda root: (root / "dataset.json").write_text("{\"labels\": "), "is not valid JSON"),
    (lambda root: _edit(root, labels={}), "lists no labels"),
    (lambda root: _edit(root, labels={"1": "left", "2": "right"}), "has no label 0"),
    (lambda root: _edit(root, training=[{"image": "../outside.nii.gz", "label": "./labelsTr/case_0.nii.gz"}]),
     "outside the dataset folder"),
    (lambda root: _edit(root, training=[{"image": "/etc/passwd", "label": "./labelsTr/case_0.nii.gz"}]),
     "outside the dataset folder"),
    (lambda root: _edit(root, unlabeled=["imagesTr/../../x.nii.gz"]), "outside the dataset folder"),
])
def test_dataset_json_errors(tmp_path, mutate, problem):
    root = decathlon_folder(tmp_path / "ds", n=1)
    (tmp_path / "outside.nii.gz").write_bytes(b"x")
    mutate(root)
    with pytest.raises(InputError, match=problem) as info:
        load_dataset(root)
    assert "dataset.json" in str(info.value)


def _edit(root: Path, **changes) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(changes)
    (root / "dataset.json").write_text(json.dumps(meta))


def test_dataset_listed_file_missing(tmp_path):
    root = decathlon_folder(tmp_path, n=2)
    (root / "labelsTr" / "case_1.nii.gz").unlink()
    with pytest.raises(InputError) as info:
        load_dataset(root)
    assert "case_1.nii.gz" in str(info.value)
    assert "listed in" in str(info.value) and "dataset.json" in str(info.value)
    assert "does not exist" in str(info.value)


def test_dataset_folder_missing(tmp_path):
    with pytest.raises(InputError, match="nowhere.*does not exist"):
        load_dataset(tmp_path / "nowhere")


def test_cases_from_files_and_unlabeled_cases(tmp_path):
    image, label = phantom(size_xyz=(8, 8, 4))
    a, b = write(image, tmp_path / "a.nii.gz"), write(image, tmp_path / "b_0000.nrrd")
    la = write(label, tmp_path / "a.seg.nrrd")
    assert cases_from_files([a, b], [la, None]) == [Case("a", a, la), Case("b", b, None)]
    assert cases_from_files([a], None) == [Case("a", a, None)]
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        cases_from_files([a, b], [la])
    with pytest.raises(InputError, match="missing.nii.gz: does not exist"):
        cases_from_files([tmp_path / "missing.nii.gz"], None)
    folder = tmp_path / "unl"
    write(image, folder / "u2.nii.gz")
    write(image, folder / "u1.mha")
    (folder / "notes.txt").write_text("not an image")
    assert [c.name for c in unlabeled_cases([folder, a])] == ["u1", "u2", "a"]
    assert unlabeled_cases(None) == []


def test_split_labeled():
    cases = [Case(f"c{i}", Path(f"i{i}"), Path(f"l{i}")) for i in range(10)]
    labeled, unlabeled = split_labeled(cases, 0.3, seed=4)
    assert len(labeled) == 3 and len(unlabeled) == 7
    assert all(c.label is None for c in unlabeled)
    assert {c.name for c in labeled} | {c.name for c in unlabeled} == {c.name for c in cases}
    assert split_labeled(cases, 0.3, seed=4) == (labeled, unlabeled)
    assert split_labeled(cases, 0.3, seed=5)[0] != labeled
    assert len(split_labeled(cases, 0.01, seed=0)[0]) == 1
    assert split_labeled(cases, 1.0, seed=0) == (cases, [])
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            split_labeled(cases, bad, seed=0)


# ----------------------------------------------------------------------------------------------------------
# reading and checking volumes


def test_read_image_and_label_good(tmp_path):
    image, label = phantom(direction=oblique_flipped())
    image_path = write(sitk.Cast(image, sitk.sitkInt16), tmp_path / "img.nrrd")
    label_path = write(label, tmp_path / "lab.seg.nrrd")
    read = read_image(image_path)
    assert read.GetPixelID() == sitk.sitkFloat32 and read.GetSize() == (40, 36, 12)
    lab = read_label(label_path, read, [0, 1, 2])
    assert lab.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(lab), sitk.GetArrayFromImage(label))


def test_read_label_within_tolerance_copies_image_geometry(tmp_path):
    image, label = phantom()
    label.SetSpacing([s * (1 + 2e-4) for s in image.GetSpacing()])
    label.SetOrigin([o + 1e-4 for o in image.GetOrigin()])
    lab = read_label(write(label, tmp_path / "lab.nii.gz"), image, {0, 1, 2})
    assert_same_grid(lab, image)


def test_read_image_squeezes_trailing_unit_dimension(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    unit4d = sitk.JoinSeries([sitk.GetImageFromArray(array)])
    assert unit4d.GetSize() == (4, 3, 2, 1)
    for name in ("unit4d.nrrd", "unit4d.mha", "unit4d.nii.gz"):
        read = read_image(write(unit4d, tmp_path / name))
        assert read.GetDimension() == 3 and read.GetSize() == (4, 3, 2)
        assert np.array_equal(sitk.GetArrayFromImage(read), array)


def test_read_dicom_series(tmp_path):
    image, _ = phantom(size_xyz=(8, 8, 4))
    image = sitk.Cast(image, sitk.sitkInt16)
    folder = tmp_path / "dicom"
    folder.mkdir()
    for k in range(image.GetSize()[2]):
        plane = image[:, :, k]
        plane.SetMetaData("0020|0013", str(k + 1))
        plane.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        plane.SetMetaData("0020|0032", "\\".join(f"{v}" for v in position))
        plane.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(plane)
    read = read_image(folder)
    assert read.GetSize() == (8, 8, 4)
    assert np.allclose(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))
    assert read.GetSpacing()[2] == pytest.approx(3.0)


def expect_input_error(path: Path, problem: str, call) -> None:
    """``call`` raises an InputError naming ``path`` and ``problem``, and leaves every file's bytes alone."""
    before = {p: digest(p) for p in path.parent.rglob("*") if p.is_file()}
    with pytest.raises(InputError) as info:
        call()
    assert path.name in str(info.value)
    assert problem in str(info.value)
    assert {p: digest(p) for p in path.parent.rglob("*") if p.is_file()} == before


def test_error_2d_image(tmp_path):
    path = write(sitk.Image([8, 8], sitk.sitkFloat32), tmp_path / "flat.nii.gz")
    expect_input_error(path, "is a 2D image of size (8, 8), not a 3D volume", lambda: read_image(path))


def test_error_single_slice_volume(tmp_path):
    path = write(sitk.Image([8, 8, 1], sitk.sitkFloat32), tmp_path / "one slice.nrrd")
    expect_input_error(path, "is a single slice (size (8, 8, 1)), not a 3D volume", lambda: read_image(path))


def test_error_4d_image(tmp_path):
    path = write(sitk.Image([4, 4, 4, 3], sitk.sitkFloat32), tmp_path / "series.nii.gz")
    expect_input_error(path, "4D image of size (4, 4, 4, 3)", lambda: read_image(path))


def test_error_vector_image(tmp_path):
    path = write(sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3), tmp_path / "rgb.nrrd")
    expect_input_error(path, "has 3 components per voxel", lambda: read_image(path))


def test_error_nan_voxels(tmp_path):
    image, _ = phantom(size_xyz=(8, 8, 4))
    array = sitk.GetArrayFromImage(image)
    array[0, 0, :3] = np.nan
    array[1, 1, 1] = np.inf
    bad = sitk.GetImageFromArray(array)
    path = write(bad, tmp_path / "nan.nrrd")
    expect_input_error(path, "contains 4 NaN/infinite voxels", lambda: read_image(path))


def test_error_unreadable_and_truncated(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"this is not an image at all" * 20))
    expect_input_error(garbage, "cannot be read as an image", lambda: read_image(garbage))
    raw = tmp_path / "raw.nii.gz"
    raw.write_bytes(bytes(range(256)) * 8)
    expect_input_error(raw, "cannot be read as an image", lambda: read_image(raw))
    image, _ = phantom()
    for name in ("whole.nii.gz", "whole.nii", "whole.nrrd", "whole.mha"):
        whole = write(image, tmp_path / name).read_bytes()
        assert read_image(tmp_path / name).GetSize() == image.GetSize()
        truncated = tmp_path / f"truncated_{name}"
        truncated.write_bytes(whole[: len(whole) // 2])
        expect_input_error(truncated, "cannot be read as an image", lambda: read_image(truncated))  # noqa: B023


@pytest.mark.parametrize("offset, fmt, value, problem", [
    (40, "<8h", (3, 4, 5, -6, 1, 1, 1, 1), "its header gives the size (4, 5, -6), with a dimension below 1"),
    (76, "<4f", (1.0, 1.0, float("nan"), 1.0), "voxel spacing (1.0, nan, 1.0); spacings must be finite"),
    (108, "<f", (float("inf"),), "its header gives the data offset inf, not a whole number >= 352"),
    (280, "<f", (float("nan"),), "NaN or infinite value in its orientation"),
    (70, "<h", (99,), "unknown voxel type code 99"),
])
def test_error_damaged_nifti_header_is_refused_before_itk_reads_it(tmp_path, offset, fmt, value, problem):
    for name in ("damaged.nii", "damaged.nii.gz"):
        path = tmp_path / name
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 5, 4), np.float32)), str(tmp_path / "ok.nii"))
        blob = bytearray((tmp_path / "ok.nii").read_bytes())
        blob[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, *value)
        path.write_bytes(gzip.compress(bytes(blob)) if name.endswith(".gz") else bytes(blob))
        expect_input_error(path, problem, lambda p=path: read_image(p))


def test_error_missing_image(tmp_path):
    with pytest.raises(InputError, match="nothing.nrrd: does not exist"):
        read_image(tmp_path / "nothing.nrrd")


def test_error_label_size_mismatch(tmp_path):
    image, _ = phantom()
    _, small = phantom(size_xyz=(40, 36, 10))
    path = write(small, tmp_path / "small.nii.gz")
    expect_input_error(path, "has size (40, 36, 10) but its image has size (40, 36, 12)",
                       lambda: read_label(path, image, [0, 1, 2]))


@pytest.mark.parametrize("change, problem", [
    (lambda lab: lab.SetSpacing((0.7, 0.9, 3.1)), "spacing (0.7, 0.9, 3.1) vs (0.7, 0.9, 3) mm"),
    (lambda lab: lab.SetOrigin((12.5, -30.0, 8.0)), "origin (12.5, -30, 8) vs (12.5, -30, 7.25) mm"),
    (lambda lab: lab.SetDirection(tuple(rotation((0, 0, 1), 5).ravel())), "direction"),
])
def test_error_label_geometry_mismatch(tmp_path, change, problem):
    image, label = phantom()
    change(label)
    path = write(label, tmp_path / "shifted.nrrd")
    expect_input_error(path, problem, lambda: read_label(path, image, [0, 1, 2]))
    with pytest.raises(InputError, match="is not on its image's grid"):
        read_label(path, image, [0, 1, 2])


def test_error_label_values_not_listed(tmp_path):
    image, label = phantom()
    array = sitk.GetArrayFromImage(label)
    array[0, 0, 0], array[0, 0, 1] = 7, 4
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(label)
    path = write(bad, tmp_path / "extra.nii.gz")
    expect_input_error(path, "holds label values [4, 7] that are not among the allowed values [0, 1, 2]",
                       lambda: read_label(path, image, [0, 1, 2]))


def test_error_label_non_integer_and_negative(tmp_path):
    image, label = phantom()
    array = sitk.GetArrayFromImage(label).astype(np.float32)
    array[0, 0, 0] = 0.5
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(label)
    path = write(bad, tmp_path / "float.nrrd")
    expect_input_error(path, "holds 1 voxels with non-integer values",
                       lambda: read_label(path, image, [0, 1, 2]))
    array = sitk.GetArrayFromImage(label).astype(np.int16)
    array[0, 0, 0] = -3
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(label)
    path = write(bad, tmp_path / "negative.nrrd")
    expect_input_error(path, "label values [-3]", lambda: read_label(path, image, [0, 1, 2]))


def test_error_empty_label(tmp_path):
    image, label = phantom()
    empty = sitk.Image(label.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(label)
    path = write(empty, tmp_path / "empty.seg.nrrd")
    expect_input_error(path, "the label is empty", lambda: read_label(path, image, [0, 1, 2]))


# ----------------------------------------------------------------------------------------------------------
# geometry


def test_slice_geometry_dict_round_trip_and_validation():
    geometry = SliceGeometry("auto", (0.75, 0.8), (160, 192))
    d = geometry.to_dict()
    assert d == {"slice_axis": "auto", "spacing": [0.75, 0.8], "size": [160, 192]}
    assert json.loads(json.dumps(d)) == d
    assert SliceGeometry.from_dict(d) == geometry
    for bad in ({**d, "slice_axis": "w"}, {**d, "spacing": [0, 1]}, {**d, "size": [100, 160]},
                {**d, "size": [160]}, {"slice_axis": "z"}, [1, 2], {**d, "spacing": ["a", 1]}):
        with pytest.raises(ValueError):
            SliceGeometry.from_dict(bad)


def test_canonical_grid_is_the_grid_dicom_orient_gives_without_copying():
    rng = np.random.default_rng(0)
    for permutation in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            direction = np.zeros((3, 3))
            for column, (row, sign) in enumerate(zip(permutation, signs)):
                direction[row, column] = sign
            rotation, _ = np.linalg.qr(np.eye(3) + 0.2 * rng.normal(size=(3, 3)))  # oblique, < 45 degrees
            image = sitk.Image([5, 6, 7], sitk.sitkUInt8)
            image.SetSpacing((0.7, 1.1, 2.5))
            image.SetOrigin(tuple(rng.normal(size=3) * 50))
            image.SetDirection(tuple((rotation @ direction).ravel()))
            grid = canonical_grid(image)
            oriented = sitk.DICOMOrient(image, "LPS")
            assert grid.size == oriented.GetSize()
            np.testing.assert_allclose(grid.spacing, oriented.GetSpacing())
            np.testing.assert_allclose(grid.origin, oriented.GetOrigin(), atol=1e-9)
            np.testing.assert_allclose(grid.direction, oriented.GetDirection(), atol=1e-12)


def test_normalise_in_place_matches_the_exact_statistics_and_samples_only_huge_volumes(monkeypatch):
    rng = np.random.default_rng(1)
    volume = rng.gamma(2.0, 50.0, size=(20, 30, 40)).astype(np.float32)
    expected = np.clip(volume.astype(np.float64), *np.percentile(volume, (0.5, 99.5)))
    expected = (expected - expected.mean()) / expected.std()
    out = volume.copy()
    geometry.normalise_in_place(out)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    monkeypatch.setattr(geometry, "PERCENTILE_SAMPLE", 1000)  # a strided sample of 1000 voxels of the 24000
    monkeypatch.setattr(geometry, "NORMALISE_CHUNK", 777)  # chunks that do not divide the volume
    sampled = volume.copy()
    geometry.normalise_in_place(sampled)
    difference = np.abs(sampled - expected)
    assert 0 < np.median(difference) < 0.01 and difference.max() < 0.5  # only the clipped tails move much


def normalise_intensities(array: np.ndarray) -> np.ndarray:
    out = np.array(array, dtype=np.float32)
    geometry.normalise_in_place(out)
    return out


def test_choose_slice_axis():
    image = sitk.Image([4, 4, 4], sitk.sitkFloat32)
    for spacing, expected in [((1, 1, 3), 0), ((1, 3, 1), 1), ((3, 1, 1), 2), ((1, 1, 1), 0), ((2, 2, 1), 1)]:
        image.SetSpacing(spacing)
        assert choose_slice_axis(image.GetSpacing(), "auto") == expected
    assert [choose_slice_axis(image.GetSpacing(), r) for r in ("z", "y", "x")] == [0, 1, 2]


def test_plan_geometry_picks_acquisition_axis_and_multiple_of_16():
    # Acquisition axis is the image's first index axis (spacing 4 mm), stored along physical x.
    a, _ = phantom(size_xyz=(10, 50, 70), spacing=(4.0, 0.8, 0.6))
    b, _ = phantom(size_xyz=(70, 60, 8), spacing=(0.5, 0.5, 3.0))
    geometry = plan_geometry([a, b])
    assert geometry.slice_axis == "auto"
    # a: slices along x (numpy axis 2) -> rows z (0.6), cols y (0.8); b: along z -> rows y (0.5), cols x (0.5)
    assert geometry.spacing == (pytest.approx(0.55), pytest.approx(0.65))
    # largest extents: rows max(70*0.6/0.55=76, 60*0.5/0.55=55) -> 80;
    # cols max(50*0.8/0.65=62, 70*0.5/0.65=54) -> 64
    assert geometry.size == (80, 64)
    assert plan_geometry([a, b], spacing=(0.1, 0.1), max_size=200).size == (192, 192)
    forced = plan_geometry([a], "z", spacing=[1.0, 2.0], size=[32, 48])
    assert forced == SliceGeometry("z", (1.0, 2.0), (32, 48))
    oblique, _ = phantom(direction=oblique_flipped())
    assert plan_geometry([oblique]).spacing == canonical_in_plane_spacing(oblique, "auto")
    with pytest.raises(ValueError):
        plan_geometry([a], size=(20, 32))
    with pytest.raises(ValueError):
        plan_geometry([a], slice_axis="sideways")


def test_normalise_intensities():
    rng = np.random.default_rng(1)
    array = rng.normal(50, 10, 20000).astype(np.float32)
    array[:5] = 1e6
    out = normalise_intensities(array)
    assert out.dtype == np.float32
    assert abs(float(out.mean())) < 1e-4 and float(out.std()) == pytest.approx(1.0, abs=1e-4)
    assert float(out.max()) < 4
    assert np.all(normalise_intensities(np.full((3, 4), 7.0, np.float32)) == 0)
    assert NORMALISATION["method"] == "percentile-zscore"


def test_round_trip_exact_at_native_spacing_for_every_slice_axis():
    image, label = phantom(direction=oblique_flipped())
    for rule in ("auto", "x", "y", "z"):
        geometry = SliceGeometry(rule, canonical_in_plane_spacing(image, rule), (64, 64))
        result = round_trip(image, label, geometry)
        assert_same_grid(result, image)
        assert result.GetPixelID() == sitk.sitkUInt8
        assert np.array_equal(sitk.GetArrayFromImage(result), sitk.GetArrayFromImage(label)), rule


def test_round_trip_resampled_keeps_grid_and_dice():
    image, label = phantom(direction=oblique_flipped())
    truth = sitk.GetArrayFromImage(label)
    for rule, spacing in (("auto", (1.0, 0.8)), ("x", (1.3, 0.6)), ("y", (0.5, 1.1))):
        prepared = prepare_volume(image, SliceGeometry(rule, spacing, (64, 64)), label)
        assert prepared.image.dtype == np.float32 and prepared.label.dtype == np.uint8
        assert prepared.image.shape == prepared.label.shape and prepared.num_slices == prepared.image.shape[0]
        result = round_trip(image, label, SliceGeometry(rule, spacing, (64, 64)))
        assert_same_grid(result, image)
        back = sitk.GetArrayFromImage(result)
        for value in (1, 2):
            assert dice(back, truth, value) >= 0.97, (rule, value)


def test_prepared_volume_shapes_and_axes():
    image, label = phantom(size_xyz=(40, 36, 12), spacing=(0.7, 0.9, 3.0))  # identity direction: LPS already
    prepared = prepare_volume(image, SliceGeometry("auto", (1.4, 0.45), (64, 64)), label)
    assert prepared.slice_axis == 0
    assert prepared.image.shape == (12, round(36 * 0.9 / 1.4), round(40 * 0.7 / 0.45))
    assert prepared.input_slice_size == (36, 40)
    assert prepared.minimum == pytest.approx(float(prepared.image.min()))
    along_x = prepare_volume(image, SliceGeometry("x", (3.0, 0.9), (64, 64)), label)
    assert along_x.slice_axis == 2 and along_x.image.shape == (40, 12, 36)
    # at native spacing the slices are the canonical array's planes along x
    assert np.array_equal(along_x.label, np.moveaxis(sitk.GetArrayFromImage(label), 2, 0))


def test_prepared_image_is_the_normalised_input_and_stays_aligned_with_its_label():
    # A regression test: the image slices once borrowed the buffer of a freed SimpleITK image, which the
    # label's resampling then overwrote, so image and label disagreed.
    image, label = phantom(size_xyz=(40, 36, 12), spacing=(0.7, 0.9, 3.0))
    prepared = prepare_volume(image, SliceGeometry("auto", (0.9, 0.7), (48, 48)), label)
    expected = normalise_intensities(sitk.GetArrayFromImage(image))
    assert np.allclose(prepared.image, expected, atol=1e-5)
    means = [prepared.image[prepared.label == c].mean() for c in (0, 1, 2)]
    assert means[0] < means[1] < means[2]  # the phantom's intensities rise with the class


def test_to_input_grid_slices_maps_indices_exactly():
    image, _ = phantom(size_xyz=(20, 10, 4), spacing=(1.0, 1.0, 3.0))
    prepared = prepare_volume(image, SliceGeometry("z", (0.5, 2.0), (16, 16)))
    h, w = prepared.image.shape[1:]
    assert (h, w) == (20, 10)
    rows = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1).expand(2, 1, h, w)
    cols = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w).expand(2, 1, h, w)
    back = to_input_grid_slices(prepared, torch.cat([rows, cols], 1))
    assert back.shape == (2, 2, 10, 20)
    # input index i sits at prepared index i * old / new (clamped to the last prepared index)
    assert torch.allclose(back[0, 0, :, 0], torch.arange(10.0) * 2, atol=1e-4)
    assert torch.allclose(back[0, 1, 0, :], (torch.arange(20.0) * 0.5).clamp(max=9), atol=1e-4)
    with pytest.raises(ValueError):
        to_input_grid_slices(prepared, torch.zeros(1, 1, h + 1, w))


def test_to_input_image_float_map():
    image, _ = phantom(direction=oblique_flipped())
    prepared = prepare_volume(image, SliceGeometry("auto", (1.0, 1.0), (32, 32)))
    canonical = sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))
    slices = np.moveaxis(canonical, prepared.slice_axis, 0).astype(np.float32)
    back = to_input_image(prepared, slices)
    assert_same_grid(back, image)
    assert back.GetPixelID() == sitk.sitkFloat32
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


# ----------------------------------------------------------------------------------------------------------
# training slices


class Volume:
    def __init__(self, image: np.ndarray, label: np.ndarray | None):
        self.image, self.label = image, label


def test_slice_dataset_crops_and_pads():
    image = np.arange(2 * 6 * 10, dtype=np.float32).reshape(2, 6, 10)
    label = (image.astype(np.int64) % 3).astype(np.uint8)
    big = Volume(image, label)
    small = Volume(image[:, :3, :4] - 100, label[:, :3, :4])
    data = SliceDataset([big, small], (4, 8), labeled=True, random_crop=False, seed=0)
    assert len(data) == 4 and data.slice_volume_index == [0, 0, 1, 1]
    x, y = data[1]
    assert x.shape == (1, 4, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert np.array_equal(x[0].numpy(), image[1, 1:5, 1:9]) and np.array_equal(y.numpy(), label[1, 1:5, 1:9])
    x, y = data[2]
    assert np.array_equal(x[0, 0:3, 2:6].numpy(), image[0, :3, :4] - 100)
    assert float(x[0, 3, 0]) == float((image[:, :3, :4] - 100).min())
    assert y[3].sum() == 0 and y[:, :2].sum() == 0
    random_data = SliceDataset([big], (4, 8), labeled=False, random_crop=True, seed=3)
    crops = {tuple(random_data[0][0][0, 0, :2].tolist()) for _ in range(30)}
    assert len(crops) > 1
    assert len(random_data[0]) == 1
    for _ in range(10):
        (x,) = random_data[1]
        first = float(x[0, 0, 0])
        r, c = divmod(int(first) - 60, 10)
        assert np.array_equal(x[0].numpy(), image[1, r:r + 4, c:c + 8])
    with pytest.raises(ValueError):
        SliceDataset([Volume(image, None)], (4, 8), labeled=True, random_crop=False)


def test_cache_round_trip(tmp_path):
    image, label = phantom(size_xyz=(20, 18, 5))
    prepared = [prepare_volume(image, SliceGeometry("auto", (1.0, 1.0), (16, 16)), label),
                prepare_volume(image, SliceGeometry("auto", (1.0, 1.0), (16, 16)))]
    cached = cache_volumes(iter(prepared), tmp_path / "cache")
    assert len(cached) == 2 and cached[1].label is None
    assert isinstance(cached[0].image, np.memmap) and cached[0].image.dtype == np.float16
    assert np.array_equal(cached[0].label, prepared[0].label)
    assert np.allclose(cached[0].image, prepared[0].image, atol=1e-2)
    from_memory = SliceDataset(prepared[:1], (16, 16), labeled=True, random_crop=False)
    from_cache = SliceDataset(cached[:1], (16, 16), labeled=True, random_crop=False)
    for i in range(len(from_memory)):
        (xm, ym), (xc, yc) = from_memory[i], from_cache[i]
        assert torch.allclose(xm, xc, atol=1e-2) and torch.equal(ym, yc)


def test_augment_aligned_and_deterministic():
    label = torch.zeros(4, 40, 56, dtype=torch.long)
    label[:, 8:30, 10:25] = 1
    label[:, 15:35, 30:50] = 2
    image = label[:, None].float()
    out1, lab1 = augment(image, label, torch.Generator().manual_seed(5), gain_range=(1, 1), max_bias=0.0)
    out2, lab2 = augment(image, label, torch.Generator().manual_seed(5), gain_range=(1, 1), max_bias=0.0)
    assert torch.equal(out1, out2) and torch.equal(lab1, lab2)
    assert lab1.dtype == torch.long and out1.shape == image.shape
    assert not torch.equal(lab1, label)
    agreement = (out1[:, 0].round().long() == lab1).float().mean()
    assert agreement > 0.97
    # unlabeled batches, default jitter: changed values, still deterministic
    u1, none = augment(image, None, torch.Generator().manual_seed(9))
    u2, _ = augment(image, None, torch.Generator().manual_seed(9))
    assert none is None and torch.equal(u1, u2)
    # pure flip: exact mirror of the columns for image and label alike
    flipped, flipped_label = augment(image, label, torch.Generator().manual_seed(0), max_rotation_deg=0,
                                     scale_range=(1, 1), flip_prob=1.0, gain_range=(1, 1), max_bias=0)
    assert torch.equal(flipped_label, label.flip(-1))
    assert torch.allclose(flipped, image.flip(-1), atol=1e-5)
    same, same_label = augment(image, label, torch.Generator().manual_seed(0), max_rotation_deg=0,
                               scale_range=(1, 1), flip_prob=0.0, gain_range=(2, 2), max_bias=0)
    assert torch.equal(same_label, label) and torch.allclose(same, 2 * image, atol=1e-5)
