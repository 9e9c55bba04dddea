"""Data-parallel training across processes and machines (``torchrun``): NCCL on GPUs, gloo on CPUs.

Each process trains on its own shard of slices and the gradients of S, D and D0 are averaged before every
update, so the three networks stay identical on every rank. Gradients are averaged by hand rather than with
DistributedDataParallel because one ISDNet iteration runs S on labeled and unlabeled slices, reads S's
features into D0 and runs a frozen D inside S's update: explicit all-reduces keep that schedule exactly as in a
single process. Only rank 0 validates, writes checkpoints and the model, and reports progress.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class ProcessGroup:
    """This process's place in a distributed run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over all ranks (one flat all-reduce)."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if not self.active or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True when ``flag`` is true on at least one rank, so all ranks take the same branch."""
        if not self.active:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Make every rank start from rank 0's weights."""
        if self.active:
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_from_environment(device_name: str) -> ProcessGroup:
    """Join the process group that ``torchrun`` describes in the environment; a plain run is rank 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessGroup()
    if not dist.is_initialized():
        use_nccl = device_name in ("auto", "cuda") and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    group = ProcessGroup(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available() and device_name in ("auto", "cuda"):
        torch.cuda.set_device(group.local_rank)
    return group


def shutdown(group: Optional[ProcessGroup]) -> None:
    """Leave the process group, if one was joined."""
    if group is not None and group.active and dist.is_initialized():
        dist.destroy_process_group()
