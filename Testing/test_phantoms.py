"""Tests of isdnet.phantoms: determinism, geometry, anatomy of the labels, intensities, dataset writing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from isdnet.phantoms import class_names, make_phantom, write_phantom_dataset


def _arrays(seed: int, **options) -> tuple[np.ndarray, np.ndarray]:
    image, labels = make_phantom(seed, **options)
    return sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels)


def test_same_seed_same_phantom_other_seed_other_phantom():
    a, b, c = make_phantom(3), make_phantom(3), make_phantom(4)
    for x, y in zip(a, b):
        assert np.array_equal(sitk.GetArrayViewFromImage(x), sitk.GetArrayViewFromImage(y))
        assert x.GetOrigin() == y.GetOrigin()
    assert not np.array_equal(sitk.GetArrayViewFromImage(a[1]), sitk.GetArrayViewFromImage(c[1]))
    assert a[0].GetOrigin() != c[0].GetOrigin()


def test_geometry_and_types():
    image, labels = make_phantom(1, shape=(16, 40, 48), spacing=(0.8, 0.9, 3.0))
    for volume in (image, labels):
        assert volume.GetSize() == (48, 40, 16)
        assert volume.GetSpacing() == pytest.approx((0.8, 0.9, 3.0))
        assert volume.GetOrigin() == image.GetOrigin()
        assert volume.GetDirection() == pytest.approx(np.eye(3).ravel())
    assert all(v != 0 for v in image.GetOrigin())
    assert image.GetPixelID() == sitk.sitkFloat32 and labels.GetPixelID() == sitk.sitkUInt8
    array = sitk.GetArrayViewFromImage(image)
    assert array.min() >= 0 and array.max() <= 1000 and array.max() > 400


@pytest.mark.parametrize("num_classes", [2, 3, 4])
def test_label_values(num_classes):
    _, labels = _arrays(0, num_classes=num_classes)
    assert set(np.unique(labels)) == set(range(num_classes))


@pytest.mark.parametrize("seed", range(6))
def test_organ_fraction_and_lesions_inside_the_organ(seed):
    _, labels = _arrays(seed)
    assert 0.15 <= np.count_nonzero(labels) / labels.size <= 0.30
    lesions = labels >= 2
    # No lesion voxel touches the background through a face: lesions are enclosed by the organ.
    padded = np.pad(lesions, 1)
    near = padded.copy()
    for axis in range(3):
        for shift in (-1, 1):
            near |= np.roll(padded, shift, axis)
    assert not np.any(near[1:-1, 1:-1, 1:-1] & (labels == 0))
    # Each lesion is at least 4 voxels in radius in-plane: its largest slice spans 8 voxels or more.
    components = sitk.ConnectedComponent(sitk.GetImageFromArray(lesions.astype(np.uint8)))
    statistics = sitk.LabelShapeStatisticsImageFilter()
    statistics.Execute(components)
    assert 1 <= statistics.GetNumberOfLabels() <= 3
    for component in statistics.GetLabels():
        width, height = statistics.GetBoundingBox(component)[3:5]
        assert min(width, height) >= 8


def test_intensities_contrast_but_overlap():
    image, labels = _arrays(2)
    organ, lesion = image[labels == 1], image[labels == 2]
    tissue = image[(labels == 0) & (image > 100)]  # the body's background tissue, not air
    assert np.median(organ) > np.median(lesion) + 100
    assert np.median(organ) > np.median(tissue) + 100
    # Not a threshold task: lesion intensities are typical of the background tissue too.
    low, high = np.percentile(tissue, [5, 95])
    assert low < np.median(lesion) < high


def test_refuses_a_volume_too_small_for_lesions():
    with pytest.raises(ValueError, match="too small"):
        make_phantom(0, shape=(8, 12, 12))
    make_phantom(0, shape=(8, 12, 12), num_classes=2)


def test_invalid_options():
    with pytest.raises(ValueError, match="num_classes"):
        make_phantom(0, num_classes=1)
    with pytest.raises(ValueError, match="shape"):
        make_phantom(0, shape=(4, 64, 64))
    with pytest.raises(ValueError, match="spacing"):
        make_phantom(0, spacing=(1.0, 0.0, 1.0))


def test_write_phantom_dataset(tmp_path):
    folder = write_phantom_dataset(tmp_path / "data", 3, seed=5, shape=(12, 32, 40), spacing=(1.2, 1.2, 3.0))
    dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert dataset["description"] == "synthetic ISDNet phantoms"
    assert dataset["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert dataset["numTraining"] == len(dataset["training"]) == 3
    assert dataset["file_ending"] == ".nii.gz" and dataset["tensorImageSize"] == "3D"
    assert dataset["modality"] == {"0": "CT"}
    assert dataset["training"][0] == {"image": "./imagesTr/phantom_000.nii.gz",
                                      "label": "./labelsTr/phantom_000.nii.gz"}
    first = None
    for entry in dataset["training"]:
        image, labels = (sitk.ReadImage(str(folder / entry[key])) for key in ("image", "label"))
        assert image.GetSize() == labels.GetSize() == (40, 32, 12)
        assert image.GetSpacing() == pytest.approx((1.2, 1.2, 3.0))
        assert labels.GetSpacing() == pytest.approx((1.2, 1.2, 3.0))
        assert image.GetOrigin() == pytest.approx(labels.GetOrigin())
        assert labels.GetPixelID() == sitk.sitkUInt8
        if first is None:
            first = sitk.GetArrayFromImage(labels)
    # A larger dataset with the same seed starts with the same cases.
    again = write_phantom_dataset(tmp_path / "again", 1, seed=5, shape=(12, 32, 40), spacing=(1.2, 1.2, 3.0))
    reread = sitk.ReadImage(str(again / "labelsTr" / "phantom_000.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(reread), first)


def test_class_names_for_more_classes():
    assert class_names(2) == {"0": "background", "1": "organ"}
    assert class_names(4) == {"0": "background", "1": "organ", "2": "lesion", "3": "lesion2"}
