"""Tests of isdnet.metrics: hand-computed Dice and HD95 values, agreement with MONAI, folder evaluation."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from isdnet.errors import InputError
from isdnet.metrics import dice_per_class, evaluate_cases, evaluate_folders, hausdorff95

DICE_CASES = [
    # (prediction, truth, labels, expected Dice per label), each counted by hand.
    ([[0, 1, 1], [0, 0, 2]], [[0, 1, 0], [0, 2, 2]], [0, 1, 2], {0: 4 / 6, 1: 2 / 3, 2: 2 / 3}),
    ([[1, 1], [2, 2]], [[1, 1], [2, 2]], [1, 2], {1: 1.0, 2: 1.0}),
    ([[1, 0]], [[0, 1]], [1], {1: 0.0}),
    ([[0, 0]], [[0, 1]], [1], {1: 0.0}),  # empty prediction, non-empty truth
    ([[0, 0]], [[0, 0]], [3], {3: 1.0}),  # absent from both: Dice 1
    ([[[1, 1], [1, 0]], [[0, 0], [0, 0]]], [[[1, 0], [0, 0]], [[1, 0], [0, 0]]], [1], {1: 2 / 5}),
]


@pytest.mark.parametrize("prediction, truth, labels, expected", DICE_CASES)
def test_dice_per_class_hand_computed(prediction, truth, labels, expected):
    result = dice_per_class(np.array(prediction, np.uint8), np.array(truth, np.uint8), labels)
    assert result.keys() == expected.keys()
    for label, value in expected.items():
        assert result[label] == pytest.approx(value, abs=1e-12)


def test_dice_per_class_refuses_different_shapes():
    with pytest.raises(ValueError, match="different shapes"):
        dice_per_class(np.zeros((2, 2)), np.zeros((2, 3)), [1])


def _image(array: np.ndarray, spacing_xyz=(1.0, 1.0, 1.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
    image.SetSpacing(spacing_xyz)
    return image


def _monai_hd95(a: np.ndarray, b: np.ndarray, spacing_xyz) -> float:
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compute_hausdorff_distance(torch.tensor(a)[None, None], torch.tensor(b)[None, None],
                                          include_background=True, percentile=95,
                                          spacing=list(spacing_xyz[::-1])).item()


def _blob(rng: np.random.Generator, shape, spacing_xyz, size: float) -> np.ndarray:
    """A random ellipsoid in physical space plus a few isolated voxels (outliers matter for HD95)."""
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing_xyz[::-1])], indexing="ij")
    extent = np.array([n * s for n, s in zip(shape, spacing_xyz[::-1])])
    centre = rng.uniform(0.3, 0.7, 3) * extent
    radii = rng.uniform(size, 2 * size, 3) * extent
    level = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
    return ((level < 1) | (rng.random(shape) < 0.005)).astype(np.uint8)


@pytest.mark.parametrize("seed, size", [(0, 0.15), (1, 0.15), (2, 0.15), (3, 0.4), (4, 0.4)])
def test_hausdorff95_agrees_with_monai_on_anisotropic_blobs(seed, size):
    # Same surface definition as MONAI (face-connected erosion, border counts as outside) and the same
    # percentile interpolation, so the only difference is float32 rounding in MONAI: tolerance 1e-3 mm.
    # Size 0.4 makes blobs cut by the image border, where the border must count as outside.
    rng = np.random.default_rng(seed)
    shape, spacing = (14, 22, 26), (0.7, 1.3, 2.5)
    a, b = _blob(rng, shape, spacing, size), _blob(rng, shape, spacing, size)
    ours = hausdorff95(_image(a, spacing), _image(b, spacing), 1)
    assert ours == pytest.approx(_monai_hd95(a, b, spacing), abs=1e-3)


@pytest.mark.parametrize("k", [1, 2, 5, 7])
def test_hausdorff95_of_two_cubes_offset_along_x(k):
    # Each cube has surface layers at x = 0..3; for every layer the nearest voxel of the other cube's
    # surface lies on the same (y, z) line, k - x ... voxels away; the 95th percentile of these 56 distances
    # falls in the last full face (16 voxels at distance k voxels, counts 16-12-12-16), so HD95 = k * sx.
    spacing = (2.0, 1.0, 3.0)
    a = np.zeros((8, 8, 20), np.uint8)
    b = np.zeros_like(a)
    a[2:6, 2:6, 2:6] = 1
    b[2:6, 2:6, 2 + k:6 + k] = 1
    assert hausdorff95(_image(a, spacing), _image(b, spacing), 1) == pytest.approx(k * 2.0)


def test_hausdorff95_interpolates_the_percentile():
    # A: 10 voxels in row y=0; B: the same row at y=2 plus one outlier at y=10. The 11 distances from B
    # to A are ten of 2*sy and one of 10*sy; the 95th percentile sits at position 0.95*10 = 9.5, halfway
    # between them: (2 + 10) / 2 * sy. From A to B all distances are 2*sy. With sy = 1.5: 9.0 mm.
    spacing = (1.0, 1.5, 1.0)
    a = np.zeros((1, 12, 10), np.uint8)
    b = np.zeros_like(a)
    a[0, 0, :] = 1
    b[0, 2, :] = 1
    b[0, 10, 0] = 1
    assert hausdorff95(_image(a, spacing), _image(b, spacing), 1) == pytest.approx(9.0)


def test_hausdorff95_of_identical_masks_touching_the_border_is_zero():
    # A single-slice image: every voxel of the block is on the surface, some only through the image border.
    block = np.zeros((1, 5, 5), np.uint8)
    block[0, 1:5, 0:4] = 1
    assert hausdorff95(_image(block), _image(block.copy()), 1) == 0.0


def test_hausdorff95_is_nan_when_a_mask_is_empty():
    a = np.zeros((3, 4, 5), np.uint8)
    b = a.copy()
    b[1, 1, 1] = 1
    assert math.isnan(hausdorff95(_image(a), _image(b), 1))
    assert math.isnan(hausdorff95(_image(b), _image(a), 1))
    assert hausdorff95(_image(b), _image(b), 1) == 0.0


def _two_cases():
    """Case a: 4 truth voxels, 4 predicted, 2 shared (Dice 0.5). Case b: 12 of 12 shared (Dice 1)."""
    pa, ta = np.zeros((1, 4, 8), np.uint8), np.zeros((1, 4, 8), np.uint8)
    ta[0, 0, 0:4] = 1
    pa[0, 0, 2:6] = 1
    pb = np.zeros((1, 4, 8), np.uint8)
    pb[0, 1:4, 0:4] = 1
    return [("a", _image(pa), _image(ta)), ("b", _image(pb), _image(pb.copy()))]


def test_evaluate_cases_pools_global_dice_and_averages_case_dice():
    report = evaluate_cases(_two_cases(), labels=[1])
    assert [c["name"] for c in report["cases"]] == ["a", "b"]
    assert report["cases"][0]["dice"]["1"] == pytest.approx(0.5)
    assert report["cases"][1]["mean_dice"] == pytest.approx(1.0)
    assert report["dice_per_class"]["1"] == pytest.approx(0.75)
    assert report["dice"] == pytest.approx(0.75)
    # Pooled: 2 * (2 + 12) / (4 + 4 + 12 + 12) = 28 / 32.
    assert report["global_dice"]["1"] == pytest.approx(0.875)
    assert report["global_dice_mean"] == pytest.approx(0.875)
    # Case a: rows of 4 voxels shifted by 2; each row's distances to the other are 0, 0, 1, 2 voxels and the
    # 95th percentile sits at position 0.95 * 3 = 2.85: 1 + 0.85 * (2 - 1) = 1.85. Case b: 0.
    assert report["cases"][0]["hd95"]["1"] == pytest.approx(1.85)
    assert report["hd95"]["1"] == pytest.approx(1.85 / 2)
    json.loads(json.dumps(report, allow_nan=False))


def test_evaluate_cases_reports_undefined_hd95_as_none_and_ignores_it_in_means():
    truth = np.zeros((1, 4, 4), np.uint8)
    truth[0, 1:3, 1:3] = 1
    truth[0, 0, 0] = 2
    pred = truth.copy()
    pred[0, 0, 0] = 0  # label 2 missed entirely
    pairs = [("x", _image(pred), _image(truth)), ("y", _image(truth), _image(truth))]
    report = evaluate_cases(pairs, [0, 1, 2])
    assert report["cases"][0]["hd95"] == {"1": 0.0, "2": None}
    assert report["hd95"] == {"1": 0.0, "2": 0.0}
    assert report["cases"][0]["mean_dice"] == pytest.approx(0.5)  # background is not in the mean
    assert set(report["dice_per_class"]) == {"0", "1", "2"}


def test_evaluate_cases_refuses_different_sizes_naming_the_case():
    with pytest.raises(InputError, match="case7.*size"):
        evaluate_cases([("case7", _image(np.zeros((1, 2, 3))), _image(np.zeros((1, 2, 4))))], [1])


def _write(array: np.ndarray, path, spacing=(1.0, 1.0, 2.0)) -> None:
    """Write ``array`` with an empty slice after it (files must hold 3D volumes; Dice and HD95 stay the same)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(_image(np.concatenate([array, np.zeros_like(array[:1])]), spacing), str(path))


