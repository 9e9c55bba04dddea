"""The report of ``isdnet-bench active``: test Dice per strategy, each strategy's gain over random paired seed by
seed with a 95% interval (``accuracy_report.mean_interval``), and how the uncertainty maps find the errors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .accuracy_report import _pm, mean_interval, mean_sd


def summarise(records: Sequence[dict[str, Any]], reference: str) -> dict[str, Any]:
    """``strategies``: per strategy (and ``start``) the test Dice by seed and its mean and SD; ``gains``: per
    strategy the paired differences from ``reference`` (Dice points) with mean and 95% interval; ``review``: per
    uncertainty map the mean AUROC and share of wrong voxels in the top over the seeds."""
    dice: dict[str, dict[str, float]] = {}
    reviews: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        key = r["strategy"] if r["round"] == "added" else "start"
        dice.setdefault(key, {})[str(r["seed"])] = r["metrics"]["dice"]
        for kind, found in (r.get("uncertainty") or {}).items():
            reviews.setdefault(kind, []).append(found)
    strategies = {k: dict(dice_by_seed=v, dice=mean_sd(list(v.values()))) for k, v in dice.items()}
    gains = []
    for strategy, by_seed in dice.items():
        if strategy in (reference, "start") or reference not in dice:
            continue
        seeds = sorted(set(by_seed) & set(dice[reference]), key=int)
        if not seeds:
            continue
        differences = [100 * (by_seed[s] - dice[reference][s]) for s in seeds]
        mean, half = mean_interval(differences)
        gains.append(dict(strategy=strategy, against=reference, seeds=[int(s) for s in seeds],
                          differences=differences, mean=mean, low=mean - half, high=mean + half))
    review = {}
    for kind, found in reviews.items():
        aurocs = [f["auroc_wrong"] for f in found if f["auroc_wrong"] is not None]
        tops = [f["wrong_in_top"] for f in found if f["wrong_in_top"] is not None]
        review[kind] = dict(auroc_wrong=mean_sd(aurocs) if aurocs else None,
                            wrong_in_top=mean_sd(tops) if tops else None, seeds=len(found))
    return dict(strategies=strategies, gains=sorted(gains, key=lambda g: -g["mean"]), review=review)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: settings, the gain table, the Dice table and the review table."""
    meta = report["meta"]
    lines = [f"# Which volume to annotate next: {meta['dataset']}", "",
             f"{meta['settings']}. Commit {meta['commit']}, {meta['machine']}, {meta['date']}, "
             f"{meta['wall_time_s'] / 60:.0f} min.", "", f"Command: `{meta['command']}`", "",
             "## Gain over random (test Dice points, paired by seed, 95% interval)", "",
             "| strategy | gain | 95% interval | seeds |", "|---|---|---|---|"]
    for g in report["gains"]:
        lines.append(f"| {g['strategy']} | {g['mean']:+.2f} | [{g['low']:+.2f}, {g['high']:+.2f}] | "
                     f"{len(g['seeds'])} |")
    lines += ["", "## Test Dice x100 (mean ± SD over seeds)", "", "| labeled set | Dice | seeds |", "|---|---|---|"]
    for name, cell in report["strategies"].items():
        label = "start (before adding)" if name == "start" else f"start + top by {name}"
        lines.append(f"| {label} | {_pm(cell['dice'])} | {len(cell['dice_by_seed'])} |")
    lines += ["", "## Review: do the uncertainty maps find the first model's errors? (test split)", "",
              "| map | AUROC wrong vs right | share of wrong voxels in the 10% most uncertain |", "|---|---|---|"]
    for kind, found in report["review"].items():
        lines.append(f"| {kind} | {_pm(found['auroc_wrong'], 1.0, 3)} | "
                     f"{_pm(found['wrong_in_top'])} % |")
    return "\n".join(lines) + "\n"



def render_review(report: dict[str, Any]) -> str:
    """``--review``'s report as Markdown: per model, its test Dice and each map's AUROC and top-10% share."""
    meta = report["meta"]
    lines = [f"# Do the uncertainty maps find the errors? {meta['dataset']}", "",
             f"{meta['settings']}. Commit {meta['commit']}, {meta['machine']}, {meta['date']}.", "",
             f"Command: `{meta['command']}`", "",
             "AUROC of each map for wrong versus right test voxels (0.5 is chance), and the share of all wrong "
             "voxels among the 10% most uncertain:", "",
             "| model | test Dice | " + " | ".join(meta["uncertainties"]) + " |",
             "|---|---|" + "---|" * len(meta["uncertainties"])]
    for row in report["models"]:
        cells = []
        for kind in meta["uncertainties"]:
            found = row["uncertainty"].get(kind)
            top = "" if not found or found["wrong_in_top"] is None else f" / {100 * found['wrong_in_top']:.0f} %"
            cells.append(f"{found['auroc_wrong']:.3f}{top}" if found and found["auroc_wrong"] is not None else "")
        lines.append(f"| {Path(row['model']).stem} | {100 * row['dice']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def worst_slice(wrong: np.ndarray) -> int:
    """The index along the first axis of the slice with the most wrong voxels (the first such slice on ties)."""
    return int(np.argmax(wrong.reshape(wrong.shape[0], -1).sum(axis=1)))


def render_review_example(image: np.ndarray, truth: np.ndarray, predicted: np.ndarray, uncertainty: np.ndarray,
                          title: str, path: Path) -> None:
    """One slice in four panels: the image, the segmentation with the truth's outline, the uncertainty overlay,
    and the wrong voxels; what a reviewer sees in ISDNet Segment, with the errors it should lead them to."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wrong = predicted != truth
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.6))
    shown = np.ma.masked_equal(predicted, 0)
    panels = [("image", None), ("segmentation (truth outlined)", shown),
              ("uncertainty", np.ma.masked_less(uncertainty, 0.05)), ("errors", np.ma.masked_equal(wrong, False))]
    for ax, (name, overlay) in zip(axes, panels):
        ax.imshow(image, cmap="gray", interpolation="nearest")
        if name.startswith("segmentation"):
            ax.imshow(overlay, cmap="tab10", vmin=0, vmax=9, alpha=0.5, interpolation="nearest")
            ax.contour(truth > 0, levels=[0.5], colors="yellow", linewidths=1)
        elif name == "uncertainty":
            ax.imshow(overlay, cmap="inferno", vmin=0, vmax=1, alpha=0.8, interpolation="nearest")
        elif overlay is not None:
            ax.imshow(overlay, cmap="autumn", alpha=0.9, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_chart(report: dict[str, Any], path: Path) -> None:
    """Bars: each strategy's mean gain over random with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gains = report["gains"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    means = [g["mean"] for g in gains]
    errors = [[g["mean"] - g["low"] if np.isfinite(g["low"]) else 0 for g in gains],
              [g["high"] - g["mean"] if np.isfinite(g["high"]) else 0 for g in gains]]
    ax.bar([g["strategy"] for g in gains], means, yerr=errors, capsize=4, color="#6fb8d2")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("test Dice gain over random (points)")
    ax.set_title(f"Annotate next: {report['meta']['dataset']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
