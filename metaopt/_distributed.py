"""The little of ``torch.distributed`` that metaopt needs.

Under DistributedDataParallel every rank holds the same model and its own batches. Methods whose
gradients DDP's backward hooks all-reduce (the Reptile family, MTL) need nothing here. The
per-task methods (PCGrad, GradVac, GradNorm) compute their gradients with
``torch.autograd.grad``, which DDP does not see, so they average their T per-task rows over the
ranks themselves, with one collective, before combining them.

With local trajectories (:class:`metaopt.SlowFastOptimizer`'s ``local_trajectories=True``) each
rank runs its own trajectory without communicating, draws its tasks from a stream derived from
the seed and its rank (:func:`rank_seed`), and the ranks average their fast weights once per
outer step (:func:`averaging`, :func:`wait`). :func:`checksum` summarises tensors bit
for bit, so that ranks can compare their slow weights cheaply.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["LOCAL", "Reduce", "average_", "averaging", "check_same_on_ranks", "checksum",
           "default_group", "gather", "rank_seed", "wait", "world_size"]

LOCAL = "local"
"""``process_group=LOCAL``: this rank alone, no collective (a per-task method inside a local
trajectory, whose rows must not be averaged with the other ranks' at every step)."""


def default_group(group: Any = None) -> Any:
    """``group`` if given; else the default group when ``torch.distributed`` is initialized
    with more than one rank; else ``None`` (a single process: nothing to average).
    :data:`LOCAL` gives ``None`` too."""
    if isinstance(group, str):
        if group != LOCAL:
            raise ValueError(f"process_group must be a process group, None or {LOCAL!r}, got {group!r}")
        return None
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


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s task stream: the first 64-bit word of numpy's
    ``SeedSequence([seed mod 2**64, rank])``, a hash designed so that streams seeded from
    neighbouring entropy words are independent (NumPy's documented way to spawn parallel
    streams). Rank 0's stream differs from the single-process stream of ``seed``."""
    state = np.random.SeedSequence([seed % 2**64, rank]).generate_state(1, dtype=np.uint64)
    return int(state[0])


_CHUNK = 1 << 22


def checksum(tensors: Sequence[Tensor]) -> tuple[Any, ...]:
    """A bit-exact summary of ``tensors``: per tensor its dtype, size, and integer sums of its
    bits (16 bits at a time: plain, and weighted by position mod 65,521, so that moved values
    count), computed on the tensor's device in chunks of 4M words without overflow. Equal
    tensors give equal summaries on every rank (integer sums do not depend on the reduction
    order); NaNs compare like any other bits."""
    out: list[Any] = []
    for t in tensors:
        flat = t.detach().contiguous().reshape(-1)
        bits = flat.view(torch.uint8) if flat.element_size() == 1 else \
            flat.view(torch.int16 if flat.element_size() == 2 else torch.int32)
        sums = torch.zeros(4, dtype=torch.int64, device=t.device)
        for start in range(0, bits.numel(), _CHUNK):
            v = bits[start:start + _CHUNK].to(torch.int64)
            w = torch.arange(start, start + v.numel(), device=t.device, dtype=torch.int64) % 65521 + 1
            lo, hi = v & 0xFFFF, v >> 16   # each below 2**16 in magnitude
            sums += torch.stack([lo.sum(), hi.sum(), (lo * w).sum(), (hi * w).sum()])
        out.append((str(t.dtype), t.numel(), *sums.tolist()))
    return tuple(out)


Reduce = Callable[[Tensor], Callable[[], None]]
"""Starts reducing a tensor in place and returns the function that completes it."""


def averaging(group: Any, timeout: float | None, where: str) -> Reduce:
    """A :data:`Reduce` that averages over the ranks of ``group``: it starts a SUM all-reduce
    with ``async_op=True`` (so the backend moves the data while the caller computes) and
    returns the function that waits for it (:func:`wait`) and divides by the world size."""
    size = world_size(group)

    def start(tensor: Tensor) -> Callable[[], None]:
        work = torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM,
                                            group=group, async_op=True)

        def finish() -> None:
            wait(work, timeout, where)
            tensor.div_(size)
        return finish
    return start


def wait(work: Any, timeout: float | None, where: str) -> None:
    """Wait for a collective, at most ``timeout`` seconds (``None``: the process group's own
    timeout, set by ``init_process_group(timeout=...)``); a failure or a timeout raises a
    ``RuntimeError`` that says what to do."""
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(timedelta(seconds=timeout))
    except RuntimeError as err:
        raise RuntimeError(
            f"{where}: a collective failed or timed out ({err}). Another rank has probably died, "
            "or stopped at a different step; this rank's optimizer state is now incomplete. "
            "Restart every rank from the last checkpoint (metaopt.load_distributed_checkpoint)"
        ) from err


def gather(value: Any, group: Any, where: str) -> list[Any]:
    """``value`` from every rank of ``group`` (``all_gather_object``), with the error of
    :func:`wait` when a rank is missing."""
    gathered: list[Any] = [None] * world_size(group)
    try:
        torch.distributed.all_gather_object(gathered, value, group=group)
    except RuntimeError as err:
        raise RuntimeError(
            f"{where}: the ranks could not exchange their state ({err}). Another rank has "
            "probably died or is at a different step; restart every rank from the last checkpoint"
        ) from err
    return gathered
