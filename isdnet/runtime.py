"""Where and how the networks run: device choice, bf16 autocast, channels-last layout."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from .config import DEVICES, PRECISIONS


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for ``name``: "auto" takes CUDA, then Apple MPS, then the CPU."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but this PyTorch sees no CUDA GPU")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for, but this PyTorch sees no Apple GPU")
    return torch.device(name)


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX-512 BF16 or AMX), where bf16 beats float32 clearly."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return False
    flags = cpuinfo.read_text(errors="replace", encoding="utf-8")
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device, training: bool = False) -> torch.dtype:
    """The autocast dtype for "auto": bf16 on CUDA with bf16 support; on the CPU, bf16 for inference where the CPU
    has native bf16, float32 for training.

    Why training stays float32 on the CPU: a bf16 step is 1.2-2.2x faster there, but the demo trained in bf16
    ended 2-6 Dice points lower after the same epochs (docs/speed.md, "Why the code is as it is").
    ``training=False`` (the default) gives the inference policy.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_fast_bf16() and not training:
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """An autocast context for ``dtype`` on ``device``, or a no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a 4D batch to ``device`` in channels-last layout (faster convolutions on CPU and GPU)."""
    return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
