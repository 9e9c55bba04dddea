"""Time to a converged model (``isdnet-bench convergence``): test Dice against wall-clock time of training.

On a small semi-supervised study (4 labeled and 12 unlabeled training cases drawn with each seed from the train
list of ``splits.json``, a fixed subset of the test cases) it trains, one run at a time so that the clock means
something, for every seed: (a) the engine's current defaults, (b) the candidate new defaults (the accuracy
benchmark's protocol, plus ``--patience`` and ``--foreground-fraction``), (c) a reference of the candidate 4x
longer, without patience.
Every few epochs the checkpoint is kept aside; after training, each kept checkpoint's S is scored on the test
subset, so the scoring costs no training time. The report says how long each run took to come within 1 Dice point
of the reference's final model, its final Dice and its minutes; over several seeds, the paired differences.

Each run leaves a JSON record in ``--records``; an interrupted benchmark resumes from the records, and a run cut
off mid-way from its checkpoint. The report (``convergence_report``: Markdown, JSON, PNG) is rebuilt from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from isdnet.checkpoint import read_checkpoint
from isdnet.config import PRECISIONS, TrainConfig, checkpoint_path
from isdnet.dataset import Case, load_dataset
from isdnet.modelfile import load_model, save_model
from isdnet.progress import Progress

from .accuracy import score
from .accuracy_plan import parse_options, split_cases
from .convergence_report import render_chart, render_markdown, summarise
from .machine import code_commit, describe_machine
from .records import (
    add_output_arguments,
    apply_quick,
    command_line,
    reusable_record,
    run_log_path,
    save_record,
    train_run,
)

ARMS = ("current", "candidate", "reference")
# The candidate new defaults: the accuracy benchmark's protocol that converged on hippocampus (docs/results.md).
CANDIDATE = dict(learning_rate=1e-3, lr_schedule="poly", discriminator_channels=16, discriminator_stride=4,
                 base_channels=16, batch_size=8, warmup_epochs=5)
QUICK = dict(unlabeled=4, test_cases=4, steps=60, reference_factor=2, current_epochs=3, patience=3,
             score_every=2, warmup_epochs=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``isdnet-bench convergence``."""
    add_output_arguments(parser, "convergence", "models, checkpoints kept along the way, logs")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--labeled", type=int, default=4, help="labeled training cases (one of them validates)")
    parser.add_argument("--unlabeled", type=int, default=12, help="unlabeled training cases")
    parser.add_argument("--test-cases", type=int, default=20, help="the first N cases of the test split")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="paired seeds: each draws the training "
                        "cases and initialises the networks of all three arms alike")
    parser.add_argument("--steps", type=int, default=3000, help="the candidate's planned steps of S (its poly "
                        "decay runs over them; patience may end it sooner)")
    parser.add_argument("--reference-factor", type=int, default=4, help="the reference trains this many times "
                        "the candidate's steps, without patience")
    parser.add_argument("--current-epochs", type=int, default=TrainConfig.epochs,
                        help="epochs of the current-defaults run (default: the engine's)")
    parser.add_argument("--warmup-epochs", type=int, default=CANDIDATE["warmup_epochs"],
                        help="the candidate's and reference's warm-up epochs")
    parser.add_argument("--patience", type=int, default=20, help="the candidate's --patience (epochs)")
    parser.add_argument("--min-delta", type=float, default=0.002, help="the candidate's --min-delta")
    parser.add_argument("--foreground-fraction", type=float, default=0.5,
                        help="the candidate's and reference's --foreground-fraction")
    parser.add_argument("--max-minutes", type=float, default=None, help="the candidate's --max-minutes")
    parser.add_argument("--score-every", type=int, default=10,
                        help="keep the checkpoint every N epochs (and the last) to score it on the test cases")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32"], dest="precisions",
                        help="one row per arm and precision (fp32 bf16: the bf16 rows beside the float32 ones)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--set", nargs="+", default=[], metavar="OPTION=VALUE", dest="set_options",
                        help="any training option for every arm, e.g. base_channels=8 (values in JSON)")
    parser.add_argument("--report-only", action="store_true", help="report the finished runs, training nothing")
    parser.add_argument("--quick", action="store_true", help="a smoke run in minutes (explicit options override "
                        "it): " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))


