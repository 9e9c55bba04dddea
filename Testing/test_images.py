"""Checked reading of volumes and label maps (isdnet.images): every bad file refused, naming it, left unchanged."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from volume_helpers import (
    assert_same_grid,
    digest,
    oblique_flipped,
    phantom,
    rotation,
    write,
)

from isdnet.errors import InputError
from isdnet.images import read_image, read_label

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


def test_detached_data_files_are_followed_only_to_regular_files(tmp_path):
    """A NRRD or MetaImage header names where its voxels are: one file, a LIST, or a pattern. Each named file must
    be a regular file, never a device (/dev/zero would feed zeros for ever) or a pipe (which blocks)."""
    import os

    from isdnet.detached import data_files

    image = sitk.GetImageFromArray(np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8) + 1)
    nhdr, mhd = write(image, tmp_path / "scan.nhdr"), write(image, tmp_path / "meta.mhd")
    assert data_files(nhdr) == [tmp_path / "scan.raw"] and data_files(mhd) == [tmp_path / "meta.raw"]
    assert data_files(write(image, tmp_path / "inline.nrrd")) == data_files(write(image, tmp_path / "in.mha")) == []
    assert read_image(nhdr).GetSize() == (8, 6, 4)
    os.mkfifo(tmp_path / "pipe.raw")
    text = nhdr.read_text()
    for field, problem in (("data file: /dev/zero", "/dev/zero, which is not a regular file"),
                           ("data file: pipe.raw", "pipe.raw, which is not a regular file"),
                           ("data file: missing.raw.gz", "missing.raw.gz, which does not exist"),
                           ("datafile: LIST\nscan.raw\nmissing_2.raw", "missing_2.raw, which does not exist"),
                           ("data file: slice%02d.raw 1 3 1", "slice01.raw, which does not exist")):
        damaged = tmp_path / "damaged.nhdr"
        damaged.write_text(text.replace("data file: scan.raw", field))
        expect_input_error(damaged, problem, lambda p=damaged: read_image(p))
    damaged = tmp_path / "damaged.mhd"
    damaged.write_text(mhd.read_text().replace("ElementDataFile = meta.raw", "ElementDataFile = /dev/zero"))
    expect_input_error(damaged, "/dev/zero, which is not a regular file", lambda: read_image(damaged))


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
