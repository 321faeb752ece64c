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
from metaopt.parts.placement import local_tensor as local  # noqa: E402

from _spawn import leave  # noqa: E402
from _stacks import (  # noqa: E402
    METHODS,
    TASKS,
    Net,
    backward_the_torch_way,
    batch,
    loss_of,
    make_opt,
)

# tensor parallelism: the methods that equal one process, and those refused when built
TP_SUPPORTED = ["sequential_reptile", "reptile", "sequential_reptile_nesterov", "mtl", "gradnorm"]
TP_REFUSED = [m for m in METHODS if m not in TP_SUPPORTED]
# FSDP1 (use_orig_params): the torch way of the Reptile family equals one process
# (loss.backward()); the per-task methods are refused when built
# (loss.backward()); MTL's backward(losses) and every one loop refused at the step (autograd
# reaches FSDP1's flat parameters, not the optimizer's)
FSDP1_SUPPORTED = ["sequential_reptile", "reptile", "sequential_reptile_nesterov"]
FSDP1_REFUSED = [m for m in METHODS if m not in FSDP1_SUPPORTED and m != "mtl"]

__all__ = ["STEPS", "build", "run"]


def method(name: str) -> str:
    """The method a name of :func:`build` trains with (how the torch way backpropagates)."""
    return name.removesuffix("_nesterov").removesuffix("_host")


def build(name: str, model: Net) -> metaopt.MultiTaskOptimizer:
    """``_stacks.make_opt``, Sequential Reptile with DiLoCo's outer Nesterov step, and with its
    state in host memory (``state_device="cpu"``: each rank's shard streamed at the outer
    step)."""
    if name == "sequential_reptile_host":
        return metaopt.SequentialReptile(
            torch.optim.Adam(model.parameters(), lr=0.05),
            tasks=TASKS,
            inner_steps=3,
            outer_lr=0.5,
            allow_unused=True,
            state_device="cpu",
        )
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
        train_steps(method(name), recipe, opt, model, rank)
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


def _gathered(model: torch.nn.Module) -> list[torch.Tensor]:
    """The whole parameters: DTensors gathered, FSDP1's summoned."""
    if any(getattr(p, "_fsdp_flattened", False) for p in model.parameters()):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model):
            return [p.detach().clone() for p in model.parameters()]
    return [p.full_tensor() for p in model.parameters()]


def nan_in_one_shard(rank: int, name: str, model=None, part=half, skip: bool = False) -> dict:
    """A backward, then a NaN written into rank 1's shard of the encoder's gradient: every rank
    must refuse the step (``skip``: skip it on the device, as on a GPU), with nothing moved.
    FSDP2 (default), or ``model`` under another engine (``part``: a rank's batch of a step and
    task)."""
    model = sharded_net() if model is None else model
    opt = build(name, model)
    if skip:
        opt.nonfinite = "skip"
    backward_the_torch_way(
        method(name),
        opt,
        {t: loss_of(model, t, part(0, t, rank), reduction="mean") for t in opt.next_tasks()},
    )
    before = _gathered(model)
    if rank == 1:
        local(model.enc.weight.grad).view(-1)[0] = float("nan")
    finite = None
    try:
        report = opt.step()
        refused = None
        finite = None if report.finite is None else bool(report.finite)
    except ValueError as err:
        refused = str(err)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, _gathered(model)))
    return {
        "refused": refused,
        "unchanged": unchanged,
        "steps": opt.step_count,
        "finite": finite,
        "skipped": opt.skipped_steps,
    }


