"""Benchmark: the memory metaopt's own state takes per rank, in every distributed mode.

Measured, not computed: each rank runs a few steps of a small MLP (P parameters), then every
tensor reachable from the metaopt optimizer is collected (unique storages, so views count once)
except the model's parameters, their gradients and the wrapped torch optimizer's state, which
the same training holds without metaopt. The bytes are printed per parameter of the model, per rank (so
that they extrapolate: the state is linear in P), for fp32 and bf16 parameters, and then
extrapolated to a 7B-parameter model on 8 GPUs. Host placement (``state_device="cpu"``) is
counted apart: those buffers live in host memory.

Modes (2 gloo ranks on CPU, 4 for the hybrid layout):

* one process; DDP (every rank a whole replica); local trajectories (one trajectory per rank);
* FSDP2 (``fully_shard`` over both ranks: each holds half of every parameter);
* hybrid (4 ranks: FSDP2 over 2 shards within each of 2 replicas, local trajectories across).

Methods: Sequential Reptile (plain interpolation), Sequential Reptile with 2 trajectories per
outer step (its trajectory mean), Sequential Reptile with its state in host memory, PCGrad with
T = 3 tasks.

Run::

    python benchmarks/memory.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metaopt  # noqa: E402

TASKS = ["a", "b", "c"]
WIDTH = 256


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = torch.nn.Sequential(
            torch.nn.Linear(64, WIDTH), torch.nn.Tanh(), torch.nn.Linear(WIDTH, WIDTH)
        )
        self.head = torch.nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.enc(x)))


def _storages(value: Any, seen: set[int], out: dict[int, int], depth: int = 0) -> None:
    """Every tensor storage reachable from ``value`` (objects, containers), bytes by address."""
    if depth > 12 or id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        local = getattr(value, "_local_tensor", value)  # a DTensor: its shard
        if local.device.type != "meta" and local.numel():
            storage = local.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
        return
    if isinstance(value, dict):
        for v in value.values():
            _storages(v, seen, out, depth + 1)
    elif isinstance(value, (list, tuple, set)):
        for v in value:
            _storages(v, seen, out, depth + 1)
    elif hasattr(value, "__dict__") and not isinstance(value, (type, torch.nn.Module)):
        if isinstance(value, torch.optim.Optimizer) and not isinstance(value, metaopt.MultiTaskOptimizer):
            # a torch optimizer metaopt owns (an outer optimizer): its state is metaopt's
            _storages(value.state, seen, out, depth + 1)
            return
        _storages(vars(value), seen, out, depth + 1)


def metaopt_bytes(opt: metaopt.MultiTaskOptimizer, model: torch.nn.Module) -> tuple[int, int]:
    """Bytes of the tensors the metaopt optimizer holds beyond the parameters, their
    gradients and the wrapped optimizer's own state: (beside the parameters, in host memory).
    Host memory: the buffers of the slow weights, the trajectory mean and the outer optimizer
    under ``state_device="cpu"`` (on this CPU-only machine both are the CPU; the split is by
    where metaopt places each buffer)."""
    excluded: dict[int, int] = {}
    seen: set[int] = set()
    for p in model.parameters():
        _storages(p, seen, excluded)
        if p.grad is not None:
            _storages(p.grad, seen, excluded)
    _storages(opt.base_optimizer.state, seen, excluded)
    held: dict[int, int] = {}
    _storages(vars(opt), set(map(id, (opt.base_optimizer, model))), held)
    host: dict[int, int] = {}
    engine = getattr(opt, "engine", None)
    if engine is not None and engine.state_device is not None:
        _storages(engine, set(), host)
        if opt.outer_step.optimizer is not None:
            _storages(opt.outer_step.optimizer.state, set(), host)
    mine = {k: v for k, v in held.items() if k not in excluded}
    return sum(v for k, v in mine.items() if k not in host), sum(v for k, v in mine.items() if k in host)


def build(method: str, model: torch.nn.Module, **options: Any) -> metaopt.MultiTaskOptimizer:
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if method == "PCGrad":
        return metaopt.PCGrad(inner, tasks=TASKS, seed=0)
    n = 2 if method == "SR, 2 trajectories" else 1
    if method == "SR, host":
        options = {**options, "state_device": "cpu"}
    return metaopt.SequentialReptile(
        inner, tasks=TASKS, inner_steps=3, tasks_per_outer_step=n, outer_lr=0.5, seed=0, **options
    )


def train(opt: metaopt.MultiTaskOptimizer, model: torch.nn.Module, steps: int = 4) -> None:
    g = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    for _ in range(steps):
        dtype = next(model.parameters()).dtype
        x = torch.randn(16, 64, generator=g).to(dtype)
        losses = {t: model(x).pow(2).mean() for t in opt.next_tasks()}
        opt.step(losses)


METHODS = ["SR", "SR, 2 trajectories", "SR, host", "PCGrad"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure(mode: str) -> dict[tuple[str, str], tuple[float, float]]:
    """Bytes per parameter (this rank's bytes / P) that metaopt holds, per dtype and method:
    (beside the parameters, in host memory)."""
    P = sum(p.numel() for p in Model().parameters())
    out = {}
    for (dname, dtype), method in [(d, m) for d in DTYPES.items() for m in METHODS]:
        model = Model().to(dtype)
        options: dict[str, Any] = {}
        if mode == "ddp":
            forward: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(model)
        else:
            forward = model
        if mode in ("fsdp2", "hybrid"):
            from torch.distributed.fsdp import fully_shard

            mesh = None
            if mode == "hybrid":
                from torch.distributed.device_mesh import init_device_mesh

                mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
                mesh = mesh2["shard"]
                options = {"local_trajectories": True, "process_group": mesh2.get_group("replicate")}
            for block in (model.enc, model.head, model):
                fully_shard(block, mesh=mesh)
        if mode == "local":
            options = {"local_trajectories": True}
        if method in ("PCGrad", "SR, host") and options:
            # local trajectories are a Reptile-family option, and not with host placement
            out[(dname, method)] = (float("nan"), float("nan"))
            continue
        opt = build(method, model, **options)
        train(opt, forward)
        device, host = metaopt_bytes(opt, model)
        out[(dname, method)] = (device / P, host / P)
    return out


def _rank(rank: int, world: int, mode: str, store: str, result: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=store, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        if rank == 0:
            torch.save(measure(mode), result)
        else:
            measure(mode)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def run_mode(mode: str) -> dict[tuple[str, str], tuple[float, float]]:
    if mode == "one process":
        return measure(mode)
    world = 4 if mode == "hybrid" else 2
    with tempfile.TemporaryDirectory() as d:
        store, result = "file://" + os.path.join(d, "store"), os.path.join(d, "result.pt")
        mp.start_processes(_rank, args=(world, mode, store, result), nprocs=world, start_method="spawn")
        return torch.load(result, weights_only=True)


def _cell(device: float, host: float, scale: float = 1.0) -> str:
    if device != device:
        return "n/a"
    out = f"{device * scale:.3f}" if scale == 1.0 else f"{device * scale:.1f}"
    if host:
        out += f" (+{host * scale:.3f} host)" if scale == 1.0 else f" (+{host * scale:.1f} host)"
    return out


def main() -> None:
    modes = ["one process", "ddp", "local", "fsdp2", "hybrid"]
    table = {mode: run_mode(mode) for mode in modes}
    P = sum(p.numel() for p in Model().parameters())
    ranks = {"one process": 1, "ddp": 2, "local": 2, "fsdp2": 2, "hybrid": 4}
    print(f"# metaopt's own state per rank, bytes per parameter (P = {P:,}), measured")
    print(f"# torch {torch.__version__}; beside the parameters, (+ in host memory)")
    for dname in DTYPES:
        print(f"\n## {dname} parameters")
        print("| mode | ranks | " + " | ".join(METHODS) + " |")
        print("|---|---|" + "---|" * len(METHODS))
        for mode, row in table.items():
            cells = [_cell(*row[(dname, m)]) for m in METHODS]
            print(f"| {mode} | {ranks[mode]} | " + " | ".join(cells) + " |")
    print(
        "\n# extrapolated: 7B parameters on 8 GPUs (FSDP2 over 8; hybrid 2 replicas x 4 shards), "
        "GB per GPU (+ GB of host memory per GPU)"
    )
    scale = {"one process": 1, "ddp": 1, "local": 1, "fsdp2": 8 / ranks["fsdp2"], "hybrid": 4 / 2}
    for dname in DTYPES:
        print(f"\n## {dname} parameters")
        print("| mode | " + " | ".join(METHODS) + " |")
        print("|---|" + "---|" * len(METHODS))
        for mode, row in table.items():
            # the measured bytes per parameter on a rank, scaled from this run's shards to 8 GPUs'
            cells = [_cell(*row[(dname, m)], scale=7e9 / 1e9 / scale[mode]) for m in METHODS]
            print(f"| {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
