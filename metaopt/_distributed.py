"""The little of ``torch.distributed`` that the per-task-gradient methods need.

Under DistributedDataParallel every rank holds the same model and its own batches. Methods whose
gradients DDP's backward hooks all-reduce (the Reptile family, MTL) need nothing here. The
per-task methods (PCGrad, GradVac, GradNorm) compute their gradients with
``torch.autograd.grad``, which DDP does not see, so they average their T per-task rows over the
ranks themselves, with one collective, before combining them.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import Tensor

__all__ = ["average_", "check_same_on_ranks", "default_group", "world_size"]


def default_group(group: Any = None) -> Any:
    """``group`` if given; else the default group when ``torch.distributed`` is initialized
    with more than one rank; else ``None`` (a single process: nothing to average)."""
    if group is not None:
        return group
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def world_size(group: Any) -> int:
    return torch.distributed.get_world_size(group)


def average_(tensor: Tensor, group: Any) -> Tensor:
    """``tensor`` ← its mean over the ranks of ``group``, in place (SUM then divide: gloo has
    no AVG)."""
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=group)
    tensor.div_(world_size(group))
    return tensor


def fingerprint(generator_state: Tensor, *values: Any) -> tuple[Any, ...]:
    """A small, process-independent summary of a schedule's state (Python's ``hash`` is
    salted per process, so a CRC of the generator's bytes is used)."""
    return (zlib.crc32(bytes(generator_state.numpy())), *values)


def check_same_on_ranks(value: Any, group: Any, where: str) -> None:
    """Raise on every rank if ``value`` differs between the ranks of ``group``."""
    gathered: list[Any] = [None] * world_size(group)
    torch.distributed.all_gather_object(gathered, value, group=group)
    if any(v != gathered[0] for v in gathered):
        differ = [r for r, v in enumerate(gathered) if v != gathered[0]]
        raise ValueError(
            f"{where}: the task schedule differs between ranks (rank(s) {differ} disagree with "
            "rank 0): every rank must draw the same tasks. Build the optimizer with the same seed "
            "and options on every rank, and load the same checkpoint"
        )
