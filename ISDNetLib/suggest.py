"""SuggestLogic: which unlabeled volume node to annotate next, by ``isdnet rank``, and opening it for annotation.

As with segmentation, small inputs are ranked in this process (``suggest``) and others by an ``isdnet rank`` child
process (``start``, followed with ``poll``), whose JSON ranking is read back. ``open_for_annotation`` makes the
Segment Editor edit the chosen volume: its source volume, and a segmentation to draw in (ISDNet's prediction of
that volume when there is one, so the user corrects it rather than starting empty).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from isdnet.config import DEFAULT_RANK_STRATEGY, RANK_FILE, Event
from isdnet.rankfile import read_ranking
from isdnet.threads import without_spinning

from .child import ChildJobLogic
from .nodes import PREDICTION, output_kind, output_of
from .runner import ProcessRunner, engine_environment
from .volumes import image_from_volume, require_image_data, write_volume

EDITOR_SINGLETON = "SegmentEditor"  # the Segment Editor module's own parameter node


@dataclass
class Suggestion:
    """A volume node in the suggested order: 1 = annotate first, with the strategy's score."""

    rank: int
    volume_node: Any
    score: float
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class SuggestStatus:
    """Where a ranking stands; ``state`` is idle, running, done, cancelled or failed."""

    state: str = "idle"
    fraction: float = 0.0
    message: str = ""
    strategy: str = DEFAULT_RANK_STRATEGY
    suggestions: list[Suggestion] = field(default_factory=list)


def _suggestions(ranking: list[Any], nodes: dict[str, Any]) -> list[Suggestion]:
    return [Suggestion(v.rank, nodes[v.name], v.score, dict(v.scores)) for v in ranking]


class SuggestLogic(ChildJobLogic):
    """Ranks unlabeled volume nodes of one scene with an ISDNet model: the "suggested next" order."""

    what = "Ranking"

    def __init__(self, scene: Any, runner: Optional[ProcessRunner] = None, python: Optional[str] = None):
        super().__init__(scene, runner, python)
        self.status = SuggestStatus()
        self._nodes: dict[str, Any] = {}
        self._folder: Optional[Path] = None

    @staticmethod
    def _names(volume_nodes: list[Any]) -> dict[str, Any]:
        """A file name for each node (``volume0``, ...), so that names in the ranking map back to the nodes."""
        for node in volume_nodes:
            require_image_data(node)
        return {f"volume{i}": node for i, node in enumerate(volume_nodes)}

    def suggest(self, model_path: Path, volume_nodes: list[Any], strategy: str = DEFAULT_RANK_STRATEGY, *,
                device: str = "auto", seed: int = 0) -> list[Suggestion]:
        """Rank ``volume_nodes`` now, in this process; the order is also kept in ``self.status``."""
        from isdnet.rank import rank_images

        nodes = self._names(volume_nodes)
        with without_spinning():
            ranking = rank_images(list(nodes), [image_from_volume(n) for n in nodes.values()], Path(model_path),
                                  strategy, seed=seed, device=device)
        self.status = SuggestStatus("done", 1.0, "", strategy, _suggestions(ranking, nodes))
        return self.status.suggestions

    def command(self, inputs: list[Path], model_path: Path, json_path: Path, strategy: str, device: str,
                seed: int) -> list[str]:
        """The command line of the ranking child."""
        return [self.python, "-m", "isdnet", "rank", *map(str, inputs), "--model", str(model_path), "--json",
                str(json_path), "--strategy", strategy, "--seed", str(seed), "--device", device, "--progress-json"]

    def start(self, model_path: Path, volume_nodes: list[Any], strategy: str = DEFAULT_RANK_STRATEGY, *,
              device: str = "auto", seed: int = 0) -> None:
        """Start ranking ``volume_nodes`` in a child process; follow it with ``poll``, end it with ``cancel``."""
        self._nodes = self._names(volume_nodes)
        self._folder = Path(tempfile.mkdtemp(prefix="isdnet-rank-"))
        inputs = []
        for name, node in self._nodes.items():
            write_volume(node, self._folder / "volumes" / f"{name}.nrrd")
            inputs.append(self._folder / "volumes" / f"{name}.nrrd")
        self._started()
        self.status = SuggestStatus("running", 0.0, f"Ranking {len(inputs)} volumes...", strategy)
        self.runner.start(self.command(inputs, Path(model_path), self._folder / RANK_FILE, strategy, device, seed),
                          env=engine_environment(), log_path=str(self._folder / "rank.log"))

    def _progress(self, event: dict[str, Any]) -> None:
        if event["event"] == Event.RANKED and event.get("cases"):
            self.status.fraction = min(0.99, float(event["index"]) / float(event["cases"]))

    def _finish(self, returncode: int) -> None:
        status, folder = self.status, self._folder
        assert folder is not None
        try:
            if not self.ended_without_result(returncode):
                status.strategy, ranking = read_ranking(folder / RANK_FILE)
                status.suggestions = _suggestions(ranking, self._nodes)
                status.state, status.fraction, status.message = "done", 1.0, ""
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            self._folder = None


def segment_editor_node(scene: Any) -> Any:
    """The Segment Editor module's parameter node (made, as the module makes it, when there is none yet)."""
    node = scene.GetSingletonNode(EDITOR_SINGLETON, "vtkMRMLSegmentEditorNode")
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        node.SetSingletonTag(EDITOR_SINGLETON)
    return node


def open_for_annotation(scene: Any, volume_node: Any, editor_node: Any = None) -> Any:
    """Make the Segment Editor edit ``volume_node``: it becomes the source volume, and the segmentation is ISDNet's
    prediction of it, else a segmentation of the user's that references it, else a new empty one. Returns that
    segmentation node."""
    require_image_data(volume_node)
    segmentation = output_of(scene, volume_node, PREDICTION) or _user_segmentation(scene, volume_node)
    if segmentation is None:
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} segmentation")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    editor = editor_node or segment_editor_node(scene)
    editor.SetAndObserveSegmentationNode(segmentation)
    editor.SetAndObserveSourceVolumeNode(volume_node)
    return segmentation


def _user_segmentation(scene: Any, volume_node: Any) -> Any:
    """A segmentation the user made on ``volume_node`` (its reference geometry node), if any."""
    role = "referenceImageGeometryRef"
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
        if output_kind(node) is None and node.GetNodeReference(role) is volume_node:
            return node
    return None
