"""Checkpoint and resume a Sequential Reptile run: the recipe of the README, end to end.

Trains with a checkpoint every few steps, "crashes" (drops every object) part-way, rebuilds the
model, optimizer and LR scheduler from scratch, resumes from the checkpoint and finishes; the
final parameters equal those of a run that was never interrupted, bit for bit. The model has
dropout, whose masks come from torch's random number generator: the checkpoint holds its state
(:func:`rng_state`), or the resumed run would draw other masks than the uninterrupted one.

    python examples/resume.py
"""

from __future__ import annotations

import os
import tempfile

import torch

import metaopt

TASKS = ["ar", "bn", "fi"]


def batch(task: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of a step depends only on the step: a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(1000 * step + TASKS.index(task))
    x = torch.randn(16, 4, generator=g)
    return x, x.sum(1, keepdim=True) * (1 + TASKS.index(task))


def build() -> tuple[torch.nn.Module, metaopt.SequentialReptile, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1)
    )
    opt = metaopt.SequentialReptile(
        torch.optim.AdamW(model.parameters(), lr=1e-2), tasks=TASKS, inner_steps=4, outer_lr=0.3, seed=0
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    return model, opt, sched


def rng_state() -> dict[str, object]:
    """The random number generators' states a resumed run needs (dropout draws from them): the
    CPU's, and every CUDA device's when there is one."""
    state: dict[str, object] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def train(path: str, steps: int, stop_at: int | None = None) -> torch.nn.Module:
    """Train to ``steps``, resuming from ``path`` if it exists; return early at ``stop_at``."""
    model, opt, sched = build()
    start = 0
    if os.path.exists(path):
        state = metaopt.load_checkpoint(path)
        model.load_state_dict(state["model"])  # the model first, then the optimizer
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])  # the dropout masks go on as they would have
        start = state["step"]
    for step in range(start, steps):
        if step == stop_at:
            return model
        (task,) = opt.next_tasks()
        x, y = batch(task, step)
        opt.step({task: torch.nn.functional.mse_loss(model(x), y)})
        sched.step()
        if (step + 1) % 5 == 0:
            metaopt.save_checkpoint(
                path,
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": rng_state(),
                    "step": step + 1,
                },
            )
    return model


def main(steps: int = 30, crash_at: int = 12) -> bool:
    with tempfile.TemporaryDirectory() as d:
        reference = train(os.path.join(d, "uninterrupted.ckpt"), steps)
        path = os.path.join(d, "run.ckpt")
        train(path, steps, stop_at=crash_at)  # the crash: everything is dropped here
        resumed_from = metaopt.load_checkpoint(path)["step"]
        resumed = train(path, steps)
    same = all(torch.equal(a, b) for a, b in zip(resumed.parameters(), reference.parameters()))
    print(
        f"crashed at step {crash_at}, resumed from the checkpoint of step {resumed_from}: "
        f"final parameters identical to the uninterrupted run: {same}"
    )
    return same


if __name__ == "__main__":
    main()
