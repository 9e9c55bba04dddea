"""The report of ``isdnet-bench convergence``: per run, the minutes to come within a point of the long reference,
the final test Dice and the minutes in all, the issue's target checked, as Markdown and a PNG chart."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .records import finish_chart

WITHIN = 0.01  # "within 1 Dice point" of the reference
TARGET_MINUTES = 15.0  # the budget on a laptop CPU (2 cores)


def minutes_to_reach(points: Sequence[dict[str, Any]], level: float) -> Optional[float]:
    """Training minutes of the first scored point whose test Dice reaches ``level``, None if none does."""
    return next((p["minutes"] for p in sorted(points, key=lambda p: p["minutes"]) if p["test_dice"] >= level), None)


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: arm, precision, why it ended, epochs, steps, minutes, final test Dice, and against the
    reference of its precision (when there is one): the difference and the minutes to come within a point."""
    references = {r["precision"]: r["test_dice"] for r in records if r["arm"] == "reference"}
    rows = []
    for r in records:
        reference = references.get(r["precision"])
        rows.append(dict(
            name=r["name"], arm=r["arm"], precision=r["precision"], reason=r.get("reason") or "planned epochs",
            epochs=r["epochs"], steps=r["steps"], minutes=r["train_minutes"], test_dice=r["test_dice"],
            best_val_dice=r["best_val_dice"], reference_dice=reference,
            behind_reference=None if reference is None else reference - r["test_dice"],
            minutes_to_within=None if reference is None else minutes_to_reach(r["points"], reference - WITHIN)))
    return rows


def target_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The issue's target for each candidate row: within a point of the reference in at most 15 minutes, and
    stopped by itself (converged) rather than at its planned steps."""
    lines = []
    for row in rows:
        if row["arm"] != "candidate":
            continue
        if row["reference_dice"] is None:
            lines.append(f"- {row['precision']}: no reference run, so the target cannot be judged")
            continue
        close = row["behind_reference"] <= WITHIN and row["minutes"] <= TARGET_MINUTES
        lines.append(f"- {row['precision']}: final model within 1 point of the reference "
                     f"({100 * row['behind_reference']:+.1f} behind) in {row['minutes']:.1f} <= {TARGET_MINUTES:g} "
                     f"min: {'**met**' if close else '**missed**'}; ended by itself: "
                     f"{'**yes**' if row['reason'] == 'converged' else '**no**'} ({row['reason']})")
    return lines


def _shown(value: Optional[float], digits: int = 1, scale: float = 1.0) -> str:
    return "" if value is None else f"{value * scale:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    """Header, the table of runs, the targets."""
    meta, rows = report["meta"], report["summary"]
    lines = [f"# Time to a converged model on {meta['dataset']}", "",
             f"- commit `{meta['commit']}`, {meta['date']}", f"- machine: {meta['machine']}",
             f"- command: `{meta['command']}`",
             f"- {meta['labeled_cases']} labeled (one of them validates) and {meta['unlabeled_cases']} unlabeled "
             f"training cases drawn with seed {meta['seed']}, {meta['test_cases']} test cases",
             f"- wall time of this invocation: {meta['wall_time_s'] / 60:.1f} min ({meta['runs_done']} runs done now, "
             f"{meta['runs_reused']} reused)", "",
             "Test Dice x100 of the model each run wrote (mean over cases of the mean foreground Dice); minutes of "
             "training (data preparation and test scoring apart); 'to within 1': training minutes until a kept "
             "checkpoint scored within 1 point of the reference's final Dice:", "",
             "| run | precision | ended | epochs | steps | minutes | test Dice | best val Dice | to within 1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        within = _shown(row["minutes_to_within"]) or ("not reached" if row["reference_dice"] is not None else "")
        lines.append(f"| {row['arm']} | {row['precision']} | {row['reason']} | {row['epochs']} | {row['steps']} | "
                     f"{row['minutes']:.1f} | {_shown(row['test_dice'], 1, 100)} | "
                     f"{_shown(row['best_val_dice'], 1, 100)} | {within} |")
    lines += ["", "Targets (from issue 16):", "", *(target_lines(rows) or ["- no candidate run"]), ""]
    return "\n".join(lines)


def render_chart(report: dict[str, Any], path: Path) -> None:
    """Test Dice of the kept checkpoints against training minutes, a line per run, and the reference's final Dice
    less one point as a dashed line per precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in report["runs"]:
        points = sorted(run["points"], key=lambda p: p["minutes"])
        ax.plot([p["minutes"] for p in points], [100 * p["test_dice"] for p in points], marker="o", markersize=3,
                label=f"{run['arm']} ({run['precision']})")
    for row in report["summary"]:
        if row["arm"] == "reference":
            ax.axhline(100 * (row["test_dice"] - WITHIN), color="gray", linestyle="--", linewidth=1,
                       label=f"reference - 1 point ({row['precision']})")
    ax.axvline(TARGET_MINUTES, color="black", linestyle=":", linewidth=1, label=f"{TARGET_MINUTES:g} min")
    ax.set_xlabel("training minutes")
    finish_chart(fig, ax, "test Dice (x100)", f"Time to a converged model on {report['meta']['dataset']}", path)