def test_evaluate_folders_against_plain_decathlon_and_nnunet_truth(tmp_path):
    cases = _two_cases()
    for name, prediction, truth in cases:
        _write(sitk.GetArrayFromImage(prediction), tmp_path / "pred" / f"{name}.nii.gz")
        _write(sitk.GetArrayFromImage(truth), tmp_path / "truth" / f"{name}.nii.gz")
        for layout, image_name in (("decathlon", name), ("nnunet", f"{name}_0000")):
            _write(sitk.GetArrayFromImage(truth), tmp_path / layout / "labelsTr" / f"{name}.nii.gz")
            _write(sitk.GetArrayFromImage(truth), tmp_path / layout / "imagesTr" / f"{image_name}.nii.gz")
    (tmp_path / "decathlon" / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "organ"},
        "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"}
                     for n, _, _ in cases],
    }), encoding="utf-8")
    (tmp_path / "nnunet" / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 2,
        "file_ending": ".nii.gz"}), encoding="utf-8")
    plain = evaluate_folders(tmp_path / "pred", tmp_path / "truth")
    assert evaluate_folders(tmp_path / "pred", tmp_path / "decathlon") == plain
    assert evaluate_folders(tmp_path / "pred", tmp_path / "nnunet") == plain, "the same reader as training"
    assert plain["global_dice"] == {"1": pytest.approx(0.875)}
    # Spacing is read from the files: case a's rows differ along x, whose spacing is 1 (see above).
    assert plain["cases"][0]["hd95"]["1"] == pytest.approx(1.85)


def test_evaluate_folders_refusals(tmp_path):
    array = np.ones((1, 2, 2), np.uint8)
    _write(array, tmp_path / "pred" / "a.nii.gz")
    _write(array, tmp_path / "pred" / "b.nii.gz")
    _write(array, tmp_path / "truth" / "a.nii.gz")
    with pytest.raises(InputError, match="no ground truth.*b"):
        evaluate_folders(tmp_path / "pred", tmp_path / "truth")
    (tmp_path / "truth" / "b.nii.gz").write_bytes(b"not an image")
    with pytest.raises(InputError, match="b.nii.gz: cannot be read"):
        evaluate_folders(tmp_path / "pred", tmp_path / "truth", labels=[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .nii.gz label maps"):
        evaluate_folders(tmp_path / "empty", tmp_path / "truth")
    with pytest.raises(InputError, match="not a folder"):
        evaluate_folders(tmp_path / "missing", tmp_path / "truth")
