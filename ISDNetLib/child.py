"""What the logics that run one short engine command as a child process share (segmenting, ranking): the
runner, progress read from its JSON lines, Cancel, and the message when it fails."""

from __future__ import annotations

from typing import Any, Optional

from isdnet.config import Event, parse_event

from .runner import ProcessRunner, python_executable

LOG_TAIL_LINES = 15


class ChildJobLogic:
    """A logic of one scene whose jobs run as a child through an injected runner; subclasses set ``status`` (with
    ``state``, ``fraction`` and ``message``), read their progress events in ``_progress`` and end in ``_finish``."""

    what = "job"  # how the messages name the job: "Segmentation", "Ranking"

    def __init__(self, scene: Any, runner: Optional[ProcessRunner] = None, python: Optional[str] = None):
        self.scene = scene
        self.runner = runner or ProcessRunner()
        self.python = python or python_executable()
        self.status: Any = None
        self._error_message = ""
        self._cancelled = False

    def _started(self) -> None:
        self._error_message, self._cancelled = "", False

    @property
    def is_running(self) -> bool:
        return self.runner.is_running

    def cancel(self) -> None:
        """End the child process (and all it started); nothing is added to the scene."""
        if self.runner.is_running:
            self._cancelled = True
            self.runner.kill()
        self.poll()

    def _progress(self, event: dict[str, Any]) -> None:
        """Take one progress event of the child (not an error)."""

    def _finish(self, returncode: int) -> None:
        raise NotImplementedError

    def poll(self) -> Any:
        """Read the child's progress; when it has ended, take its result (or say why it failed)."""
        for line in self.runner.poll():
            event = parse_event(line)
            if event is None:
                continue
            if event["event"] == Event.ERROR:
                self._error_message = str(event.get("message", ""))
            else:
                self._progress(event)
        if self.status.state == "running" and not self.runner.is_running and self.runner.returncode is not None:
            self._finish(self.runner.returncode)
        return self.status

    def ended_without_result(self, returncode: int) -> bool:
        """Set the status when the child was cancelled or failed (with its error and log tail); True then."""
        if self._cancelled:
            self.status.state, self.status.message = "cancelled", f"{self.what} cancelled."
            return True
        if returncode == 0:
            return False
        reason = self._error_message or f"the {self.what.lower()} process ended unexpectedly (exit status " \
                                        f"{returncode})"
        tail = [line for line in self.runner.log_tail(LOG_TAIL_LINES * 5) if parse_event(line) is None]
        self.status.state = "failed"
        self.status.message = (f"{self.what} failed: {reason}\n\nLast lines of the log:\n"
                               + "\n".join(tail[-LOG_TAIL_LINES:]))
        return True
