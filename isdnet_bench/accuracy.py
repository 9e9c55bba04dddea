"""The paper's ablation (Table 3) on a Decathlon-layout dataset, as a rerunnable table (``isdnet-bench accuracy``).

Every method of ``config.METHODS`` is trained at each labeled fraction with each seed (the seed draws the labeled
cases and initialises the networks; ``accuracy_plan``), plus the full-label ``baseline`` as the upper bound. All
runs get the same budget of optimisation steps of S, whatever the method or fraction, with a poly learning-rate
decay, and the final model is scored on a held-out test split at the original grid (the best epoch on the
validation part of the labeled cases is scored too, as a second look).

Each run leaves a JSON record (metrics per case, per-epoch losses, D's and D0's diagnostics) in ``--records``, so
an interrupted benchmark resumes where it stopped, also on another machine; the report (``accuracy_report``:
Markdown, JSON, PNG) is rebuilt from those records.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from isdnet.config import LR_SCHEDULES, METHODS, TrainConfig, checkpoint_path
from isdnet.dataset import Case, load_dataset, split_labeled
from isdnet.geometry import SliceGeometry, prepare_volume
from isdnet.images import read_image
from isdnet.infer import segment
from isdnet.metrics import auroc, evaluate_cases
from isdnet.modelfile import LoadedModel, load_model
from isdnet.networks import ImportanceNet, SUNet
from isdnet.validation import split_validation

from .accuracy_plan import DEFAULT_FRACTIONS, QUICK, Run, plan_runs, split_cases, train_config
from .accuracy_report import paired, render_chart, render_markdown, summarise, write_headline
from .machine import code_commit, describe_machine
from .records import (
    RunStopped,
    add_output_arguments,
    apply_quick,
    command_line,
    reusable_record,
    save_record,
    train_run,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``isdnet-bench accuracy``; the defaults fit the hippocampus table in under 3 h on 2 cores."""
    add_output_arguments(parser, "accuracy", "models and logs of the runs")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--fractions", nargs="+", type=float, default=list(DEFAULT_FRACTIONS),
                        help="labeled fractions of the training cases (default 1/2 1/8 1/16)")
    parser.add_argument("--no-full", action="store_true", help="leave out the full-label baseline")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                        help="seeds of baseline and isdnet (each seed: a labeled subset and initial weights)")
    parser.add_argument("--ablation-seeds", type=int, default=3,
                        help="how many of the first seeds the other methods (adv, adv-classifier, hung) run")
    add_training_arguments(parser)
    parser.add_argument("--variant", nargs="+", default=[], metavar="NAME:OPTION=VALUE,...", dest="variants",
                        help="named variants (of isdnet, or of --variant-methods), each a row of its own at every "
                             "fraction and paired seed, e.g. unaugmented:pseudo_labels=unaugmented")
    parser.add_argument("--variant-methods", nargs="+", choices=METHODS, default=["isdnet"],
                        help="the methods each --variant runs (baseline isdnet: a change to both, such as a loss, "
                             "paired as isdnet [NAME] against the baseline variant that makes the same change to a "
                             "baseline; no baseline run is trained twice)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each in its own process with cores/jobs threads "
                             "(on a GPU: several runs share the device)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / jobs)")
    parser.add_argument("--grid", action="store_true",
                        help="also run the paper's Table 2 grid for isdnet (first fraction, first seed)")
    parser.add_argument("--headline", type=Path, default=None, metavar="DOC",
                        help="also rewrite the result that DOC quotes (the lines between its headline markers, "
                             "e.g. docs/results.md) from this report")
    parser.add_argument("--headline-block", default="", metavar="NAME",
                        help="the named block of DOC to rewrite, where DOC quotes several reports (markers "
                             "'<!-- headline NAME: generated from the report -->' and '<!-- end of headline NAME -->')")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the runs already finished in --out, training nothing")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in minutes (explicit options override it): "
                        + ", ".join(f"{k}={v}" for k, v in QUICK.items()))


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of each training run and of the data split, shared by the benchmarks that train
    (``accuracy_plan.train_config`` reads them)."""
    parser.add_argument("--steps", type=int, default=3000,
                        help="optimisation steps of S, the same budget for every run (rounded to whole passes "
                             "over the labeled slices)")
    parser.add_argument("--warmup-epochs", type=int, default=5,
                        help="passes over the labeled slices before the unlabeled terms start (the paper: 5)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--slice-size", type=int, nargs=2, default=None, metavar=("ROWS", "COLS"),
                        help="training slice size (default: the whole slice, as planned from the training cases)")
    parser.add_argument("--learning-rate", type=float, default=1e-3,
                        help="Adam's rate for S (the paper: 1e-4, which leaves S far from converged within this "
                             "budget)")
    parser.add_argument("--discriminator-learning-rate", type=float, default=None,
                        help="Adam's rate for D and D0 (default: --learning-rate)")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="poly",
                        help="poly decays every rate to 0 over the run (Hung et al.)")
    parser.add_argument("--discriminator-channels", type=int, default=16,
                        help="D's first width (Hung: 64; 16 keeps D from overpowering a width-16 S)")
    parser.add_argument("--discriminator-stride", type=int, default=4,
                        help="D's map resolution (Hung: 32, a single value on a 48-pixel slice)")
    parser.add_argument("--lambda-adv", type=float, default=TrainConfig.lambda_adv)
    parser.add_argument("--lambda-semi", type=float, default=TrainConfig.lambda_semi)
    parser.add_argument("--t-semi", type=float, default=TrainConfig.t_semi)
    parser.add_argument("--cross-entropy", type=float, default=0.0,
                        help="weight of the cross-entropy term (default 0: the paper's loss, Dice alone, for the "
                             f"table's plain rows; the training default is {TrainConfig.cross_entropy})")
    parser.add_argument("--set", nargs="+", default=[], metavar="OPTION=VALUE", dest="set_options",
                        help="any other training option for every run, e.g. class_weights=[1,2,3] (values in JSON)")
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--precision", default="fp32",
                        help="float32, as the published table; bf16 trains faster but less accurately (docs/speed.md)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", type=int, default=None, help="use only the first N training cases")
    parser.add_argument("--test-cases", type=int, default=None, help="score only the first N test cases")


# ----------------------------------------------------------------------------------------------------
# One run


def execute(run: Run, config: TrainConfig, train_cases: Sequence[Case], test_cases: Sequence[Case],
            labels: dict[int, str], folder: Path) -> dict[str, Any]:
    """Train one run, score its final and its best-on-validation model on the test cases and gather the
    diagnostics; returns the run's record."""
    labeled, unlabeled = split_labeled(train_cases, run.fraction, run.seed) if run.fraction < 1 else (
        list(train_cases), [])
    model, best = folder / f"{run.name}.safetensors", folder / f"{run.name}.best.safetensors"
    started = time.monotonic()
    result, resumed = train_run(labeled, unlabeled, labels, model, config, best_out=best)
    train_time = time.monotonic() - started
    started = time.monotonic()
    loaded = load_model(model)
    metrics, confidence = score(loaded, test_cases, labels, config)
    metrics_best = score(load_model(best), test_cases, labels, config)[0] if best.is_file() else None
    validation = split_validation(labeled, config.validation_fraction, config.seed)[1]
    record = dict(
        name=run.name, method=run.method, label=run.label, variant=run.variant, fraction=run.fraction, key=run.key,
        seed=run.seed, overrides=dict(run.overrides), config=dataclasses.asdict(config),
        labeled_cases=len(labeled) - len(validation), validation_cases=len(validation),
        unlabeled_cases=len(unlabeled) if config.uses_unlabeled else 0,
        steps=result.epochs_run * result.steps_per_epoch, epochs=result.epochs_run, best_epoch=result.best_epoch,
        best_val_dice=result.best_val_dice, train_time_s=round(train_time, 1), resumed=resumed,
        eval_time_s=round(time.monotonic() - started, 1), metrics=metrics, metrics_best=metrics_best,
        confidence=confidence, history=result.history)
    if config.uses_importance:
        record["importance"] = importance_diagnostics(checkpoint_path(model), config, loaded.header,
                                                      len(labels), labeled, unlabeled)
    return record