def whole(step: int, task: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's batch under tensor parallelism: the whole one."""
    return batch(step, task)


def tp_net() -> Net:
    """The shared model under tensor parallelism (Megatron's pairing): the encoder's output
    features split over the ranks (``ColwiseParallel``), each head's input features likewise
    (``RowwiseParallel``, its bias replicated and its output summed over the ranks). Every rank
    runs the whole batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = Net()
    plan = {"enc": ColwiseParallel(), **{f"heads.{t}": RowwiseParallel() for t in TASKS}}
    return parallelize_module(model, init_device_mesh("cpu", (dist.get_world_size(),)), plan)


def tensor_parallel(rank: int, names: list[str], refused: list[str]) -> dict:
    """The methods that combine per-parameter placements (the Reptile family, MTL, GradNorm
    over MTL) trained the torch way and through the one loop, each rank on the whole batch;
    the per-task gradient methods refused when built; a NaN in rank 1's shard of the encoder's
    gradient refused on every rank, with nothing moved."""
    out: dict = {}
    for name in names:
        for recipe in ("one_loop", "torch"):
            model = tp_net()
            train_steps(method(name), recipe, build(name, model), model, rank, part=whole)
            out[("tp", name, recipe)] = [p.full_tensor() for p in model.parameters()]
        out[("tp_nan", name)] = nan_in_one_shard(rank, name, tp_net(), whole)
    for name in refused:
        try:
            build(name, tp_net())
            out[("tp_refused", name)] = None
        except ValueError as err:
            out[("tp_refused", name)] = str(err)
    return out


def fsdp1_net() -> torch.nn.Module:
    """The shared model under FSDP1 (``use_orig_params``, on the CPU): the encoder and each head
    their own unit, then the root. (With the root's one unit only, every parameter is a view of
    one flat parameter whose gradient is zero, not ``None``, where no loss reached it, so that
    an inner Adam moves the idle heads on its momentum, which one process does not.)"""
    from _hybrid_worker import fsdp1

    model = Net()
    model.enc = fsdp1(model.enc, None)
    for t in TASKS:
        model.heads[t] = fsdp1(model.heads[t], None)
    return fsdp1(model, None)


def fsdp1_cases(rank: int, names: list[str], refused: list[str]) -> dict:
    """The Reptile family the torch way, each rank on its half of every batch (gathered with
    ``summon_full_params``); the one loop (and MTL's, which backpropagates through it) refused
    at the step; the per-task gradient methods refused when built; a NaN in one rank's shard
    of a gradient refused on every rank."""
    out: dict = {}
    for name in [*names, "mtl"]:
        model = fsdp1_net()
        opt = build(name, model)
        try:
            opt.step({t: loss_of(model, t, half(0, t, rank), reduction="mean") for t in opt.next_tasks()})
            out[("fsdp1_one_loop", name)] = None
        except ValueError as err:
            out[("fsdp1_one_loop", name)] = (str(err), opt.step_count)
    for name in names:
        model = fsdp1_net()
        opt = build(name, model)
        train_steps(method(name), "torch", opt, model, rank)
        out[("fsdp1", name)] = _gathered(model)
    for name in names:  # a NaN in rank 1's shard of the encoder's gradient
        out[("fsdp1_nan", name)] = nan_in_one_shard(rank, name, fsdp1_net())
    out["fsdp1_frozen_shard"] = fsdp1_frozen_shard(rank)
    out["fsdp1_local"] = fsdp1_on_rank_0_only(rank)
    for name in refused:
        try:
            build(name, fsdp1_net())
            out[("fsdp1_refused", name)] = None
        except ValueError as err:
            out[("fsdp1_refused", name)] = str(err)
    return out


def frozen_encoder_sr(model: torch.nn.Module) -> metaopt.SequentialReptile:
    """Sequential Reptile over plain SGD (an idle head's zero gradient moves nothing)."""
    return metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.05),
        tasks=TASKS,
        inner_steps=2,
        outer_lr=0.5,
        allow_unused=True,
    )


def fsdp1_frozen_shard(rank: int) -> list[torch.Tensor]:
    """FSDP1 with one unit, the encoder frozen: its 30 elements fill rank 0's shard of the 51,
    so that rank 0 holds no trainable element and has no gradient of its own. Every rank must
    step (the "no gradient" decision is agreed), as one process does."""
    from _hybrid_worker import fsdp1

    net = Net()
    net.enc.requires_grad_(False)
    model = fsdp1(net, None)
    opt = frozen_encoder_sr(model)
    for s in range(5):
        (t,) = opt.next_tasks()
        loss_of(model, t, half(s, t, rank), reduction="mean").backward()
        opt.step()
        opt.zero_grad()
    return _gathered(model)


def fsdp1_on_rank_0_only(rank: int) -> int | None:
    """FSDP1 over a group of rank 0 alone, its optimizer built with process_group="local": its
    steps join no collective of the other ranks (which do not step)."""
    from _hybrid_worker import fsdp1

    group = dist.new_group([0])  # every rank takes part in creating it
    if rank != 0:
        return None
    model = fsdp1(Net(), group)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.05),
        tasks=TASKS,
        inner_steps=2,
        allow_unused=True,
        process_group="local",
    )
    for s in range(3):
        (t,) = opt.next_tasks()
        loss_of(model, t, batch(s, t), reduction="mean").backward()
        opt.step()
        opt.zero_grad()
    return opt.step_count


