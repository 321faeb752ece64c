"""Few-shot sinusoid regression (Finn et al. 2017): MAML, first-order MAML, Reptile and
Sequential Reptile at the same inner-step budget, over seeds, scored by the post-adaptation MSE.

Tasks: y = A sin(x + b), A ~ U[0.1, 5], b ~ U[0, π], x ~ U[-5, 5] (the MAML paper's), a pool of
``--pool`` tasks drawn from a seeded generator; each draw of a task gives a fresh K-shot batch.
Model: the paper's MLP 1-40-40-1 (ReLU). Every method takes ``--iterations`` outer steps of
``--meta-batch`` tasks × ``--inner-steps`` plain SGD inner steps at lr ``--inner-lr`` (the same
number of inner forward/backward passes; MAML's second order costs more per pass):

* MAML / first-order MAML (``metaopt.maml.meta_loss``), Adam outer step at ``--outer-lr``;
* Reptile: ``--meta-batch`` trajectories of one task each per outer step, η = ``--eta``;
* Sequential Reptile: ``--meta-batch`` trajectories per outer step, each step on a task drawn
  afresh (trajectories mix tasks), η = ``--eta``.

Evaluation (the same for all): from the learned initialisation, ``--inner-steps`` SGD steps
on K shots of a new task, MSE on 100 points of it, averaged over ``--eval-tasks`` tasks.

    python benchmarks/sinusoid.py                   # 3 seeds, about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metaopt
from metaopt import maml

from _timing import machine

METHODS = ("MAML", "first-order MAML", "Reptile", "Sequential Reptile")


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


class Sinusoids:
    """A seeded pool of sinusoid tasks; ``batch(t, n)`` draws n fresh points of task t."""

    def __init__(self, pool: int, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.amp = 0.1 + 4.9 * torch.rand(pool, generator=self.g)
        self.phase = math.pi * torch.rand(pool, generator=self.g)

    def batch(self, t: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = 10 * torch.rand(n, 1, generator=self.g) - 5
        return x, self.amp[t] * torch.sin(x + self.phase[t])


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, y)


def train(method: str, seed: int, args: argparse.Namespace) -> nn.Module:
    tasks = Sinusoids(args.pool, 1000 + seed)
    model = _net(seed)
    names = [str(i) for i in range(args.pool)]
    if method in ("MAML", "first-order MAML"):
        outer = torch.optim.Adam(model.parameters(), lr=args.outer_lr)
        pick = torch.Generator().manual_seed(seed)
        for _ in range(args.iterations):
            batch = []
            for t in torch.randint(args.pool, (args.meta_batch,), generator=pick).tolist():
                batch.append((*tasks.batch(t, args.shots), *tasks.batch(t, args.shots)))
            loss = maml.meta_loss(
                model,
                batch,
                _mse,
                inner=maml.SGD(lr=args.inner_lr),
                steps=args.inner_steps,
                first_order=method != "MAML",
            )
            outer.zero_grad()
            loss.backward()
            outer.step()
        return model
    cls = metaopt.Reptile if method == "Reptile" else metaopt.SequentialReptile
    opt = cls(
        torch.optim.SGD(model.parameters(), lr=args.inner_lr),
        tasks=names,
        inner_steps=args.inner_steps,
        outer_lr=args.eta,
        tasks_per_outer_step=args.meta_batch,
        seed=seed,
    )
    for _ in range(args.iterations * args.meta_batch * args.inner_steps):
        (t,) = opt.next_tasks()
        x, y = tasks.batch(int(t), args.shots)
        _mse(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():  # evaluate from φ
        for p, phi in zip(model.parameters(), opt.slow_weights):
            p.copy_(phi)
    return model


def evaluate(model: nn.Module, seed: int, args: argparse.Namespace) -> float:
    """Post-adaptation MSE on new tasks (their own pool, never trained on)."""
    tasks = Sinusoids(args.eval_tasks, 99_000 + seed)
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    total = 0.0
    for t in range(args.eval_tasks):
        x, y = tasks.batch(t, args.shots)
        adapted = maml.adapt(
            model,
            params,
            lambda out, y=y: _mse(out, y),
            x,
            inner=maml.SGD(lr=args.inner_lr),
            steps=args.inner_steps,
            first_order=True,
        )
        xt, yt = tasks.batch(t, 100)
        with torch.no_grad():
            total += float(_mse(torch.func.functional_call(model, adapted, (xt,)), yt))
    return total / args.eval_tasks


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=300, help="outer steps")
    ap.add_argument("--meta-batch", type=int, default=4)
    ap.add_argument("--inner-steps", type=int, default=5)
    ap.add_argument("--inner-lr", type=float, default=0.01)
    ap.add_argument("--outer-lr", type=float, default=1e-3, help="MAML's Adam outer step")
    ap.add_argument("--eta", type=float, default=0.5, help="Reptile's outer interpolation")
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--pool", type=int, default=500)
    ap.add_argument("--eval-tasks", type=int, default=100)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    budget = args.iterations * args.meta_batch * args.inner_steps
    print(
        f"sinusoid regression, {args.shots}-shot; each method: {budget:,} inner SGD steps "
        f"({args.iterations} outer steps x {args.meta_batch} tasks x {args.inner_steps}); "
        f"{args.seeds} seeds; post-adaptation MSE after {args.inner_steps} steps on "
        f"{args.eval_tasks} new tasks"
    )
    print(f"machine: {machine()}")
    baseline = statistics.mean(evaluate(_net(s), s, args) for s in range(args.seeds))
    print(f"  {'no meta-training':20s} MSE {baseline:7.3f}")
    for method in METHODS:
        t0 = time.perf_counter()
        scores = [evaluate(train(method, s, args), s, args) for s in range(args.seeds)]
        spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
        print(
            f"  {method:20s} MSE {statistics.mean(scores):7.3f} ± {spread:.3f}   "
            f"(seeds: {', '.join(f'{v:.3f}' for v in scores)})   {time.perf_counter() - t0:6.1f} s"
        )


if __name__ == "__main__":
    main()