def score(loaded: LoadedModel, cases: Sequence[Case], labels: dict[int, str], config: TrainConfig
          ) -> tuple[dict[str, Any], Optional[dict[str, float]]]:
    """Test metrics of a model, and when it has a confidence map, how well 1 - confidence finds S's errors:
    the AUROC for "this voxel is wrong" over every test voxel, and the mean confidence on right and wrong ones."""
    with_confidence = loaded.confidence is not None
    wrong_scores: list[np.ndarray] = []
    wrong_flags: list[np.ndarray] = []

    def pairs() -> Iterator[tuple[str, sitk.Image, sitk.Image]]:
        for case in cases:
            result = segment(case.image, loaded, batch_size=64, device=config.device, precision=config.precision,
                             confidence=with_confidence)
            truth = sitk.ReadImage(str(case.label))
            if result.confidence is not None:
                wrong = sitk.GetArrayViewFromImage(result.labels) != sitk.GetArrayViewFromImage(truth)
                wrong_flags.append(wrong.ravel())
                wrong_scores.append(1.0 - sitk.GetArrayFromImage(result.confidence).ravel())
            yield case.name, result.labels, truth

    metrics = evaluate_cases(pairs(), sorted(labels))
    if not wrong_flags:
        return metrics, None
    flags, scores = np.concatenate(wrong_flags), np.concatenate(wrong_scores)
    return metrics, dict(auroc_wrong=auroc(scores, flags), wrong_share=float(flags.mean()),
                         confidence_right=float(1 - scores[~flags].mean()),
                         confidence_wrong=float(1 - scores[flags].mean()) if flags.any() else None)


