"""Writing files so that nothing is ever half-written, and one writer per output at a time.

Every file is written to a temporary beside it, named ``.<name>.<random hex>.isdnet-tmp<ending>`` and created
with the user's umask, then renamed over it. The writer holds the temporary locked (on Windows: open, which
forbids deleting it) until the rename, so a later write of the same file can tell the temporary of a killed
writer, which it deletes, from one being written right now, which it leaves alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Optional

from .config import TEMPORARY_MARKER, lock_path
from .errors import InputError, PathLike, TrainingError

_RANDOM_HEX = 12  # characters of random hex in a temporary's name


def _temporary_name(path: Path, ending: str = "") -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(_RANDOM_HEX // 2)}{TEMPORARY_MARKER}{ending}")


def _temporary_pattern(path: Path) -> re.Pattern[str]:
    """The names ``_temporary_name`` gives the temporaries of ``path``, and no other name."""
    return re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{{_RANDOM_HEX}}}{re.escape(TEMPORARY_MARKER)}"
                      r"(\.[A-Za-z]+){0,2}")


@contextlib.contextmanager
def _temporary_beside(path: Path, ending: str = "") -> Iterator[tuple[int, Path]]:
    """A new, empty temporary for ``path`` (descriptor and path), held as its writer's until the block ends.

    A failure inside the block removes it; the block renames it over ``path`` with ``_rename_over``.
    """
    remove_stale_temporaries(path)
    while True:
        temporary = _temporary_name(path, ending)
        try:
            descriptor = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        _hold(descriptor)
        yield descriptor, temporary
    except BaseException:
        _close(descriptor)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _close(descriptor)


def _close(descriptor: int) -> None:
    with contextlib.suppress(OSError):
        os.close(descriptor)


def _rename_over(descriptor: int, temporary: Path, path: Path) -> None:
    """Rename the temporary over ``path``: on Windows after closing it (Windows renames no open file), elsewhere
    while its writer still holds it."""
    if os.name == "nt":
        _close(descriptor)
    os.replace(temporary, path)


def output_folder(path: PathLike) -> Path:
    """The folder ``path``, created if missing; InputError naming it if it cannot be (a file, unwritable)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(path, f"cannot be used as the output folder ({error.strerror or error})") from None
    return path


def check_outputs_apart(outputs: Iterable[Path], inputs: Iterable[Path]) -> None:
    """Refuse, naming the output, any output that would replace an input or be written into a folder that holds
    one (a DICOM folder holds itself), so that no command ever overwrites its data or mixes results into it."""
    folders: dict[tuple[int, int], Path] = {}
    for source in inputs:
        with contextlib.suppress(OSError):
            folder = source if source.is_dir() else source.parent
            status = folder.stat()
            folders.setdefault((status.st_dev, status.st_ino), source)
    for output in outputs:
        try:
            status = output.parent.stat()
        except OSError:
            continue  # a folder still to be made holds no input
        source = folders.get((status.st_dev, status.st_ino))
        if source is not None:
            raise InputError(output, f"would be written into the folder of the input {source}; write the outputs "
                                     "to a folder apart from the inputs")


def remove_stale_temporaries(path: PathLike) -> None:
    """Delete the temporaries of ``path`` whose writer is gone (killed, or its machine lost power).

    Only names this module gives ``path``'s temporaries are touched, and of those only the ones no live writer
    holds; any other file in the folder stays, whatever its name.
    """
    path = Path(path)
    pattern = _temporary_pattern(path)
    with contextlib.suppress(OSError):
        for leftover in path.parent.iterdir():
            if pattern.fullmatch(leftover.name) and _abandoned(leftover):
                with contextlib.suppress(OSError):
                    leftover.unlink()


