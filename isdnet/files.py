"""Writing files so that nothing is ever half-written, and one writer per output at a time."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Optional

from .errors import InputError, PathLike, TrainingError


def write_atomically(path: PathLike, data: bytes, previous: Optional[PathLike] = None) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush and fsync it, then rename it over ``path``.

    A reader sees the old file or the new one, never a partial one, even if the process or machine dies. A
    failure (disk full, read-only folder) leaves the old file as it was and raises InputError naming ``path``.
    With ``previous``, the old file is kept there too, linked only once the new data is on disk, so that
    ``path`` exists at every moment (a kill mid-write never leaves only the previous file).
    """
    path = Path(path)
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise InputError(path, f"cannot be written ({error.strerror or error})") from None
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)
        if previous is not None and path.exists():
            _keep_as(path, Path(previous))
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise InputError(path, f"cannot be written ({error.strerror or error}); the previous file is kept") \
                from None
        raise
    # Make the rename itself durable; not possible on every platform (Windows cannot open folders).
    with contextlib.suppress(OSError):
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _keep_as(path: Path, previous: Path) -> None:
    """Make ``previous`` a copy of ``path`` (a hard link where the file system has them), atomically."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{previous.name}.", suffix=".tmp", dir=previous.parent)
    os.close(descriptor)
    os.unlink(temporary)
    try:
        os.link(path, temporary)
    except OSError:
        shutil.copyfile(path, temporary)
    os.replace(temporary, previous)


def write_image_atomically(image: Any, path: PathLike) -> None:
    """Write a SimpleITK image (compressed) to a temporary file beside ``path``, then rename it over ``path``.

    The temporary keeps ``path``'s extensions so that ITK picks the same writer; it is fsynced before the rename,
    like ``write_atomically``'s (which cannot serve here: ITK writes the file itself). A failure removes it and
    raises RuntimeError (ITK's) or OSError; an existing ``path`` stays as it was.
    """
    import SimpleITK as sitk

    path = Path(path)
    extension = "".join(path.suffixes[-2:]) if path.name.endswith(".gz") or path.name.endswith(".seg.nrrd") \
        else path.suffix
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{extension}", dir=path.parent)
    os.close(descriptor)
    try:
        sitk.WriteImage(image, temporary, useCompression=True)
        with open(temporary, "rb") as written:  # on disk before the rename, as in write_atomically
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def remove_stale_temporaries(path: PathLike) -> None:
    """Delete temporary files that a killed writer left beside ``path`` (``write_atomically``'s ``.name.*.tmp``).

    Call it only while holding the output's lock, when no other writer can be mid-write.
    """
    path = Path(path)
    stem = path.name.removesuffix(".safetensors")
    for leftover in path.parent.glob(f".{stem}*.tmp"):
        with contextlib.suppress(OSError):
            leftover.unlink()


class OutputLock:
    """An exclusive lock on ``<output>.lock`` so that two trainings never write the same model at once.

    The operating system drops the lock when its process ends, however it ends (a SIGKILL included), so a
    crashed run never leaves a stale lock behind.
    """

    def __init__(self, output: PathLike):
        self.output = Path(output)
        self.path = self.output.with_name(self.output.name + ".lock")
        self._file: Optional[object] = None

    def __enter__(self) -> OutputLock:
        file = open(self.path, "a+b")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            _lock(file)
        except OSError:
            file.close()
            raise TrainingError(f"{self.output}: another training is writing this model right now "
                                f"(its lock {self.path.name} is held); wait for it, stop it, or choose another "
                                "output") from None
        self._file = file
        remove_stale_temporaries(self.output)
        return self

    def __exit__(self, kind: Optional[type], error: Optional[BaseException], trace: Optional[TracebackType]) -> None:
        if self._file is not None:
            _unlock(self._file)
            self._file.close()  # type: ignore[attr-defined]
            self._file = None
        # The lock file stays: unlinking it could let a waiting process lock an inode no one else sees.


if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _lock(file) -> None:
        file.seek(0)
        msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)

    def _unlock(file) -> None:
        file.seek(0)
        with contextlib.suppress(OSError):
            msvcrt.locking(file.fileno(), msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _lock(file) -> None:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(file) -> None:
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)
