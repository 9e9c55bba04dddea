"""Which volume to annotate next, measured (``isdnet-bench active``): does annotating the volumes a strategy ranks
first help more than annotating volumes at random?

For each seed: start from ``--start-fraction`` (1/16) of the training cases labeled, the rest an unlabeled pool;
train; rank the pool by every strategy (``config.RANK_STRATEGIES``, and ``importance``: the mean over a volume's
slices of D0's weight 1 - D0, read from the training's checkpoint since the model file holds no D0); give the top
``--add`` (8) of each strategy, and 8 at random, their labels; retrain from scratch with the same budget of steps;
score on the test split. The gain of a strategy is its test Dice minus random's, paired seed by seed, with a 95%
interval. The first model's per-voxel uncertainty maps are also checked against its errors on the test split
(AUROC for wrong vs right voxels, and the share of all wrong voxels among the 10% most uncertain).

Each training leaves a small JSON record in ``--records``, so an interrupted benchmark resumes where it stopped;
the report (``active_report``: Markdown, JSON, PNG) is rebuilt from the records.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import SimpleITK as sitk
import torch

from isdnet.config import (
    DEFAULT_UNCERTAINTY,
    RANK_STRATEGIES,
    UNCERTAINTIES,
    UNCERTAINTY_TITLES,
    TrainConfig,
    checkpoint_path,
)
from isdnet.dataset import Case, load_dataset, split_labeled
from isdnet.metrics import auroc, evaluate_cases
from isdnet.modelfile import load_model
from isdnet.rank import order
from isdnet.uncertainty import analyse

from .accuracy import add_training_arguments, importance_weights, score
from .accuracy_plan import Run, split_cases, train_config
from .active_report import render_chart, render_markdown, render_review, render_review_example, summarise, worst_slice
from .machine import code_commit, describe_machine
from .records import add_output_arguments, apply_quick, same_settings, save_record, train_run

IMPORTANCE = "importance"  # D0's signal: only the benchmark has it (from the checkpoint)
STRATEGIES = (*[s for s in RANK_STRATEGIES if s != "random"], IMPORTANCE)
REFERENCE = "random"
TOP_SHARE = 0.1  # the review check: the share of all wrong voxels among this share of the most uncertain ones
QUICK = dict(cases=24, test_cases=4, seeds=[0], steps=60, add=2, start_fraction=0.125, warmup_epochs=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``isdnet-bench active``; the training options are ``isdnet-bench accuracy``'s."""
    add_output_arguments(parser, "active", "models and logs of the rounds")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                        help="paired seeds (each: the starting labeled cases, the random pick, initial weights)")
    parser.add_argument("--start-fraction", type=float, default=1 / 16, help="labeled share of the training cases "
                        "at the start")
    parser.add_argument("--add", type=int, default=8, help="volumes each strategy adds to the labeled ones")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES),
                        help="compared with random, which always runs")
    parser.add_argument("--method", default="isdnet", help="what every round trains (isdnet has D and D0)")
    add_training_arguments(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the finished records, training nothing (a seed without its "
                             "start record is left out)")
    parser.add_argument("--review", nargs="+", type=Path, default=[], metavar="MODEL",
                        help="train nothing: how each uncertainty map of these trained models finds their errors "
                             "on the test split")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in minutes (explicit options override it): "
                        + ", ".join(f"{k}={v}" for k, v in QUICK.items()))


def _train(config: TrainConfig, labeled: Sequence[Case], unlabeled: Sequence[Case], labels: dict[int, str],
           model: Path) -> Any:
    return train_run(labeled, unlabeled, labels, model, config)[0]


