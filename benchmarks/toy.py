"""Toy: three conflicting 2-D task losses, each method's trajectory drawn on the contours.

Each task is an anisotropic quadratic with its own minimum, so task gradients conflict
almost everywhere between the minima. Every method starts at the same point, uses the same
inner optimizer (SGD) and learning rate and takes the same number of steps through the one
metaopt loop; the figure shows where each ends relative to the minimum of the summed loss.

    python benchmarks/toy.py                 # writes benchmarks/results/toy.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import metaopt
from metaopt._extras import install_hint

CENTERS = torch.tensor([[2.0, 0.0], [-1.0, 1.8], [-1.0, -1.8]])
SCALES = [
    torch.tensor([[1.0, 0.0], [0.0, 8.0]]),
    torch.tensor([[6.0, 2.0], [2.0, 1.0]]),
    torch.tensor([[3.0, -2.0], [-2.0, 2.0]]),
]
TASKS = ["a", "b", "c"]


def task_loss(theta: torch.Tensor, i: int) -> torch.Tensor:
    d = theta - CENTERS[i]
    return 0.5 * d @ SCALES[i] @ d


class Point(torch.nn.Module):
    def __init__(self, start: tuple[float, float]) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(start))


def methods(lr: float) -> dict[str, object]:
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=lr)  # noqa: E731
    return {
        "MTL (sum)": lambda m: metaopt.MTL(sgd(m), tasks=TASKS),
        "sampled MTL (SeqReptile η=1)": lambda m: metaopt.SequentialReptile(
            sgd(m), tasks=TASKS, inner_steps=10, outer_lr=1.0, seed=0
        ),
        "Sequential Reptile (η=0.1, K=10)": lambda m: metaopt.SequentialReptile(
            sgd(m), tasks=TASKS, inner_steps=10, outer_lr=0.1, seed=0
        ),
        "Reptile (η=0.1, K=10)": lambda m: metaopt.Reptile(
            sgd(m), tasks=TASKS, inner_steps=10, outer_lr=0.1, seed=0
        ),
        "PCGrad": lambda m: metaopt.PCGrad(sgd(m), tasks=TASKS, seed=0),
        "GradVac (β=0.1)": lambda m: metaopt.GradVac(sgd(m), tasks=TASKS, beta=0.1, seed=0),
        "GradNorm (α=1.5)": lambda m: metaopt.GradNorm(metaopt.MTL(sgd(m), tasks=TASKS), layer=[m.theta]),
    }


def trajectory(make, steps: int, start: tuple[float, float]) -> torch.Tensor:
    m = Point(start)
    opt = make(m)
    path = [m.theta.detach().clone()]
    for _ in range(steps):
        wanted = opt.next_tasks()
        report = opt.step({t: task_loss(m.theta, TASKS.index(t)) for t in wanted})
        if getattr(report, "outer_update", False) or not isinstance(opt, metaopt.SlowFastOptimizer):
            path.append(m.theta.detach().clone())
    return torch.stack(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "toy.png"))
    args = ap.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(f"benchmarks/toy.py needs matplotlib: {install_hint('bench')}") from None

    start = (0.0, 3.0)
    total = lambda th: sum(task_loss(th, i) for i in range(3))  # noqa: E731
    A = sum(SCALES)
    opt_point = torch.linalg.solve(A, sum(S @ c for S, c in zip(SCALES, CENTERS)))
    xs = torch.linspace(-3, 3.5, 200)
    ys = torch.linspace(-3, 3.5, 200)
    X, Y = torch.meshgrid(xs, ys, indexing="xy")
    grid = torch.stack([X, Y], -1).reshape(-1, 2)
    Z = torch.stack([total(p) for p in grid]).reshape(X.shape)

    fig, ax = plt.subplots(figsize=(8, 7))
    ax.contour(X, Y, Z.log(), levels=25, cmap="Greys", linewidths=0.6)
    for i, c in enumerate(CENTERS):
        ax.plot(*c, marker="x", color="k", ms=8)
        ax.annotate(f"min {TASKS[i]}", c, textcoords="offset points", xytext=(5, 5))
    ax.plot(*opt_point, marker="*", color="gold", ms=16, mec="k", label="min of Σ L")
    print(f"{'method':36s} {'final Σ L':>10s} {'dist to min':>12s}")
    for name, make in methods(args.lr).items():
        path = trajectory(make, args.steps, start)
        end = path[-1]
        ax.plot(path[:, 0], path[:, 1], lw=1.5, label=name)
        print(f"{name:36s} {float(total(end)):10.4f} {float((end - opt_point).norm()):12.4f}")
    ax.plot(*start, marker="o", color="k")
    ax.set_title(f"{args.steps} steps of SGD (lr {args.lr}) from {start}; contours of log Σ L")
    ax.legend(loc="upper right", fontsize=8)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
