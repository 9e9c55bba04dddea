"""The runs of ``isdnet-bench accuracy``: which methods, fractions and seeds, and the options of each run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from isdnet.config import TrainConfig
from isdnet.dataset import Case
from isdnet.errors import InputError

from .accuracy_report import baseline_change, fraction_key

DEFAULT_FRACTIONS = (0.5, 0.125, 0.0625)
# Table 2 of the paper: each hyperparameter varied alone around the defaults, for isdnet.
PAIRED_METHODS = ("baseline", "isdnet")  # run with every seed; the other methods with the first --ablation-seeds
GRID = {"lambda_adv": (1e-4, 1e-3, 5e-3), "lambda_semi": (0.5, 1.0, 5.0), "t_semi": (0.0, 0.1, 0.5, 1.0)}
QUICK = dict(cases=24, test_cases=8, seeds=[0], fractions=[0.125], steps=150, warmup_epochs=1)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the table: method, labeled fraction (1.0 = full labels), seed, and the options it
    changes: a named variant's (a row of its own) or one of the Table 2 grid's."""

    method: str
    fraction: float
    seed: int
    overrides: tuple[tuple[str, Any], ...] = ()
    variant: str = ""

    @property
    def key(self) -> str:
        return fraction_key(self.fraction)

    @property
    def label(self) -> str:
        """The table row: the method, or the method and its variant's name."""
        return f"{self.method} [{self.variant}]" if self.variant else self.method

    @property
    def name(self) -> str:
        if self.variant:
            return f"{self.method}-{self.variant}_{self.key.replace('/', 'of')}_seed{self.seed}"
        extra = "".join(f"_{k}{v:g}" for k, v in self.overrides)
        return f"{self.method}_{self.key.replace('/', 'of')}_seed{self.seed}{extra}"


def plan_runs(args: argparse.Namespace) -> list[Run]:
    """Seed-major order, so an interrupted benchmark still has every cell for the first seeds."""
    runs = []
    for index, seed in enumerate(args.seeds):
        methods = [m for m in args.methods if m in PAIRED_METHODS or index < args.ablation_seeds]
        for fraction in args.fractions:
            runs += [Run(method, fraction, seed) for method in methods]
            runs += variant_runs(args, fraction, seed)
        if not args.no_full:
            runs.append(Run("baseline", 1.0, seed))
    if args.grid:
        for name, values in GRID.items():
            runs += [Run("isdnet", args.fractions[0], args.seeds[0], ((name, v),))
                     for v in values if v != getattr(args, name)]
    return runs


def variant_runs(args: argparse.Namespace, fraction: float, seed: int) -> list[Run]:
    """Each --variant of each --variant-methods, but no baseline run that another one already makes: a variant
    whose other options are all in SEMI_SUPERVISED_OPTIONS changes a baseline as the plain or an earlier one does."""
    runs, baseline_changes = [], [{}]
    for name, overrides in variants(args).items():
        for method in args.variant_methods:
            if method == "baseline":
                change = baseline_change(overrides)
                if change in baseline_changes:
                    continue
                baseline_changes.append(change)
            runs.append(Run(method, fraction, seed, overrides, name))
    return runs


def split_cases(dataset: Path, cases: Sequence[Case], test_fraction: float) -> tuple[list[Case], list[Case]]:
    """Train and test cases: from ``splits.json`` when the dataset has one, else a fixed seeded split."""
    by_name = {c.name: c for c in cases}
    splits_path = dataset / "splits.json"
    if splits_path.is_file():
        splits = json.loads(splits_path.read_text(encoding="utf-8"))
        missing = [n for n in splits.get("train", []) + splits.get("test", []) if n not in by_name]
        if missing or not splits.get("train") or not splits.get("test"):
            raise InputError(splits_path, "needs non-empty 'train' and 'test' lists of the dataset's labeled cases"
                             + (f"; unknown: {', '.join(missing[:5])}" if missing else ""))
        return [by_name[n] for n in splits["train"]], [by_name[n] for n in splits["test"]]
    order = sorted(by_name)
    random.Random(0).shuffle(order)
    n_test = max(1, round(test_fraction * len(order)))
    test = set(order[:n_test])
    return [c for c in cases if c.name not in test], [c for c in cases if c.name in test]


def parse_options(items: Sequence[str], flag: str) -> dict[str, Any]:
    """``OPTION=VALUE`` pairs as TrainConfig fields (values parsed as JSON, else kept as strings)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"{flag} {item!r}: expected OPTION=VALUE with OPTION one of {sorted(fields)}")
        try:
            options[name] = json.loads(text)
        except json.JSONDecodeError:
            options[name] = text
    return options


def set_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--set`` options, for every run."""
    return parse_options(args.set_options, "--set")


def variants(args: argparse.Namespace) -> dict[str, tuple[tuple[str, Any], ...]]:
    """The ``--variant NAME:OPTION=VALUE,...`` rows: name -> the options each of its runs changes."""
    rows = {}
    for item in args.variants:
        name, sep, text = item.partition(":")
        if not sep or not name or not text:
            raise ValueError(f"--variant {item!r}: expected NAME:OPTION=VALUE[,OPTION=VALUE...]")
        rows[name] = tuple(parse_options(text.split(","), f"--variant {name}:").items())
    return rows


def train_config(args: argparse.Namespace, run: Run) -> TrainConfig:
    """The run's TrainConfig: the same budget of S steps for every method and fraction, the final model kept."""
    config = TrainConfig(
        method=run.method, total_steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        discriminator_learning_rate=args.discriminator_learning_rate, lr_schedule=args.lr_schedule,
        discriminator_channels=args.discriminator_channels, discriminator_stride=args.discriminator_stride,
        lambda_adv=args.lambda_adv, lambda_semi=args.lambda_semi, t_semi=args.t_semi, cross_entropy=args.cross_entropy,
        warmup_epochs=args.warmup_epochs, base_channels=args.base_channels,
        slice_size=list(args.slice_size) if args.slice_size else None,
        validation_fraction=args.validation_fraction, model_selection="final", seed=run.seed, device=args.device,
        precision=args.precision)
    return dataclasses.replace(config, **set_options(args), **dict(run.overrides))
