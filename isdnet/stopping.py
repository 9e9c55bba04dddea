"""When a training ends before its planned epochs: a stop request (the stop file, SIGTERM, Ctrl-C), convergence
(``--patience``: no gain in validation Dice for that many epochs) or a spent time budget (``--max-minutes``).

The rules read only what a checkpoint keeps (the per-epoch history and the training seconds), so a resumed run
decides as an uninterrupted one would. No torch here.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .config import TrainConfig

_IMPORTED = time.time()
CONVERGED = "converged"  # the done event's reason when --patience ended the run
TIME_BUDGET = "time budget"  # and when --max-minutes did


def _process_started() -> float:
    """When this process started; where psutil cannot load (its Linux module needs the POSIX-only ``resource``,
    missing in some embedded Pythons), when this module was imported, which is soon after."""
    try:
        import psutil
    except ImportError:
        return _IMPORTED
    return psutil.Process().create_time()


class StopRequest:
    """A request to stop that the loop honours between iterations: the stop file beside the model appearing (how
    the Slicer module and the web app ask, on every system), SIGTERM or SIGINT (Ctrl-C; main thread only).

    Training then writes a checkpoint at the iteration it reached and exits cleanly, so Resume loses nothing. A
    stop file older than this process is left from an earlier run (one killed before it could remove it) and is
    removed; a newer one is a Stop pressed while the training was still starting, and is honoured.
    """

    def __init__(self, stop_file: Optional[Path] = None) -> None:
        self.signalled = False
        self.stop_file = stop_file
        self._previous: dict[int, Any] = {}
        if stop_file is not None:
            with contextlib.suppress(FileNotFoundError):
                if stop_file.stat().st_mtime < _process_started():
                    stop_file.unlink(missing_ok=True)

    @property
    def requested(self) -> bool:
        return self.signalled or (self.stop_file is not None and self.stop_file.exists())

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._request)
        return self

    def _request(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)


def epochs_without_improvement(val_dices: Sequence[Optional[float]], min_delta: float = 0.0) -> int:
    """Epochs since the last one whose validation Dice beat the best before it by more than ``min_delta``.

    The count starts at the first epoch with a Dice above 0: a model that segments nothing yet has not started to
    learn (on small structures it does so for hundreds of steps), which is not convergence. Later epochs without a
    validation Dice count as no gain.
    """
    best, stale = None, 0
    for value in val_dices:
        if best is None and not value:
            continue
        if value is not None and (best is None or value > best + min_delta):
            best, stale = value, 0
        else:
            stale += 1
    return stale


def converged_epochs(history: Sequence[dict[str, Any]], config: TrainConfig, semi: bool) -> Optional[int]:
    """The epochs without improvement once they reach ``config.patience``, else None (also without patience or
    without any validation Dice). With ``semi`` (unlabeled terms that start after the warm-up), only epochs after
    the warm-up count, so the semi-supervised terms always get ``patience`` epochs to help."""
    if config.patience is None or not history or all(e.get("val_dice") is None for e in history):
        return None
    stale = epochs_without_improvement([e.get("val_dice") for e in history], config.min_delta)
    if semi:
        stale = min(stale, int(history[-1]["epoch"]) - config.warmup_epochs)
    return stale if stale >= config.patience else None


def budget_spent(train_seconds: float, config: TrainConfig) -> bool:
    """True when ``--max-minutes`` is set and that much training time has passed."""
    return config.max_minutes is not None and train_seconds >= 60.0 * config.max_minutes


def minutes_text(seconds: float) -> str:
    """9 min, 1.5 min, 0.1 min: whole minutes from 2 on, tenths below."""
    minutes = seconds / 60.0
    return f"{minutes:.0f} min" if minutes >= 2 else f"{minutes:.1f} min"


def converged_message(train_seconds: float, epoch: int, stale: int) -> str:
    """What the progress says when ``--patience`` ends the run."""
    return (f"converged after {minutes_text(train_seconds)} at epoch {epoch}: validation Dice has not improved "
            f"for {stale} epochs")


def budget_message(train_seconds: float, epoch: int, config: TrainConfig) -> str:
    """What the progress says when ``--max-minutes`` ends the run."""
    return (f"time budget spent: stopped after {minutes_text(train_seconds)} of training at epoch {epoch} "
            f"(--max-minutes {config.max_minutes:g}); resume with a larger --max-minutes to train on")
