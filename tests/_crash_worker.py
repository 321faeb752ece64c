"""Worker process for the SIGKILL test in ``tests/test_checkpoint.py``.

Trains a small multi-head MLP (3,315 parameters: a shared trunk and one head per task) with
``metaopt.SequentialReptile(torch.optim.AdamW(...))`` and a cosine LR schedule, on data derived
from the step index alone (a ``torch.Generator`` seeded by the step), so that any run of
``--steps`` steps computes the same thing however often it is killed and resumed. Every
``--save-every`` steps it writes one checkpoint (model, optimizer, scheduler, step, and an
``extras`` entry padded with ``--pad-mb`` MiB so that writes take long enough to be interrupted).
On start it resumes from the checkpoint if there is one: the model's state first, then the
optimizer's, then the scheduler's. At the end it writes the final parameters and slow weights
to ``--out`` with ``torch.save``.

``python tests/_crash_worker.py --ckpt C --out O --steps N [--save-every K] [--pad-mb M]
[--progress]``. With ``--progress`` it prints ``start S`` (the step it resumes from) when
training is about to begin, then ``step N`` after each step, once that step's checkpoint (if
any) has been written, so a reader knows which checkpoint is durable at any moment.
:func:`life` runs the same with the reports sent over a ``multiprocessing`` connection, for
processes forked from a forkserver that has imported this module (and torch) once.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo  # noqa: F401  (torch.optim imports it on first use: a forkserver preloads it)

import metaopt

IMPORTED_BY = os.getpid()  # a forked life sees its forkserver's pid here: the imports were shared
TASKS = ("a", "b", "c")
IN, HIDDEN, BATCH = 16, 48, 32


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(
            torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh()
        )
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(HIDDEN, 1) for t in TASKS})

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](self.trunk(x))


def batch(step: int, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step``: a function of the step index and the task only."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(BATCH, IN, generator=g)
    w = torch.randn(IN, 1, generator=torch.Generator().manual_seed(1000 + TASKS.index(task)))
    return x, torch.sin(x @ w) + 0.05 * torch.randn(BATCH, 1, generator=g)


def padding(mib: float) -> torch.Tensor:
    n = int(mib * 2**20) // 4
    return torch.randn(n, generator=torch.Generator().manual_seed(12345))


def build(steps: int) -> tuple[Net, metaopt.SequentialReptile, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = Net()
    opt = metaopt.SequentialReptile(
        torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2),
        tasks=list(TASKS),
        inner_steps=5,
        outer_lr=0.3,
        seed=0,
        allow_unused=True,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=1e-4)
    return model, opt, sched


def _print_report(kind: str, n: int) -> None:
    print(kind, n, flush=True)


def main(argv: list[str] | None = None, report: Callable[[str, int], None] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--save-every", type=int, default=1)
    ap.add_argument("--pad-mb", type=float, default=0.0)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if report is None and args.progress:
        report = _print_report
    torch.set_num_threads(1)  # the same reduction order in every process

    model, opt, sched = build(args.steps)
    pad = padding(args.pad_mb)
    start = 0
    if os.path.exists(args.ckpt):
        state = metaopt.load_checkpoint(args.ckpt)
        model.load_state_dict(state["model"])  # 1. the model
        opt.load_state_dict(state["optimizer"])  # 2. the optimizer (refers to the parameters)
        sched.load_state_dict(state["scheduler"])  # 3. the scheduler (acts on param_groups)
        start = int(state["step"])
        if not torch.equal(state["extras"]["pad"], pad):
            raise SystemExit(f"{args.ckpt}: the padding tensor did not round-trip")
    if report is not None:
        report("start", start)

    t_train = time.perf_counter()
    for step in range(start, args.steps):
        (task,) = opt.next_tasks()
        x, y = batch(step, task)
        opt.step({task: torch.nn.functional.mse_loss(model(x, task), y)})
        sched.step()
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            metaopt.save_checkpoint(
                args.ckpt,
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "step": step + 1,
                    "extras": {"pad": pad},
                },
            )
        if report is not None:
            report("step", step + 1)
    torch.save(
        {
            "params": [p.detach().clone() for p in model.parameters()],
            "slow": [s.detach().clone() for s in opt.slow_weights],
            "resumed_from": start,
            "train_seconds": time.perf_counter() - t_train,
        },
        args.out,
    )


def life(argv: list[str], conn: Any) -> None:
    """:func:`main` with its reports sent as ``(kind, n)`` over ``conn`` (a multiprocessing
    connection; each message is one small atomic write, so a kill never leaves half of one),
    after a ``("preloaded", 0 or 1, metaopt.__file__)`` saying whether this module came
    imported from the parent, and which metaopt it runs."""
    conn.send(("preloaded", int(IMPORTED_BY != os.getpid()), metaopt.__file__))
    main(argv, report=lambda kind, n: conn.send((kind, n)))


if __name__ == "__main__":
    main()
