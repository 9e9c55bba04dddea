"""Fuzzing of NIfTI and NRRD files fed to the dataset loader and to segment(): damaged headers, odd arrays,
truncated data. Whatever the file holds, only the project's own errors may escape, each naming the file, and
the file is never modified.

A hang inside ITK cannot be interrupted from Python, so faulthandler's watchdog thread ends the run (with the
stack) if one example takes over a minute, instead of the suite hanging.
"""

from __future__ import annotations

import faulthandler
import gzip
import hashlib
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isdnet.dataset import load_dataset
from isdnet.errors import ISDNetError
from isdnet.images import read_image, read_label
from isdnet.infer import segment
from isdnet.modelfile import load_model, make_header, save_model
from isdnet.networks import SUNet

EXAMPLE_TIMEOUT_S = 60
# NIfTI-1 header fields: name -> (byte offset, struct format of the whole field)
NIFTI_FIELDS = {"dim": (40, "8h"), "datatype": (70, "h"), "bitpix": (72, "h"), "pixdim": (76, "8f"),
                "vox_offset": (108, "f"), "scl": (112, "2f"), "codes": (252, "2h"), "quatern": (256, "6f"),
                "srow": (280, "12f"), "sizeof_hdr": (0, "i")}
SPECIAL_NUMBERS = [0, -1, 1, 2, 3, 7, 8, 16, 64, 352, 32767, -32768, 2**31 - 1, 1e30, -1e30, 1e-30, 0.5,
                   float("nan"), float("inf"), -float("inf")]
NRRD_VALUES = ["0", "-1", "1e30", "nan", "inf", "4 5", "4 5 6 7", "999999999 999999999 999999999",
               "(1,0,0) (0,0,0) (0,0,1)", "(nan,0,0) (0,1,0) (0,0,1)", "garbage", "", "float", "short", "raw",
               "gzip", "little", "big", "2", "4", "none (1,0,0) (0,1,0)", "left-posterior-superior"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    segmenter = SUNet(1, 3, base_channels=4, depth=2, groups=2)
    header = make_header(["background", "a", "b"], {"method": "percentile-zscore", "lower_percentile": 0.5,
                                                    "upper_percentile": 99.5},
                         {"slice_axis": "z", "spacing": [1.0, 1.0], "size": [16, 16]}, segmenter, method="baseline")
    return save_model(tmp_path_factory.mktemp("model") / "tiny.safetensors", header, segmenter)


@st.composite
def volumes(draw) -> np.ndarray:
    shape = tuple(draw(st.integers(2, 7)) for _ in range(3))
    dtype = draw(st.sampled_from([np.float32, np.int16, np.uint8, np.float64]))
    array = np.random.default_rng(draw(st.integers(0, 2**16))).normal(20, 10, shape).astype(dtype)
    if dtype in (np.float32, np.float64) and draw(st.booleans()):
        array.flat[draw(st.integers(0, array.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return array


def _mutate_nifti(blob: bytes, mutations: list[tuple[str, int, float]]) -> bytes:
    data = bytearray(blob)
    for field, index, value in mutations:
        offset, fmt = NIFTI_FIELDS[field]
        size = struct.calcsize("<" + fmt)
        values = list(struct.unpack("<" + fmt, data[offset:offset + size]))
        i = index % len(values)
        if fmt[-1] in "hi":
            limit = 2**15 if fmt[-1] == "h" else 2**31
            value = 0 if not np.isfinite(value) else int(max(-limit, min(limit - 1, value)))
        values[i] = value
        data[offset:offset + size] = struct.pack("<" + fmt, *values)
    return bytes(data)


def _mutate_nrrd(blob: bytes, mutations: list[tuple[int, str]]) -> bytes:
    head, _, data = blob.partition(b"\n\n")
    lines = head.split(b"\n")
    for line, value in mutations:
        i = 1 + line % (len(lines) - 1)
        key = lines[i].split(b":")[0]
        lines[i] = key + b": " + value.encode()
    return b"\n".join(lines) + b"\n\n" + data


@st.composite
def damaged_files(draw) -> tuple[str, bytes]:
    """(extension, file bytes): a small volume written by SimpleITK, then damaged."""
    array = draw(volumes())
    extension = draw(st.sampled_from([".nii", ".nii.gz", ".nrrd"]))
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(draw(st.sampled_from([0.5, 1.0, 3.0])) for _ in range(3)))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("v.nrrd" if extension == ".nrrd" else "v.nii")  # gzipped after damaging
        sitk.WriteImage(image, str(path), useCompression=False)
        blob = path.read_bytes()
    if extension == ".nrrd":
        mutations = draw(st.lists(st.tuples(st.integers(0, 20), st.sampled_from(NRRD_VALUES)), max_size=3))
        blob = _mutate_nrrd(blob, mutations)
    else:
        mutations = draw(st.lists(st.tuples(st.sampled_from(sorted(NIFTI_FIELDS)), st.integers(0, 11),
                                            st.sampled_from(SPECIAL_NUMBERS)), max_size=3))
        blob = _mutate_nifti(blob, mutations)
    if draw(st.booleans()):
        blob = blob[:draw(st.integers(0, len(blob)))]
    if extension == ".nii.gz":
        blob = gzip.compress(blob)
    return extension, blob


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _expect_only_own_errors(call, path: Path) -> None:
    before = _digest(path)
    faulthandler.dump_traceback_later(EXAMPLE_TIMEOUT_S, exit=True)
    try:
        call()
    except ISDNetError as error:
        assert path.name in str(error), f"the error does not name {path.name}: {error}"
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert _digest(path) == before, f"{path.name} was modified"


FUZZ_SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ_SETTINGS
@given(damaged_files())
def test_reading_a_damaged_image_raises_only_our_errors(file):
    extension, blob = file
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"scan ü{extension}"
        path.write_bytes(blob)
        _expect_only_own_errors(lambda: read_image(path), path)


@FUZZ_SETTINGS
@given(damaged_files())
def test_a_dataset_with_a_damaged_label_raises_only_our_errors(file):
    extension, blob = file
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "dataset ü"
        (root / "imagesTr").mkdir(parents=True)
        (root / "labelsTr").mkdir()
        image = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32))
        label_path = root / "labelsTr" / f"case{extension}"
        label_path.write_bytes(blob)
        image_path = root / "imagesTr" / f"case{extension}"
        sitk.WriteImage(image, str(image_path))
        (root / "dataset.json").write_text(json.dumps({
            "labels": {"background": 0, "a": 1, "b": 2},
            "training": [{"image": f"./imagesTr/case{extension}", "label": f"./labelsTr/case{extension}"}]}),
            encoding="utf-8")

        def load():
            spec = load_dataset(root)
            case = spec.cases[0]
            read_label(case.label, read_image(case.image), spec.labels)

        _expect_only_own_errors(load, label_path)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(damaged_files())
def test_segmenting_a_damaged_image_raises_only_our_errors(model_path, file):
    extension, blob = file
    model = load_model(model_path)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"scan{extension}"
        path.write_bytes(blob)

        def run():
            result = segment(path, model, device="cpu", precision="fp32")
            assert result.labels.GetSize() == read_image(path).GetSize()

        _expect_only_own_errors(run, path)
