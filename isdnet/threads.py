"""How the engine's worker threads wait for each other: passively, so that one busy core does not stall them.

PyTorch runs its CPU kernels on OpenMP threads, which by default spin while they wait at the end of each parallel
region. When another process holds one of the cores (Slicer, a browser, a second ISDNet job), the spinning thread
burns the time slice its partner needs, and every region waits for a thread that is not running. On 2 cores with
one of them busy, passive waiting made a float32 training step 2.8x faster and ranking 18x faster; on the idle
machine it cost 4-12% (docs/speed.md, "Threads that wait"). A laptop that trains while its user works is rarely idle.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
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
