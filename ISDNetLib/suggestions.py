"""How the front ends show a "suggested next" ranking (``suggest.SuggestLogic``'s status): the text of a volume's
"suggested" cell, the line saying which strategy ordered the volumes and why it is the default, the rows of the
web app's list, which model to rank with, and opening the top volume for annotation.

Kept apart from the Qt widget so that ISDNet Train and the web app say the same and the tests check it on
slicer-core.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

from isdnet.config import DEFAULT_RANK_STRATEGY, MODEL_SUFFIX, RANK_DEFAULT_REASON, RANK_STRATEGY_TITLES

from .suggest import SuggestStatus, open_for_annotation


def score_text(score: float) -> str:
    """A strategy's score as the front ends print it."""
    return f"{score:.3f}"


def strategy_note(strategy: str) -> str:
    """Which strategy ordered the volumes, in words, and for the default strategy why it is the default."""
    title = RANK_STRATEGY_TITLES.get(strategy, strategy)
    text = f"Ordered by '{strategy}': {title}{'' if strategy == 'random' else ', highest first'}."
    return f"{text} {RANK_DEFAULT_REASON}" if strategy == DEFAULT_RANK_STRATEGY else text


def _present(scene: Any, node: Any) -> bool:
    return node is not None and node.GetID() is not None and scene.GetNodeByID(node.GetID()) is node


def suggested_text(status: SuggestStatus, volume_node: Any) -> str:
    """The "suggested" cell of a volume: ``#rank (score)`` when the last ranking holds it, else empty."""
    for suggestion in status.suggestions:
        if suggestion.volume_node is volume_node:
            return f"#{suggestion.rank} ({score_text(suggestion.score)})"
    return ""


def top_volume(scene: Any, status: SuggestStatus) -> Optional[Any]:
    """The best-ranked volume of the last ranking that is still in the scene, or None."""
    return next((s.volume_node for s in status.suggestions if _present(scene, s.volume_node)), None)


def describe(scene: Any, status: SuggestStatus) -> str:
    """One line on where the ranking stands: running, why it failed, or which volume comes first and why."""
    if status.state == "done":
        top = top_volume(scene, status)
        if top is None:
            return "No ranked volume is left in the scene."
        return f"Annotate '{top.GetName()}' next. {strategy_note(status.strategy)}"
    return status.message.split("\n")[0]


def suggestion_rows(scene: Any, status: SuggestStatus) -> list[dict[str, Any]]:
    """The ranking as plain rows (node ID, name, rank, score text, strategy), best first, for a list on a page."""
    return [dict(id=s.volume_node.GetID(), name=s.volume_node.GetName(), rank=s.rank, score=score_text(s.score),
                 strategy=status.strategy) for s in status.suggestions if _present(scene, s.volume_node)]


def model_to_rank(candidates: Iterable[Optional[str]]) -> Optional[Path]:
    """The first of ``candidates`` (a finished training's model, the model chosen) that is a model file."""
    for candidate in candidates:
        if candidate and str(candidate).endswith(MODEL_SUFFIX) and Path(candidate).is_file():
            return Path(candidate)
    return None


def rank_request(candidates: Iterable[Optional[str]], volume_nodes: Sequence[Any]) -> Path:
    """The model to rank ``volume_nodes`` with (``model_to_rank``); ValueError, in plain words, when there is no
    model yet or no volume to rank."""
    model = model_to_rank(candidates)
    if model is None:
        raise ValueError("there is no model to rank with yet: train one, or choose a trained model as the output "
                         "model")
    if not volume_nodes:
        raise ValueError("there is no unlabeled volume to rank: tick volumes without a segmentation")
    return model


def annotate_top(scene: Any, status: SuggestStatus, editor_node: Any = None) -> tuple[Any, Any]:
    """Open the top suggested volume in the Segment Editor (``suggest.open_for_annotation``); returns the volume
    and the segmentation to edit. ValueError when no ranked volume is left."""
    volume = top_volume(scene, status)
    if volume is None:
        raise ValueError("no suggested volume to annotate: press Suggest first")
    return volume, open_for_annotation(scene, volume, editor_node)
