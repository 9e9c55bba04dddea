"""Slicer segmentation files (.seg.nrrd) as labels: real Slicer-written files shipped with slicerio, and layers."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import slicerio.segmentation as slicer_segmentation

from isdnet.cli import main
from isdnet.errors import InputError
from isdnet.images import label_values, read_label_map
from isdnet.modelheader import read_header
from isdnet.segfiles import segments_of

SLICER_FILES = Path(slicerio.__file__).parent / "data"  # written by 3D Slicer, shipped with slicerio


def test_the_segments_of_a_real_slicer_file():
    segments = segments_of(SLICER_FILES / "Segmentation.seg.nrrd")
    assert [(s.value, s.name) for s in segments[:3]] == [(1, "ribs"), (2, "cervical vertebral column"),
                                                          (3, "thoracic vertebral column")]
    assert segments[0].color == (253, 232, 158)
    assert "SCT^113197003^Rib" in segments[0].terminology
    assert label_values(read_label_map(SLICER_FILES / "Segmentation.seg.nrrd")) == list(range(8))


def test_training_on_a_slicer_segmentation_names_the_classes_after_its_segments(tmp_path):
    out = tmp_path / "chest.safetensors"
    assert main(["train", "--images", str(SLICER_FILES / "CTChest4.nrrd"), "--labels",
                 str(SLICER_FILES / "Segmentation.seg.nrrd"), "--out", str(out), "--epochs", "1",
                 "--steps-per-epoch", "1", "--base-channels", "8", "--validation-fraction", "0"]) == 0
    classes = read_header(out)["classes"]
    assert [c["name"] for c in classes][:4] == ["background", "ribs", "cervical vertebral column",
                                                "thoracic vertebral column"]
    assert classes[1]["color"] == [253, 232, 158] and "Rib" in classes[1]["terminology"]


def test_overlapping_segments_are_refused_naming_the_file_and_the_segment(capsys):
    path = SLICER_FILES / "SegmentationOverlapping.seg.nrrd"
    with pytest.raises(InputError, match="'overlapping sphere' overlaps another segment"):
        read_label_map(path)
    assert main(["train", "--images", str(SLICER_FILES / "CTChest4.nrrd"), "--labels", str(path),
                 "--out", "/nonexistent/x.safetensors"]) == 2
    assert str(path) in capsys.readouterr().err


def test_layers_without_overlap_are_flattened_with_one_value_a_segment(tmp_path):
    seg = slicer_segmentation.create_segmentation((8, 9, 10), np.diag([1.0, 1.0, 2.0, 1.0]))
    a, b, c = (np.zeros((8, 9, 10), bool) for _ in range(3))
    a[1:3, 1:3, 1:3], b[2:4, 2:4, 2:4], c[5:7, 5:7, 5:7] = True, True, True
    for mask, name in ((a, "A"), (b, "B"), (c, "C")):
        slicer_segmentation.add_segment(seg, mask, {"name": name})
    seg["voxels"][1][a] = 0  # B stays in its own layer (as Slicer keeps it) but no longer overlaps A
    assert [(s["layer"], s["labelValue"]) for s in seg["segments"]] == [(0, 1), (1, 1), (0, 2)]
    path = tmp_path / "layers.seg.nrrd"
    slicer_segmentation.write_segmentation(str(path), seg)
    flat = sitk.GetArrayFromImage(read_label_map(path))  # (z, y, x); slicerio's voxels are (i, j, k)
    # values 1, 1, 2 collide across the layers, so the segments are numbered 1, 2, 3 in the file's order
    assert [(s.value, s.name) for s in segments_of(path)] == [(1, "A"), (2, "B"), (3, "C")]
    for value, mask in ((1, a), (2, b & ~a), (3, c)):
        np.testing.assert_array_equal(flat == value, mask.transpose(2, 1, 0))
