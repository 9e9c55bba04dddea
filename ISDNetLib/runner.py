"""Run the engine as a child process and read its JSON-line progress, without blocking the caller.

The child writes its stdout and stderr straight into a log file, and the runner reads that file as it grows:
``poll()`` returns the lines that arrived since the last call. Because the child holds no pipe to its parent,
it can outlive the parent (``detach()``, when the user lets a training finish after closing Slicer), and a
crash of the parent does not kill it halfway through a write. ``kill()`` ends the whole process tree, found with
psutil, so it also reaches the real Python behind a launcher (PythonSlicer) and works alike on every system. No
console window opens for the child on Windows.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from isdnet.threads import wait_passively

LOG_LINES_KEPT = 5000
WINDOWS = os.name == "nt"


def python_executable() -> str:
    """Slicer's own Python (PythonSlicer) inside Slicer, else the running interpreter."""
    name = "PythonSlicer.exe" if WINDOWS else "PythonSlicer"
    beside = Path(sys.executable).with_name(name)
    if beside.is_file():
        return str(beside)
    return shutil.which("PythonSlicer") or sys.executable


def engine_environment(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment for an engine child: unbuffered output, torch threads that wait passively
    (``isdnet.threads``), and the folder holding ``isdnet`` on PYTHONPATH.

    Inside Slicer the extension's folders are on ``sys.path`` of the application only, so a child process would
    not find ``isdnet`` without this.
    """
    env = dict(os.environ)
    wait_passively(env)  # Slicer's own torch is loaded already; the child's is not
    env["PYTHONUNBUFFERED"] = "1"
    spec = importlib.util.find_spec("isdnet")
    if spec is not None and spec.origin:
        engine_root = str(Path(spec.origin).resolve().parent.parent)
        paths = [engine_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != engine_root]
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


class ProcessRunner:
    """One child process at a time, followed through its log file; safe to poll from a GUI timer."""

    def __init__(self) -> None:
        self._process: Optional[subprocess.Popen] = None
        self._log: collections.deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self._new_lines: list[str] = []
        self._lock = threading.Lock()
        self._log_path: Optional[Path] = None
        self._offset = 0
        self._partial = b""

    def start(self, args: Sequence[str], env: Optional[dict[str, str]] = None, cwd: Optional[str] = None,
              log_path: Optional[str] = None) -> None:
        """Start ``args`` with its output appended to ``log_path`` (a temporary file when not given).

        Raises RuntimeError if a process of this runner is still running.
        """
        if self.is_running:
            raise RuntimeError("a process is already running; stop it first")
        if log_path:
            path = Path(log_path)
            path.parent.mkdir(parents=True, exist_ok=True)
        else:
            handle, name = tempfile.mkstemp(prefix="isdnet-", suffix=".log")
            os.close(handle)
            path = Path(name)
        with self._lock:
            self._log.clear()
            self._new_lines = []
            self._log_path = path
            self._partial = b""
            command = "$ " + " ".join(str(a) for a in args)
            self._log.append(command)
            with open(path, "ab") as log:
                log.write((command + "\n").encode("utf-8"))
                self._offset = log.tell()
        options: dict[str, Any] = {}
        if WINDOWS:  # no console window (closing it would kill the child), as Slicer's launchConsoleProcess
            options["creationflags"] = (subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
                                        | subprocess.CREATE_NO_WINDOW)  # type: ignore[attr-defined]
        else:
            options["start_new_session"] = True
        with open(path, "ab") as log:  # the child keeps its own handle; ours closes at once
            self._process = subprocess.Popen([str(a) for a in args], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT, **options)
        self._read_new()

    def _read_new(self) -> None:
        """Take the complete lines the log file gained since the last read (and the last partial line once the
        process has ended)."""
        with self._lock:
            if self._log_path is None:
                return
            ended = self._process is None or self._process.poll() is not None
            try:
                with open(self._log_path, "rb") as log:
                    log.seek(self._offset)
                    data = log.read()
            except OSError:
                return
            self._offset += len(data)
            data = self._partial + data
            lines = data.split(b"\n")
            self._partial = lines.pop()
            if ended and self._partial:
                lines.append(self._partial)
                self._partial = b""
            for raw in lines:
                line = raw.decode("utf-8", errors="replace").rstrip("\r")
                self._new_lines.append(line)
                self._log.append(line)

    def _append_log(self, line: str) -> None:
        """Add a line of the runner's own to the log file (the child appends to it too)."""
        if self._log_path is not None:
            with open(self._log_path, "ab") as log:
                log.write((line + "\n").encode("utf-8"))

    def poll(self) -> list[str]:
        """The lines the process wrote since the last call (all of them once it has ended)."""
        self._read_new()
        with self._lock:
            lines, self._new_lines = self._new_lines, []
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

    def kill(self, grace_s: float = 5.0) -> None:
        """End the child and every process it started: terminate the whole tree (collected before anything is
        ended, so a launcher's child is not lost when the launcher exits first), and kill what lingers."""
        import psutil

        process = self._process
        if process is None or process.poll() is not None:
            return
        self._append_log("[stopped by the user]")
        try:
            root = psutil.Process(process.pid)
            tree = [*root.children(recursive=True), root]
        except psutil.NoSuchProcess:
            tree = []
        for member in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.terminate()
        _, alive = psutil.wait_procs(tree, timeout=grace_s)
        for member in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        psutil.wait_procs(alive, timeout=grace_s)
        process.wait()

    def detach(self) -> Optional[int]:
        """Let a running child go on without this runner (it keeps writing its log); returns its process id."""
        process = self._process
        if process is None or process.poll() is not None:
            return None
        self._append_log("[left running when the application closed]")
        self._process = None
        return process.pid

    def log_tail(self, lines: int = 20) -> list[str]:
        """The last ``lines`` lines of the log: the command, then the child's stdout and stderr together."""
        self._read_new()
        with self._lock:
            return list(self._log)[-lines:]
