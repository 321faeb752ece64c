"""Checkpoints of a run on several ranks: rank 0 writes every rank's state into one file with
:func:`metaopt.save_checkpoint`, and every rank loads its own part back.

With local trajectories (``local_trajectories=True``) the ranks differ between outer steps:
each has its own fast weights, inner-optimizer moments and task stream. A resume that is to
continue the run exactly needs all of them, from the same moment, so they travel together: the
ranks' states are gathered to rank 0 (``all_gather``-style, over the process group, after
moving them to the CPU), rank 0 writes one atomic checkpoint, and the outcome is broadcast so
that every rank returns or raises together. A crash at any moment leaves the previous complete
checkpoint or the new one (see :mod:`metaopt.checkpoint`), never a mixture of two moments.

Under data parallelism (DDP) every rank holds the same state, so rank 0 may simply call
:func:`metaopt.save_checkpoint` alone; these functions work there too (at W times the size).

Every collective here runs under the process group's timeout (``init_process_group(timeout=
...)``): if a rank has died, the others raise a ``RuntimeError`` saying so instead of waiting
for ever. Restart every rank, then load.

Example (on every rank)::

    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}
    metaopt.save_distributed_checkpoint("run.ckpt", state)
    ...
    state = metaopt.load_distributed_checkpoint("run.ckpt")   # this rank's part
    model.load_state_dict(state["model"]); opt.load_state_dict(state["optimizer"])
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any

import torch

from . import _distributed
from .checkpoint import CheckpointError, MapLocation, load_checkpoint, save_checkpoint
from .parts.placement import sharded
from .parts.state_dict import map_tensors

__all__ = ["load_distributed_checkpoint", "save_distributed_checkpoint"]

_KEY = "metaopt_ranks"


def _group(group: Any, where: str) -> Any:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{where}: torch.distributed is not initialized "
            "(use metaopt.save_checkpoint / load_checkpoint in a single process)"
        )
    return dist.group.WORLD if group is None else group


def _collective(fn: Any, where: str, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except RuntimeError as err:
        raise _distributed.collective_failed(
            where, err, "the checkpoint on disk is the last complete one"
        ) from err


def save_distributed_checkpoint(
    path: str | os.PathLike[str], state: Mapping[str, Any], *, group: Any = None, timeout: float | None = None
) -> None:
    """Every rank calls this with its own ``state`` (a mapping as for
    :func:`metaopt.save_checkpoint`); rank 0 of ``group`` (default: all ranks) writes all of
    them to ``path``, atomically, and every rank returns once the file is complete, or raises
    (a bad state on any rank, a failed write: the same failure on every rank, and the previous
    checkpoint is left in place).

    Args:
        path: the checkpoint file, as seen by rank 0 (a shared file system for several hosts).
        state: this rank's state, e.g. ``{"model": model.state_dict(), "optimizer":
            opt.state_dict(), "step": step}``.
        group: the process group (default: all ranks).
        timeout: seconds to wait for the other ranks to arrive (default: the process group's
            timeout); the transfer itself runs under the process group's timeout.

    Rank 0 holds every rank's state in memory while it writes (under NCCL the transfer also
    stages each rank's pickled state on rank 0's GPU): W times one state.
    """
    where = "save_distributed_checkpoint"
    dist = torch.distributed
    group = _group(group, where)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    root = dist.get_global_rank(group, 0)
    problem = None
    payload = b""
    try:  # everything that can fail on this rank alone, before the ranks exchange anything
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        found: list[torch.Tensor] = []

        def keep(t: torch.Tensor) -> torch.Tensor:
            found.append(t)
            return t

        map_tensors(dict(state), keep)
        if sharded(found):
            raise ValueError(
                "the state holds sharded tensors (DTensor: FSDP2 or tensor parallel), which one "
                "file on rank 0 cannot hold as shards; save with torch.distributed.checkpoint "
                "(PyTorch's AppState recipe over get_state_dict / set_state_dict, "
                "docs/checkpoints.md)"
            )
        payload = pickle.dumps(map_tensors(dict(state), lambda t: t.detach().cpu()))
    except Exception as err:
        problem = err
    flags = _distributed.gather_digests([int(problem is not None)], group, timeout, where)
    failed = [r for r, (f,) in enumerate(flags) if f]
    if failed:
        if problem is not None:
            problem.add_note(f"{where}: on rank {rank}; nothing was written")
            raise problem
        raise RuntimeError(
            f"{where}: the state of rank(s) {failed} could not be prepared; nothing was written"
        )
    gathered: list[Any] | None = [None] * size if rank == 0 else None
    _collective(dist.gather_object, where, payload, gathered, dst=root, group=group)
    outcome: list[Any] = [None]
    error: Exception | None = None
    if rank == 0:
        assert gathered is not None
        try:
            save_checkpoint(path, {_KEY: {"world_size": size, "ranks": [pickle.loads(b) for b in gathered]}})
        except Exception as err:  # reported on every rank, then raised here as it is
            outcome, error = [f"{type(err).__name__}: {err}"], err
    _collective(dist.broadcast_object_list, where, outcome, src=root, group=group)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise RuntimeError(f"{where}: rank 0 could not write the checkpoint: {outcome[0]}")


def load_distributed_checkpoint(
    path: str | os.PathLike[str], *, group: Any = None, map_location: MapLocation = None
) -> dict[str, Any]:
    """This rank's part of a checkpoint written by :func:`save_distributed_checkpoint`; every
    rank reads the file itself (no collective). Raises :class:`metaopt.CheckpointError` for a
    damaged file (see :func:`metaopt.load_checkpoint`), for a single-process checkpoint, and
    for one written by another number of ranks: local trajectories cannot be re-sharded (each
    rank's moments and task stream belong to its trajectory).
    """
    where = "load_distributed_checkpoint"
    dist = torch.distributed
    group = _group(group, where)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    loaded = load_checkpoint(path, map_location=map_location)
    target = os.fspath(path)
    saved = loaded.get(_KEY)
    if not isinstance(saved, Mapping) or not isinstance(saved.get("ranks"), list):
        raise CheckpointError(
            target,
            "undecodable",
            f"{where}: not a distributed checkpoint (written by "
            "metaopt.save_checkpoint? load it with metaopt.load_checkpoint)",
        )
    ranks = saved["ranks"]
    if saved.get("world_size") != size or len(ranks) != size:
        raise CheckpointError(
            target,
            "undecodable",
            f"{where}: written by {saved.get('world_size')} ranks, this run has "
            f"{size}; restart with the same number of ranks",
        )
    part = ranks[rank]
    if not isinstance(part, dict):
        raise CheckpointError(target, "undecodable", f"{where}: rank {rank}'s part is not a dict")
    return part
