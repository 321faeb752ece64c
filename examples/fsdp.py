"""Sequential Reptile and PCGrad on FSDP2 (``fully_shard``), with PyTorch's own checkpoints.

* ``--layout fsdp2``: the model is sharded over every rank; every rank draws the same tasks,
  on its own share of each batch (FSDP2 averages the gradients as it reduce-scatters them).
* ``--layout hybrid`` (4 ranks): a 2 x 2 ``DeviceMesh``; FSDP2 shards the model within each of
  2 replicas, and Sequential Reptile runs one local trajectory per replica, averaging the
  replicas' shards once per outer step (``local_trajectories=True`` over the replica dimension).

With ``--checkpoint DIR`` it saves with ``torch.distributed.checkpoint`` (PyTorch's ``AppState``
recipe) after every ``--inner-steps`` steps, and resumes from ``DIR`` when it exists. gloo on
CPU; nccl (one GPU per rank) when CUDA is present.

    torchrun --standalone --nproc_per_node=2 examples/fsdp.py --method SequentialReptile
    torchrun --standalone --nproc_per_node=2 examples/fsdp.py --method PCGrad
    torchrun --standalone --nproc_per_node=4 examples/fsdp.py --layout hybrid
"""

from __future__ import annotations

import argparse
import os
from contextlib import nullcontext
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import metaopt

TASKS = ["ar", "bn", "fi"]


class Model(torch.nn.Module):
    """A shared encoder and one head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32))
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(32, 1) for t in TASKS})

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](torch.tanh(self.enc(x)))


class AppState(Stateful):
    """PyTorch's recipe: the model's and the optimizer's state through get/set_state_dict."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        self.model, self.opt = model, opt

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def batch(task: str, seed: int, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``task`` at ``step`` from data stream ``seed``; the tasks share half of
    their target weights."""
    g = torch.Generator().manual_seed(10_000 * seed + 10 * step + TASKS.index(task))
    x = torch.randn(32, 8, generator=g)
    w = torch.ones(8, 1)
    w[4:] *= TASKS.index(task) - 1.0
    return x.to(device), (x @ w).to(device)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=["SequentialReptile", "PCGrad"], default="SequentialReptile")
    ap.add_argument("--layout", choices=["fsdp2", "hybrid"], default="fsdp2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--inner-steps", type=int, default=10, help="K (and the checkpoint period)")
    ap.add_argument("--checkpoint", default=None, help="DCP checkpoint directory (optional)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=60))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    world = dist.get_world_size()
    torch.manual_seed(0)  # the same initial parameters on every rank
    model = Model().to(device)
    options: dict[str, Any] = {}
    if args.layout == "hybrid":
        if args.method != "SequentialReptile" or world % 2:
            raise SystemExit("--layout hybrid runs Sequential Reptile on an even number of ranks")
        mesh = init_device_mesh(device.type, (2, world // 2), mesh_dim_names=("replicate", "shard"))
        replica, shard = mesh.get_coordinate()
        shards, sub = world // 2, mesh["shard"]
        options = {"local_trajectories": True, "process_group": mesh.get_group("replicate")}
    else:
        replica, shard, shards, sub = 0, dist.get_rank(), world, None
    for block in (model.enc, *model.heads.values(), model):
        fully_shard(block, mesh=sub)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if args.method == "PCGrad":
        opt: metaopt.MultiTaskOptimizer = metaopt.PCGrad(inner, tasks=TASKS, seed=0)
    else:
        opt = metaopt.SequentialReptile(
            inner,
            tasks=TASKS,
            inner_steps=args.inner_steps,
            outer_lr=0.5,
            seed=0,
            allow_unused=True,
            **options,
        )
    if args.checkpoint and os.path.exists(args.checkpoint):
        dcp.load({"app": AppState(model, opt)}, checkpoint_id=args.checkpoint)
    start = opt.step_count

    def share(xy: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = slice(shard * len(xy[0]) // shards, (shard + 1) * len(xy[0]) // shards)
        return xy[0][rows], xy[1][rows]

    for step in range(start, args.steps):
        losses = {}
        for t in opt.next_tasks():
            x, y = share(batch(t, replica, step, device))
            losses[t] = torch.nn.functional.mse_loss(model(x, t), y)
        opt.step(losses)
        if args.checkpoint and (step + 1) % args.inner_steps == 0:
            dcp.save({"app": AppState(model, opt)}, checkpoint_id=args.checkpoint)
    held_out = {}
    # evaluate at φ; under FSDP2 use_slow_weights needs the model (to drop its gathered copies)
    at_phi = opt.use_slow_weights(model) if isinstance(opt, metaopt.SlowFastOptimizer) else nullcontext()
    with torch.no_grad(), at_phi:
        for t in TASKS:
            x, y = share(batch(t, 99, 10_000, device))
            held_out[t] = torch.nn.functional.mse_loss(model(x, t), y).item()
    if dist.get_rank() == 0:
        print(
            f"{args.method} {args.layout}: {world} ranks ({dist.get_backend()}), steps {start} to "
            f"{opt.step_count}; held-out loss on rank 0's share "
            + ", ".join(f"{t} {v:.4f}" for t, v in held_out.items())
        )
    dist.destroy_process_group()
    return held_out


if __name__ == "__main__":
    main()
