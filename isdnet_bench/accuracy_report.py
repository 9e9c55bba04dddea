"""The report of ``isdnet-bench accuracy``: per-cell means over seeds, paired differences with 95% intervals, the
diagnostics of D and D0, the issue's targets, as Markdown and a PNG chart."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import numpy as np

from isdnet.config import METHODS, SEMI_SUPERVISED_OPTIONS
from isdnet.errors import InputError

from .records import finish_chart

FULL = "full"  # the fraction key of the full-label runs


def headline_markers(block: str = "") -> tuple[str, str]:
    """The lines around a result a doc quotes, which --headline rewrites from the report; a doc that quotes several
    reports names each block (--headline-block)."""
    name = f" {block}" if block else ""
    return f"<!-- headline{name}: generated from the report -->", f"<!-- end of headline{name} -->"


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; beyond, the normal's 1.96.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
# The comparisons the paper makes (Table 3), each paired seed by seed: (method, against).
COMPARISONS = (("isdnet", "baseline"), ("hung", "baseline"), ("isdnet", "hung"), ("adv", "adv-classifier"),
               ("adv", "baseline"))


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def mean_interval(differences: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval (inf for a single value)."""
    n = len(differences)
    mean, sd = mean_sd(differences)
    if n < 2:
        return mean, math.inf
    t = T_975[n - 2] if n - 1 <= len(T_975) else 1.96
    return mean, t * sd / math.sqrt(n)


def fraction_key(fraction: float) -> str:
    """1/8 for 0.125: the way the paper names labeled fractions ("full" for 1)."""
    f = Fraction(fraction).limit_denominator(64)
    return str(f) if f.denominator > 1 else FULL


def keys(summary: dict[str, Any]) -> list[str]:
    """The fraction keys present, most labels first, full labels last."""
    found = {cell.split("|")[0] for cell in summary}
    fractions = sorted((k for k in found if k != FULL), key=lambda k: -float(Fraction(k)))
    return fractions + ([FULL] if FULL in found else [])


def rows_of(summary: dict[str, Any]) -> list[str]:
    """The table's rows: the paper's methods in their order, then the named variants."""
    labels = {cell.split("|")[1] for cell in summary}
    return [m for m in METHODS if m in labels] + sorted(labels - set(METHODS))


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per (fraction key, method) cell: the runs' test metrics (final model, and best-on-validation), per seed and
    as mean and SD over seeds, and the diagnostics."""
    cells: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        if r.get("variant") or not r["overrides"]:  # the Table 2 grid is reported apart
            cells.setdefault(f"{r['key']}|{r.get('label', r['method'])}", []).append(r)
    summary = {}
    for cell, runs in cells.items():
        classes = sorted(runs[0]["metrics"]["dice_per_class"], key=int)
        hd95 = [np.nanmean([np.nan if v is None else v for v in r["metrics"]["hd95"].values()]) for r in runs]
        best = [r["metrics_best"]["dice"] for r in runs if r.get("metrics_best")]
        summary[cell] = dict(
            seeds=[r["seed"] for r in runs],
            overrides=dict(runs[0].get("overrides") or {}),
            dice=mean_sd([r["metrics"]["dice"] for r in runs]),
            dice_by_seed={str(r["seed"]): r["metrics"]["dice"] for r in runs},
            dice_best=mean_sd(best) if best else None,
            dice_per_class={c: mean_sd([r["metrics"]["dice_per_class"][c] for r in runs]) for c in classes if c != "0"},
            global_dice=mean_sd([r["metrics"]["global_dice_mean"] for r in runs]),
            hd95=mean_sd(hd95),
            train_time_s=mean_sd([r["train_time_s"] for r in runs]),
            steps=runs[0]["steps"],
            labeled_cases=runs[0]["labeled_cases"],
            validation_cases=runs[0].get("validation_cases"),
            diagnostics=diagnostics(runs),
        )
    return summary


def baseline_change(overrides: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """What a variant's options change in a baseline run: those outside SEMI_SUPERVISED_OPTIONS."""
    return {k: v for k, v in overrides if k not in SEMI_SUPERVISED_OPTIONS}