def run(rank: int, runs: list[tuple[str, str]], nan_runs: list[str], store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        results: dict = {(name, recipe): train(rank, name, recipe) for name, recipe in runs}
        results.update({("nan", name): nan_in_one_shard(rank, name) for name in nan_runs})
        results.update({("nan_skip", name): nan_in_one_shard(rank, name, skip=True) for name in nan_runs})
        results.update(review_cases(rank))
        results.update(tensor_parallel(rank, TP_SUPPORTED, TP_REFUSED))
        results.update(fsdp1_cases(rank, FSDP1_SUPPORTED, FSDP1_REFUSED))
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    leave(0)


# ---------------------------------------------------------------- cases found by review
def inf_loss_on_one_rank(rank: int, name: str) -> dict:
    """Rank 1's first loss is +inf (a detached constant: its gradients stay finite). Every rank
    must refuse the step, with nothing moved, or the ranks would go on out of step."""
    model = sharded_net()
    opt = build(name, model)
    losses = {t: loss_of(model, t, half(0, t, rank), reduction="mean") for t in opt.next_tasks()}
    if rank == 1:
        first = next(iter(losses))
        losses[first] = losses[first] + float("inf")
    before = [p.full_tensor() for p in model.parameters()]
    try:
        opt.step(losses)
        refused = None
    except ValueError as err:
        refused = str(err)
    unchanged = all(torch.equal(a, p.full_tensor()) for a, p in zip(before, model.parameters()))
    return {"refused": refused, "unchanged": unchanged, "steps": opt.step_count}


def slow_eval(model: Net, rank: int, world: int) -> dict:
    """Reptile mid-trajectory, evaluated on the fast weights, then on the slow weights, then on
    the fast weights again, and trained on: with FSDP2 on the root module only, whose gathered
    parameters FSDP2 keeps after a forward without backward."""
    opt = metaopt.Reptile(
        torch.optim.SGD(model.parameters(), lr=0.1),
        tasks=TASKS,
        inner_steps=3,
        outer_lr=0.5,
        allow_unused=True,
    )
    x = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(2, 4)
    out: dict = {}
    for s in range(5):
        (t,) = opt.next_tasks()
        xy = half(s, t, rank) if world > 1 else _whole(s, t)
        opt.step({t: loss_of(model, t, xy, reduction="mean")})
        if s == 1:
            with torch.no_grad():
                out["fast_before"] = model(x, "a").clone()
                with opt.use_slow_weights(model):
                    out["slow"] = model(x, "a").clone()
                out["fast_after"] = model(x, "a").clone()
    out["params"] = [
        p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()
    ]
    return out


def _whole(step: int, task: str):
    from _stacks import batch

    return batch(step, task)


class SharedNet(Net):
    """``Net`` whose ``forward(x)`` (no task) runs the encoder once and every head on it, so
    that the tasks' losses share the encoder's graph (through the root module's forward, as
    FSDP2 needs)."""

    def forward(self, x: torch.Tensor, task: str | None = None):  # type: ignore[override]
        if task is not None:
            return super().forward(x, task)
        h = torch.tanh(self.enc(x))
        return [self.heads[t](h) for t in TASKS]


def shared_forward_losses(model: Net, step: int, rank: int, world: int) -> dict:
    """One encoder forward feeding every head: the losses share the encoder's graph."""
    x, _ = half(step, "a", rank) if world > 1 else _whole(step, "a")
    out = {}
    for t, o in zip(TASKS, model(x)):
        y = x @ (torch.arange(1.0, 5.0, dtype=x.dtype).reshape(4, 1) * (TASKS.index(t) - 1)) + 0.3
        out[t] = (o - y).pow(2).mean()
    return out


def shared_forward(model: Net, rank: int, world: int, retain_graph: bool) -> list[torch.Tensor]:
    opt = metaopt.PCGrad(
        torch.optim.Adam(model.parameters(), lr=0.05), tasks=TASKS, retain_graph=retain_graph
    )
    for s in range(3):
        opt.step(shared_forward_losses(model, s, rank, world))
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]


def review_cases(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    out: dict = {
        ("inf_loss", n): inf_loss_on_one_rank(rank, n) for n in ("mtl", "sequential_reptile", "pcgrad")
    }
    root_only = Net()
    fully_shard(root_only)
    out["slow_eval"] = slow_eval(root_only, rank, 2)
    model = sharded_net()
    opt = build("reptile", model)
    try:
        with opt.use_slow_weights():
            pass
        out["slow_without_model"] = None
    except ValueError as err:
        out["slow_without_model"] = str(err)
    shared = SharedNet()
    fully_shard(shared)
    out["shared_forward"] = shared_forward(shared, rank, 2, retain_graph=False)
    try:
        metaopt.save_distributed_checkpoint(
            os.path.join(os.devnull, "never.ckpt"), {"optimizer": opt.state_dict()}
        )
        out["rank0_checkpoint"] = None
    except ValueError as err:
        out["rank0_checkpoint"] = str(err)
    try:
        metaopt.SequentialReptile(
            torch.optim.SGD(sharded_net().parameters(), lr=0.1), tasks=TASKS, local_trajectories=True
        )
        out["local_trajectories"] = None
    except ValueError as err:
        out["local_trajectories"] = str(err)
    return out
