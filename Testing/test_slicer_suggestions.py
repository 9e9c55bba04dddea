"""ISDNet Train's "suggested next" as its widget shows it (``ISDNetLib.suggestions``), on slicer-core, with the
ranking child replaced by a fake runner that writes the JSON ``isdnet rank`` writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import SimpleITK as sitk
import slicer_fixture as fx

from isdnet.config import DEFAULT_RANK_STRATEGY, RANK_DEFAULT_REASON, RANK_STRATEGY_TITLES, Event
from isdnet.rankfile import RankedVolume, write_ranking
from ISDNetLib.suggest import SuggestLogic, segment_editor_node
from ISDNetLib.suggestions import (
    annotate_top,
    describe,
    model_to_rank,
    rank_request,
    strategy_note,
    suggested_text,
    suggestion_rows,
    top_volume,
)


@pytest.fixture
def mrml():
    return fx.make_scene()


class FakeRankRunner:
    """Stands in for ``ProcessRunner`` running ``isdnet rank``: scores the i-th input ``scores[i]``, writes the
    ranking file where ``--json`` says, and gives one progress line a poll."""

    def __init__(self, scores: list[float], returncode: int = 0):
        self.scores, self.final = scores, returncode
        self.args: list[str] = []
        self.voxels: list[tuple[int, ...]] = []
        self._lines: list[str] = []
        self.returncode = None

    def start(self, args, env=None, cwd=None, log_path=None) -> None:
        self.args, self.returncode = list(args), None
        inputs = args[args.index("rank") + 1:args.index("--model")]
        self.voxels = [sitk.ReadImage(p).GetSize() for p in inputs]  # the volumes were written for the child
        names = [Path(p).name.removesuffix(".nrrd") for p in inputs]
        events = [dict(event=Event.RANKED, case=n, index=i + 1, cases=len(names)) for i, n in enumerate(names)]
        if self.final == 0:
            order = sorted(range(len(names)), key=lambda i: -self.scores[i])
            ranking = [RankedVolume(place + 1, names[i], inputs[i], self.scores[i], {"entropy": self.scores[i]})
                       for place, i in enumerate(order)]
            write_ranking(args[args.index("--json") + 1], ranking, args[args.index("--strategy") + 1], "m")
        else:
            events.append(dict(event=Event.ERROR, message="m.safetensors: not a model file"))
        self._lines = [json.dumps(e) for e in events]

    @property
    def is_running(self) -> bool:
        return self.returncode is None and bool(self.args)

    def poll(self) -> list[str]:
        if self._lines:
            return [self._lines.pop(0)]
        if self.args:
            self.returncode = self.final
        return []

    def kill(self) -> None:
        self.returncode = -9

    def log_tail(self, lines: int = 20) -> list[str]:
        return ["a line of the log"]


def scans(scene, count: int = 3) -> list:
    return [fx.add_volume(scene, fx.phantom((12, 32, 32), seed=s)[0], f"scan {s}", (0.8, 0.8, 2.5))
            for s in range(count)]


def run_to_end(logic: SuggestLogic) -> list[float]:
    fractions = []
    for _ in range(20):
        status = logic.poll()
        fractions.append(status.fraction)
        if status.state != "running":
            return fractions
    raise AssertionError(f"the ranking never ended: {logic.status}")


def test_the_suggested_column_the_strategy_line_and_annotate_top(mrml, tmp_path):
    scene = mrml.scene
    volumes = scans(scene)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    runner = FakeRankRunner([0.125, 0.5, 0.25])
    logic = SuggestLogic(scene, runner=runner, python="python")
    logic.start(rank_request([None, str(model)], volumes), volumes, device="cpu")
    assert describe(scene, logic.status) == "Ranking 3 volumes..."
    assert runner.voxels == [(32, 32, 12)] * 3
    assert runner.args[runner.args.index("--strategy") + 1] == DEFAULT_RANK_STRATEGY
    assert runner.args[runner.args.index("--device") + 1] == "cpu"
    assert run_to_end(logic) == pytest.approx([1 / 3, 2 / 3, 0.99, 1.0])
    status = logic.status
    assert status.state == "done" and [s.volume_node for s in status.suggestions] == [volumes[1], volumes[2],
                                                                                        volumes[0]]
    assert [suggested_text(status, v) for v in volumes] == ["#3 (0.125)", "#1 (0.500)", "#2 (0.250)"]
    assert suggested_text(status, scans(scene, 1)[0]) == "", "a volume the ranking did not hold"
    line = describe(scene, status)
    assert line.startswith(f"Annotate 'scan 1' next. Ordered by '{DEFAULT_RANK_STRATEGY}': ")
    assert RANK_STRATEGY_TITLES[DEFAULT_RANK_STRATEGY] in line and line.endswith(RANK_DEFAULT_REASON)
    assert suggestion_rows(scene, status) == [
        dict(id=volumes[1].GetID(), name="scan 1", rank=1, score="0.500", strategy=DEFAULT_RANK_STRATEGY),
        dict(id=volumes[2].GetID(), name="scan 2", rank=2, score="0.250", strategy=DEFAULT_RANK_STRATEGY),
        dict(id=volumes[0].GetID(), name="scan 0", rank=3, score="0.125", strategy=DEFAULT_RANK_STRATEGY)]

    volume, segmentation = annotate_top(scene, status)
    editor = segment_editor_node(scene)
    assert volume is volumes[1] and editor.GetSourceVolumeNode() is volumes[1]
    assert editor.GetSegmentationNode() is segmentation and segmentation.GetName() == "scan 1 segmentation"
    scene.RemoveNode(volumes[1])  # the top volume deleted: the next one is on top
    assert top_volume(scene, status) is volumes[2] and describe(scene, status).startswith("Annotate 'scan 2'")
    assert [row["name"] for row in suggestion_rows(scene, status)] == ["scan 2", "scan 0"]


def test_a_failed_or_impossible_ranking_is_said_in_one_line(mrml, tmp_path):
    scene = mrml.scene
    volumes = scans(scene, 2)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    logic = SuggestLogic(scene, runner=FakeRankRunner([0.1, 0.2], returncode=2), python="python")
    logic.start(model, volumes)
    run_to_end(logic)
    assert logic.status.state == "failed" and logic.status.suggestions == []
    assert describe(scene, logic.status) == "Ranking failed: m.safetensors: not a model file"
    assert top_volume(scene, logic.status) is None
    with pytest.raises(ValueError, match="no suggested volume to annotate"):
        annotate_top(scene, logic.status)
    with pytest.raises(ValueError, match="no model to rank with yet"):
        rank_request([None, "", str(tmp_path / "missing.safetensors"), str(tmp_path)], volumes)
    with pytest.raises(ValueError, match="no unlabeled volume to rank"):
        rank_request([str(model)], [])
    trained = tmp_path / "trained.safetensors"
    trained.write_bytes(b"weights")
    assert model_to_rank([str(trained), str(model)]) == trained, "the finished training's model comes first"
    assert model_to_rank([None, str(model)]) == model


@pytest.mark.parametrize("strategy, expected", [
    ("flip", "Ordered by 'flip': mean left-right flip disagreement (S) over the predicted foreground, highest "
             "first."),
    ("random", "Ordered by 'random': a seeded random order."),
])
def test_the_strategy_line_names_the_order_and_says_why_only_for_the_default(strategy, expected):
    reason = f" {RANK_DEFAULT_REASON}" if strategy == DEFAULT_RANK_STRATEGY else ""
    assert strategy_note(strategy) == expected + reason
