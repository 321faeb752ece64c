"""MAML on few-shot sinusoid regression, the toy problem of Finn, Abbeel & Levine, *Model-Agnostic
Meta-Learning for Fast Adaptation of Deep Networks*, ICML 2017 (arXiv 1703.03400).

Each task is a sine wave y = A sin(x + b) with amplitude A ~ U[0.1, 5] and phase b ~ U[0, π],
seen through K = 10 points x ~ U[-5, 5]. MAML learns an initialisation of a 1-40-40-1 MLP from
which a few SGD steps on a new task's K shots fit that task well. Each outer step draws a
meta-batch of tasks, ``metaopt.maml.meta_loss`` adapts on each task's K train shots and scores
the adapted parameters on K test shots, and ``torch.optim.Adam`` steps on the mean.

Before and after meta-training, the example adapts to the same held-out tasks (with
``metaopt.maml.adapt`` on their K shots) and prints the mean post-adaptation MSE on 100 test
points of each. A much longer comparison with Reptile is ``benchmarks/sinusoid.py``.

    python examples/sinusoid.py [--iterations 400] [--first-order]
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from metaopt import maml

Task = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def sample_task(g: torch.Generator, shots: int, test_points: int) -> Task:
    """One sinusoid task: ``(x_train, y_train, x_test, y_test)`` with ``shots`` train points."""
    amplitude = 0.1 + 4.9 * torch.rand(1, generator=g)
    phase = math.pi * torch.rand(1, generator=g)
    x = 10 * torch.rand(shots + test_points, 1, generator=g) - 5
    y = amplitude * torch.sin(x + phase)
    return x[:shots], y[:shots], x[shots:], y[shots:]


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, y)


def evaluate(model: nn.Module, tasks: list[Task], inner: maml.SGD, steps: int) -> float:
    """Mean test MSE over ``tasks`` after ``steps`` inner steps on each task's train shots."""
    params = {k: p.detach().requires_grad_() for k, p in model.named_parameters()}
    total = 0.0
    for x_train, y_train, x_test, y_test in tasks:
        adapted = maml.adapt(
            model,
            params,
            lambda out, y=y_train: mse(out, y),
            x_train,
            inner=inner,
            steps=steps,
            first_order=True,  # evaluation needs no meta-gradient
        )
        with torch.no_grad():
            total += float(mse(torch.func.functional_call(model, adapted, (x_test,)), y_test))
    return total / len(tasks)


def main(argv: list[str] | None = None) -> tuple[float, float]:
    """Meta-train, and return the held-out post-adaptation MSE ``(before, after)``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=400, help="outer (meta) steps")
    ap.add_argument("--meta-batch", type=int, default=4, help="tasks per outer step")
    ap.add_argument("--shots", type=int, default=10, help="K: train (and test) points per task")
    ap.add_argument("--inner-steps", type=int, default=5)
    ap.add_argument("--inner-lr", type=float, default=0.01)
    ap.add_argument("--outer-lr", type=float, default=1e-3)
    ap.add_argument("--first-order", action="store_true", help="first-order MAML")
    ap.add_argument("--eval-tasks", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    outer = torch.optim.Adam(model.parameters(), lr=args.outer_lr)
    inner = maml.SGD(lr=args.inner_lr)
    held_out = torch.Generator().manual_seed(10_000 + args.seed)  # new tasks, never trained on
    eval_tasks = [sample_task(held_out, args.shots, 100) for _ in range(args.eval_tasks)]
    train_tasks = torch.Generator().manual_seed(args.seed)

    name = "first-order MAML" if args.first_order else "MAML"
    print(
        f"{name}: {args.iterations} outer steps of {args.meta_batch} tasks, {args.shots}-shot, "
        f"{args.inner_steps} inner SGD steps at lr {args.inner_lr}"
    )
    before = evaluate(model, eval_tasks, inner, args.inner_steps)
    print(f"before meta-training: post-adaptation MSE {before:.4f}")
    for step in range(1, args.iterations + 1):
        batch = [sample_task(train_tasks, args.shots, args.shots) for _ in range(args.meta_batch)]
        loss = maml.meta_loss(
            model, batch, mse, inner=inner, steps=args.inner_steps, first_order=args.first_order
        )
        outer.zero_grad()
        loss.backward()
        outer.step()
        if step % max(1, args.iterations // 4) == 0:
            print(f"  step {step:4d}  meta-batch loss {loss.item():.4f}")
    after = evaluate(model, eval_tasks, inner, args.inner_steps)
    print(f"after meta-training:  post-adaptation MSE {after:.4f}")
    return before, after


if __name__ == "__main__":
    main()
