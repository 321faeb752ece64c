"""Communication of Sequential Reptile on 2 gloo ranks: data-parallel (DDP) against local
trajectories, over the same inner steps, measured side by side in one run.

* DDP: the model wrapped in ``DistributedDataParallel`` (``find_unused_parameters=True``, as the
  Reptile family needs); every inner step all-reduces the whole gradient (counted by a DDP
  communication hook around torch's own ``allreduce_hook``).
* local trajectories: ``SequentialReptile(..., local_trajectories=True)`` on the bare model; one
  all-reduce of the packed fast weights per outer step (counted around
  ``torch.distributed.all_reduce``). Both check the ranks at the first step with one small
  ``all_gather`` of digests, reported apart.

Bytes are the payloads handed to the collectives (a ring all-reduce puts 2(W-1)/W times that
on each rank's link). The two runs alternate in rounds of one outer step each, so that load on
the machine hits both alike; wall time is the sum of each run's rounds, on rank 0, after a
barrier per round. The mean training loss of the last round is printed too: the two are
different algorithms (DDP averages gradients of W batches per step; local trajectories average
W trajectories per outer step), so this is a cost comparison, not a quality one.

Then the outer step alone, on a 2048 x 2048 layer (P ~ 4.2M): one all-reduce of the packed
buffer against buckets (``bucket_elements``) whose interpolation runs while the later buckets
are still in flight.

Last, the on-paper prediction of docs/scaling.md (arithmetic, no measurement).

    python benchmarks/local_trajectories.py              # 1,000 inner steps, K = 100, P ~ 0.53M
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metaopt

from _timing import free_port, leave_rank, machine

MODES = ("DDP (data-parallel)", "local trajectories")


class _Model(torch.nn.Module):
    """A shared two-layer encoder and T heads; ``forward(x, i)`` routes through head i."""

    def __init__(self, width: int, T: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = torch.nn.Sequential(
            torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, width), torch.nn.Tanh()
        )
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, 1) for _ in range(T))

    def forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return self.heads[i](self.enc(x))


class _Counter:
    """Payload bytes handed to collectives."""

    def __init__(self) -> None:
        self.bytes = 0  # all-reduce payloads
        self.calls = 0
        self.check_bytes = 0  # the first step's all_gather of digests


def _ddp_hook(state: _Counter, bucket: Any) -> Any:
    """torch's own all-reduce hook, counting the bucket's payload."""
    buf = bucket.buffer()
    state.bytes += buf.numel() * buf.element_size()
    state.calls += 1
    return default_hooks.allreduce_hook(None, bucket)


# DDP checks the hook's annotations as objects (this module's are strings)
_ddp_hook.__annotations__ = {
    "state": object,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    T = args.tasks
    tasks = [f"t{i}" for i in range(T)]
    g = torch.Generator().manual_seed(1 + rank)
    data = [
        (torch.randn(args.batch, args.width, generator=g), torch.randn(args.batch, 1, generator=g))
        for _ in range(T)
    ]

    def loss(model: torch.nn.Module, task: str) -> torch.Tensor:
        i = tasks.index(task)
        x, y = data[i]
        return torch.nn.functional.mse_loss(model(x, i), y)

    counters = {m: _Counter() for m in MODES}
    runs: dict[str, tuple[torch.nn.Module, metaopt.SequentialReptile]] = {}
    base = _Model(args.width, T)
    ddp = torch.nn.parallel.DistributedDataParallel(base, find_unused_parameters=True)
    ddp.register_comm_hook(counters[MODES[0]], _ddp_hook)
    runs[MODES[0]] = (
        ddp,
        metaopt.SequentialReptile(
            torch.optim.AdamW(base.parameters(), lr=1e-3),
            tasks=tasks,
            inner_steps=args.inner_steps,
            outer_lr=0.5,
            allow_unused=True,
            seed=0,
        ),
    )
    local = _Model(args.width, T)
    runs[MODES[1]] = (
        local,
        metaopt.SequentialReptile(
            torch.optim.AdamW(local.parameters(), lr=1e-3),
            tasks=tasks,
            inner_steps=args.inner_steps,
            outer_lr=0.5,
            allow_unused=True,
            seed=0,
            local_trajectories=True,
        ),
    )

    real_all_reduce, real_gather = dist.all_reduce, dist.all_gather
    active: list[_Counter] = []

    def all_reduce(tensor: torch.Tensor, *a: Any, **k: Any) -> Any:
        if active and active[0] is counters[MODES[1]]:  # DDP's hook counts its own
            active[0].bytes += tensor.numel() * tensor.element_size()
            active[0].calls += 1
        return real_all_reduce(tensor, *a, **k)

    def all_gather(out_list: list[torch.Tensor], tensor: torch.Tensor, *a: Any, **k: Any) -> Any:
        if active:
            active[0].check_bytes += tensor.numel() * tensor.element_size()
        return real_gather(out_list, tensor, *a, **k)

    dist.all_reduce, dist.all_gather = all_reduce, all_gather  # type: ignore[assignment]
    wall = {m: 0.0 for m in MODES}
    last: dict[str, list[float]] = {m: [] for m in MODES}
    rounds = args.steps // args.inner_steps
    for r in range(rounds):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for mode in order:
            model, opt = runs[mode]
            real_all_reduce(torch.zeros(1))  # a barrier that is not counted
            active.append(counters[mode])
            t0 = time.perf_counter()
            for _ in range(args.inner_steps):
                (task,) = opt.next_tasks()
                value = loss(model, task)
                value.backward()
                opt.step()
                opt.zero_grad()
                if r == rounds - 1:
                    last[mode].append(value.item())
            wall[mode] += time.perf_counter() - t0
            active.clear()
    dist.all_reduce, dist.all_gather = real_all_reduce, real_gather  # type: ignore[assignment]
    if rank == 0:
        P = sum(p.numel() for p in local.parameters())
        torch.save(
            {
                "wall": wall,
                "bytes": {m: c.bytes for m, c in counters.items()},
                "check": {m: c.check_bytes for m, c in counters.items()},
                "calls": {m: c.calls for m, c in counters.items()},
                "loss": {m: sum(v) / len(v) for m, v in last.items()},
                "P": P,
                "outer": runs[MODES[1]][1].outer_step_count,
            },
            out,
        )
    dist.destroy_process_group()
    leave_rank()


def _outer_rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    """The outer step alone (inner_steps=1, lr 0): one all-reduce against buckets whose
    interpolation overlaps the rest of the communication."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    variants = {"one all-reduce": None, "buckets of 2^20": 1 << 20, "buckets of 2^18": 1 << 18}
    runs = {}
    for name, bucket in variants.items():
        torch.manual_seed(0)
        model = torch.nn.Linear(args.outer_width, args.outer_width)
        opt = metaopt.SequentialReptile(
            torch.optim.SGD(model.parameters(), lr=0.0),
            tasks=["a"],
            inner_steps=1,
            outer_lr=0.5,
            local_trajectories=True,
            bucket_elements=bucket,
        )
        for p in model.parameters():
            p.grad = torch.full_like(p, 1.0 + rank)
        runs[name] = opt
    times: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    for r in range(args.repeats + 1):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            dist.barrier()
            t0 = time.perf_counter()
            runs[n].step()
            if r:  # the first round checks the ranks (one all_gather of digests): not timed
                times[n].append(time.perf_counter() - t0)
    if rank == 0:
        P = args.outer_width * (args.outer_width + 1)
        torch.save({"times": times, "P": P}, out)
    dist.destroy_process_group()
    leave_rank()


