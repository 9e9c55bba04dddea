"""Slice geometry (isdnet.geometry) and its inverse (infer): exact round trips on oblique, anisotropic grids."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from volume_helpers import (
    assert_same_grid,
    canonical_in_plane_spacing,
    dice,
    oblique_flipped,
    phantom,
    round_trip,
)

from isdnet import geometry
from isdnet.geometry import (
    NORMALISATION,
    SliceGeometry,
    canonical_grid,
    choose_slice_axis,
    plan_geometry,
    prepare_volume,
)
from isdnet.infer import to_input_grid_slices, to_input_image

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
