"""The little of ``torch.distributed`` that metaopt needs.

Under DistributedDataParallel every rank holds the same model and its own batches. Methods whose
gradients DDP's backward hooks all-reduce (the Reptile family, MTL) need nothing here. The
per-task methods (PCGrad, GradVac, GradNorm) compute their gradients with
``torch.autograd.grad``, which DDP does not see, so they average their T per-task rows over the
ranks themselves, with one collective, before combining them.

With local trajectories (:class:`metaopt.SlowFastOptimizer`'s ``local_trajectories=True``) each
rank runs its own trajectory without communicating, draws its tasks from a stream derived from
the seed and its rank (:func:`rank_seed`), and the ranks average their fast weights once per
outer step (:func:`averaging`). :func:`checksum` digests tensors bit for bit, so that ranks can
compare their slow weights cheaply (:func:`gather_digests`). Every collective here is waited
for with a timeout (:func:`wait`), so a dead or late rank gives an error, not a hang.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "LOCAL",
    "Reduce",
    "average_",
    "averaging",
    "checksum",
    "collective_failed",
    "default_group",
    "digest",
    "fingerprint",
    "gather_digests",
    "rank_seed",
    "wait",
    "world_size",
]

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


def _device(group: Any) -> torch.device:
    """Where this backend's collectives want their tensors (NCCL: the current GPU)."""
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average_(tensor: Tensor, group: Any, timeout: float | None = None, where: str = "metaopt") -> Tensor:
    """``tensor`` ← its mean over the ranks of ``group``, in place, waiting for it."""
    averaging(group, timeout, where)(tensor)()
    return tensor


def digest(value: Any) -> int:
    """A 63-bit digest of ``repr(value)`` (BLAKE2b; Python's ``hash`` is salted per process)."""
    raw = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return int.from_bytes(raw, "little") >> 1


def fingerprint(generator_state: Tensor, *values: Any) -> int:
    """A small, process-independent summary of a schedule's state."""
    return digest((bytes(generator_state.numpy()), values))


def gather_digests(values: Sequence[int], group: Any, timeout: float | None, where: str) -> list[list[int]]:
    """Every rank's ``values`` (a few 63-bit ints, as many on every rank): one ``all_gather``
    of an int64 tensor, waited for at most ``timeout`` seconds (:func:`wait`)."""
    mine = torch.tensor(list(values), dtype=torch.int64, device=_device(group))
    out = [torch.empty_like(mine) for _ in range(world_size(group))]
    work = torch.distributed.all_gather(out, mine, group=group, async_op=True)
    wait(work, timeout, where, moved=False)
    return [t.tolist() for t in out]


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s task stream: the first 64-bit word of numpy's
    ``SeedSequence([seed mod 2**64, rank])``, a hash designed so that streams seeded from
    neighbouring entropy words are independent (NumPy's documented way to spawn parallel
    streams). Rank 0's stream differs from the single-process stream of ``seed``."""
    state = np.random.SeedSequence([seed % 2**64, rank]).generate_state(1, dtype=np.uint64)
    return int(state[0])


_CHUNK = 1 << 22
_WEIGHTS: dict[torch.device, Tensor] = {}


def _weights(device: torch.device) -> Tensor:
    """Fixed pseudo-random weights in [1, 2**15), one per position of a chunk (the same on
    every rank and every run: a seeded CPU generator), cached per device."""
    if device not in _WEIGHTS:
        g = torch.Generator().manual_seed(0x5EED)
        _WEIGHTS[device] = torch.randint(1, 1 << 15, (_CHUNK,), generator=g, dtype=torch.int64).to(device)
    return _WEIGHTS[device]


def checksum(tensors: Sequence[Tensor]) -> int:
    """A digest of the bits of ``tensors`` (with their dtypes and shapes), for comparing them
    across ranks without moving them. Per chunk of 4M 16-bit words, the words' low and high
    bytes are summed, plainly and weighted by fixed pseudo-random weights, on the tensor's
    device and without overflow; the per-chunk sums are digested in order on the host. A
    changed, moved or swapped byte changes a weighted sum unless the weights cancel for that
    pattern (odds about 2**-15 for each of the two weighted sums). NaNs and -0.0 compare like
    any other bits."""
    parts: list[Any] = []
    for t in tensors:
        flat = t.detach().contiguous().reshape(-1)
        words = flat.view(torch.uint8) if flat.element_size() == 1 else flat.view(torch.int16)
        w = _weights(t.device)
        sums = []
        for start in range(0, words.numel(), _CHUNK):
            v = words[start : start + _CHUNK].to(torch.int64)
            lo, hi = v & 0xFF, v >> 8  # |each| < 2**8: sums of 2**22 terms stay below 2**45
            k = w[: v.numel()]
            sums.append(torch.stack([lo.sum(), hi.sum(), (lo * k).sum(), (hi * k).sum()]))
        parts.append((str(t.dtype), tuple(t.shape), torch.stack(sums).tolist() if sums else []))
    return digest(parts)


Reduce = Callable[[Tensor], Callable[[], None]]
"""Starts reducing a tensor in place and returns the function that completes it."""


def averaging(group: Any, timeout: float | None, where: str) -> Reduce:
    """A :data:`Reduce` that averages over the ranks of ``group``: it starts a SUM all-reduce
    with ``async_op=True`` (so the backend moves the data while the caller computes) and
    returns the function that waits for it (:func:`wait`) and divides by the world size."""
    size = world_size(group)

    def start(tensor: Tensor) -> Callable[[], None]:
        work = torch.distributed.all_reduce(
            tensor, op=torch.distributed.ReduceOp.SUM, group=group, async_op=True
        )

        def finish() -> None:
            wait(work, timeout, where)
            tensor.div_(size)

        return finish

    return start


def wait(work: Any, timeout: float | None, where: str, *, moved: bool = True) -> None:
    """Wait for a collective, at most ``timeout`` seconds (``None``: the process group's own
    timeout, set by ``init_process_group(timeout=...)``); a failure or a timeout raises a
    ``RuntimeError`` that says what to do. ``moved``: whether the caller's state has already
    moved (then it is incomplete, and says so)."""
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(timedelta(seconds=timeout))
    except RuntimeError as err:
        raise collective_failed(
            where, err, "this rank's optimizer state is now incomplete" if moved else "nothing was updated"
        ) from err


def collective_failed(where: str, err: BaseException, state: str) -> RuntimeError:
    """The error for a collective that failed or timed out: what probably happened, what
    ``state`` this rank is left in, and what to do."""
    return RuntimeError(
        f"{where}: a collective failed or timed out ({err}). Another rank has probably died, "
        f"or stopped at a different step; {state}. Restart every rank from the last "
        "checkpoint (metaopt.load_distributed_checkpoint)"
    )
