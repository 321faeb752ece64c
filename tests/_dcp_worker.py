"""One rank of the DCP tests (test_dcp.py): PyTorch's own checkpoint recipe, an ``AppState``
``Stateful`` over ``get_state_dict`` / ``set_state_dict`` saved and loaded with
``torch.distributed.checkpoint``, into a freshly built model and optimizer as the template.
Saves the resumed and the uninterrupted run's gathered parameters."""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

sys.path.insert(0, os.path.dirname(__file__))

from _ddp_worker import half  # noqa: E402
from _fsdp_worker import build, method, sharded_net  # noqa: E402

import metaopt  # noqa: E402

from _spawn import leave  # noqa: E402
from _stacks import TASKS, Net, batch, loss_of, torch_way_step  # noqa: E402

SAVED_AT, END = 6, 10  # local trajectories: K = 3, saved at an outer step (every rank's θ = φ)


class AppState(Stateful):
    """PyTorch's recipe (the DCP tutorial's ``AppState``)."""

    def __init__(self, model, opt) -> None:
        self.model, self.opt = model, opt

    def state_dict(self):
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict) -> None:
        set_state_dict(
            self.model, self.opt, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"]
        )


def _build(engine: str, name: str):
    if engine == "local":  # local trajectories: one per rank, each on its rank's own data
        model = Net()
        opt = metaopt.SequentialReptile(
            torch.optim.Adam(model.parameters(), lr=0.05),
            tasks=TASKS,
            inner_steps=3,
            outer_lr=0.5,
            seed=0,
            allow_unused=True,
            local_trajectories=True,
        )
        return model, model, opt
    if engine == "fsdp2":
        model = sharded_net()
        return model, model, build(name, model)
    model = Net()
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    return model, ddp, build(name, model)


def _part(step: int, task: str, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s share of the step's batch, of ``world`` shares."""
    if world == 2:
        return half(step, task, rank)
    x, y = batch(step, task)
    rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    return x[rows], y[rows]


def _steps(name: str, opt, forward, rank: int, start: int, end: int, world: int = 2) -> None:
    for s in range(start, end):
        losses = {
            t: loss_of(forward, t, _part(s, t, rank, world), reduction="mean") for t in opt.next_tasks()
        }
        torch_way_step(method(name), opt, losses)


def _full(model) -> list[torch.Tensor]:
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]


def resume(rank: int, engine: str, name: str, directory: str) -> dict:
    model, forward, opt = _build(engine, name)
    _steps(name, opt, forward, rank, 0, SAVED_AT)
    every_state = len(opt.state) == len(list(model.parameters()))  # DCP loads what the template has
    dcp.save({"app": AppState(forward, opt)}, checkpoint_id=directory)
    saved_count = opt.step_count
    _steps(name, opt, forward, rank, SAVED_AT, END)
    uninterrupted = _full(model)

    model2, forward2, opt2 = _build(engine, name)
    template = AppState(forward2, opt2)
    template.state_dict()  # what dcp.load does first: DCP initializes a fresh optimizer's state
    hidden = (opt2.step_count, opt2.clock, opt2.next_tasks() == _build(engine, name)[2].next_tasks())
    dcp.load({"app": template}, checkpoint_id=directory)
    loaded_count = opt2.step_count
    _steps(name, opt2, forward2, rank, SAVED_AT, END)
    return {
        "every_state": every_state,
        "hidden": hidden,
        "counts": (saved_count, loaded_count),
        "uninterrupted": uninterrupted,
        "resumed": _full(model2),
    }


def run(rank: int, cases: list[tuple[str, str]], store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        results = {}
        for engine, name in cases:
            directory = os.path.join(out, f"ckpt-{engine}-{name}")
            results[(engine, name)] = resume(rank, engine, name, directory)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    leave(0)


def reshard(rank: int, names: list[str], store: str, out: str) -> None:
    """4 ranks load the 2-rank FSDP2 checkpoints ``run`` saved (each rank's shard of the slow
    weights and of Adam's moments re-cut by DCP for 4) and continue on quarter batches."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=4, timeout=timedelta(seconds=60))
    try:
        results = {}
        for name in names:
            model, forward, opt = _build("fsdp2", name)
            dcp.load({"app": AppState(forward, opt)}, checkpoint_id=os.path.join(out, f"ckpt-fsdp2-{name}"))
            loaded = opt.step_count
            _steps(name, opt, forward, rank, SAVED_AT, END, world=4)
            results[name] = {"loaded": loaded, "resumed": _full(model)}
        torch.save(results, os.path.join(out, f"reshard{rank}.pt"))
    finally:
        dist.destroy_process_group()
    leave(0)