def variant_comparisons(summary: dict[str, Any], key: str) -> list[tuple[str, str]]:
    """Each variant of a fraction against the plain baseline and its own plain method, and each variant of isdnet
    against the baseline variants that make the same change to what a baseline reads (the options outside
    SEMI_SUPERVISED_OPTIONS)."""
    cells = {cell.split("|")[1]: value for cell, value in summary.items() if cell.split("|")[0] == key}
    comparisons = []
    for variant in sorted(set(cells) - set(METHODS)):
        comparisons += [(variant, against) for against in dict.fromkeys(("baseline", variant.split(" [")[0]))]
        if variant.startswith("isdnet ["):
            change = baseline_change(cells[variant].get("overrides", {}).items())
            comparisons += [(variant, twin) for twin in sorted(cells) if twin.startswith("baseline [")
                            and cells[twin].get("overrides", {}) == change]
    return comparisons


def paired(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """For each fraction and comparison of ``COMPARISONS`` with runs of both methods: the seed-by-seed
    differences of test Dice (points) with their mean and 95% interval."""
    rows = []
    for key in keys(summary):
        for method, against in (*COMPARISONS, *variant_comparisons(summary, key)):
            a, b = summary.get(f"{key}|{method}"), summary.get(f"{key}|{against}")
            if not a or not b:
                continue
            seeds = sorted(set(a["dice_by_seed"]) & set(b["dice_by_seed"]), key=int)
            if not seeds:
                continue
            differences = [100 * (a["dice_by_seed"][s] - b["dice_by_seed"][s]) for s in seeds]
            mean, half = mean_interval(differences)
            rows.append(dict(key=key, method=method, against=against, seeds=[int(s) for s in seeds],
                             differences=differences, mean=mean, low=mean - half, high=mean + half))
    return rows


def diagnostics(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Is D learning, how much unlabeled data passes T_semi (per epoch), what w D0 gives, how well D's map finds
    S's errors; means over the cell's seeds."""
    out: dict[str, Any] = {}
    for key in ("d", "adv", "confident_fraction", "w_mean", "d0", "semi"):
        series = [[e["losses"][key] for e in r["history"] if key in e["losses"]] for r in runs]
        series = [s for s in series if s]
        if series:
            length = min(len(s) for s in series)
            out[key] = [float(np.mean([s[i] for s in series])) for i in range(length)]
    weights = [r["importance"] for r in runs if r.get("importance")]
    for group in ("labeled", "unlabeled"):
        if weights and all(group in w for w in weights):
            out[f"w_{group}"] = {k: float(np.mean([w[group][k] for w in weights])) for k in ("mean", "std")}
    aurocs = [r["confidence"]["auroc_wrong"] for r in runs if r.get("confidence")]
    if aurocs:
        out["auroc_wrong"] = float(np.mean(aurocs))
    return out


def interval_verdict(low: float, high: float, bound: float) -> str:
    """Met or missed only when the whole 95% interval [low, high] lies on one side of ``bound`` (met at or above
    it): with a few seeds, a mean on the right side of it is no result."""
    if low >= bound:
        return "**met**"
    if high < bound:
        return "**missed**"
    return f"**undecided** (the interval holds {bound:+.1f})"


def targets(summary: dict[str, Any], pairs: Sequence[dict[str, Any]]) -> list[str]:
    """The issue's targets, each checked on the measured cells; missing cells are said to be missing."""
    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    def pair(key: str, method: str, against: str) -> Optional[dict[str, Any]]:
        return next((p for p in pairs if (p["key"], p["method"], p["against"]) == (key, method, against)), None)

    def shown(p: dict[str, Any]) -> str:
        return f"{p['mean']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}] (n={len(p['seeds'])})"

    lines = []
    full = summary.get(f"{FULL}|baseline")
    lines.append(f"- full-label baseline >= 84: {full['dice'][0] * 100:.1f} {verdict(full['dice'][0] >= 0.84)}"
                 if full else "- full-label baseline >= 84: not run")
    for key in keys(summary):
        p = pair(key, "isdnet", "baseline")
        if key == FULL or p is None:
            continue
        if key == "1/2":
            lines.append(f"- 1/2: isdnet - baseline >= -0.5: {shown(p)} "
                         f"{interval_verdict(p['low'], p['high'], -0.5)}")
        elif key in ("1/8", "1/16"):
            lines.append(f"- {key}: isdnet - baseline >= +1.8 with the interval above 0: {shown(p)} "
                         f"{verdict(p['mean'] >= 1.8 and p['low'] > 0)}")
        else:
            lines.append(f"- {key} (reported): isdnet - baseline = {shown(p)}")
        for method, against, need in (("isdnet", "hung", "> 0"), ("adv", "adv-classifier", ">= 0")):
            q = pair(key, method, against)
            if q is not None:
                lines.append(f"- {key}: {method} - {against} {need}: {shown(q)} "
                             f"{interval_verdict(q['low'], q['high'], 0.0)}")
    return lines


def _pm(pair: Optional[Sequence[float]], scale: float = 100.0, digits: int = 1) -> str:
    return "" if pair is None else f"{pair[0] * scale:.{digits}f} ± {pair[1] * scale:.{digits}f}"


def _semi_trace(values: Sequence[float]) -> str:
    """First, middle and last value of a per-epoch series."""
    if not values:
        return ""
    picks = [values[0], values[len(values) // 2], values[-1]] if len(values) > 2 else list(values)
    return " / ".join(f"{v:.3f}" for v in picks)


def method_table(summary: dict[str, Any], shown: Callable[[dict[str, Any]], str]) -> list[str]:
    """A table with a row per method and a column per fraction, each cell as ``shown`` writes it."""
    cell_keys = keys(summary)
    lines = ["| method | " + " | ".join(f"{k} labels" for k in cell_keys) + " |", "|---|" + "---|" * len(cell_keys)]
    for method in rows_of(summary):
        row = [shown(c) if (c := summary.get(f"{k}|{method}")) else "" for k in cell_keys]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines


def final_table(summary: dict[str, Any]) -> list[str]:
    """The result: test Dice of the final models per method and fraction, mean ± SD over seeds."""
    return ["Test Dice of the final models, mean over the foreground classes (x100), mean ± SD over seeds "
            "(n = seeds):", "", *method_table(summary, lambda c: f"{_pm(c['dice'])} (n={len(c['seeds'])})")]


def paired_table(pairs: Sequence[dict[str, Any]]) -> list[str]:
    """The paired differences, seed by seed, with their means and 95% intervals."""
    lines = ["Paired differences of test Dice (points), seed by seed (the same seed: the same labeled cases "
             "and initial weights), mean [95% t interval]:", "",
             "| labels | comparison | seeds | differences | mean [95% interval] |", "|---|---|---|---|---|"]
    for p in pairs:
        lines.append(f"| {p['key']} | {p['method']} - {p['against']} | {p['seeds']} | "
                     f"{', '.join(f'{d:+.1f}' for d in p['differences'])} | "
                     f"{p['mean']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}] |")
    return lines


def write_headline(report: dict[str, Any], document: Path, block: str = "") -> None:
    """Replace the block between ``headline_markers(block)`` in ``document`` (a doc that quotes the result) with
    the final models' table, the paired differences and the targets, so the doc cannot drift from the records."""
    start, end = headline_markers(block)
    text = document.read_text(encoding="utf-8")
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise InputError(document, f"needs one '{start}' line followed by one '{end}' line")
    block = [start, *final_table(report["summary"]), "", *paired_table(report["paired"]), "",
             "The issue's targets, as the report checks them:", "", *targets(report["summary"], report["paired"]),
             end]
    before, rest = text.split(start)
    document.write_text(before + "\n".join(block) + rest.split(end, 1)[1], encoding="utf-8")


def render_markdown(report: dict[str, Any]) -> str:
    """The Markdown report: header, the table of final models, best-on-validation, paired differences, details,
    diagnostics and targets."""
    summary, meta = report["summary"], report["meta"]
    cell_keys, methods = keys(summary), rows_of(summary)
    lines = [f"# ISDNet ablation (paper Table 3) on {meta['dataset']}", "",
             f"- commit `{meta['commit']}`, {meta['date']}", f"- machine: {meta['machine']}",
             f"- command: `{meta['command']}`", f"- {meta['settings']}",
             f"- wall time of this invocation: {meta['wall_time_s'] / 60:.1f} min ({meta['runs_done']} runs done "
             f"now, {meta['runs_reused']} reused from earlier invocations)", "", *final_table(summary)]
    lines += ["", "The same runs' models of the epoch with the best validation Dice (a second look, not the "
              "result):", "", *method_table(summary, lambda c: _pm(c["dice_best"]))]
    lines += ["", *paired_table(report["paired"])]
    lines += ["", "Details: labeled cases trained on (validation cases apart), Dice per class and global Dice (x100), "
              "HD95 (mm), training time (s), steps of S:", "",
              "| labels | method | labeled (+val) | Dice per class | global Dice | HD95 | train s | steps |",
              "|---|---|---|---|---|---|---|---|"]
    for key in cell_keys:
        for method in methods:
            if c := summary.get(f"{key}|{method}"):
                per_class = ", ".join(f"{k}: {_pm(v)}" for k, v in c["dice_per_class"].items())
                lines.append(f"| {key} | {method} | {c['labeled_cases']} (+{c['validation_cases']}) | {per_class} | "
                             f"{_pm(c['global_dice'])} | {_pm(c['hd95'], 1, 2)} | {c['train_time_s'][0]:.0f} | "
                             f"{c['steps']} |")
    lines += ["", "Diagnostics, epoch means over seeds (first / middle / last epoch that has the term). d: the "
              "confidence net's loss (2 ln 2 = 1.39 at chance); confident: share of unlabeled pixels over T_semi; "
              "w: importance weight 1 - D0 (training mean; and on slices of 8 labeled / 8 unlabeled cases with "
              "the final networks); AUROC: how well 1 - D's confidence ranks S's wrong test voxels above right "
              "ones (0.5 is chance):", "",
              "| labels | method | d | confident | w (training) | w labeled / unlabeled | AUROC |",
              "|---|---|---|---|---|---|---|"]
    for key in cell_keys:
        for method in methods:
            c = summary.get(f"{key}|{method}")
            d = c["diagnostics"] if c else {}
            if d:
                w = (f"{d['w_labeled']['mean']:.3f} / {d['w_unlabeled']['mean']:.3f}"
                     if "w_labeled" in d and "w_unlabeled" in d else "")
                auroc = f"{d['auroc_wrong']:.3f}" if "auroc_wrong" in d else ""
                lines.append(f"| {key} | {method} | {_semi_trace(d.get('d', []))} | "
                             f"{_semi_trace(d.get('confident_fraction', []))} | {_semi_trace(d.get('w_mean', []))} "
                             f"| {w} | {auroc} |")
    if report["grid"]:
        lines += ["", "Table 2 grid (isdnet, one hyperparameter changed from the defaults):", "",
                  "| change | labels | seed | Dice |", "|---|---|---|---|"]
        lines += [f"| {g['overrides']} | {g['key']} | {g['seed']} | {g['dice'] * 100:.1f} |" for g in report["grid"]]
    lines += ["", "Targets (from the issue):", "", *targets(summary, report["paired"]), ""]
    return "\n".join(lines)


def render_chart(report: dict[str, Any], path: Path) -> None:
    """Grouped bars: mean test Dice of the final models per method at each fraction, SD over seeds as error bars,
    and the full-label baseline as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    cell_keys = [k for k in keys(summary) if k != FULL]
    methods = [m for m in rows_of(summary) if any(f"{k}|{m}" in summary for k in cell_keys)]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        cells = [summary.get(f"{k}|{method}") for k in cell_keys]
        xs = [j + i * width for j, c in enumerate(cells) if c]
        ax.bar(xs, [c["dice"][0] * 100 for c in cells if c], width, yerr=[c["dice"][1] * 100 for c in cells if c],
               label=method, capsize=3)
    full = summary.get(f"{FULL}|baseline")
    if full:
        ax.axhline(full["dice"][0] * 100, color="black", linestyle="--", label="baseline, all labels")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cell_keys))], [f"{k} labeled" for k in cell_keys])
    values = [c["dice"][0] * 100 for c in summary.values()]
    ax.set_ylim(max(0, min(values) - 5), min(100, max(values) + 3))
    finish_chart(fig, ax, "mean test Dice of the final model (x100)", f"ISDNet ablation on {report['meta']['dataset']}",
                 path)
