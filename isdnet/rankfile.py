"""The ranking file of ``isdnet rank`` (JSON) and its table, without torch: the front ends read it from here."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import UNCERTAINTIES
from .errors import InputError, PathLike
from .files import write_atomically

RANK_FORMAT = "isdnet-rank"


@dataclass
class RankedVolume:
    """One volume of a ranking: its place (1 = annotate first), the strategy's score and every signal's."""

    rank: int
    name: str
    path: str
    score: float
    scores: dict[str, float] = field(default_factory=dict)


def ranking_document(ranking: Sequence[RankedVolume], strategy: str, model_path: PathLike) -> dict[str, Any]:
    """The JSON document of a ranking: its format, strategy, model and volumes in order."""
    return dict(format=RANK_FORMAT, strategy=strategy, model=str(model_path),
                volumes=[asdict(volume) for volume in ranking])


def write_ranking(path: PathLike, ranking: Sequence[RankedVolume], strategy: str, model_path: PathLike) -> Path:
    """Write the ranking as JSON (atomically) and return the path."""
    text = json.dumps(ranking_document(ranking, strategy, model_path), indent=1, allow_nan=False)
    write_atomically(Path(path), text.encode("utf-8"))
    return Path(path)


def read_ranking(path: PathLike) -> tuple[str, list[RankedVolume]]:
    """The strategy and volumes of a ranking file ``write_ranking`` wrote; anything else is refused, naming it."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != RANK_FORMAT:
            raise ValueError(f"its format is not {RANK_FORMAT}")
        volumes = [RankedVolume(int(v["rank"]), str(v["name"]), str(v["path"]), float(v["score"]),
                                {str(k): float(s) for k, s in v.get("scores", {}).items()})
                   for v in document["volumes"]]
        return str(document["strategy"]), volumes
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(path, f"is not an ISDNet ranking ({error})") from None


def ranking_table(ranking: Sequence[RankedVolume], strategy: str) -> str:
    """The ranking as a plain-text table, one volume a line, for people."""
    signals = [s for s in UNCERTAINTIES if any(s in v.scores for v in ranking)]
    lines = [f"{'rank':>4}  {strategy + ' score':>18}  " + "".join(f"{s:>11}  " for s in signals) + "volume"]
    for v in ranking:
        lines.append(f"{v.rank:>4}  {v.score:>18.4f}  " + "".join(f"{v.scores[s]:>11.4f}  " for s in signals)
                     + v.name)
    return "\n".join(lines)