def importance_diagnostics(checkpoint: Path, config: TrainConfig, header: dict[str, Any], num_classes: int,
                           labeled: Sequence[Case], unlabeled: Sequence[Case], max_cases: int = 8) -> dict[str, Any]:
    """Weights w = 1 - D0(Z(X)) that the last epoch's S and D0 give to slices of labeled and unlabeled cases.

    Shows whether D0 tells the two apart (labeled slices should get low w) and whether w varies at all.
    """
    stats = {}
    for group, cases in (("labeled", labeled), ("unlabeled", unlabeled)):
        weights = importance_weights(checkpoint, config, header, num_classes, list(cases)[:max_cases])
        if weights:
            w = np.concatenate(weights)
            stats[group] = dict(mean=float(w.mean()), std=float(w.std()), min=float(w.min()), max=float(w.max()),
                                slices=int(w.size))
    return stats


def importance_weights(checkpoint: Path, config: TrainConfig, header: dict[str, Any], num_classes: int,
                       cases: Sequence[Case]) -> list[np.ndarray]:
    """Per case, the weight w = 1 - D0(Z(X)) of each of its slices, from the S and D0 of a training's checkpoint
    (the model file holds no D0)."""
    tensors = load_file(str(checkpoint))
    segmenter = SUNet(1, num_classes, config.base_channels)
    segmenter.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("net.S.")})
    importance = ImportanceNet(segmenter.feature_channels, config.importance_channels)
    importance.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("net.D0.")})
    segmenter.eval()
    geometry = SliceGeometry.from_dict(header["geometry"])
    weights = []
    for case in cases:
        slices = torch.from_numpy(np.asarray(prepare_volume(read_image(case.image), geometry).image))[:, None]
        with torch.inference_mode():
            _, features = segmenter.forward_features(slices.float())
            weights.append((1 - torch.sigmoid(importance(features))).numpy().ravel())
    return weights


def settings_line(args: argparse.Namespace, n_train: int, n_test: int) -> str:
    """The benchmark's settings in one sentence, for the report's header."""
    critic_rate = args.discriminator_learning_rate or args.learning_rate
    return (f"{n_train} training cases (labeled/unlabeled drawn from them), {n_test} test cases; about {args.steps} "
            f"steps of S (batch {args.batch_size}, whole passes over the labeled slices), warm-up "
            f"{args.warmup_epochs} passes, {args.lr_schedule} learning rate, final model scored; width "
            f"{args.base_channels}, slices {'x'.join(map(str, args.slice_size or ['whole']))}, {args.precision}, "
            f"{args.device}; Adam {args.learning_rate:g} (D and D0: {critic_rate:g}); D width "
            f"{args.discriminator_channels}, map stride {args.discriminator_stride}; lambda_adv {args.lambda_adv}, "
            f"lambda_semi {args.lambda_semi}, T_semi {args.t_semi}; "
            f"{' '.join(args.set_options) or 'no other option set'}; seeds {args.seeds}")


# ----------------------------------------------------------------------------------------------------
# Command


_stopping: Optional[Any] = None  # in a pool worker: the benchmark's "stopping" event (a multiprocessing Event)


def _join_pool(stopping: Any) -> None:
    """Pool initializer: keep the benchmark's stopping event, which any stopped run, or the benchmark, sets."""
    global _stopping
    _stopping = stopping


def _may_start(name: str) -> None:
    """Raise RunStopped instead of starting ``name`` in a pool worker whose benchmark is ending: a run was stopped
    (SIGTERM, Ctrl-C, a stop file) or the benchmark's process is gone. (A pool's workers hold queued runs, and
    without this they would go on to train them.) In the benchmark's own process a stop ends the benchmark anyway."""
    parent = multiprocessing.parent_process()
    if parent is not None and ((_stopping is not None and _stopping.is_set()) or not parent.is_alive()):
        raise RunStopped(f"{name} was not started: the benchmark is stopping; run it again to resume")


