"""One rank of the hybrid test (test_hybrid.py): 4 ranks on a 2 x 2 DeviceMesh, FSDP2 sharding
the model over the "shard" dimension within each replica (FSDP1 too), and Sequential Reptile's local
trajectories across the "replicate" dimension: one trajectory per replica, each replica's two
ranks splitting its batch. Saves the drawn tasks and the gathered parameters."""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

import _local_worker as w  # noqa: E402

import metaopt  # noqa: E402

from _spawn import leave  # noqa: E402
from _stacks import Net, loss_of  # noqa: E402


def _half(xy: tuple[torch.Tensor, torch.Tensor], shard: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = xy
    rows = slice(shard * len(x) // 2, (shard + 1) * len(x) // 2)
    return x[rows], y[rows]


def fsdp1(module: torch.nn.Module, group) -> torch.nn.Module:
    """FSDP1 over ``group``, keeping the original parameters (``use_orig_params``), on the CPU."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(
        module, process_group=group, use_orig_params=True, device_id=torch.device("cpu")
    )


def hybrid(rank: int, kind: str, engine: str = "fsdp2") -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    replica, shard = mesh.get_coordinate()
    model = Net()
    if engine == "fsdp1":  # each module its own unit, as FSDP2 below
        group = mesh.get_group("shard")
        model.enc = fsdp1(model.enc, group)
        for t in list(model.heads):
            model.heads[t] = fsdp1(model.heads[t], group)
        model = fsdp1(model, group)
    else:
        fully_shard(model.enc, mesh=mesh["shard"])
        for head in model.heads.values():
            fully_shard(head, mesh=mesh["shard"])
        fully_shard(model, mesh=mesh["shard"])
    opt = w.build(kind, model, process_group=mesh.get_group("replicate"))
    drawn = []
    for s in range(w.STEPS):
        (task,) = opt.next_tasks()
        drawn.append(task)
        # the replica's batch, split over its two ranks; FSDP2 averages the two halves' gradients,
        # so each half's summed loss counts twice: the replica computes its whole batch's
        loss = 2 * loss_of(model, task, _half(w.rank_batch(replica, s, task), shard))
        loss.backward()
        opt.step()
        opt.zero_grad()
    if engine == "fsdp1":
        with FullyShardedDataParallel.summon_full_params(model):
            params = [p.detach().clone() for p in model.parameters()]
    else:
        params = [p.full_tensor() for p in model.parameters()]
    return {"replica": replica, "tasks": drawn, "outer": opt.outer_step_count, "params": params}


def refusals() -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    out = {}
    for label, group in (("no group", None), ("whole world", dist.group.WORLD), ("shard group", "shard")):
        model = Net()
        fully_shard(model, mesh=mesh["shard"])
        try:
            metaopt.SequentialReptile(
                torch.optim.SGD(model.parameters(), lr=0.1),
                tasks=["a", "b", "c"],
                local_trajectories=True,
                process_group=mesh.get_group("shard") if group == "shard" else group,
            )
            out[label] = None
        except ValueError as err:
            out[label] = str(err)
    return out


def run(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=4, timeout=timedelta(seconds=60))
    try:
        results = {kind: hybrid(rank, kind) for kind in ("equivalence", "diloco")}
        results["fsdp1"] = hybrid(rank, "equivalence", "fsdp1")
        results["refusals"] = refusals()
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    leave(0)
