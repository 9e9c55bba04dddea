"""ISDNetSegment's logic on slicer-core, with a tiny model trained once by the real engine."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import slicer.util
import slicer_fixture as fx
import vtk

from isdnet.config import train_arguments
from isdnet.modelheader import read_header
from ISDNetLib.export import export_dataset
from ISDNetLib.nodes import corrected_label, training_volumes, uncorrected_predictions, use_as_training_label
from ISDNetLib.runner import engine_environment
from ISDNetLib.segment import SegmentLogic, describe_model
from ISDNetLib.volumes import NodeError, ijk_to_ras, image_from_volume


@pytest.fixture
def mrml():
    return fx.make_scene()


LIVER_TERMINOLOGY = "SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes~^^~^^"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A one-epoch ISDNet model (with its confidence network) trained on phantoms exported from a scene."""
    folder = tmp_path_factory.mktemp("model")
    scene = fx.make_scene()
    pairs = []
    for n in range(3):
        image, labels = fx.phantom((12, 32, 32), seed=n)
        volume = fx.add_volume(scene.scene, image, f"train {n}", (0.8, 0.8, 2.5))
        pairs.append((volume, fx.add_segmentation(scene.scene, volume, labels, fx.ORGAN_NAMES, fx.ORGAN_COLORS)))
    liver = pairs[0][1].GetSegmentation().GetNthSegment(0)
    liver.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), LIVER_TERMINOLOGY)
    export_dataset(scene.scene, pairs[:2], [pairs[2][0]], folder / "ds")
    model = folder / "model.safetensors"
    subprocess.run([sys.executable, "-m", "isdnet", "train", str(folder / "ds"), "--out", str(model),
                    *train_arguments(epochs=1, **fx.TINY_TRAINING)], check=True,
                   env=engine_environment(), capture_output=True, timeout=300)
    return model


def oblique_float_volume(scene, name: str = "patient"):
    """A float32 volume whose spacing and orientation differ from the (int16, axial) training data."""
    image, labels = fx.phantom((12, 40, 40), seed=7)
    return fx.add_volume(scene, image.astype(np.float32) * 1.5 - 40, name, (0.6, 1.1, 3.0), (12.0, -30.0, 7.0),
                         fx.rotation(30, 2) @ fx.rotation(-20, 0))


def labelmap_of(scene, segmentation_node, volume) -> np.ndarray:
    """The segmentation as one label map on ``volume``'s grid, segment k-1 -> k, through the Segmentations logic."""
    segmentation = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    for i in range(segmentation.GetNumberOfSegments()):
        ids.InsertNextValue(segmentation.GetNthSegmentID(i))
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap,
                                                                                 volume)
    voxels = slicer.util.arrayFromVolume(labelmap).copy()
    np.testing.assert_allclose(ijk_to_ras(labelmap), ijk_to_ras(volume), atol=1e-9)
    scene.RemoveNode(labelmap)
    return voxels


def segment_names_and_colors(node):
    segmentation = node.GetSegmentation()
    return [(segmentation.GetNthSegment(i).GetName(), tuple(round(c, 3) for c in segmentation.GetNthSegment(i)
                                                            .GetColor()))
            for i in range(segmentation.GetNumberOfSegments())]


EXPECTED_SEGMENTS = [("liver", (0.902, 0.6, 0.4)), ("tumor", (0.2, 0.8, 0.298))]


