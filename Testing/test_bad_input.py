"""Inputs that would not fit in memory are refused up front, from the header alone, naming the file."""

import pytest

from isdnet.data import read_image
from isdnet.errors import InputError


def test_volume_too_large_for_free_memory_is_refused_before_reading_voxels(tmp_path, monkeypatch):
    # A MetaImage header claiming 4000^3 int16 voxels (128 GB) over a tiny raw file: only the header is read.
    (tmp_path / "huge.raw").write_bytes(b"\0" * 64)
    header = tmp_path / "huge scan.mha"
    header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4000 4000 4000\nElementType = MET_SHORT\n"
                      "ElementSpacing = 1 1 1\nElementDataFile = huge.raw\n")
    monkeypatch.setenv("ISDNET_AVAILABLE_MEMORY", str(10**9))
    with pytest.raises(InputError, match="needs about .* GB of memory but only 1.0 GB are free") as error:
        read_image(header)
    assert "huge scan.mha" in str(error.value)
    assert (tmp_path / "huge.raw").read_bytes() == b"\0" * 64  # nothing touched
