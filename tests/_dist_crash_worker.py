"""One rank of the distributed crash test (test_distributed_checkpoint.py): local-trajectory
Sequential Reptile that saves a distributed checkpoint every ``EVERY`` steps (mid-trajectory as
well as at outer steps), optionally resuming from it, optionally SIGKILL-ing itself at a step.
Writes its final parameters, or the error it stopped with, for the parent."""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from _local_worker import adam, rank_batch  # noqa: E402

import metaopt  # noqa: E402

from _spawn import leave  # noqa: E402
from _stacks import TASKS, Net, loss_of  # noqa: E402

STEPS = 14
EVERY = 2
TIMEOUT_S = 20  # the process group's
STALL_TIMEOUT_S = 2  # the optimizer's own (timeout=), for the stalled-rank case


def run(
    rank: int,
    world: int,
    init: str,
    out: str,
    ckpt: str,
    kill_at: int | None,
    resume: bool,
    stall_at: int | None = None,
    verify: bool = True,
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S)
    )
    try:
        model = Net()
        opt = metaopt.SequentialReptile(
            adam(list(model.parameters())),
            tasks=TASKS,
            inner_steps=3,
            outer_lr=0.5,
            local_trajectories=True,
            allow_unused=True,
            seed=3,
            verify_ranks=verify,
            timeout=None if stall_at is None else STALL_TIMEOUT_S,
        )
        start = 0
        if resume:
            state = metaopt.load_distributed_checkpoint(ckpt)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start = state["step"]
        for s in range(start, STEPS):
            (task,) = opt.next_tasks()
            loss_of(model, task, rank_batch(rank, s, task)).backward()
            opt.step()
            opt.zero_grad()
            if (s + 1) % EVERY == 0 and stall_at is None:
                metaopt.save_distributed_checkpoint(
                    ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": s + 1}
                )
            if s == kill_at and rank == world - 1:
                os.kill(os.getpid(), signal.SIGKILL)
            if s == stall_at and rank == world - 1:  # alive, but late for the outer step
                time.sleep(3 * STALL_TIMEOUT_S)
        torch.save(
            {"params": [p.detach().clone() for p in model.parameters()], "start": start},
            os.path.join(out, f"rank{rank}.pt"),
        )
    except Exception as err:
        with open(os.path.join(out, f"error{rank}.txt"), "w") as f:
            f.write(f"{err}\n{traceback.format_exc()}")
        leave(1)  # a peer is gone: no collective clean-up
    dist.destroy_process_group()
    leave(0)


def bad_state(rank: int, world: int, init: str, out: str, ckpt: str) -> None:
    """A good checkpoint, then one where the last rank hands in a state that cannot be
    written: every rank must raise, and the good checkpoint stay in place."""
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S)
    )
    try:
        metaopt.save_distributed_checkpoint(ckpt, {"step": 1, "rank": rank})
        bad = [1, 2] if rank == world - 1 else {"step": 2, "rank": rank}
        try:
            metaopt.save_distributed_checkpoint(ckpt, bad)  # type: ignore[arg-type]
            message = "no error"
        except Exception as err:
            message = f"{type(err).__name__}: {err}"
        with open(os.path.join(out, f"error{rank}.txt"), "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()
    leave(0)