def spy(monkeypatch, owner, name: str) -> list:
    """Record what ``owner.name`` returns (or, for methods, is given), calling through to the real function."""
    calls = []
    real = getattr(owner, name)

    def recorder(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(owner, name, recorder)
    return calls


def test_segment_in_process_on_a_differing_volume(mrml, model_path, monkeypatch):
    import isdnet.infer

    # An undertrained model's classes nearly tie, so argmax differs between runs with other batch layouts:
    # the node is compared with the engine's result of the same run.
    engine_runs = spy(monkeypatch, isdnet.infer, "segment")
    scene = mrml.scene
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "unused")  # something else in the scene
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "subject"), "study")
    volume = oblique_float_volume(scene)
    hierarchy.CreateItem(study, volume)
    logic = SegmentLogic(scene)
    calls = []
    node = logic.segment(volume, model_path, confidence=True, progress=lambda done, total: calls.append(done))
    assert node.GetName() == "patient segmentation" and calls and calls[-1] == 12
    assert segment_names_and_colors(node) == EXPECTED_SEGMENTS
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is volume
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study

    (image, _model), _, result = engine_runs[0]
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), slicer.util.arrayFromVolume(volume))
    assert image.GetSpacing() == pytest.approx((0.6, 1.1, 3.0))
    expected = sitk.GetArrayFromImage(result.labels)
    assert expected.shape == slicer.util.arrayFromVolume(volume).shape and expected.any()
    np.testing.assert_array_equal(labelmap_of(scene, node, volume), expected)

    confidence = logic.status.confidence_node
    assert confidence.GetName() == "patient confidence"
    assert confidence.GetImageData().GetScalarTypeAsString() == "float"
    np.testing.assert_allclose(ijk_to_ras(confidence), ijk_to_ras(volume))
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(confidence)) == study
    assert other.GetName() == "unused" and other.GetImageData() is None


def test_result_survives_seg_nrrd_save_and_reload(mrml, model_path, tmp_path):
    scene = mrml.scene
    volume = oblique_float_volume(scene)
    node = SegmentLogic(scene).segment(volume, model_path)
    before = labelmap_of(scene, node, volume)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(tmp_path / "result.seg.nrrd"))
    assert storage.WriteData(node)
    reloaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(str(tmp_path / "result.seg.nrrd"))
    assert reader.ReadData(reloaded)
    assert segment_names_and_colors(reloaded) == EXPECTED_SEGMENTS
    np.testing.assert_array_equal(labelmap_of(scene, reloaded, volume), before)


def test_background_process_and_cancel(mrml, model_path, monkeypatch):
    scene = mrml.scene
    volume = oblique_float_volume(scene)
    logic = SegmentLogic(scene, python=sys.executable)
    imports = spy(monkeypatch, logic, "import_result")
    nodes = scene.GetNumberOfNodes()
    logic.start(volume, model_path)
    logic.cancel()
    assert logic.status.state == "cancelled" and scene.GetNumberOfNodes() == nodes

    logic.start(volume, model_path, confidence=True)
    deadline = time.monotonic() + 120
    while logic.poll().state == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert logic.status.state == "done", logic.status.message
    assert logic.status.fraction == 1.0
    node = logic.status.segmentation_node
    assert segment_names_and_colors(node) == EXPECTED_SEGMENTS and node.GetName() == "patient segmentation"
    (_, labels, _, confidence, _, _), _, _ = imports[0]
    np.testing.assert_array_equal(labelmap_of(scene, node, volume), sitk.GetArrayViewFromImage(labels))
    assert confidence is not None and logic.status.confidence_node is not None


def test_replace_or_add_to_an_existing_segmentation(mrml, model_path):
    scene = mrml.scene
    volume = oblique_float_volume(scene)
    image, labels = fx.phantom((12, 40, 40), seed=7)
    existing = fx.add_segmentation(scene, volume, labels, ["drawn by hand"], [(0.1, 0.1, 0.9)], "mine")
    logic = SegmentLogic(scene)
    logic.segment(volume, model_path, segmentation_node=existing, replace=False)
    assert [name for name, _ in segment_names_and_colors(existing)] == ["drawn by hand", "liver", "tumor"]
    logic.segment(volume, model_path, segmentation_node=existing, replace=True)
    assert segment_names_and_colors(existing) == EXPECTED_SEGMENTS and existing.GetName() == "mine"


def test_a_second_apply_reuses_its_nodes_and_outputs_are_never_training_data(mrml, model_path):
    scene = mrml.scene
    volume = oblique_float_volume(scene)
    logic = SegmentLogic(scene)
    first = logic.segment(volume, model_path, confidence=True)
    confidence = logic.status.confidence_node
    assert first.GetSegmentation().ContainsRepresentation("Closed surface"), "shown in 3D"
    again = logic.segment(volume, model_path, confidence=True)
    assert again is first and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert scene.GetNodeByID(confidence.GetID()) is None, "the old confidence map is replaced, not kept beside"
    assert training_volumes(scene) == [volume], "the confidence map is not offered as training data"
    assert uncorrected_predictions(scene) == [first] and corrected_label(scene, volume) is None
    use_as_training_label(first)  # the user corrected it in the Segment Editor and says so
    assert uncorrected_predictions(scene) == [] and corrected_label(scene, volume) is first


