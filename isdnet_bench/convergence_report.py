"""The report of ``isdnet-bench convergence``: per run, the minutes to come within a point of the long reference,
the final test Dice and the minutes in all; over paired seeds, the candidate against its reference and against the
current defaults, and bf16 against float32, with 95% intervals; the issue's targets checked, as Markdown and a PNG
chart."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .accuracy_report import interval_verdict, mean_interval
from .records import finish_chart

WITHIN = 0.01  # "within 1 Dice point" of the reference
BF16_WITHIN = 0.005  # bf16 becomes the CPU default only where it matches float32 within half a point (issue 16)
TARGET_MINUTES = 15.0  # the budget on a laptop CPU (2 cores)


def minutes_to_reach(points: Sequence[dict[str, Any]], level: float) -> Optional[float]:
    """Training minutes of the first scored point whose test Dice reaches ``level``, None if none does."""
    return next((p["minutes"] for p in sorted(points, key=lambda p: p["minutes"]) if p["test_dice"] >= level), None)


def record_seed(record: dict[str, Any]) -> int:
    """The seed of a run's record (records written before --seeds keep it in their config only)."""
    return record.get("seed", record["config"]["seed"])


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: arm, precision, seed, why it ended, epochs, steps, minutes, final test Dice, and against
    the reference of its precision and seed (when there is one): the difference and the minutes to come within a
    point."""
    references = {(r["precision"], record_seed(r)): r["test_dice"] for r in records if r["arm"] == "reference"}
    rows = []
    for r in records:
        reference = references.get((r["precision"], record_seed(r)))
        rows.append(dict(
            name=r["name"], arm=r["arm"], precision=r["precision"], seed=record_seed(r),
            reason=r.get("reason") or "planned epochs",
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
        run = f"{row['precision']}, seed {row['seed']}"
        if row["reference_dice"] is None:
            lines.append(f"- {run}: no reference run, so the target cannot be judged")
            continue
        close = row["behind_reference"] <= WITHIN and row["minutes"] <= TARGET_MINUTES
        lines.append(f"- {run}: final model within 1 point of the reference "
                     f"({100 * row['behind_reference']:+.1f} behind) in {row['minutes']:.1f} <= {TARGET_MINUTES:g} "
                     f"min: {'**met**' if close else '**missed**'}; ended by itself: "
                     f"{'**yes**' if row['reason'] == 'converged' else '**no**'} ({row['reason']})")
    return lines


def paired(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per precision, over the seeds that have a candidate and its reference: the candidate's test Dice minus the
    reference's and minus the current defaults' (mean and 95% half-width, in Dice), its median minutes and how
    many of its runs ended by themselves."""
    by_run = {(r["precision"], r["seed"], r["arm"]): r for r in rows}
    result = []
    for precision in dict.fromkeys(r["precision"] for r in rows):
        seeds = sorted(s for p, s, arm in by_run if p == precision and arm == "candidate"
                       and (p, s, "reference") in by_run)
        if not seeds:
            continue
        candidates = [by_run[precision, s, "candidate"] for s in seeds]
        currents = [(c, by_run[precision, c["seed"], "current"]) for c in candidates
                    if (precision, c["seed"], "current") in by_run]
        result.append(dict(
            precision=precision, seeds=seeds,
            against_reference=mean_interval([-c["behind_reference"] for c in candidates]),
            against_current=mean_interval([c["test_dice"] - r["test_dice"] for c, r in currents]) if currents else None,
            median_minutes=statistics.median(c["minutes"] for c in candidates),
            converged=sum(c["reason"] == "converged" for c in candidates)))
    return result


def within_verdict(mean: float, half: float) -> str:
    """Whether a paired difference to the reference (in Dice) is within 1 point, judged on its 95% interval."""
    return interval_verdict(100 * (mean - half), 100 * (mean + half), -100 * WITHIN)


