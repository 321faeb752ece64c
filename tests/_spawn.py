"""Starting test ranks: a fresh rendezvous file per run (no TCP port to race for) and a
deadline, so that a hang can never stall CI."""

from __future__ import annotations

import os
import sys
import time
import uuid

import pytest
import torch.multiprocessing as mp

DEADLINE_S = 240


def file_store(directory: str) -> str:
    """A fresh rendezvous file (no TCP port to race for)."""
    return "file://" + os.path.join(directory, f"store-{uuid.uuid4().hex}")


def spawn(fn, world: int, args: tuple, deadline_s: float = DEADLINE_S) -> None:
    """Run ``fn(rank, *args)`` on ``world`` spawned processes; fail (and kill them) past the
    deadline, so that a hang can never stall CI."""
    ctx = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks did not finish within {deadline_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def leave(code: int = 0) -> None:
    """End a rank without interpreter finalization, once its results are on disk and its
    process group destroyed: gloo's worker threads can still hold finished async work whose
    tensors are released during finalization, which aborts the process ("terminate called
    without an active exception", about one run in twenty here; pytorch/pytorch#179291
    describes the mechanism)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_and_leave(rank: int, module: str, function: str, *args: object) -> None:
    """``module.function(rank, *args)`` in a spawned rank, then :func:`leave` (for workers that
    are not test code, such as the recipes' ``worker``); an exception propagates as usual."""
    import importlib

    getattr(importlib.import_module(module), function)(rank, *args)
    leave(0)