def arm_config(args: argparse.Namespace, arm: str, precision: str, seed: int) -> TrainConfig:
    """The TrainConfig of one arm: the engine's defaults (``current``), the candidate, or its long reference."""
    common = dict(seed=seed, device=args.device, precision=precision)
    if arm == "current":
        config = TrainConfig(**common, epochs=args.current_epochs)
    else:
        config = TrainConfig(**common, **{**CANDIDATE, "warmup_epochs": args.warmup_epochs},
                             total_steps=args.steps, patience=args.patience, min_delta=args.min_delta,
                             foreground_fraction=args.foreground_fraction, max_minutes=args.max_minutes)
        if arm == "reference":
            config = dataclasses.replace(config, total_steps=args.steps * args.reference_factor, patience=None,
                                         max_minutes=None)
    config = dataclasses.replace(config, **parse_options(args.set_options, "--set"))
    config.validate()
    return config


def study_cases(train_cases: Sequence[Case], labeled: int, unlabeled: int, seed: int) -> tuple[list[Case], list[Case]]:
    """The labeled and unlabeled training cases, drawn with ``seed`` from the training split (disjoint)."""
    if labeled < 2 or unlabeled < 0 or labeled + unlabeled > len(train_cases):
        raise ValueError(f"--labeled {labeled} and --unlabeled {unlabeled} need at least 2 labeled cases and at "
                         f"most {len(train_cases)} in all (the training split)")
    order = list(train_cases)
    random.Random(seed).shuffle(order)
    return order[:labeled], order[labeled:labeled + unlabeled]


class _KeepCheckpoints(Progress):
    """JSON-lines progress to the run's log that also copies the checkpoint aside at every ``every``-th epoch's
    end, for scoring after training."""

    def __init__(self, stream: Any, checkpoint: Path, folder: Path, every: int):
        super().__init__(json_lines=True, stream=stream)
        self.checkpoint, self.folder, self.every = checkpoint, folder, every

    def emit(self, event: str, **fields: Any) -> None:
        super().emit(event, **fields)
        if event == "checkpoint" and "iteration" not in fields and fields["epoch"] % self.every == 0:
            shutil.copyfile(self.checkpoint, self.folder / f"epoch{fields['epoch']:05d}.checkpoint.safetensors")


def model_from_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Write the model file that a checkpoint's networks and header make (S, and D when the header has one)."""
    tensors, meta = read_checkpoint(checkpoint)

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    confidence = part("net.D.") if meta["header"]["architecture"]["confidence"] else None
    return save_model(out, meta["header"], part("net.S."), confidence)


def read_events(log: Path) -> list[dict[str, Any]]:
    """The progress events of a run's log, every session of a resumed run in order."""
    lines = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
    return [json.loads(line) for line in lines if line.startswith("{")]