def review(model: Path, test_cases: Sequence[Case], labels: dict[int, str], config: TrainConfig
           ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The model's test metrics, and for each uncertainty map how it finds S's errors: AUROC (wrong vs right
    voxels) and the share of all wrong voxels among the ``TOP_SHARE`` most uncertain voxels."""
    loaded = load_model(model)
    maps: dict[str, list[np.ndarray]] = {}
    wrong: list[np.ndarray] = []

    def pairs() -> Any:
        for case in test_cases:
            result = analyse(case.image, loaded, device=config.device, precision=config.precision)
            truth = sitk.ReadImage(str(case.label))
            wrong.append((sitk.GetArrayViewFromImage(result.labels) != sitk.GetArrayViewFromImage(truth)).ravel())
            for kind, image in result.maps.items():
                maps.setdefault(kind, []).append(sitk.GetArrayFromImage(image).ravel())
            yield case.name, result.labels, truth

    metrics = evaluate_cases(pairs(), sorted(labels))
    flags = np.concatenate(wrong)
    found = {}
    for kind, values in maps.items():
        scores = np.concatenate(values)
        top = np.argpartition(-scores, max(0, int(np.ceil(TOP_SHARE * scores.size)) - 1))[
            :int(np.ceil(TOP_SHARE * scores.size))]
        found[kind] = dict(auroc_wrong=auroc(scores, flags), wrong_share=float(flags.mean()),
                           wrong_in_top=float(flags[top].sum() / flags.sum()) if flags.any() else None)
    return metrics, found


def start_round(seed: int, config: TrainConfig, labeled: Sequence[Case], pool: Sequence[Case],
                test_cases: Sequence[Case], labels: dict[int, str], folder: Path) -> dict[str, Any]:
    """Train on the starting labels, score every pool volume by every signal, review the uncertainty maps."""
    model = folder / f"start_seed{seed}.safetensors"
    started = time.monotonic()
    result = _train(config, labeled, pool, labels, model)
    loaded = load_model(model)
    scores = {case.name: analyse(case.image, loaded, maps=False, device=config.device,
                                 precision=config.precision).scores for case in pool}
    if config.uses_importance:
        weights = importance_weights(checkpoint_path(model), config, loaded.header, len(labels), pool)
        for case, w in zip(pool, weights):
            scores[case.name][IMPORTANCE] = float(w.mean())
    metrics, uncertainty = review(model, test_cases, labels, config)
    return dict(name=model.stem, seed=seed, round="start", labeled=[c.name for c in labeled],
                pool=[c.name for c in pool], scores=scores, metrics=metrics, uncertainty=uncertainty,
                steps=result.epochs_run * result.steps_per_epoch, train_time_s=round(time.monotonic() - started, 1))


def picked(start: dict[str, Any], strategy: str, add: int) -> list[str]:
    """The ``add`` pool volumes ``strategy`` ranks first (random: drawn with the round's seed)."""
    names = start["pool"]
    scores = [start["scores"][n] for n in names]
    return [names[i] for i, _ in order(names, scores, strategy, seed=start["seed"])[:add]]


def added_round(start: dict[str, Any], strategy: str, args: argparse.Namespace, config: TrainConfig,
                by_name: dict[str, Case], test_cases: Sequence[Case], labels: dict[int, str], folder: Path
                ) -> dict[str, Any]:
    """Retrain from scratch with the strategy's volumes added to the labeled ones; score on the test split."""
    chosen = picked(start, strategy, args.add)
    labeled = [by_name[n] for n in start["labeled"] + chosen]
    unlabeled = [by_name[n] for n in start["pool"] if n not in chosen]
    model = folder / f"{strategy}_seed{start['seed']}.safetensors"
    started = time.monotonic()
    result = _train(config, labeled, unlabeled, labels, model)
    metrics, _ = score(load_model(model), test_cases, labels, config)
    return dict(name=model.stem, seed=start["seed"], round="added", strategy=strategy, added=chosen,
                metrics=metrics, steps=result.epochs_run * result.steps_per_epoch,
                train_time_s=round(time.monotonic() - started, 1))


def _recorded(path: Path, settings: dict[str, Any], make: Callable[[], dict[str, Any]], report_only: bool
              ) -> Optional[dict[str, Any]]:
    """The record at ``path`` if it was made with ``settings``; else ``make()``'s, written there (atomically), or
    None with ``report_only``."""
    if path.is_file():
        record = json.loads(path.read_text(encoding="utf-8"))
        if same_settings(record.get("settings"), settings):
            return record
    if report_only:
        return None
    print(f"{path.stem} ...", file=sys.stderr, flush=True)
    record = {**make(), "settings": settings}
    save_record(record, path)
    print(f"{path.stem}: test Dice {record['metrics']['dice']:.4f}", file=sys.stderr, flush=True)
    return record


def run(args: argparse.Namespace) -> None:
    """Run (or resume) every round of every seed, then write the report and print the Markdown."""
    if args.quick:
        apply_quick(args, QUICK, add_arguments)
    if args.steps < 1 or args.add < 1 or not 0 < args.start_fraction < 1:
        raise ValueError("--steps and --add must be at least 1 and --start-fraction within (0, 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    spec = load_dataset(args.dataset)
    train_cases, test_cases = split_cases(args.dataset, spec.cases, args.test_fraction)
    train_cases, test_cases = train_cases[:args.cases], test_cases[:args.test_cases]
    if args.review:
        review_models(args, test_cases, spec.labels, started)
        return
    by_name = {c.name: c for c in train_cases}
    folder = args.out / "runs"
    records_folder = args.records or folder
    for path in (folder, records_folder):
        path.mkdir(parents=True, exist_ok=True)
    records = []
    for seed in args.seeds:
        config = train_config(args, Run(args.method, args.start_fraction, seed))
        base = dict(config=dataclasses.asdict(config), train=[c.name for c in train_cases],
                    test=[c.name for c in test_cases], start_fraction=args.start_fraction, add=args.add)
        settings = json.loads(json.dumps(base))
        labeled, pool = split_labeled(train_cases, args.start_fraction, seed)
        if len(pool) < args.add:
            raise ValueError(f"only {len(pool)} unlabeled training cases, fewer than --add {args.add}")
        start = _recorded(records_folder / f"start_seed{seed}.json", settings,
                          partial(start_round, seed, config, labeled, pool, test_cases, spec.labels, folder),
                          args.report_only)
        if start is None:
            continue
        records.append(start)
        for strategy in [*args.strategies, REFERENCE]:
            if strategy == IMPORTANCE and IMPORTANCE not in next(iter(start["scores"].values()), {}):
                continue  # a method without D0
            if strategy == "confidence" and "confidence" not in next(iter(start["scores"].values()), {}):
                continue  # a method without D
            added = _recorded(records_folder / f"{strategy}_seed{seed}.json", settings,
                              partial(added_round, start, strategy, args, config, by_name, test_cases, spec.labels,
                                      folder), args.report_only)
            if added is not None:
                records.append(added)
    if not records:
        raise ValueError(f"no finished record in {records_folder} was made with these settings")
    settings = (f"{len(train_cases)} training cases, {len(test_cases)} test cases; start {args.start_fraction:g} "
                f"labeled, +{args.add} per strategy; {args.method}, about {args.steps} steps of S per training; "
                f"seeds {sorted({r['seed'] for r in records})}")
    report = dict(meta=_meta(args, settings, started), **summarise(records, REFERENCE),
                  runs=[{k: v for k, v in r.items() if k != "settings"} for r in records])
    render_chart(report, _write(report, render_markdown(report), args).with_suffix(".png"))


def review_models(args: argparse.Namespace, test_cases: Sequence[Case], labels: dict[int, str],
                  started: float) -> None:
    """``--review``: each trained model's test Dice and how each of its uncertainty maps finds its errors."""
    config = TrainConfig(device=args.device, precision=args.precision)
    rows = []
    for model in args.review:
        metrics, found = review(model, test_cases, labels, config)
        rows.append(dict(model=str(model), dice=metrics["dice"], uncertainty=found))
    report = dict(meta=_meta(args, f"{len(test_cases)} test cases; trained models reviewed", started), models=rows)
    path = _write(report, render_review(report), args)
    review_example(args.review[0], test_cases[0], config, path.with_suffix(".png"))


def review_example(model: Path, case: Case, config: TrainConfig, path: Path) -> None:
    """The picture of a review: the case's slice with the most wrong voxels, with the default uncertainty map."""
    result = analyse(case.image, load_model(model), kinds=[DEFAULT_UNCERTAINTY], device=config.device,
                     precision=config.precision)
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(case.image)))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
    predicted = sitk.GetArrayFromImage(result.labels)
    uncertainty = sitk.GetArrayFromImage(result.maps[DEFAULT_UNCERTAINTY])
    index = worst_slice(predicted != truth)
    title = (f"{case.name}, slice {index} of the first axis: {UNCERTAINTY_TITLES[DEFAULT_UNCERTAINTY]} from "
             f"{Path(model).stem}")
    render_review_example(image[index], truth[index], predicted[index], uncertainty[index], title, path)


def _meta(args: argparse.Namespace, settings: str, started: float) -> dict[str, Any]:
    return dict(dataset=args.dataset.name, commit=code_commit(), machine=describe_machine(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="isdnet-bench active " + " ".join(sys.argv[sys.argv.index("active") + 1:])
                if "active" in sys.argv else " ".join(sys.argv),
                settings=settings, uncertainties=list(UNCERTAINTIES), wall_time_s=round(time.monotonic() - started, 1))


def _write(report: dict[str, Any], markdown: str, args: argparse.Namespace) -> Path:
    """Write the report's Markdown and JSON at ``--report`` (default ``<out>/results``), print the Markdown, and
    return the path without extension."""
    path = args.report or args.out / "results"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".md").write_text(markdown, encoding="utf-8")
    path.with_suffix(".json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(markdown)
    return path
