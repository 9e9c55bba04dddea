"""The project's own error types: every problem a user can cause ends in one of these, naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Union

PathLike = Union[str, Path]


class ISDNetError(Exception):
    """Base class of every error ISDNet raises on purpose."""


class InputError(ISDNetError):
    """A file or folder given by the user cannot be used; the message names it and says why."""

    def __init__(self, path: PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple:
        """Rebuilt from its path and problem, so it crosses process boundaries (a pool of runs) intact."""
        return type(self), (self.path, self.problem)


class ModelFileError(InputError):
    """A model file is not a valid ISDNet model (wrong format, bad header, mismatched weights)."""


class TrainingError(ISDNetError):
    """Training cannot go on (for example no labeled slices, or an output already locked)."""
