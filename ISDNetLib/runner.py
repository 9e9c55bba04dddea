"""Run the engine as a child process and read its JSON-line progress, without blocking the caller.

The runner is polled (by a QTimer in the widgets, by a loop in the tests): ``poll()`` returns the stdout lines
that arrived since the last call. Stdout and stderr are both kept in the log, and in a log file when given one.
``stop()`` ends the whole process tree: the child starts a session (process group) of its own.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Optional

LOG_LINES_KEPT = 5000


def python_executable() -> str:
    """Slicer's own Python (PythonSlicer) inside Slicer, else the running interpreter."""
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    beside = Path(sys.executable).with_name(name)
    if beside.is_file():
        return str(beside)
    return shutil.which("PythonSlicer") or sys.executable


def engine_environment(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment for an engine child: unbuffered output and the folder holding ``isdnet`` on PYTHONPATH.

    Inside Slicer the extension's folders are on ``sys.path`` of the application only, so a child process would
    not find ``isdnet`` without this.
    """
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    spec = importlib.util.find_spec("isdnet")
    if spec is not None and spec.origin:
        engine_root = str(Path(spec.origin).resolve().parent.parent)
        paths = [engine_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != engine_root]
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


def parse_event(line: str) -> Optional[dict[str, Any]]:
    """The progress event a stdout line carries, or None for plain log text."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("event"), str) else None


class ProcessRunner:
    """One child process at a time, read by two threads; safe to poll from a GUI timer."""

    def __init__(self) -> None:
        self._process: Optional[subprocess.Popen] = None
        self._stdout_lines: queue.Queue[str] = queue.Queue()
        self._log: collections.deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self._log_lock = threading.Lock()
        self._log_file: Optional[IO[str]] = None
        self._threads: list[threading.Thread] = []

    def start(self, args: Sequence[str], env: Optional[dict[str, str]] = None, cwd: Optional[str] = None,
              log_path: Optional[str] = None) -> None:
        """Start ``args``; raises RuntimeError if a process of this runner is still running."""
        if self.is_running:
            raise RuntimeError("a process is already running; stop it first")
        self._close_log_file()
        self._stdout_lines = queue.Queue()
        self._log.clear()
        if log_path:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed when the child ends
        options: dict[str, Any] = {}
        if os.name == "nt":
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        else:
            options["start_new_session"] = True
        self._append_log("$ " + " ".join(str(a) for a in args))
        self._process = subprocess.Popen(
            [str(a) for a in args], env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", bufsize=1, **options)
        self._threads = [
            threading.Thread(target=self._read, args=(self._process.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self._process.stderr, False), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read(self, stream: IO[str], is_stdout: bool) -> None:
        for line in stream:
            line = line.rstrip("\r\n")
            if is_stdout:
                self._stdout_lines.put(line)
            self._append_log(line)
        stream.close()

    def _append_log(self, line: str) -> None:
        with self._log_lock:
            self._log.append(line)
            if self._log_file is not None:
                self._log_file.write(line + "\n")
                self._log_file.flush()

    def _close_log_file(self) -> None:
        with self._log_lock:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def poll(self) -> list[str]:
        """The stdout lines that arrived since the last call (all of them once the process has ended)."""
        if self._process is not None and self._process.poll() is not None:
            for thread in self._threads:
                thread.join()
            self._close_log_file()
        lines = []
        while True:
            try:
                lines.append(self._stdout_lines.get_nowait())
            except queue.Empty:
                return lines

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        """The exit status, None while running or before any start."""
        return None if self._process is None else self._process.poll()

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Block until the process ends (tests and scripts only); returns its exit status."""
        if self._process is None:
            return None
        self._process.wait(timeout)
        return self._process.returncode

    def stop(self, grace_s: float = 5.0) -> None:
        """End the child and everything it started: terminate the process group, kill it if it lingers."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        self._append_log("[stopped by the user]")
        if os.name == "nt":
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True, check=False)
        else:
            for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
                try:
                    os.killpg(process.pid, sig)  # the group outlives its leader: stragglers get the kill too
                except ProcessLookupError:
                    break
                try:
                    process.wait(wait_s)
                except subprocess.TimeoutExpired:
                    continue
        process.wait()

    def log_tail(self, lines: int = 20) -> list[str]:
        """The last ``lines`` lines of stdout and stderr together."""
        with self._log_lock:
            return list(self._log)[-lines:]
