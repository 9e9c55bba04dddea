"""Resumable training checkpoints: safetensors (never a pickle), a checksum, and the previous one kept.

Each save writes ``name.checkpoint.safetensors`` atomically after moving the last good one to
``name.checkpoint.prev.safetensors``. The SHA-256 covers the metadata and every tensor. Loading verifies it, lets
the caller check what it holds (``check_meta``: the metadata a training writes, ``META_SCHEMA``), and falls back to
the previous checkpoint when the newest is missing, partial, corrupt or unusable, so a crash at any moment leaves
something to resume from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Optional

import jsonschema
import safetensors.torch
import torch
from safetensors import safe_open

from .config import previous_checkpoint_path
from .errors import InputError, ModelFileError
from .files import write_atomically
from .modelfile import registered_options
from .modelheader import check_header

METADATA_KEY = "isdnet-checkpoint"
CHECKSUM_KEY = "sha256"
DATA_ROLES = ("labeled", "validation", "unlabeled")
_COUNT = {"type": "integer", "minimum": 0}
META_SCHEMA = {  # what a training checkpoint's metadata holds (train._TrainingRun._checkpoint writes it)
    "type": "object",
    "required": ["config", "header", "state", "data"],
    "properties": {
        "config": {"type": "object"},
        "header": {"type": "object"},
        "state": {"type": "object", "required": ["epoch", "iteration", "sums", "best_val_dice", "best_epoch",
                                                 "history"],
                  "properties": {"epoch": _COUNT, "iteration": _COUNT, "best_epoch": _COUNT,
                                 "sums": {"type": "object", "additionalProperties": {"type": "number"}},
                                 "best_val_dice": {"type": ["number", "null"]},
                                 "history": {"type": "array", "items": {"type": "object"}}}},
        "data": {"type": "object", "required": list(DATA_ROLES),
                 "properties": {role: {"type": "object", "additionalProperties": {"type": "string"}}
                                for role in DATA_ROLES}},
    },
}


def checksum(tensors: dict[str, torch.Tensor], meta_text: str) -> str:
    """SHA-256 over the metadata's JSON text, then every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256(f"{len(meta_text)}|{meta_text}|".encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write a checkpoint atomically; refuse non-finite weights so a broken state is never what gets resumed."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"refusing to checkpoint non-finite values in {name}")
    text = json.dumps(meta)
    data = safetensors.torch.save(tensors, metadata={METADATA_KEY: text, CHECKSUM_KEY: checksum(tensors, text)})
    write_atomically(path, data, previous=previous_checkpoint_path(path))


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of one checkpoint file, checked against its checksum; InputError if unusable."""
    if not path.exists():
        raise InputError(path, "does not exist")
    try:
        with safe_open(str(path), "pt") as file:
            metadata = file.metadata() or {}
        tensors = safetensors.torch.load_file(str(path))
        text, expected = metadata[METADATA_KEY], metadata[CHECKSUM_KEY]
    except Exception as error:  # noqa: BLE001 - whatever the parser says, the file is unusable
        raise InputError(path, f"is not a complete checkpoint ({type(error).__name__}: {error})") from None
    if checksum(tensors, text) != expected:
        raise InputError(path, "is corrupt: its checksum does not match its contents")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise InputError(path, f"is not a complete checkpoint (its metadata: {error})") from None
    return tensors, meta


Check = Callable[[dict[str, torch.Tensor], Any], None]


def _usable(path: Path, check: Optional[Check]) -> tuple[dict[str, torch.Tensor], Any]:
    """``read_checkpoint``, then ``check`` (which raises ValueError saying what is wrong) on what it holds."""
    tensors, meta = read_checkpoint(path)
    if check is not None:
        try:
            check(tensors, meta)
        except ValueError as error:
            raise InputError(path, f"is not a usable checkpoint: {error}") from None
    return tensors, meta


def load_latest(path: Path, report: Optional[Callable[[str], None]] = None, check: Optional[Check] = None,
                ) -> tuple[dict[str, torch.Tensor], Any, Path]:
    """The newest usable checkpoint: ``path`` if sound and ``check`` accepts it, else the previous one (``report``
    says why)."""
    try:
        return (*_usable(path, check), path)
    except InputError as newest_error:
        previous = previous_checkpoint_path(path)
        if not previous.exists():
            if not path.exists():
                raise InputError(path, "there is no checkpoint to resume from (train without --resume first)") \
                    from None
            raise
        if report is not None:
            report(f"{newest_error}; resuming from the previous checkpoint {previous.name}")
        return (*_usable(previous, check), previous)


def check_meta(meta: Any) -> None:
    """Raise ValueError saying what is wrong unless ``meta`` is a training checkpoint's metadata (``META_SCHEMA``,
    with a valid model header)."""
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(META_SCHEMA).iter_errors(meta))
    if error is not None:
        raise ValueError(f"its metadata {'.'.join(map(str, error.absolute_path)) or 'itself'} is invalid: "
                         f"{error.message}")
    try:
        check_header(meta["header"], "header", registered_options())
    except ModelFileError as error:
        raise ValueError(f"its model header is invalid: {error.problem}") from None


def data_changes(saved: dict[str, dict[str, str]], current: dict[str, dict[str, str]]) -> str:
    """Which cases differ between a checkpoint's data and this run's, in words ("" when none)."""
    parts = []
    for role in DATA_ROLES:
        before, now = saved[role], current[role]
        for what, names in (("added", sorted(set(now) - set(before))), ("removed", sorted(set(before) - set(now))),
                            ("changed", sorted(n for n in set(now) & set(before) if now[n] != before[n]))):
            if names:
                parts.append(f"{role} {what}: {', '.join(names)}")
    return "; ".join(parts)
