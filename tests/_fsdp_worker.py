"""One rank of the FSDP2 tests (test_fsdp.py): the shared model of ``_stacks`` sharded with
``fully_shard`` (the encoder, each head, then the root: every parameter a DTensor, a head's
one-row weight leaving rank 1 an empty shard), the optimizer built over its parameters as
usual, each rank on its half of every batch. Saves the gathered final parameters, and what a
step with a non-finite gradient in one rank's shard did on each rank."""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from _ddp_worker import STEPS, _CountingAllReduce, half, train_steps  # noqa: E402

import metaopt  # noqa: E402

from _spawn import leave  # noqa: E402
from _stacks import TASKS, Net, loss_of, make_opt  # noqa: E402

__all__ = ["STEPS", "build", "run"]


def build(name: str, model: Net) -> metaopt.MultiTaskOptimizer:
    """``_stacks.make_opt``, and Sequential Reptile with DiLoCo's outer Nesterov step."""
    if name == "sequential_reptile_nesterov":
        return metaopt.SequentialReptile(
            torch.optim.Adam(model.parameters(), lr=0.05),
            tasks=TASKS,
            inner_steps=3,
            outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.7, momentum=0.9, nesterov=True),
            allow_unused=True,
        )
    return make_opt(name, model)


def sharded_net() -> Net:
    from torch.distributed.fsdp import fully_shard

    model = Net()
    fully_shard(model.enc)
    for head in model.heads.values():
        fully_shard(head)
    fully_shard(model)
    return model


def train(rank: int, name: str, recipe: str) -> dict:
    if name == "pcgrad_mixed":  # the encoder sharded, the heads left plain tensors
        from torch.distributed.fsdp import fully_shard

        model = Net()
        fully_shard(model.enc)
        try:
            make_opt("pcgrad", model)
        except ValueError as err:
            return {"error": str(err)}
        return {}
    model = sharded_net()
    counter = _CountingAllReduce()
    dist.all_reduce = counter
    try:
        opt = build(name, model)
        train_steps(name.removesuffix("_nesterov"), recipe, opt, model, rank)
    except ValueError as err:
        return {"error": str(err)}
    finally:
        dist.all_reduce = counter.real
    holder = opt.inner if getattr(opt, "inner", None) is not None else opt
    jacobian = getattr(holder, "_jacobian", None)
    return {
        "params": [p.full_tensor() for p in model.parameters()],
        "steps": opt.step_count,
        "all_reduce_calls": counter.calls,
        "all_reduce_elements": counter.elements,
        "local_elements": sum(p.to_local().numel() for p in model.parameters()),
        "jacobian_shape": None if jacobian is None else tuple(jacobian.shape),
    }


def nan_in_one_shard(rank: int, name: str) -> dict:
    """A backward, then a NaN written into rank 1's shard of the encoder's gradient: every rank
    must refuse the step, with nothing moved."""
    model = sharded_net()
    opt = build(name, model)
    losses = {t: loss_of(model, t, half(0, t, rank), reduction="mean") for t in opt.next_tasks()}
    if name in ("sequential_reptile", "reptile", "mtl"):
        sum(losses.values()).backward()
    else:
        opt.backward(losses)
    before = [p.full_tensor() for p in model.parameters()]
    if rank == 1:
        model.enc.weight.grad.to_local().view(-1)[0] = float("nan")
    try:
        opt.step()
        refused = None
    except ValueError as err:
        refused = str(err)
    unchanged = all(torch.equal(a, p.full_tensor()) for a, p in zip(before, model.parameters()))
    return {"refused": refused, "unchanged": unchanged, "steps": opt.step_count}


def run(rank: int, runs: list[tuple[str, str]], nan_runs: list[str], store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        results: dict = {(name, recipe): train(rank, name, recipe) for name, recipe in runs}
        results.update({("nan", name): nan_in_one_shard(rank, name) for name in nan_runs})
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    leave(0)
