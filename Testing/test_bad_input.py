"""Inputs whose size or spacing cannot be right are refused up front, from the header alone, naming the file."""

import numpy as np
import pytest
import SimpleITK as sitk

from isdnet.errors import InputError
from isdnet.geometry import NORMALISATION
from isdnet.images import read_image
from isdnet.infer import segment
from isdnet.modelfile import make_header, save_model
from isdnet.networks import SUNet


def test_volume_too_large_for_free_memory_is_refused_before_reading_voxels(tmp_path, monkeypatch):
    # A MetaImage header claiming 4000^3 int16 voxels (128 GB) over a tiny raw file: only the header is read.
    (tmp_path / "huge.raw").write_bytes(b"\0" * 64)
    header = tmp_path / "huge scan.mha"
    header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4000 4000 4000\nElementType = MET_SHORT\n"
                      "ElementSpacing = 1 1 1\nElementDataFile = huge.raw\n", encoding="utf-8")
    monkeypatch.setenv("ISDNET_AVAILABLE_MEMORY", str(10**9))
    with pytest.raises(InputError, match="needs about .* GB of memory but only 1.0 GB are free") as error:
        read_image(header)
    assert "huge scan.mha" in str(error.value)
    assert (tmp_path / "huge.raw").read_bytes() == b"\0" * 64  # nothing touched


@pytest.mark.parametrize("spacing", [1e30, 1e-30])
def test_absurd_voxel_spacing_is_refused_naming_the_file(tmp_path, spacing):
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32))
    image.SetSpacing((1.0, spacing, 1.0))
    path = tmp_path / "odd spacing.nrrd"
    sitk.WriteImage(image, str(path))
    with pytest.raises(InputError, match="odd spacing.nrrd: has the voxel spacing .* its header's spacing is wrong"):
        read_image(path)


def test_slices_too_large_at_the_model_spacing_are_refused_before_resampling(tmp_path):
    # 2000 mm voxels are plausible on their own, but 6 of them at the model's 1 mm make 12000-pixel slices.
    image = sitk.GetImageFromArray(np.zeros((4, 6, 6), np.float32))
    image.SetSpacing((2000.0, 2000.0, 1.0))
    path = tmp_path / "coarse.nii.gz"
    sitk.WriteImage(image, str(path))
    segmenter = SUNet(1, 2, base_channels=4, depth=2, groups=2)
    header = make_header(["background", "a"], dict(NORMALISATION), {"slice_axis": "z", "spacing": [1.0, 1.0],
                                                                     "size": [16, 16]}, segmenter, method="baseline")
    model = save_model(tmp_path / "m.safetensors", header, segmenter)
    with pytest.raises(InputError, match=r"coarse.nii.gz: 6 voxels of 2000 mm would become 12000 pixels"):
        segment(path, model, device="cpu")