def predict() -> None:
    """docs/scaling.md's figures on paper: a ring all-reduce moves 2(W-1)/W of the payload
    through each rank's link; DDP does one per inner step, local trajectories one per outer
    step. Link rates are assumptions (leads from datasheets), not measurements."""
    P, W, bytes_per = 178e6, 8, 4  # mBERT-base, 8 GPUs, float32
    traffic = 2 * (W - 1) / W * P * bytes_per
    links = {"NVLink (360 GB/s)": 360e9, "100 Gb/s Ethernet (11.25 GB/s)": 11.25e9}
    print(f"on paper: P = 178M float32 on {W} ranks, {traffic / 1e9:.3f} GB per rank per all-reduce")
    for name, rate in links.items():
        one = traffic / rate
        print(
            f"  {name:32s} one all-reduce {one * 1e3:7.1f} ms; per outer step at K = 100: "
            f"DDP {100 * one:7.2f} s, local {one:.4f} s; at K = 1,000: DDP {1000 * one:7.1f} s, "
            f"local {one:.4f} s"
        )
    flops = 6 * 85e6 * 32 * 128  # non-embedding parameters x tokens
    print(
        f"  compute per inner step (batch 32 x 128 tokens): {flops / 1e12:.1f} TFLOP, "
        f"{flops / 400e12 * 1e3:.1f} ms at 400 TFLOP/s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000, help="inner steps per run")
    ap.add_argument("--inner-steps", type=int, default=100, help="K")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument(
        "--outer-width",
        type=int,
        default=2048,
        help="width of the linear layer timed alone in the outer-step comparison",
    )
    ap.add_argument("--repeats", type=int, default=15, help="rounds of the outer-step comparison")
    args = ap.parse_args()
    if args.steps % args.inner_steps:
        ap.error("--steps must be a multiple of --inner-steps")
    port = free_port()
    out = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"metaopt_local_{os.getpid()}.pt")
    mp.spawn(_rank, args=(2, port, args, out), nprocs=2, join=True)
    res = torch.load(out)
    os.remove(out)
    print(
        f"2 gloo ranks on one machine, {args.threads} thread(s) each; {args.steps} inner steps, "
        f"K = {args.inner_steps}, T = {args.tasks}, P = {res['P']:,} float32 parameters"
    )
    print(f"machine: {machine()}")
    for m in MODES:
        print(
            f"  {m:22s} {res['bytes'][m]:>14,d} bytes in {res['calls'][m]:5d} all-reduces "
            f"(+ {res['check'][m]} bytes checked at step 1)   {res['wall'][m]:7.2f} s   "
            f"last-round loss {res['loss'][m]:.4f}"
        )
    a, b = MODES
    print(f"  bytes  DDP / local: {res['bytes'][a] / res['bytes'][b]:.1f}x")
    print(f"  wall   DDP / local: {res['wall'][a] / res['wall'][b]:.2f}x")

    port = free_port()
    mp.spawn(_outer_rank, args=(2, port, args, out), nprocs=2, join=True)
    res = torch.load(out)
    os.remove(out)
    times = res["times"]
    print(
        f"outer step alone (all-reduce + interpolation), P = {res['P']:,}; median of "
        f"{args.repeats} rotated rounds:"
    )
    first = next(iter(times))
    for n, v in times.items():
        ratio = statistics.median(x / y for x, y in zip(v, times[first]))
        print(f"  {n:18s} {statistics.median(v) * 1e3:8.2f} ms   {ratio:.3f}x of {first} (paired)")
    predict()


if __name__ == "__main__":
    main()
