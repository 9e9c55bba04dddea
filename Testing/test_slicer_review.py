"""ISDNet Segment's review of low-confidence regions and ISDNet Train's "suggested next" order, on slicer-core."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import slicer.util
import slicer_fixture as fx
import torch
import vtk
from test_outputs import tiny_model

from isdnet.config import DEFAULT_UNCERTAINTY, UNCERTAINTY_TITLES
from isdnet.rank import rank_images
from isdnet.uncertainty import analyse
from ISDNetLib.nodes import UNCERTAINTY, output_kind, training_volumes
from ISDNetLib.review import jump_to_slice, slice_axis, slice_centre, uncertain_slices
from ISDNetLib.segment import SegmentLogic
from ISDNetLib.suggest import SuggestLogic, open_for_annotation, segment_editor_node
from ISDNetLib.volumes import image_from_volume


@pytest.fixture
def mrml():
    return fx.make_scene()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An untrained tiny model with a confidence network: its uncertainty is whatever it is, and the tests compare
    the scene's nodes with the engine's own results."""
    return tiny_model(tmp_path_factory.mktemp("model") / "m.safetensors")


# A volume whose K axis runs left-right, J anterior-posterior and I superior-inferior (a sagittal acquisition).
SAGITTAL = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_uncertain_slices_rank_by_area_along_the_views_axis(mrml):
    voxels = np.zeros((6, 5, 4), dtype=np.float32)  # (k, j, i)
    voxels[:, :, 1] = 0.5  # I = 1: half uncertain over 6 x 5 voxels
    voxels[2, 1:3, 3] = 1.0  # I = 3: two fully uncertain voxels
    volume = fx.add_volume(mrml.scene, voxels, "uncertainty", (2.0, 0.5, 3.0), (10.0, 20.0, 30.0), SAGITTAL)
    assert slice_axis(volume, "Red") == 0 and slice_axis(volume, "Yellow") == 2 and slice_axis(volume, "Green") == 1
    pixel_area = 0.5 * 3.0  # J and K spacing: the in-plane area of an axial (I) slice
    assert uncertain_slices(volume, "Red") == [(1, pytest.approx(15 * pixel_area)),
                                               (3, pytest.approx(2 * pixel_area))]
    assert uncertain_slices(volume, "Red", count=1) == [(1, pytest.approx(15 * pixel_area))]
    assert [i for i, _ in uncertain_slices(volume, "Yellow")] == [2, 0, 1, 3, 4, 5]  # K: slice 2 holds more


def test_a_click_jumps_the_view_to_the_slice(mrml):
    views = fx.add_slice_views(mrml.scene)
    volume = fx.add_volume(mrml.scene, np.zeros((6, 5, 4), np.float32), "v", (2.0, 0.5, 3.0), (10.0, 20.0, 30.0),
                           fx.rotation(20, 0) @ SAGITTAL)
    for view in ("Red", "Yellow", "Green"):
        for index in (0, 2):
            node = jump_to_slice(mrml.scene, view, volume, index)
            assert node is views[view]
            matrix = slicer.util.arrayFromVTKMatrix(node.GetSliceToRAS())
            point = np.array(slice_centre(volume, view, index))
            assert abs(float(np.dot(point - matrix[:3, 3], matrix[:3, 2]))) < 1e-6, (view, index)
    ijk = [1.5, 2.0, 2.5]  # the centre of slice 2 of the K axis (the sagittal one)
    ijk[slice_axis(volume, "Yellow")] = 2
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    assert np.allclose(slice_centre(volume, "Yellow", 2), (np.array(matrix.MultiplyPoint([*ijk, 1.0]))[:3]))
    with pytest.raises(Exception, match="has no slice 4"):
        slice_centre(volume, "Red", 4)


