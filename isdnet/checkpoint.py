"""Resumable training checkpoints: safetensors (never a pickle), a checksum, and the previous one kept.

Each save writes ``name.checkpoint.safetensors`` atomically after moving the last good one to
``name.checkpoint.prev.safetensors``. Loading verifies the checksum and falls back to the previous checkpoint
when the newest is missing, partial or corrupt, so a crash at any moment leaves something to resume from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Optional

import safetensors.torch
import torch
from safetensors import safe_open

from .config import previous_checkpoint_path
from .errors import InputError
from .files import write_atomically

METADATA_KEY = "isdnet-checkpoint"
CHECKSUM_KEY = "sha256"


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
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
    data = safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(meta),
                                                     CHECKSUM_KEY: tensor_checksum(tensors)})
    write_atomically(path, data, previous=previous_checkpoint_path(path))


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of one checkpoint file, checked against its checksum; InputError if unusable."""
    if not path.exists():
        raise InputError(path, "does not exist")
    try:
        with safe_open(str(path), "pt") as file:
            metadata = file.metadata() or {}
        tensors = safetensors.torch.load_file(str(path))
        meta = json.loads(metadata[METADATA_KEY])
        expected = metadata[CHECKSUM_KEY]
    except Exception as error:  # noqa: BLE001 - whatever the parser says, the file is unusable
        raise InputError(path, f"is not a complete checkpoint ({type(error).__name__}: {error})") from None
    if tensor_checksum(tensors) != expected:
        raise InputError(path, "is corrupt: its checksum does not match its contents")
    return tensors, meta


def load_latest(path: Path, report: Optional[Callable[[str], None]] = None,
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """The newest usable checkpoint: ``path`` if sound, else the previous one (``report`` says why)."""
    try:
        return (*read_checkpoint(path), path)
    except InputError as newest_error:
        previous = previous_checkpoint_path(path)
        if not previous.exists():
            if not path.exists():
                raise InputError(path, "there is no checkpoint to resume from (train without --resume first)") \
                    from None
            raise
        if report is not None:
            report(f"{newest_error}; resuming from the previous checkpoint {previous.name}")
        return (*read_checkpoint(previous), previous)
