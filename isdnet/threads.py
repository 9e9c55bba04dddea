"""How the engine's worker threads wait for each other: passively, so that one busy core does not stall them.

PyTorch runs its CPU kernels on OpenMP threads, which by default spin while they wait at the end of each parallel
region. When another process holds one of the cores (Slicer, a browser, a second ISDNet job), the spinning thread
burns the time slice its partner needs, and every region waits for a thread that is not running. On 2 cores with
one of them busy, passive waiting made a float32 training step 2.8x faster and ranking 18x faster; on the idle
machine it cost 4-12% (docs/speed.md, "Threads that wait"). A laptop that trains while its user works is rarely idle.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, MutableMapping
from typing import Optional

# Read by GNU, LLVM and Intel OpenMP alike, once, when torch loads them.
THREAD_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}


def wait_passively(env: Optional[MutableMapping[str, str]] = None) -> MutableMapping[str, str]:
    """Set ``THREAD_ENVIRONMENT`` in ``env`` (default: this process's environment) where it is unset, so that a
    user's own value wins; returns ``env``. In this process it takes effect only if torch is not imported yet."""
    env = os.environ if env is None else env
    for name, value in THREAD_ENVIRONMENT.items():
        env.setdefault(name, value)
    return env


def waits_passively(env: Optional[MutableMapping[str, str]] = None) -> bool:
    """Whether ``env`` (default: this process's) asks OpenMP's threads to wait passively."""
    env = os.environ if env is None else env
    return all(env.get(name, "").upper() == value for name, value in THREAD_ENVIRONMENT.items())


@contextlib.contextmanager
def without_spinning() -> Iterator[None]:
    """Run the block's torch work on one thread where torch's threads may spin (a process that loaded torch before
    ``wait_passively`` could act, as Slicer does), then restore the thread count. One thread cannot wait for
    another: ranking 10 volumes took 2.2 s on one thread against 43.8 s on two spinning ones with one core busy,
    and 2.0 against 1.4 s on the idle machine (docs/speed.md)."""
    if waits_passively():
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
