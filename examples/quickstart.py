"""Quickstart: train one small model on three related regression tasks with Sequential Reptile.

Run with ``make demo`` (or ``python examples/quickstart.py`` in an environment with metaopt).
The loop below is the one loop every metaopt optimizer uses.
"""

from __future__ import annotations

import torch

import metaopt


def make_tasks(seed: int = 0, n: int = 256) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Three tasks sharing a nonlinear feature map, each with its own linear read-out."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(8, 16, generator=g)
    tasks = {}
    for name in ("ar", "bn", "fi"):
        x = torch.randn(n, 8, generator=g)
        w = torch.randn(16, 1, generator=g)
        tasks[name] = (x, torch.tanh(x @ shared) @ w + 0.05 * torch.randn(n, 1, generator=g))
    return tasks


def main(steps: int = 600) -> None:
    torch.manual_seed(0)
    data = make_tasks()
    body = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh())
    heads = torch.nn.ModuleDict({t: torch.nn.Linear(64, 1) for t in data})
    model = torch.nn.ModuleDict({"body": body, "heads": heads})

    def predict(task: str, x: torch.Tensor) -> torch.Tensor:
        return heads[task](body(x))

    # allow_unused: each step reaches only its own task's head
    opt = metaopt.SequentialReptile(
        torch.optim.AdamW(model.parameters(), lr=3e-3),
        tasks=list(data),
        inner_steps=20,
        outer_lr=0.5,
        seed=0,
        allow_unused=True,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    batch = torch.Generator().manual_seed(1)

    def loss_fn(task: str) -> torch.Tensor:
        x, y = data[task]
        idx = torch.randint(len(x), (32,), generator=batch)
        return torch.nn.functional.mse_loss(predict(task, x[idx]), y[idx])

    def report_losses() -> str:
        with torch.no_grad():
            full = {t: torch.nn.functional.mse_loss(predict(t, x), y).item() for t, (x, y) in data.items()}
        return "  ".join(f"{t}: {v:.3f}" for t, v in full.items())

    print(f"initial per-task MSE       {report_losses()}")
    for step in range(1, steps + 1):
        wanted = opt.next_tasks()  # the optimizer owns the task schedule
        report = opt.step({t: loss_fn(t) for t in wanted})  # the one loop: backward, then step
        sched.step()
        if report.outer_update and opt.outer_step_count % 6 == 0:
            print(f"step {step:4d} (outer {opt.outer_step_count:2d})  {report_losses()}")
    print("per-task MSE is measured at the slow weights (the model after each outer step)")


if __name__ == "__main__":
    main()