def execute(name: str, config: TrainConfig, labeled: Sequence[Case], unlabeled: Sequence[Case],
            test: Sequence[Case], labels: dict[int, str], folder: Path, every: int) -> dict[str, Any]:
    """Train one arm (resuming from its checkpoint when a session cut it off), then score the checkpoints kept
    along the way and the model it wrote on the test cases; returns the run's record."""
    model = folder / f"{name}.safetensors"
    log = run_log_path(model)
    kept = folder / f"{name}.kept"
    kept.mkdir(exist_ok=True)
    result, resumed = train_run(labeled, unlabeled, labels, model, config,
                                progress=lambda stream: _KeepCheckpoints(stream, checkpoint_path(model), kept, every))
    last = kept / f"epoch{result.epochs_run:05d}.checkpoint.safetensors"
    if not last.is_file():
        shutil.copyfile(checkpoint_path(model), last)
    epochs = {e["epoch"]: e for e in read_events(log) if e["event"] == "epoch"}
    started = time.monotonic()
    points = []
    for path in sorted(kept.glob("epoch*.checkpoint.safetensors")):
        epoch = int(path.name[5:10])
        snapshot = model_from_checkpoint(path, kept / f"epoch{epoch:05d}.safetensors")
        dice = score(load_model(snapshot), test, labels, config)[0]["dice"]
        points.append(dict(epoch=epoch, minutes=epochs[epoch]["train_s"] / 60, val_dice=epochs[epoch]["val_dice"],
                           test_dice=dice))
    metrics = score(load_model(model), test, labels, config)[0]
    done = next((e for e in reversed(read_events(log)) if e["event"] == "done"), {})
    return dict(name=name, config=dataclasses.asdict(config), epochs=result.epochs_run,
                steps=sum(e.get("iterations", result.steps_per_epoch) for e in result.history),
                best_epoch=result.best_epoch, best_val_dice=result.best_val_dice, reason=result.reason,
                message=done.get("message", ""), train_minutes=result.train_s / 60, resumed=resumed,
                eval_time_s=round(time.monotonic() - started, 1), test_dice=metrics["dice"], metrics=metrics,
                points=points, history=result.history)


def run(args: argparse.Namespace) -> None:
    """Run (or resume) every arm at every precision, then write the report and print the Markdown."""
    if args.quick:
        apply_quick(args, QUICK, add_arguments)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.score_every < 1 or args.reference_factor < 1 or args.steps < 1:
        raise ValueError("--score-every, --reference-factor and --steps must be at least 1")
    started = time.monotonic()
    spec = load_dataset(args.dataset)
    train_cases, test_cases = split_cases(args.dataset, spec.cases, args.test_fraction)
    test_cases = test_cases[:args.test_cases]
    folder = args.out / "runs"
    records_folder = args.records or folder
    for path in (folder, records_folder):
        path.mkdir(parents=True, exist_ok=True)
    report_path = args.report or args.out / "results"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    records, done, reused = [], 0, 0
    runs = [(seed, precision, arm) for seed in args.seeds for precision in args.precisions for arm in args.arms]
    for seed, precision, arm in runs:
        labeled, unlabeled = study_cases(train_cases, args.labeled, args.unlabeled, seed)
        name, config = f"{arm}_{precision}_seed{seed}", arm_config(args, arm, precision, seed)
        settings = json.loads(json.dumps(dict(
            config=dataclasses.asdict(config), labeled=[c.name for c in labeled],
            unlabeled=[c.name for c in unlabeled], test=[c.name for c in test_cases], every=args.score_every)))
        record_path = records_folder / f"{name}.json"
        record = reusable_record(record_path, settings)
        if record is not None:
            reused += 1
        elif args.report_only:
            continue
        else:
            print(f"{name} ...", file=sys.stderr, flush=True)
            record = dict(execute(name, config, labeled, unlabeled, test_cases, spec.labels, folder,
                                  args.score_every), arm=arm, precision=precision, seed=seed,
                          settings=settings)
            save_record(record, record_path)
            done += 1
            print(f"{name}: test Dice {record['test_dice']:.4f} after {record['train_minutes']:.1f} min",
                  file=sys.stderr, flush=True)
        records.append(record)
    report = dict(
        meta=dict(dataset=args.dataset.name, commit=code_commit(), machine=describe_machine(),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  command=command_line("convergence"), wall_time_s=time.monotonic() - started, runs_done=done,
                  runs_reused=reused, labeled_cases=args.labeled, unlabeled_cases=args.unlabeled,
                  test_cases=len(test_cases), seeds=args.seeds),
        summary=summarise(records),
        runs=[{k: v for k, v in r.items() if k != "settings"} for r in records])
    markdown = render_markdown(report)
    report_path.with_suffix(".md").write_text(markdown, encoding="utf-8")
    report_path.with_suffix(".json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    render_chart(report, report_path.with_suffix(".png"))
    print(markdown)
