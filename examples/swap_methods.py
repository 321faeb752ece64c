"""One training loop, every method: swap metaopt optimizers by name.

    python examples/swap_methods.py

Trains the quickstart's shared-body/per-task-head model with each method for the same number
of training examples and prints the final per-task loss. (A toy: see benchmarks/ for real
comparisons.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from quickstart import make_tasks

import metaopt

TASKS = ["ar", "bn", "fi"]


def build(
    name: str, params: list[torch.nn.Parameter], layer: list[torch.nn.Parameter]
) -> metaopt.MultiTaskOptimizer:
    adam = lambda: torch.optim.Adam(params, lr=3e-3)  # noqa: E731
    makers: dict[str, Callable[[], metaopt.MultiTaskOptimizer]] = {
        "mtl": lambda: metaopt.MTL(adam(), tasks=TASKS, allow_unused=True),
        "pcgrad": lambda: metaopt.PCGrad(adam(), tasks=TASKS, seed=0),
        "gradvac": lambda: metaopt.GradVac(adam(), tasks=TASKS, seed=0),
        "gradnorm": lambda: metaopt.GradNorm(metaopt.MTL(adam(), tasks=TASKS), layer=layer),
        "reptile": lambda: metaopt.Reptile(
            adam(), tasks=TASKS, inner_steps=20, outer_lr=0.5, allow_unused=True, seed=0
        ),
        "sequential_reptile": lambda: metaopt.SequentialReptile(
            adam(), tasks=TASKS, inner_steps=20, outer_lr=0.5, allow_unused=True, seed=0
        ),
        "seqreptile_over_gradvac": lambda: metaopt.SequentialReptile(
            metaopt.GradVac(adam(), tasks=TASKS, seed=0), inner_steps=20, outer_lr=0.5, seed=0
        ),
    }
    return makers[name]()


def main(examples: int = 600 * 32) -> None:
    data = make_tasks()
    for name in (
        "mtl",
        "pcgrad",
        "gradvac",
        "gradnorm",
        "reptile",
        "sequential_reptile",
        "seqreptile_over_gradvac",
    ):
        torch.manual_seed(0)
        body = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh())
        heads = torch.nn.ModuleDict({t: torch.nn.Linear(64, 1) for t in TASKS})
        params = [*body.parameters(), *heads.parameters()]
        opt = build(name, params, list(body[0].parameters()))
        g = torch.Generator().manual_seed(1)
        seen = 0
        while seen < examples:  # the same number of examples for every method
            wanted = opt.next_tasks()
            losses = {}
            for t in wanted:
                x, y = data[t]
                idx = torch.randint(len(x), (32,), generator=g)
                losses[t] = torch.nn.functional.mse_loss(heads[t](body(x[idx])), y[idx])
            opt.step(losses)
            seen += 32 * len(wanted)
        with torch.no_grad():
            final = {
                t: torch.nn.functional.mse_loss(heads[t](body(x)), y).item() for t, (x, y) in data.items()
            }
        print(f"{name:26s} " + "  ".join(f"{t}: {v:.3f}" for t, v in final.items()))


if __name__ == "__main__":
    main()
