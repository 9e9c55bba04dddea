"""Progress of long jobs: JSON lines for programs (the Slicer module reads them) or a bar for people."""

from __future__ import annotations

import json
import sys
from typing import Any, Optional, TextIO


def _fmt_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Emit progress events.

    With ``json_lines``, each event is one JSON object on its own line of ``stream`` (stdout by default): the
    contract the Slicer module parses. Otherwise a one-line bar on stderr and a summary line per epoch.
    """

    def __init__(self, json_lines: bool = False, stream: Optional[TextIO] = None):
        self.json_lines = json_lines
        self.stream = stream or (sys.stdout if json_lines else sys.stderr)
        self.events: list[dict[str, Any]] = []

    def emit(self, event: str, **fields: Any) -> None:
        record = {"event": event, **fields}
        if event != "iteration":
            self.events.append(record)
        if self.json_lines:
            self.stream.write(json.dumps(record) + "\n")
            self.stream.flush()
            return
        self._human(record)

    def _human(self, r: dict[str, Any]) -> None:
        event = r["event"]
        if event == "start":
            self._line(f"training {r['method']} on {r['labeled_slices']} labeled and {r['unlabeled_slices']} "
                       f"unlabeled slices, {r['epochs']} epochs, device {r['device']} ({r['precision']})")
        elif event == "iteration":
            done = r["iteration"] / r["iterations"]
            bar = "#" * int(done * 20)
            losses = " ".join(f"{k} {v:.3f}" for k, v in r["losses"].items())
            self.stream.write(f"\repoch {r['epoch']} [{bar:<20}] {r['iteration']}/{r['iterations']} {losses} "
                              f"ETA {_fmt_seconds(r['eta_s'])}   ")
            self.stream.flush()
        elif event == "epoch":
            val = "-" if r["val_dice"] is None else f"{r['val_dice']:.4f}"
            self._line(f"\repoch {r['epoch']}/{r['epochs']}: validation Dice {val}, "
                       f"elapsed {_fmt_seconds(r['elapsed_s'])}, ETA {_fmt_seconds(r['eta_s'])}")
        elif event == "done":
            if "model" in r:
                self._line(f"model written to {r['model']}")
        elif event in ("error", "message"):
            self._line(r.get("message", ""))

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
