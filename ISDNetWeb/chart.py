"""The loss and Dice chart of a training as a small SVG, from TrainLogic's per-epoch history."""

from __future__ import annotations

import base64
import math
from html import escape

from isdnet.config import LOSS_TITLES, VAL_DICE
from ISDNetLib.train import SERIES_COLORS

WIDTH, PLOT_HEIGHT, MARGIN, LINE = 330, 110, 28, 12


def _css_color(rgb: tuple[float, float, float]) -> str:
    return "rgb({},{},{})".format(*(int(round(255 * c)) for c in rgb))


def training_chart(history: dict[int, dict[str, float]]) -> str:
    """An SVG with one polyline per loss of the method, each scaled to its own largest value (their sizes differ
    by orders of magnitude), and the validation Dice on its true 0-1 scale."""
    epochs = sorted(history)
    keys = [k for k in LOSS_TITLES if any(k in history[e] for e in epochs)]
    if any(VAL_DICE in history[e] for e in epochs):
        keys.append(VAL_DICE)
    bottom = 8 + PLOT_HEIGHT  # the x axis; the epoch labels and then the legend go below it
    height = bottom + 2 * LINE + LINE * len(keys)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
             f'viewBox="0 0 {WIDTH} {height}" font-size="10" font-family="sans-serif" class="isdnet-chart">',
             f'<rect x="{MARGIN}" y="8" width="{WIDTH - MARGIN - 8}" height="{PLOT_HEIGHT}" '
             'fill="none" stroke="#888"/>']
    if not epochs:
        parts.append(f'<text x="{WIDTH / 2}" y="{8 + PLOT_HEIGHT / 2}" text-anchor="middle" fill="#888">'
                     'no epoch finished yet</text></svg>')
        return "".join(parts)
    span = max(1, epochs[-1] - epochs[0])

    def xy(epoch: int, value: float, scale: float) -> str:
        x = MARGIN + (epoch - epochs[0]) / span * (WIDTH - MARGIN - 8)
        y = 8 + (1 - value / scale) * PLOT_HEIGHT
        return f"{x:.1f},{y:.1f}"

    for index, key in enumerate(keys):
        finite = [abs(history[e][key]) for e in epochs if key in history[e] and math.isfinite(history[e][key])]
        scale = 1.0 if key == VAL_DICE else max([1e-12, *finite])
        points = [xy(e, history[e][key], scale) for e in epochs
                  if key in history[e] and math.isfinite(history[e][key])]
        color = _css_color(SERIES_COLORS[index % len(SERIES_COLORS)])
        dash = ' stroke-dasharray="4 3"' if key == VAL_DICE else ""
        parts.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>')
        for point in points:
            x, y = point.split(",")
            parts.append(f'<circle cx="{x}" cy="{y}" r="2" fill="{color}"/>')
        if key == VAL_DICE:
            title = f"validation Dice (last {finite[-1]:.3f})" if finite else "validation Dice"
        else:
            title = f"{LOSS_TITLES[key]} (max {scale:.3g})" if max(finite, default=0) > 0 else f"{LOSS_TITLES[key]} (0)"
        parts.append(f'<text x="{MARGIN}" y="{bottom + LINE * (index + 2)}" fill="{color}">{escape(title)}</text>')
    parts.append(f'<text x="{MARGIN - 3}" y="14" text-anchor="end" fill="#888">max</text>'
                 f'<text x="{MARGIN - 3}" y="{bottom}" text-anchor="end" fill="#888">0</text>'
                 f'<text x="{WIDTH - 8}" y="{bottom + LINE}" text-anchor="end" fill="#888">epoch {epochs[-1]}</text>'
                 f'<text x="{MARGIN}" y="{bottom + LINE}" fill="#888">epoch {epochs[0]}</text></svg>')
    return "".join(parts)


def chart_image(svg: str) -> str:
    """The chart as a ``data:`` address for an ``<img>``: an image shows, never runs, what it holds."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode("ascii")
