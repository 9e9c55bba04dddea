"""What the benchmarks share: their dataset and output options, run records kept as small JSON files (written
atomically, reused only when made with the same settings), ``--quick`` defaults that explicit options override,
the command line a report names, and the finish of a report's chart."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from isdnet.config import TrainConfig, has_checkpoint, model_stem, training_files
from isdnet.errors import InputError, ISDNetError

RUN_LOG_SUFFIX = ".log.jsonl"  # a benchmark run's progress log, beside its model


def add_output_arguments(parser: argparse.ArgumentParser, benchmark: str, work: str) -> None:
    """The dataset and the folders a benchmark of runs writes: ``--out`` (``work`` says what goes there),
    ``--records`` (the resumable records), ``--report``."""
    parser.add_argument("dataset", type=Path, help="dataset folder (Decathlon layout); a splits.json with "
                        "'train' and 'test' case lists fixes the test split")
    parser.add_argument("--out", type=Path, default=Path(f"bench-output/{benchmark}"), help=f"work folder: {work}")
    parser.add_argument("--records", type=Path, default=None,
                        help="folder of the finished runs' JSON records (small: commit them), from which an "
                             "interrupted benchmark resumes, also on another machine; default: <out>/runs")
    parser.add_argument("--report", type=Path, default=None,
                        help="report path without extension (.md, .json, .png); default: <out>/results")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="without splits.json: the seeded share of cases held out for testing")


def finish_chart(fig: Any, ax: Any, ylabel: str, title: str, path: Path) -> None:
    """Label a report's chart, add its legend (right of the axes, where it hides no bar or curve), write it as PNG
    and free it."""
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)


def apply_quick(args: argparse.Namespace, quick: dict[str, Any],
                add_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    """Set the ``quick`` values on ``args`` for every option still at its default (explicit options win)."""
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    for name, value in quick.items():
        if getattr(args, name) == defaults.get_default(name):
            setattr(args, name, value)



class RunStopped(ISDNetError):
    """A run was asked to stop (SIGTERM at the end of a session, Ctrl-C) before its budget: it leaves no record,
    only its checkpoint, from which the next invocation resumes it."""


def run_log_path(model: Path) -> Path:
    """Where a benchmark run's progress log, in JSON lines, lies: beside its model, as ``name.log.jsonl``."""
    return Path(model).with_name(model_stem(model) + RUN_LOG_SUFFIX)


def train_run(labeled: Sequence[Any], unlabeled: Sequence[Any], labels: dict[int, str], model: Path,
              config: TrainConfig, progress: Optional[Callable[[Any], Any]] = None,
              **options: Any) -> tuple[Any, bool]:
    """Train one run of a benchmark to its budget; returns its ``TrainResult`` and whether it continued a checkpoint.
    It resumes from its checkpoint when a session cut it off, starts over when that checkpoint cannot be resumed
    (written by an older version), and raises RunStopped when it is stopped, so that a partly trained model is
    never scored as the run's result.
    ``progress`` makes the run's progress reporter from its log stream, ``run_log_path(model)`` (default: JSON
    lines)."""
    from isdnet.progress import Progress
    from isdnet.train import train

    resumed = has_checkpoint(model)
    make = progress or (lambda stream: Progress(json_lines=True, stream=stream))
    try:
        with open(run_log_path(model), "a" if resumed else "w", encoding="utf-8") as stream:
            result = train(labeled, unlabeled, labels, model, config, progress=make(stream), resume=resumed,
                           **options)
    except InputError as error:
        if not resumed:
            raise
        print(f"{model.stem}: its checkpoint cannot be resumed ({error.problem}); starting over",
              file=sys.stderr, flush=True)
        for path in training_files(model):
            path.unlink(missing_ok=True)
        return train_run(labeled, unlabeled, labels, model, config, progress, **options)
    if result.stopped:
        raise RunStopped(f"{model.stem} was stopped at epoch {result.epochs_run}; run the benchmark again to "
                         "resume it")
    return result, resumed

def same_settings(saved: Any, current: dict[str, Any]) -> bool:
    """True when a finished run was made with the current settings. An option added to TrainConfig after the run
    counts as the same when it keeps its default, which reproduces the behaviour from before it existed."""
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        return False
    defaults = TrainConfig().as_json()
    config = {k: v for k, v in current["config"].items() if k in saved["config"] or v != defaults.get(k)}
    return {**current, "config": config} == saved


def reusable_record(path: Path, settings: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The finished run's record at ``path`` when it was made with ``settings`` (``same_settings``), else None."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    return record if same_settings(record.get("settings"), settings) else None


def save_record(record: dict[str, Any], path: Path) -> None:
    """Write a run's record through a temporary renamed into place, so a killed run leaves no half record."""
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(temporary, path)


def command_line(benchmark: str) -> str:
    """How this benchmark was invoked, as ``isdnet-bench BENCHMARK OPTIONS``."""
    if benchmark in sys.argv:
        return f"isdnet-bench {benchmark} " + " ".join(sys.argv[sys.argv.index(benchmark) + 1:])
    return " ".join(sys.argv)