def _execute_and_save(planned: Run, config: TrainConfig, train_cases: Sequence[Case], test_cases: Sequence[Case],
                      labels: dict[int, str], folder: Path, settings: dict[str, Any], record_path: Path,
                      threads: int) -> Path:
    """One run in this process with ``threads`` torch threads; its record is written to ``record_path`` (a
    temporary renamed into place, so a killed run leaves no half record), whose path is returned: a pool worker
    sends back only that, since a large result could block forever on a pipe whose benchmark has gone."""
    _may_start(planned.name)
    torch.set_num_threads(threads)
    print(f"{planned.name} ...", file=sys.stderr, flush=True)
    try:
        record = execute(planned, config, train_cases, test_cases, labels, folder)
    except RunStopped:
        if _stopping is not None:
            _stopping.set()
        raise
    record["settings"] = settings
    save_record(record, record_path)
    print(f"{planned.name}: test Dice {record['metrics']['dice']:.4f}, train {record['train_time_s']:.0f} s, "
          f"eval {record['eval_time_s']:.0f} s", file=sys.stderr, flush=True)
    return record_path


def _execute_all(work: Sequence[tuple[Any, ...]], jobs: int) -> Iterator[Path]:
    """Each run of ``work`` (``_execute_and_save``'s arguments), ``jobs`` at a time; yields their record paths as
    they finish. Each pool worker is a fresh interpreter for one run and then exits, so a benchmark that was
    killed (SIGTERM to its process group) leaves no worker behind, waiting forever on its queue."""
    if jobs == 1:
        yield from (_execute_and_save(*w) for w in work)
        return
    import concurrent.futures

    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    stopping = context.Event()
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, max_tasks_per_child=1,
                                                initializer=_join_pool, initargs=(stopping,)) as pool:
        futures = [pool.submit(_execute_and_save, *w) for w in work]
        try:
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
        except BaseException:
            stopping.set()  # the queued runs start in no worker
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def run(args: argparse.Namespace) -> None:
    """Run (or resume) every planned run, then write the report and print the Markdown table."""
    if args.quick:
        apply_quick(args, QUICK, add_arguments)
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    started = time.monotonic()
    spec = load_dataset(args.dataset)
    train_cases, test_cases = split_cases(args.dataset, spec.cases, args.test_fraction)
    train_cases, test_cases = train_cases[:args.cases], test_cases[:args.test_cases]
    folder = args.out / "runs"
    records_folder = args.records or folder
    records_folder.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    report_path = args.report or args.out / "results"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    records, pending, reused = [], [], 0
    plan = plan_runs(args)
    for planned in plan:
        config = train_config(args, planned)
        record_path = records_folder / f"{planned.name}.json"
        settings = json.loads(json.dumps(dict(config=dataclasses.asdict(config), train=[c.name for c in train_cases],
                                              test=[c.name for c in test_cases])))  # as a record file holds it
        record = reusable_record(record_path, settings)
        if record is not None:
            records.append(record)
            reused += 1
            continue
        pending.append((planned, config, settings, record_path))
    done = 0
    if not args.report_only and pending:
        jobs = max(1, min(args.jobs, len(pending)))
        threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
        work = [(p, c, train_cases, test_cases, spec.labels, folder, s, r, threads) for p, c, s, r in pending]
        print(f"{len(pending)} runs to train ({reused} reused), {jobs} at a time", file=sys.stderr, flush=True)
        for path in _execute_all(work, jobs):
            records.append(json.loads(path.read_text(encoding="utf-8")))
            done += 1
    summary = summarise(records)
    report = dict(
        meta=dict(dataset=args.dataset.name, commit=code_commit(), machine=describe_machine(),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  command=command_line("accuracy"),
                  settings=settings_line(args, len(train_cases), len(test_cases)),
                  wall_time_s=time.monotonic() - started, runs_done=done, runs_reused=reused),
        summary=summary,
        paired=paired(summary),
        grid=[dict(overrides=r["overrides"], key=r["key"], seed=r["seed"], dice=r["metrics"]["dice"])
              for r in records if r["overrides"] and not r.get("variant")],
        runs=[{k: v for k, v in r.items() if k not in ("settings",)} for r in records],
    )
    markdown = render_markdown(report)
    report_path.with_suffix(".md").write_text(markdown, encoding="utf-8")
    report_path.with_suffix(".json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    render_chart(report, report_path.with_suffix(".png"))
    if args.headline:
        write_headline(report, args.headline, args.headline_block)
    print(markdown)
