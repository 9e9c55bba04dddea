"""Which volume to annotate next: unlabeled volumes scored by a model's uncertainty and ordered, most useful first.

Each volume gets the scores of ``uncertainty.analyse`` (one pass of S, and D where the model has it); a strategy of
``config.RANK_STRATEGIES`` orders them: by one score, by ``combined`` (the mean over the signals of each volume's
rank among the volumes, 0 lowest to 1 highest) or by ``random`` (seeded). The default is the one the benchmark
(``isdnet-bench active``) measures best (``config.RANK_DEFAULT_REASON``, docs/active.md).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import SimpleITK as sitk

from .config import DATASET_FILE, DEFAULT_RANK_STRATEGY, RANK_STRATEGIES, UNCERTAINTIES
from .dataset import Case, load_dataset, unlabeled_cases
from .errors import InputError, PathLike
from .modelfile import LoadedModel, load_model
from .rankfile import RankedVolume
from .uncertainty import analyse, available_uncertainties, check_uncertainties


def rank_inputs(paths: Sequence[PathLike]) -> list[Case]:
    """The volumes to rank: image files, folders of images, and dataset folders (their ``unlabeled`` cases)."""
    cases: list[Case] = []
    for path in map(Path, paths):
        if (path / DATASET_FILE).is_file():
            listed = load_dataset(path).unlabeled
            if not listed:
                raise InputError(path / DATASET_FILE, "lists no unlabeled cases to rank")
            cases += listed
        else:
            cases += unlabeled_cases([path])
    if not cases:
        raise InputError(paths[0] if paths else ".", "holds no volume to rank")
    return cases


def signals_for(strategy: str, model: LoadedModel) -> tuple[str, ...]:
    """The uncertainty scores a strategy needs: one map, all the model gives (``combined``), or none (``random``)."""
    if strategy not in RANK_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(RANK_STRATEGIES)}")
    if strategy == "random":
        return ()
    return available_uncertainties(model) if strategy == "combined" else (strategy,)


def combined_scores(scores: Sequence[dict[str, float]], signals: Sequence[str]) -> list[float]:
    """Each volume's mean over ``signals`` of its rank among the volumes (0 lowest .. 1 highest; ties share)."""
    n = len(scores)
    if n == 1:
        return [0.5]
    totals = [0.0] * n
    for signal in signals:
        values = [s[signal] for s in scores]
        for i, value in enumerate(values):
            below = sum(v < value for v in values)
            equal = sum(v == value for v in values) - 1
            totals[i] += (below + equal / 2) / (n - 1)
    return [t / len(signals) for t in totals]


def order(names: Sequence[str], scores: Sequence[dict[str, float]], strategy: str, seed: int = 0,
          signals: Sequence[str] = UNCERTAINTIES) -> list[tuple[int, float]]:
    """(index, score) of the volumes, highest score first (ties by name): the strategy's ranking of ``scores``.

    ``combined`` uses those of ``signals`` every volume has; any other strategy name is read as a score key, so
    a benchmark may rank by a signal of its own.
    """
    if strategy == "random":
        rng = random.Random(seed)
        strategy_scores = [rng.random() for _ in names]
    elif strategy == "combined":
        present = [s for s in signals if all(s in volume for volume in scores)]
        strategy_scores = combined_scores(scores, present)
    else:
        strategy_scores = [volume[strategy] for volume in scores]
    ranked = sorted(range(len(names)), key=lambda i: (-strategy_scores[i], names[i]))
    return [(i, strategy_scores[i]) for i in ranked]


def rank_images(names: Sequence[str], images: Sequence[Union[sitk.Image, PathLike]],
                model: Union[LoadedModel, PathLike], strategy: str = DEFAULT_RANK_STRATEGY, *, seed: int = 0,
                device: str = "auto", precision: str = "auto", batch_size: int = 16,
                progress: Optional[Callable[[int, str, dict[str, float]], None]] = None) -> list[RankedVolume]:
    """Score every image (a file or a SimpleITK image) with the model and rank them by ``strategy``;
    ``progress(index, name, scores)`` after each."""
    model_source = None if isinstance(model, LoadedModel) else model
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    signals = signals_for(strategy, loaded)
    check_uncertainties(loaded, signals, model_source)
    scores: list[dict[str, float]] = []
    for index, (name, image) in enumerate(zip(names, images)):
        found = analyse(image, loaded, kinds=signals, maps=False, batch_size=batch_size, device=device,
                        precision=precision).scores if signals else {}
        scores.append(found)
        if progress is not None:
            progress(index, name, found)
    paths = ["" if isinstance(image, sitk.Image) else str(image) for image in images]
    return [RankedVolume(place + 1, names[i], paths[i], score, scores[i])
            for place, (i, score) in enumerate(order(names, scores, strategy, seed, signals))]


def rank_volumes(cases: Sequence[Case], model: Union[LoadedModel, PathLike], strategy: str = DEFAULT_RANK_STRATEGY,
                 **options: Any) -> list[RankedVolume]:
    """``rank_images`` of the cases' image files, by case name."""
    return rank_images([c.name for c in cases], [c.image for c in cases], model, strategy, **options)
