"""One rank of the DDP tests (test_ddp.py): the model wrapped in DistributedDataParallel, the
optimizer built over it as usual, each rank on its half of every batch. Saves its final
parameters and optimizer state for the parent to compare."""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from _spawn import leave  # noqa: E402
from _stacks import REPTILE_FAMILY, Net, batch, loss_of, make_opt, torch_way_step  # noqa: E402

WORLD = 2
STEPS = 6


def half(step: int, task: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(step, task)
    rows = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
    return x[rows], y[rows]


class _CountingAllReduce:
    """``torch.distributed.all_reduce`` as metaopt calls it, counted (DDP's own bucketed
    all-reduce goes through the C++ reducer, not this function)."""

    def __init__(self) -> None:
        self.calls = 0
        self.elements = 0
        self.real = dist.all_reduce

    def __call__(self, tensor, *args, **kwargs):
        self.calls += 1
        self.elements += tensor.numel()
        return self.real(tensor, *args, **kwargs)


def train_steps(name: str, recipe: str, opt, model, rank: int, part=None) -> None:
    """``STEPS`` steps, each rank on its half of every batch (or its ``part(step, task,
    rank)``), through the one loop or the torch way (``name`` picks how the torch way's
    backward is made)."""
    part = half if part is None else part
    for s in range(STEPS):
        wanted = opt.next_tasks()
        losses = {t: loss_of(model, t, part(s, t, rank), reduction="mean") for t in wanted}
        if recipe == "one_loop":
            opt.step(losses)
        else:
            torch_way_step(name, opt, losses)


def train(rank: int, name: str, recipe: str, seed: int, option: tuple = ()) -> dict:
    counter = _CountingAllReduce()
    dist.all_reduce = counter
    try:
        return _train(rank, name, recipe, seed, option) | {"all_reduce_calls": counter.calls}
    finally:
        dist.all_reduce = counter.real


def _train(rank: int, name: str, recipe: str, seed: int, option: tuple = ()) -> dict:
    model = Net()
    # The Reptile family forwards one task per step, leaving the other heads unused: DDP then
    # needs find_unused_parameters. The others forward every task (one forward per task) into
    # one backward pass, which DDP supports only without it (every head is used).
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=name in REPTILE_FAMILY)
    opt = make_opt(name, model, seed=seed)
    if option and rank == 1:  # (attribute path, value): rank 1 built with another option
        *path, attr, value = option
        target = opt
        for part in path:
            target = getattr(target, part)
        setattr(target, attr, value)
    try:
        train_steps(name, recipe, opt, ddp, rank)
    except ValueError as err:
        return {"error": str(err)}
    return {"params": [p.detach().clone() for p in model.parameters()], "state": opt.state_dict()}


def _rank_zero_only(rank: int) -> dict:
    """A Sequential Reptile built with process_group="local" and stepped on rank 0 alone (an
    evaluation run, say): no collective, so rank 0 neither waits for rank 1 nor fails."""
    if rank != 0:
        return {}
    model = Net()
    opt = make_opt("sequential_reptile", model)
    opt.process_group = "local"
    try:
        for s in range(4):
            opt.step({t: loss_of(model, t, batch(s, t)) for t in opt.next_tasks()})
    except Exception as err:  # a collective would fail here: rank 1 is not in it
        return {"error": f"{type(err).__name__}: {err}"}
    return {"steps": opt.step_count}


def run(rank: int, runs: list[tuple[str, str, int, int]], port: int, out: str) -> None:
    """``runs``: (method, recipe, seed on rank 0, seed on rank 1)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        results = {
            (name, recipe, s0, s1, *option): train(rank, name, recipe, (s0, s1)[rank], tuple(option))
            for name, recipe, s0, s1, *option in runs
        }
        results["local"] = _rank_zero_only(rank)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    leave(0)