def test_terminology_goes_from_the_labeled_segments_through_the_model_to_the_result(mrml, model_path):
    liver, tumor = read_header(model_path)["classes"][1:]
    assert liver["terminology"] == LIVER_TERMINOLOGY
    assert "Tissue" in tumor["terminology"], "Slicer's default terminology of a segment is carried too"
    volume = oblique_float_volume(mrml.scene)
    node = SegmentLogic(mrml.scene).segment(volume, model_path)
    assert node.GetSegmentation().GetNthSegment(0).GetTerminology() == LIVER_TERMINOLOGY


def test_import_names_every_class_and_sets_terminology(mrml):
    scene = mrml.scene
    volume = fx.add_volume(scene, np.zeros((4, 5, 6), np.int16), "small", (1.0, 2.0, 3.0))
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 1:3, 1:3] = 3
    image = image_from_volume(volume)
    result = sitk.GetImageFromArray(labels)
    result.CopyInformation(image)
    terminology = "SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes~^^~^^"
    header = {"classes": [{"value": 0, "name": "background", "color": [0, 0, 0]},
                          {"value": 3, "name": "lesion", "color": [255, 0, 0]},
                          {"value": 1, "name": "liver", "color": [0, 255, 0], "terminology": terminology}]}
    node = SegmentLogic(scene).import_result(volume, result, header)
    assert segment_names_and_colors(node) == [("liver", (0.0, 1.0, 0.0)), ("lesion", (1.0, 0.0, 0.0))]
    liver = node.GetSegmentation().GetNthSegment(0)
    assert liver.GetTerminology() == terminology
    np.testing.assert_array_equal(labelmap_of(scene, node, volume), np.where(labels == 3, 2, 0))

    labels[0, 0, 0] = 7
    stray = sitk.GetImageFromArray(labels)
    stray.CopyInformation(image)
    with pytest.raises(NodeError, match=r"small: the label map holds values \[7\]"):
        SegmentLogic(scene).import_result(volume, stray, header)
    moved = sitk.GetImageFromArray(labels)
    with pytest.raises(NodeError, match="small: the label map has spacing"):
        SegmentLogic(scene).import_result(volume, moved, header)


def test_clear_errors(mrml, model_path, tmp_path):
    from isdnet.errors import ModelFileError

    scene = mrml.scene
    hollow = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "hollow")
    with pytest.raises(NodeError, match="hollow: the volume has no image data"):
        SegmentLogic(scene).segment(hollow, model_path)
    not_a_model = tmp_path / "notes.safetensors"
    not_a_model.write_text("hello", encoding="utf-8")
    volume = oblique_float_volume(scene)
    with pytest.raises(ModelFileError, match="notes.safetensors"):
        SegmentLogic(scene).segment(volume, not_a_model)
    with pytest.raises(ModelFileError, match="notes.safetensors"):
        SegmentLogic(scene).start(volume, not_a_model)


def test_single_slice_and_non_finite_volumes_are_refused_and_left_unchanged(mrml, model_path):
    scene = mrml.scene
    flat = fx.add_volume(scene, np.ones((1, 16, 16), np.float32), "flat")
    with pytest.raises(NodeError, match=r"flat: the volume is a single slice \(16 x 16 x 1 voxels\)"):
        SegmentLogic(scene).segment(flat, model_path)
    voxels = np.ones((6, 16, 16), np.float32)
    voxels[2, 3, 4:7] = np.nan
    voxels[5, 0, 0] = -np.inf
    holes = fx.add_volume(scene, voxels.copy(), "holes")
    before = scene.GetNumberOfNodes()
    for call in (SegmentLogic(scene).segment, SegmentLogic(scene).start):
        with pytest.raises(NodeError, match="holes: the volume has 4 NaN or infinite voxels"):
            call(holes, model_path)
    assert scene.GetNumberOfNodes() == before
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(holes), voxels)


def test_model_description(model_path):
    header = read_header(model_path)
    text = describe_model(header)
    assert text.startswith("Classes: 1 liver, 2 tumor") and "Method: isdnet" in text
