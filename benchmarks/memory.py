"""Benchmark: the memory metaopt's own state takes per rank, in every distributed mode.

Measured, not computed: each rank runs a few steps of a small MLP (P parameters), then every
tensor reachable from the metaopt optimizer is collected (unique storages, so views count once)
except the model's parameters, their gradients and the wrapped torch optimizer's state, which
the same training holds without metaopt. The bytes are printed as "elements of P" per rank (so
that they extrapolate: the state is linear in P), and then extrapolated to a 7B-parameter model
on 8 GPUs, fp32 and bf16 parameters (metaopt's slow weights are fp32 masters for both).

Modes (2 gloo ranks on CPU, 4 for the hybrid layout):

* one process; DDP (every rank a whole replica); local trajectories (one trajectory per rank);
* FSDP2 (``fully_shard`` over both ranks: each holds half of every parameter);
* hybrid (4 ranks: FSDP2 over 2 shards within each of 2 replicas, local trajectories across).

Methods: Sequential Reptile (plain interpolation), Sequential Reptile with 2 trajectories per
outer step (its trajectory mean), PCGrad with T = 3 tasks.

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


def metaopt_bytes(opt: metaopt.MultiTaskOptimizer, model: torch.nn.Module) -> int:
    """Bytes of the tensors the metaopt optimizer holds beyond the parameters, their
    gradients and the wrapped optimizer's own state."""
    excluded: dict[int, int] = {}
    seen: set[int] = set()
    for p in model.parameters():
        _storages(p, seen, excluded)
        if p.grad is not None:
            _storages(p.grad, seen, excluded)
    _storages(opt.base_optimizer.state, seen, excluded)
    held: dict[int, int] = {}
    _storages(vars(opt), set(map(id, (opt.base_optimizer, model))), held)
    return sum(v for k, v in held.items() if k not in excluded)


def build(method: str, model: torch.nn.Module, **options: Any) -> metaopt.MultiTaskOptimizer:
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if method == "PCGrad":
        return metaopt.PCGrad(inner, tasks=TASKS, seed=0)
    n = 2 if method == "SR, 2 trajectories" else 1
    return metaopt.SequentialReptile(
        inner, tasks=TASKS, inner_steps=3, tasks_per_outer_step=n, outer_lr=0.5, seed=0, **options
    )


def train(opt: metaopt.MultiTaskOptimizer, model: torch.nn.Module, steps: int = 4) -> None:
    g = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    for _ in range(steps):
        losses = {t: model(torch.randn(16, 64, generator=g)).pow(2).mean() for t in opt.next_tasks()}
        opt.step(losses)


METHODS = ["SR", "SR, 2 trajectories", "PCGrad"]


def measure(mode: str) -> dict[str, float]:
    """Elements of P (this rank's bytes / 4 / P) that metaopt holds, per method."""
    P = sum(p.numel() for p in Model().parameters())
    out = {}
    for method in METHODS:
        model = Model()
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
        if method == "PCGrad" and options:
            out[method] = float("nan")  # local trajectories are a Reptile-family option
            continue
        opt = build(method, model, **options)
        train(opt, forward)
        out[method] = metaopt_bytes(opt, model) / 4 / P
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


def run_mode(mode: str) -> dict[str, float]:
    if mode == "one process":
        return measure(mode)
    world = 4 if mode == "hybrid" else 2
    with tempfile.TemporaryDirectory() as d:
        store, result = "file://" + os.path.join(d, "store"), os.path.join(d, "result.pt")
        mp.start_processes(_rank, args=(world, mode, store, result), nprocs=world, start_method="spawn")
        return torch.load(result, weights_only=True)


def main() -> None:
    modes = ["one process", "ddp", "local", "fsdp2", "hybrid"]
    table = {mode: run_mode(mode) for mode in modes}
    P = sum(p.numel() for p in Model().parameters())
    print(f"# metaopt's own state per rank, in elements of P = {P:,} (fp32), measured")
    print(f"# torch {torch.__version__}")
    print("| mode | ranks | " + " | ".join(METHODS) + " |")
    print("|---|---|" + "---|" * len(METHODS))
    ranks = {"one process": 1, "ddp": 2, "local": 2, "fsdp2": 2, "hybrid": 4}
    for mode, row in table.items():
        cells = ["n/a" if v != v else f"{v:.3f}" for v in row.values()]
        print(f"| {mode} | {ranks[mode]} | " + " | ".join(cells) + " |")
    print(
        "\n# extrapolated: 7B parameters on 8 GPUs (FSDP2 over 8; hybrid 2 replicas x 4 shards), GB per GPU"
    )
    print("| mode | " + " | ".join(METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    scale = {"one process": 1, "ddp": 1, "local": 1, "fsdp2": 8 / ranks["fsdp2"], "hybrid": 4 / 2}
    for mode, row in table.items():
        # the measured factor per rank, scaled from this run's shard count to 8 GPUs'
        cells = ["n/a" if v != v else f"{v / scale[mode] * 7e9 * 4 / 1e9:.1f}" for v in row.values()]
        print(f"| {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