def write_atomically(path: PathLike, data: bytes, previous: Optional[PathLike] = None) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush and fsync it, then rename it over ``path``.

    A reader sees the old file or the new one, never a partial one, even if the process or machine dies. A
    failure (disk full, read-only folder) leaves the old file as it was and raises InputError naming ``path``.
    With ``previous``, the old file is kept there too, linked only once the new data is on disk, so that
    ``path`` exists at every moment (a kill mid-write never leaves only the previous file).
    """
    path = Path(path)

    def write(descriptor: int, _: Path) -> None:
        with os.fdopen(descriptor, "wb", closefd=False) as file:
            file.write(data)

    try:
        _write_beside(path, write, previous=None if previous is None else Path(previous))
    except OSError as error:
        raise InputError(path, f"cannot be written ({error.strerror or error}); the previous file is kept") \
            from None


def write_image_atomically(image: Any, path: PathLike) -> None:
    """Write a SimpleITK image (compressed) to a temporary file beside ``path``, then rename it over ``path``.

    The temporary keeps ``path``'s ending so that ITK picks the same writer. A failure removes it and raises
    RuntimeError (ITK's) or OSError; an existing ``path`` stays as it was.
    """
    import SimpleITK as sitk

    path = Path(path)
    ending = "".join(path.suffixes[-2:]) if path.name.endswith((".gz", ".seg.nrrd")) else path.suffix
    _write_beside(path, lambda _, temporary: sitk.WriteImage(image, str(temporary), useCompression=True), ending)


def _write_beside(path: Path, write: Callable[[int, Path], None], ending: str = "",
                  previous: Optional[Path] = None) -> None:
    """The temporary filled by ``write`` (given its descriptor and path), fsynced, ``previous`` kept, renamed."""
    with _temporary_beside(path, ending) as (descriptor, temporary):
        write(descriptor, temporary)
        os.fsync(descriptor)  # the file's data, whoever wrote it, is on disk before the rename
        if previous is not None and path.exists():
            _keep_as(path, previous)
        _rename_over(descriptor, temporary, path)
    # Make the rename itself durable; not possible on every platform (Windows cannot open folders).
    with contextlib.suppress(OSError):
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _keep_as(path: Path, previous: Path) -> None:
    """Make ``previous`` a copy of ``path`` (a hard link where the file system has them), atomically."""
    remove_stale_temporaries(previous)
    while True:
        temporary = _temporary_name(previous)
        try:
            os.link(path, temporary)
            break
        except FileExistsError:
            continue
        except OSError:  # no hard links here: copy
            with _temporary_beside(previous) as (descriptor, temporary):
                with open(path, "rb") as source, os.fdopen(descriptor, "wb", closefd=False) as target:
                    shutil.copyfileobj(source, target)
                _rename_over(descriptor, temporary, previous)
            return
    os.replace(temporary, previous)


class OutputLock:
    """An exclusive lock on ``<output>.lock`` so that two trainings never write the same model at once.

    The operating system drops the lock when its process ends, however it ends (a SIGKILL included), so a
    crashed run never leaves a stale lock behind.
    """

    def __init__(self, output: PathLike):
        self.output = Path(output)
        self.path = lock_path(self.output)
        self._file: Optional[Any] = None

    def __enter__(self) -> OutputLock:
        file = open(self.path, "a+b")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            _lock(file.fileno())
        except OSError:
            file.close()
            raise TrainingError(f"{self.output}: another training is writing this model right now "
                                f"(its lock {self.path.name} is held); wait for it, stop it, or choose another "
                                "output") from None
        self._file = file
        return self

    def __exit__(self, kind: Optional[type], error: Optional[BaseException], trace: Optional[TracebackType]) -> None:
        if self._file is not None:
            _unlock(self._file.fileno())
            self._file.close()
            self._file = None
        # The lock file stays: unlinking it could let a waiting process lock an inode no one else sees.


if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _lock(descriptor: int) -> None:
        os.lseek(descriptor, 0, os.SEEK_SET)
        msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)

    def _unlock(descriptor: int) -> None:
        os.lseek(descriptor, 0, os.SEEK_SET)
        with contextlib.suppress(OSError):
            msvcrt.locking(descriptor, msvcrt.LK_UNLCK, 1)

    def _hold(descriptor: int) -> None:
        """Nothing to add: Windows deletes no file that a process holds open."""

    def _abandoned(temporary: Path) -> bool:
        return True  # deleting it fails while its writer holds it open
else:
    import fcntl

    def _lock(descriptor: int) -> None:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(descriptor: int) -> None:
        fcntl.flock(descriptor, fcntl.LOCK_UN)

    _hold = _lock

    def _abandoned(temporary: Path) -> bool:
        """True when no process holds the temporary's lock: its writer has ended."""
        try:
            descriptor = os.open(temporary, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            _lock(descriptor)
            return True
        except OSError:
            return False
        finally:
            os.close(descriptor)
