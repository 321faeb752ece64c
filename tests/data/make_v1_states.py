"""Writes ``state_v1.pt``: optimizer state dicts in the layout of metaopt 0.1.0 (state-dict
layout 1), each saved mid-run, with the parameters the same run reached a few steps later.

Run once with metaopt 0.1.0 on the path (``PYTHONPATH=<a 0.1.0 checkout> python
tests/data/make_v1_states.py``); ``tests/test_state_migration.py`` loads the file with today's
metaopt and checks that every run continues to the same parameters.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

import metaopt

TASKS = ["a", "b", "c"]


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()


def data(step: int, task: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + TASKS.index(task))
    return torch.randn(6, 4, generator=g, dtype=torch.float64)


def build(name: str, net: torch.nn.Module) -> metaopt.MultiTaskOptimizer:
    adam = torch.optim.Adam(net.parameters(), lr=0.05)
    if name == "sequential_reptile":
        return metaopt.SequentialReptile(adam, tasks=TASKS, inner_steps=3, outer_lr=0.5, seed=1)
    if name == "batched_reptile":
        return metaopt.Reptile(adam, tasks=TASKS, inner_steps=2, outer_lr=0.5, tasks_per_outer_step=3, seed=2)
    if name == "outer_nesterov":
        return metaopt.SequentialReptile(
            adam,
            tasks=TASKS,
            inner_steps=2,
            seed=3,
            outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.7, momentum=0.9, nesterov=True),
        )
    if name == "sequential_reptile_pcgrad":
        return metaopt.SequentialReptile(
            metaopt.PCGrad(adam, tasks=TASKS, seed=4), inner_steps=2, outer_lr=0.5, seed=4
        )
    if name == "gradvac":
        return metaopt.GradVac(adam, tasks=TASKS, beta=0.3, seed=5)
    if name == "gradnorm":
        return metaopt.GradNorm(metaopt.MTL(adam, tasks=TASKS), layer=list(net[0].parameters()), seed=6)
    raise ValueError(name)


NAMES = [
    "sequential_reptile",
    "batched_reptile",
    "outer_nesterov",
    "sequential_reptile_pcgrad",
    "gradvac",
    "gradnorm",
]
SAVED_AT, CONTINUED = 5, 4  # steps before the save, steps after it


def step(opt: metaopt.MultiTaskOptimizer, net: torch.nn.Module, s: int) -> None:
    opt.step({t: net(data(s, t)).pow(2).mean() + 0.1 * (TASKS.index(t) + 1) for t in opt.next_tasks()})


def main() -> None:
    out = {}
    for name in NAMES:
        net = model()
        opt = build(name, net)
        for s in range(SAVED_AT):
            step(opt, net, s)
        # state dicts hold references to live tensors: copy them before training goes on
        saved = copy.deepcopy({"model": net.state_dict(), "optimizer": opt.state_dict()})
        for s in range(SAVED_AT, SAVED_AT + CONTINUED):
            step(opt, net, s)
        out[name] = {**saved, "after": [p.detach().clone() for p in net.parameters()]}
    torch.save({"metaopt": metaopt.__version__, "runs": out}, Path(__file__).with_name("state_v1.pt"))


if __name__ == "__main__":
    main()