def test_review_shows_the_models_uncertainty_over_the_volume(mrml, model):
    scene = mrml.scene
    fx.add_slice_views(scene)
    image, _ = fx.phantom((12, 32, 32), seed=3)
    volume = fx.add_volume(scene, image, "patient", (0.8, 0.8, 2.5), (5.0, -3.0, 2.0), fx.rotation(15, 2))
    logic = SegmentLogic(scene)
    slices = logic.review(volume, model, view="Red", count=5)
    node = logic.status.uncertainty_node
    assert output_kind(node) == UNCERTAINTY and node not in training_volumes(scene)
    assert node.GetAttribute("ISDNet.Uncertainty") == DEFAULT_UNCERTAINTY
    assert UNCERTAINTY_TITLES[DEFAULT_UNCERTAINTY] in logic.status.message
    expected = analyse(image_from_volume(volume), model, kinds=[DEFAULT_UNCERTAINTY]).maps[DEFAULT_UNCERTAINTY]
    np.testing.assert_allclose(slicer.util.arrayFromVolume(node), sitk.GetArrayViewFromImage(expected), atol=1e-6)
    assert slices == uncertain_slices(node, "Red", 5) and len(slices) == 5
    assert [a for _, a in slices] == sorted((a for _, a in slices), reverse=True)
    composite = scene.GetSingletonNode("Red", "vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == node.GetID() and composite.GetBackgroundVolumeID() == volume.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.5)
    logic.review(volume, model, uncertainty="flip")  # a second review replaces the first map
    volumes = [scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
               for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
    maps = [n for n in volumes if output_kind(n)]
    assert len(maps) == 1 and maps[0].GetAttribute("ISDNet.Uncertainty") == "flip"


def test_in_process_work_runs_torch_on_one_thread_unless_its_threads_wait_passively(mrml, model, monkeypatch):
    import isdnet.rank
    import isdnet.uncertainty

    seen = []

    def spy(real):
        def wrapped(*args, **kwargs):
            seen.append(torch.get_num_threads())
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(isdnet.uncertainty, "analyse", spy(isdnet.uncertainty.analyse))
    monkeypatch.setattr(isdnet.rank, "rank_images", spy(isdnet.rank.rank_images))
    image, _ = fx.phantom((12, 32, 32), seed=4)
    volume = fx.add_volume(mrml.scene, image, "patient", (1.0, 1.0, 2.5), (0.0, 0.0, 0.0), np.eye(3))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # Slicer's torch: loaded with spinning threads
        SegmentLogic(mrml.scene).review(volume, model, count=2)
        SuggestLogic(mrml.scene).suggest(model, [volume])
        assert seen == [1, 1] and torch.get_num_threads() == 2, "one thread inside, the count restored after"
        monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # isdnet-web's: set before torch loaded
        SegmentLogic(mrml.scene).review(volume, model, count=2)
        assert seen == [1, 1, 2]
    finally:
        torch.set_num_threads(before)


def test_a_review_above_the_in_process_limit_runs_in_a_child_with_the_same_map(mrml, model):
    scene = mrml.scene
    fx.add_slice_views(scene)
    image, _ = fx.phantom((12, 32, 32), seed=4)
    volume = fx.add_volume(scene, image, "large", (0.8, 0.8, 2.5), (5.0, -3.0, 2.0), fx.rotation(15, 2))
    logic = SegmentLogic(scene, python=sys.executable)
    segmented = logic.segment(volume, model, device="cpu")
    assert logic.review(volume, model, uncertainty="flip", device="cpu", view="Green", count=4,
                        in_process_max_voxels=12 * 32 * 32 - 1) is None
    assert logic.status.state == "running" and "uncertainty of 'large'" in logic.status.message
    command = logic.runner.log_tail(1)[0]  # the log's first line: the child's command
    assert " -m isdnet segment " in command and command.endswith("--uncertainty flip")
    deadline = time.monotonic() + 120
    while logic.poll().state == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    status = logic.status
    assert status.state == "done", status.message
    node = status.uncertainty_node
    assert output_kind(node) == UNCERTAINTY and node.GetAttribute("ISDNet.Uncertainty") == "flip"
    expected = analyse(image_from_volume(volume), model, kinds=["flip"], device="cpu").maps["flip"]
    np.testing.assert_allclose(slicer.util.arrayFromVolume(node), sitk.GetArrayViewFromImage(expected), atol=1e-5)
    assert status.slices == uncertain_slices(node, "Green", 4) and len(status.slices) == 4
    assert status.segmentation_node is segmented, "a review keeps the segmentation to use as a label"
    composite = scene.GetSingletonNode("Green", "vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == node.GetID()


def unlabeled_volumes(scene) -> list:
    return [fx.add_volume(scene, fx.phantom((12, 32, 32), seed=s)[0] * (1 + 3 * (s == 2)), f"scan {s}",
                          (0.8, 0.8, 2.5)) for s in range(3)]


def test_suggest_in_process_and_in_a_child_give_the_engines_order(mrml, model):
    scene = mrml.scene
    volumes = unlabeled_volumes(scene)
    images = [image_from_volume(v) for v in volumes]
    expected = [v.name for v in rank_images([v.GetName() for v in volumes], images, model, "entropy")]
    logic = SuggestLogic(scene, python=sys.executable)
    in_process = logic.suggest(model, volumes, "entropy", device="cpu")
    assert [s.volume_node.GetName() for s in in_process] == expected
    assert [s.rank for s in in_process] == [1, 2, 3] and in_process[0].score >= in_process[-1].score
    logic.start(model, volumes, "entropy", device="cpu")
    deadline = time.monotonic() + 120
    while logic.poll().state == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert logic.status.state == "done", logic.status.message
    child = logic.status.suggestions
    assert [s.volume_node for s in child] == [s.volume_node for s in in_process]
    assert [s.score for s in child] == pytest.approx([s.score for s in in_process], abs=1e-5)


def test_a_failed_ranking_says_why(mrml, tmp_path):
    not_a_model = tmp_path / "broken.safetensors"
    not_a_model.write_bytes(b"nothing")
    logic = SuggestLogic(mrml.scene, python=sys.executable)
    logic.start(not_a_model, unlabeled_volumes(mrml.scene)[:1])
    deadline = time.monotonic() + 60
    while logic.poll().state == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert logic.status.state == "failed" and str(not_a_model) in logic.status.message
    assert logic.status.suggestions == []


def test_open_for_annotation_selects_the_volume_and_a_segmentation_in_the_editor(mrml, model):
    scene = mrml.scene
    first, second, third = unlabeled_volumes(scene)
    editor = segment_editor_node(scene)
    assert segment_editor_node(scene) is editor, "the Segment Editor's one parameter node"
    fresh = open_for_annotation(scene, first)
    assert editor.GetSourceVolumeNode() is first and editor.GetSegmentationNode() is fresh
    assert fresh.GetName() == "scan 0 segmentation" and fresh.GetNodeReference("referenceImageGeometryRef") is first
    assert open_for_annotation(scene, first) is fresh, "a second open reuses the user's segmentation"
    predicted = SegmentLogic(scene).segment(second, model, device="cpu")
    assert open_for_annotation(scene, second) is predicted, "ISDNet's prediction is there to be corrected"
    assert editor.GetSourceVolumeNode() is second and editor.GetSegmentationNode() is predicted
    _, labels = fx.phantom((12, 32, 32), seed=2)
    own = fx.add_segmentation(scene, third, labels, fx.ORGAN_NAMES, fx.ORGAN_COLORS)
    assert open_for_annotation(scene, third) is own and editor.GetSourceVolumeNode() is third