def precision_pairs(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm, over the seeds run in both precisions: bf16's test Dice minus float32's (mean and 95% half-width,
    in Dice), the median minutes of each and the median of the per-seed speed-ups (float32 minutes / bf16's)."""
    by_run = {(r["arm"], r["seed"], r["precision"]): r for r in rows}
    result = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        seeds = sorted(s for a, s, p in by_run if a == arm and p == "bf16" and (arm, s, "fp32") in by_run)
        if not seeds:
            continue
        pairs = [(by_run[arm, s, "fp32"], by_run[arm, s, "bf16"]) for s in seeds]
        result.append(dict(
            arm=arm, seeds=seeds,
            difference=mean_interval([bf16["test_dice"] - fp32["test_dice"] for fp32, bf16 in pairs]),
            fp32_minutes=statistics.median(fp32["minutes"] for fp32, _ in pairs),
            bf16_minutes=statistics.median(bf16["minutes"] for _, bf16 in pairs),
            speedup=statistics.median(fp32["minutes"] / bf16["minutes"] for fp32, bf16 in pairs)))
    return result


def precision_lines(pairs: Sequence[dict[str, Any]]) -> list[str]:
    """The bf16 against float32 table and, per arm, whether bf16 matches float32 within half a point."""
    lines = ["| arm | seeds | bf16 - fp32 | fp32 minutes (median) | bf16 minutes (median) | speed-up (median) |",
             "|---|---|---|---|---|---|"]
    for pair in pairs:
        lines.append(f"| {pair['arm']} | {len(pair['seeds'])} | {_difference(pair['difference'])} | "
                     f"{pair['fp32_minutes']:.1f} | {pair['bf16_minutes']:.1f} | {pair['speedup']:.2f}x |")
    lines.append("")
    for pair in pairs:
        mean, half = pair["difference"]
        verdict = interval_verdict(100 * (mean - half), 100 * (mean + half), -100 * BF16_WITHIN)
        lines.append(f"- {pair['arm']} over {len(pair['seeds'])} seeds: bf16 within {100 * BF16_WITHIN:g} point of "
                     f"float32: {verdict}")
    return lines


def _difference(value: Optional[tuple[float, float]]) -> str:
    if value is None:
        return ""
    mean, half = value
    return f"{100 * mean:+.2f} [{100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}]"


def paired_lines(pairs: Sequence[dict[str, Any]]) -> list[str]:
    """The paired table (test Dice points, 95% intervals) and the issue's target judged over the seeds."""
    lines = ["| precision | seeds | candidate - reference | candidate - current | candidate minutes (median) | "
             "ended by itself |", "|---|---|---|---|---|---|"]
    for pair in pairs:
        n = len(pair["seeds"])
        lines.append(f"| {pair['precision']} | {n} | {_difference(pair['against_reference'])} | "
                     f"{_difference(pair['against_current'])} | {pair['median_minutes']:.1f} | "
                     f"{pair['converged']} of {n} |")
    lines.append("")
    for pair in pairs:
        n, (mean, half) = len(pair["seeds"]), pair["against_reference"]
        fast = pair["median_minutes"] <= TARGET_MINUTES
        lines.append(f"- {pair['precision']} over {n} seeds: within 1 point of the reference: "
                     f"{within_verdict(mean, half)}; median {pair['median_minutes']:.1f} <= {TARGET_MINUTES:g} min: "
                     f"{'**yes**' if fast else '**no**'}; ended by itself in {pair['converged']} of {n}")
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
             f"training cases drawn with each seed ({', '.join(map(str, meta['seeds']))}), "
             f"{meta['test_cases']} test cases",
             f"- wall time of this invocation: {meta['wall_time_s'] / 60:.1f} min ({meta['runs_done']} runs done now, "
             f"{meta['runs_reused']} reused)", "",
             "Test Dice x100 of the model each run wrote (mean over cases of the mean foreground Dice); minutes of "
             "training (data preparation and test scoring apart); 'to within 1': training minutes until a kept "
             "checkpoint scored within 1 point of the reference's final Dice:", "",
             "| run | precision | seed | ended | epochs | steps | minutes | test Dice | best val Dice | to within 1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        within = _shown(row["minutes_to_within"]) or ("not reached" if row["reference_dice"] is not None else "")
        lines.append(f"| {row['arm']} | {row['precision']} | {row['seed']} | {row['reason']} | {row['epochs']} | "
                     f"{row['steps']} | "
                     f"{row['minutes']:.1f} | {_shown(row['test_dice'], 1, 100)} | "
                     f"{_shown(row['best_val_dice'], 1, 100)} | {within} |")
    pairs = paired(rows)
    if any(len(pair["seeds"]) > 1 for pair in pairs):
        lines += ["", "Paired over seeds (test Dice points, mean and 95% interval; a seed fixes the cases and the "
                  "initial weights of every arm):", "", *paired_lines(pairs)]
    precisions = precision_pairs(rows)
    if any(len(pair["seeds"]) > 1 for pair in precisions):
        lines += ["", "bf16 against float32, paired over seeds (test Dice points, mean and 95% interval):", "",
                  *precision_lines(precisions)]
    lines += ["", "Targets (from issue 16), run by run:", "", *(target_lines(rows) or ["- no candidate run"]), ""]
    return "\n".join(lines)


def render_chart(report: dict[str, Any], path: Path) -> None:
    """Test Dice of the kept checkpoints against training minutes, a line per run (one colour per arm and
    precision, every seed), and the references' mean final Dice less one point as a dashed line per precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colours: dict[str, str] = {}
    for run in report["runs"]:
        points = sorted(run["points"], key=lambda p: p["minutes"])
        key = f"{run['arm']} ({run['precision']})"
        line, = ax.plot([p["minutes"] for p in points], [100 * p["test_dice"] for p in points], marker="o",
                        markersize=3, color=colours.get(key), label=None if key in colours else key)
        colours.setdefault(key, line.get_color())
    references: dict[str, list[float]] = {}
    for row in report["summary"]:
        if row["arm"] == "reference":
            references.setdefault(row["precision"], []).append(row["test_dice"])
    for precision, values in references.items():
        ax.axhline(100 * (statistics.mean(values) - WITHIN), color="gray", linestyle="--", linewidth=1,
                   label=f"reference - 1 point ({precision})")
    ax.axvline(TARGET_MINUTES, color="black", linestyle=":", linewidth=1, label=f"{TARGET_MINUTES:g} min")
    ax.set_xlabel("training minutes")
    finish_chart(fig, ax, "test Dice (x100)", f"Time to a converged model on {report['meta']['dataset']}", path)
