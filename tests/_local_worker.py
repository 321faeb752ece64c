"""One rank of the local-trajectory tests (test_local_trajectories.py): the model is not wrapped
in DDP; each rank runs Sequential Reptile with ``local_trajectories=True`` on its own batches
(a function of the rank, the step and the task) and records what it drew and where it ended,
for the parent to compare with one process. Torch's local SGD (``PostLocalSGDOptimizer`` with
``PeriodicModelAverager``) runs here too, as the oracle for η = 1."""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

import metaopt  # noqa: E402

from _spawn import leave  # noqa: E402
from _stacks import TASKS, Net, batch, loss_of  # noqa: E402

K = 3  # inner steps per trajectory
OUTER = 3  # outer steps per run
STEPS = K * OUTER
SEED = 7


def rank_batch(rank: int, step: int, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch of ``task`` at inner step ``step`` (its own data)."""
    return batch(100_000 * (rank + 1) + step, task)


def adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.05)


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def nesterov(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


def build(kind: str, model: Net, **options: Any) -> metaopt.SlowFastOptimizer:
    inner = sgd if kind == "local_sgd" else adam
    if kind == "reptile":
        return metaopt.Reptile(
            inner(list(model.parameters())),
            tasks=TASKS,
            inner_steps=K,
            outer_lr=0.5,
            local_trajectories=True,
            allow_unused=True,
            seed=SEED,
            **options,
        )
    if kind == "local_sgd":
        options.setdefault("outer_lr", 1.0)
    elif kind == "diloco":
        options.setdefault("outer_optimizer", nesterov)
    else:
        options.setdefault("outer_lr", 0.5)
    return metaopt.SequentialReptile(
        inner(list(model.parameters())),
        tasks=TASKS,
        inner_steps=K,
        local_trajectories=True,
        allow_unused=True,
        seed=SEED,
        **options,
    )


def train(
    rank: int,
    model: torch.nn.Module,
    opt: metaopt.SlowFastOptimizer,
    recipe: str,
    steps: int = STEPS,
    after: Any = None,
) -> list[str]:
    drawn = []
    if recipe == "torch_zero":  # every parameter keeps a (zero) gradient: see local_sgd
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    for s in range(steps):
        (task,) = opt.next_tasks()
        drawn.append(task)
        dtype = next(model.parameters()).dtype
        loss = loss_of(model, task, tuple(t.to(dtype) for t in rank_batch(rank, s, task)))
        if recipe.startswith("torch"):
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=recipe == "torch")
        else:
            opt.step({task: loss})
        if after is not None:
            after(s)
    return drawn


def snapshot(model: torch.nn.Module, opt: metaopt.SlowFastOptimizer) -> dict[str, Any]:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "slow": [w.clone() for w in opt.slow_weights],
        "outer": opt.outer_step_count,
    }


def scenario(rank: int, world: int, name: str, options: dict[str, Any]) -> dict[str, Any]:
    recipe = options.pop("recipe", "one_loop")
    if name in ("equivalence", "diloco", "local_sgd", "reptile"):
        model = Net()
        opt = build(name, model, **options)
        out = {"tasks": train(rank, model, opt, recipe)} | snapshot(model, opt)
        if name == "local_sgd":  # the oracle: torch's local SGD, on the same tasks and batches
            from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
            from torch.distributed.optim import PostLocalSGDOptimizer

            oracle = Net()
            # PeriodicModelAverager averages after its step 0, K, 2K, ... once step >= warmup:
            # warmup K - 1 makes that after the K-th, 2K-th, ... optimizer step, as here. It
            # averages only the parameters that have a .grad (a collective whose size would
            # differ between ranks training different heads), so every parameter keeps a zero
            # gradient in both runs ("torch_zero").
            torch_opt = PostLocalSGDOptimizer(
                sgd(oracle.parameters()), PeriodicModelAverager(period=K, warmup_steps=K - 1)
            )
            for p in oracle.parameters():
                p.grad = torch.zeros_like(p)
            for s, task in enumerate(out["tasks"]):
                loss_of(oracle, task, rank_batch(rank, s, task)).backward()
                torch_opt.step()
                torch_opt.zero_grad(set_to_none=False)
            out["oracle"] = [p.detach().clone() for p in oracle.parameters()]
        return out
    if name == "sharded":  # each rank's trajectory sees one task only
        model = Net()
        opt = build(name, model, schedule=[TASKS[rank % len(TASKS)]])
        return {"tasks": train(rank, model, opt, recipe)} | snapshot(model, opt)
    if name == "ddp_wrapped":
        model = Net()
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = build(name, model)
        before = [p.detach().clone() for p in model.parameters()]
        (task,) = opt.next_tasks()
        loss_of(ddp, task, rank_batch(rank, 0, task)).backward()
        try:
            opt.step()
        except ValueError as err:
            moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
            return {"error": str(err), "moved": moved, "step_count": opt.step_count}
        return {"error": None}
    if name == "ddp_no_sync":  # DDP's gradient sync off for every inner step: as unwrapped
        model = Net()
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = build("equivalence", model)
        for s in range(STEPS):
            (task,) = opt.next_tasks()
            with ddp.no_sync():
                loss_of(ddp, task, rank_batch(rank, s, task)).backward()
            opt.step()
            opt.zero_grad()
        return snapshot(model, opt)
    if name == "bf16":
        model = Net(dtype=torch.bfloat16)
        opt = build("equivalence", model)
        train(rank, model, opt, recipe)
        return snapshot(model, opt) | {"dtypes": [str(w.dtype) for w in opt.slow_weights]}
    if name in ("other_options", "other_buckets", "same_stream"):
        model = Net()
        differ = {
            "other_options": {"outer_lr": 0.5 + 0.1 * rank},
            "other_buckets": {"bucket_elements": None if rank == 0 else 3},
        }
        opt = build("equivalence", model, **differ.get(name, {}))
        if name == "same_stream":  # every rank loads rank 0's state (its task stream too)
            state = [opt.state_dict()]
            dist.broadcast_object_list(state, src=0)
            opt.load_state_dict(state[0])
        before = [p.detach().clone() for p in model.parameters()]
        try:
            train(rank, model, opt, recipe, steps=1)
        except ValueError as err:
            moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
            return {"error": str(err), "step_count": opt.step_count, "moved": moved}
        return {"error": None}
    if name == "different_init":
        model = Net(seed=rank)
        opt = build(name, model)
        try:
            train(rank, model, opt, recipe, steps=1)
        except ValueError as err:
            return {"error": str(err), "step_count": opt.step_count}
        return {"error": None}
    if name == "verify":
        model = Net()
        opt = build(name, model, verify_ranks=True)

        def perturb(s: int) -> None:
            if s == K + 1 and rank == world - 1:  # something writes φ on one rank only
                opt.slow_weights[0].add_(1e-3)

        before: list[torch.Tensor] = []

        def perturb_then_snapshot(s: int) -> None:
            perturb(s)
            before[:] = [p.detach().clone() for p in model.parameters()]

        try:
            train(rank, model, opt, recipe, after=perturb_then_snapshot)
        except RuntimeError as err:
            moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
            return {
                "error": str(err),
                "outer": opt.outer_step_count,
                "moved": moved,
                "step_count": opt.step_count,
            }
        return {"error": None}
    if name == "composed":
        model = Net()
        pcgrad = metaopt.PCGrad(adam(list(model.parameters())), tasks=TASKS, seed=SEED, process_group="local")
        opt = metaopt.SequentialReptile(
            pcgrad, inner_steps=K, outer_lr=0.5, local_trajectories=True, seed=SEED
        )
        for s in range(STEPS):
            opt.step({t: loss_of(model, t, rank_batch(rank, s, t)) for t in opt.next_tasks()})
        out = snapshot(model, opt)
        try:
            metaopt.SequentialReptile(
                metaopt.PCGrad(adam(list(model.parameters())), tasks=TASKS),
                inner_steps=K,
                local_trajectories=True,
            )
            out["unwrapped_error"] = None
        except ValueError as err:
            out["unwrapped_error"] = str(err)
        return out
    raise KeyError(name)


def run(rank: int, world: int, runs: list[tuple[str, dict[str, Any]]], init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    results = []
    try:
        for name, options in runs:
            try:
                results.append(scenario(rank, world, name, dict(options)))
            except Exception:
                results.append({"crash": traceback.format_exc()})
    finally:
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()
    leave(0)
