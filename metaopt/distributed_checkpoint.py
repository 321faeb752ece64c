"""Checkpoints of a run on several ranks: every rank writes its own part, a manifest names
them, and every rank loads its own part back.

With local trajectories (``local_trajectories=True``) the ranks differ between outer steps:
each has its own fast weights, inner-optimizer moments and task stream. A resume that is to
continue the run exactly needs all of them, from the same moment, so they are committed
together: each rank writes its state (moved to the CPU) to its own part file beside the
checkpoint with :func:`metaopt.save_checkpoint` (atomic, checksummed), the ranks agree that
every part is complete, then rank 0 replaces the checkpoint, a small manifest naming the parts,
atomically, and each rank removes its part of the previous checkpoint. A crash at any moment
leaves the previous complete checkpoint or the new one (see :mod:`metaopt.checkpoint`), never
a mixture of two moments. No rank holds another rank's state: each writes and reads its own
part (the parts must be on a file system every rank sees, as the manifest is). Sharded state
(FSDP2, tensor parallel: DTensors) is refused: save it with ``torch.distributed.checkpoint``,
PyTorch's ``AppState`` recipe (docs/checkpoints.md), which metaopt's state supports whole.

Under data parallelism (DDP) every rank holds the same state, so rank 0 may simply call
:func:`metaopt.save_checkpoint` alone; these functions work there too (W parts).

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

import contextlib
import glob
import os
import uuid
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


def _part_name(path: str, nonce: str, rank: int) -> str:
    return f"{os.path.basename(path)}.{nonce}.rank{rank}"


def _unlink(name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name)


def _remove_parts(path: str, rank: int, keep: str) -> None:
    """This rank's part files of ``path`` other than ``keep`` (those of earlier checkpoints,
    and of saves that never committed)."""
    nonce = "[0-9a-f]" * 32  # of this function's parts only, not of a file named like them
    pattern = os.path.join(
        glob.escape(os.path.dirname(os.path.abspath(path))),
        f"{glob.escape(os.path.basename(path))}.{nonce}.rank{rank}",
    )
    for name in glob.glob(pattern):
        if os.path.basename(name) != keep:
            _unlink(name)


def save_distributed_checkpoint(
    path: str | os.PathLike[str], state: Mapping[str, Any], *, group: Any = None, timeout: float | None = None
) -> None:
    """Every rank calls this with its own ``state`` (a mapping as for
    :func:`metaopt.save_checkpoint`); each writes its own part beside ``path``, then rank 0 of
    ``group`` (default: all ranks) commits them by writing ``path``, atomically. Every rank
    returns once the checkpoint is complete, or raises (a bad state on any rank, a failed
    write: the same failure on every rank, and the previous checkpoint is left in place).

    Args:
        path: the checkpoint (the manifest); the parts are written beside it, as
            ``<name>.<nonce>.rank<r>``, on a file system every rank sees.
        state: this rank's state, e.g. ``{"model": model.state_dict(), "optimizer":
            opt.state_dict(), "step": step}``.
        group: the process group (default: all ranks).
        timeout: seconds to wait for the other ranks to arrive (default: the process group's
            timeout).
    """
    where = "save_distributed_checkpoint"
    dist = torch.distributed
    group = _group(group, where)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    root = dist.get_global_rank(group, 0)
    target = os.fspath(path)
    problem = None
    cpu_state: dict[str, Any] = {}
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
                "the state holds sharded tensors (DTensor: FSDP2 or tensor parallel), which "
                "a part per rank cannot hold as shards; save with torch.distributed.checkpoint "
                "(PyTorch's AppState recipe over get_state_dict / set_state_dict, "
                "docs/checkpoints.md)"
            )
        cpu_state = map_tensors(dict(state), lambda t: t.detach().cpu())
    except Exception as err:
        problem = err
    _agree(problem, rank, group, timeout, where, "could not be prepared")
    named: list[Any] = [uuid.uuid4().hex if rank == 0 else None]
    _collective(dist.broadcast_object_list, where, named, src=root, group=group)
    nonce: str = named[0]
    mine = os.path.join(os.path.dirname(os.path.abspath(target)), _part_name(target, nonce, rank))
    try:
        save_checkpoint(mine, cpu_state)
    except Exception as err:
        problem = err
    try:
        _agree(problem, rank, group, timeout, where, "could not be written")
    except Exception:
        _unlink(mine)
        raise
    outcome: list[Any] = [None]
    error: Exception | None = None
    if rank == 0:  # the commit: one atomic replace of the manifest
        parts = [_part_name(target, nonce, r) for r in range(size)]
        try:
            save_checkpoint(target, {_KEY: {"world_size": size, "parts": parts}})
        except Exception as err:  # reported on every rank, then raised here as it is
            outcome, error = [f"{type(err).__name__}: {err}"], err
    _collective(dist.broadcast_object_list, where, outcome, src=root, group=group)
    if outcome[0] is None:  # committed: the previous checkpoint's part goes (and strays)
        _remove_parts(target, rank, keep=os.path.basename(mine))
    else:  # not committed: the previous checkpoint stands, with its parts
        _unlink(mine)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise RuntimeError(f"{where}: rank 0 could not write the checkpoint: {outcome[0]}")


def _agree(
    problem: Exception | None, rank: int, group: Any, timeout: float | None, where: str, what: str
) -> None:
    """Raise on every rank if ``problem`` happened on any: this rank's own error as it is, the
    others a ``RuntimeError`` naming the ranks; nothing is committed."""
    flags = _distributed.gather_digests([int(problem is not None)], group, timeout, where)
    failed = [r for r, (f,) in enumerate(flags) if f]
    if not failed:
        return
    if problem is not None:
        problem.add_note(f"{where}: on rank {rank}; nothing was written")
        raise problem
    raise RuntimeError(f"{where}: the state of rank(s) {failed} {what}; nothing was written")


def load_distributed_checkpoint(
    path: str | os.PathLike[str], *, group: Any = None, map_location: MapLocation = None
) -> dict[str, Any]:
    """This rank's part of a checkpoint written by :func:`save_distributed_checkpoint`; every
    rank reads the manifest and its own part (no collective). Raises
    :class:`metaopt.CheckpointError` for a damaged manifest or part (see
    :func:`metaopt.load_checkpoint`), for a single-process checkpoint, and for one written by
    another number of ranks: local trajectories cannot be re-sharded (each rank's moments and
    task stream belong to its trajectory). Reads the single-file checkpoints of earlier
    versions (every rank's state in the one file) too.
    """
    where = "load_distributed_checkpoint"
    dist = torch.distributed
    group = _group(group, where)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    target = os.fspath(path)
    loaded = load_checkpoint(target, map_location=map_location)
    saved = loaded.get(_KEY)
    parts = saved.get("parts", saved.get("ranks")) if isinstance(saved, Mapping) else None
    if not isinstance(saved, Mapping) or not isinstance(parts, list):
        raise CheckpointError(
            target,
            "undecodable",
            f"{where}: not a distributed checkpoint (written by "
            "metaopt.save_checkpoint? load it with metaopt.load_checkpoint)",
        )
    if saved.get("world_size") != size or len(parts) != size:
        raise CheckpointError(
            target,
            "undecodable",
            f"{where}: written by {saved.get('world_size')} ranks, this run has "
            f"{size}; restart with the same number of ranks",
        )
    part = parts[rank]
    if "parts" in saved:  # this version's: a file per rank
        if not isinstance(part, str) or os.path.basename(part) != part:
            raise CheckpointError(target, "undecodable", f"{where}: rank {rank}'s part is not a file name")
        part = load_checkpoint(
            os.path.join(os.path.dirname(os.path.abspath(target)), part), map_location=map_location
        )
    if not isinstance(part, dict):
        raise CheckpointError(target, "undecodable", f"{where}: rank {rank}'s part is not a dict")
    return part
