"""Checks that the ranks of a ``torch.distributed`` run take the same steps.

Both are one all-gather of a few integer digests, made before anything moves:

* :func:`compare_ranks` (data-parallel runs, at the first step and after a load): every rank was
  built with the same options and holds the same task stream;
* :func:`compare_local_ranks` (local trajectories, at the first step; before every outer step
  with ``verify_ranks``): every rank is at the same point of the same run, with bit-identical
  slow weights, its own task stream and, at the first step, its own gradients.

A rank that differs is named in a ``ValueError`` (a ``RuntimeError`` when the slow weights part
mid-run), raised on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

from torch import Tensor

from .._distributed import checksum, digest, gather_digests

__all__ = ["compare_local_ranks", "compare_ranks"]


def compare_ranks(stream: int, config: Any, group: Any, where: str) -> None:
    """Every rank of ``group`` has the same ``config`` (the class, the tasks, every option) and
    the same task stream (``stream``: its fingerprint), or a ``ValueError`` on every rank."""
    ranks = gather_digests([stream, digest(config)], group, None, where)
    differ = [r for r, v in enumerate(ranks) if v[1] != ranks[0][1]]
    if differ:
        raise ValueError(
            f"{where}: rank(s) {differ} were built with other options than rank 0 "
            f"(this rank: {config}); build the optimizer with the same options on every rank. "
            "Nothing was updated"
        )
    differ = [r for r, v in enumerate(ranks) if v[0] != ranks[0][0]]
    if differ:
        raise ValueError(
            f"{where}: the task schedule differs between ranks (rank(s) {differ} disagree "
            "with rank 0): every rank must draw the same tasks. Build the optimizer with "
            "the same seed on every rank, and load the same checkpoint. Nothing was updated"
        )


def compare_local_ranks(
    config: Any,
    slow: Sequence[Tensor],
    grads: Sequence[Tensor],
    stream: int,
    group: Any,
    timeout: float | None,
    where: str,
    *,
    with_grads: bool,
) -> None:
    """Local trajectories: every rank of ``group`` has the same ``config`` (options and
    counters) and bit-identical ``slow`` weights, a task stream of its own (``stream``: its
    fingerprint) and, ``with_grads`` (the first step), gradients of its own (bit-identical
    gradients on every rank mean DDP averaged them, or every rank was fed the same batches)."""
    mine = (digest(config), checksum(slow), checksum(grads) if grads else -1, stream)
    ranks = gather_digests(mine, group, timeout, where)

    def refuse(problem: str, fix: str) -> NoReturn:
        # before anything moves: at the first step, and before an outer step (verify_ranks)
        kind = ValueError if with_grads else RuntimeError
        raise kind(f"{where}: {problem}: {fix}. Nothing was updated")

    differ = [r for r, v in enumerate(ranks) if v[0] != ranks[0][0]]
    if differ:
        refuse(
            f"rank(s) {differ} run with other options or are at another step than rank 0 "
            f"(this rank: {config})",
            "build the optimizer with the same options on every rank, and resume every "
            "rank from the same checkpoint (metaopt.load_distributed_checkpoint)",
        )
    differ = [r for r, v in enumerate(ranks) if v[1] != ranks[0][1]]
    if differ and with_grads:
        refuse(
            f"the slow weights (the parameters when the optimizer was built, or as last "
            f"loaded) of rank(s) {differ} differ from rank 0's",
            "build the model from the same seed on every rank (or broadcast rank 0's "
            "parameters) before building the optimizer, and load the same checkpoint",
        )
    if differ:
        refuse(
            f"the slow weights of rank(s) {differ} are no longer bit-identical to rank 0's",
            "something changed them on some ranks only (a write outside the optimizer, "
            "a load on one rank); restart every rank from the last checkpoint",
        )
    if len(ranks) > 1 and len({v[3] for v in ranks}) < len(ranks):
        refuse(
            "two ranks hold the same task stream, so their trajectories would repeat each other",
            "each rank must load its own state (metaopt.load_distributed_checkpoint)",
        )
    if with_grads and len(ranks) > 1 and ranks[0][2] != -1 and all(v[2] == ranks[0][2] for v in ranks):
        refuse(
            "the gradients are bit-identical on every rank at the first step of local trajectories",
            "the model is wrapped in DistributedDataParallel, which "
            "averages gradients at every step (use the model itself, or run each inner "
            "step under ddp.no_sync()), or every rank is fed the same batches (give each "
            "rank its own data)",
        )
