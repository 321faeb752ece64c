"""Sequential Reptile on several processes, in either of its two distributed modes.

* ``--mode ddp``: data-parallel. The model is wrapped in ``DistributedDataParallel``, every rank
  draws the same task (same seed) on its own data, and DDP averages the gradients at every
  inner step.
* ``--mode local``: local trajectories. The model is *not* wrapped; each rank runs its own
  trajectory over all tasks (its own task stream) and the ranks average their fast weights once
  per outer step (``local_trajectories=True``): K times less communication.

Both save a distributed checkpoint at every outer step (``--checkpoint``) and resume from it
when it exists. gloo on CPU; nccl (one GPU per rank) when CUDA is present.

    torchrun --standalone --nproc_per_node=2 examples/distributed.py --mode local
    torchrun --standalone --nproc_per_node=2 examples/distributed.py --mode ddp
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist

import metaopt

TASKS = ["ar", "bn", "fi"]


class Model(torch.nn.Module):
    """A shared encoder and one head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh())
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(32, 1) for t in TASKS})

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](self.enc(x))


def batch(task: str, rank: int, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch at ``step``: its own data, a function of the step (so that a resumed
    run sees the same batches). The tasks share the first half of their target weights."""
    g = torch.Generator().manual_seed(10_000 * rank + 10 * step + TASKS.index(task))
    x = torch.randn(32, 8, generator=g)
    w = torch.ones(8, 1)
    w[4:] *= TASKS.index(task) - 1.0
    return x.to(device), (x @ w).to(device)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["ddp", "local"], default="local")
    ap.add_argument("--steps", type=int, default=200, help="inner steps")
    ap.add_argument("--inner-steps", type=int, default=20, help="K")
    ap.add_argument("--checkpoint", default=None, help="distributed checkpoint path (optional)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    # a timeout turns a dead peer into an error instead of a hang
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    torch.manual_seed(0)  # the same initial parameters on every rank
    model = Model().to(device)
    local = args.mode == "local"
    net: torch.nn.Module = (
        model if local else torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    )  # one head per step: the other heads are unused
    opt = metaopt.SequentialReptile(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        tasks=TASKS,
        inner_steps=args.inner_steps,
        outer_lr=0.5,
        seed=0,
        allow_unused=True,
        local_trajectories=local,
    )
    start = 0
    if args.checkpoint and os.path.exists(args.checkpoint):
        state = metaopt.load_distributed_checkpoint(args.checkpoint, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    for step in range(start, args.steps):
        (task,) = opt.next_tasks()
        x, y = batch(task, rank, step, device)
        torch.nn.functional.mse_loss(net(x, task), y).backward()
        report = opt.step()
        opt.zero_grad()
        if report.outer_update and args.checkpoint:
            metaopt.save_distributed_checkpoint(
                args.checkpoint,
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step + 1},
            )
    losses = {}
    with torch.no_grad(), opt.use_slow_weights():  # evaluate at φ on held-out batches
        for t in TASKS:
            x, y = batch(t, 99, 10_000, device)
            losses[t] = torch.nn.functional.mse_loss(model(x, t), y).item()
    if rank == 0:
        print(
            f"{args.mode}: {dist.get_world_size()} ranks ({dist.get_backend()}), "
            f"{opt.outer_step_count} outer steps from step {start}; held-out loss at the slow "
            "weights " + ", ".join(f"{t} {v:.4f}" for t, v in losses.items())
        )
    dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
