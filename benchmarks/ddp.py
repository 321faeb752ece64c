"""Cost of averaging PCGrad's T per-task gradient rows over DDP ranks, against T DDP backward
passes.

Under DistributedDataParallel, PCGrad/GradVac/GradNorm average their T rows with one
all-reduce per backward pass (``metaopt/_distributed.py``). The alternative a user could write
is one DDP backward pass per task (DDP all-reducing each task's gradient in its buckets). On 2
gloo ranks (CPU), side by side in one run, rotating the order:

* communication only: one all-reduce of the (T, P) rows, against T all-reduces of P elements
  (DDP's 25 MB buckets, the volume T DDP backward passes send);
* a whole step: ``opt.backward(losses); opt.step()`` with PCGrad on the DDP model, against T
  DDP ``loss_t.backward()`` passes (keeping each task's gradient) and one AdamW step.

    python benchmarks/ddp.py                 # T = 9, P ~ 1.05M, 2 ranks, 1 thread each
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metaopt

from _timing import free_port, leave_rank, machine

BUCKET = 25 * 2**20 // 4  # DDP's default bucket, in float32 elements


class _Model(torch.nn.Module):
    """A shared encoder and T heads; ``forward(x, i)`` routes through head i."""

    def __init__(self, width: int, T: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh())
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, 1) for _ in range(T))

    def forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return self.heads[i](self.enc(x))


def _model(width: int, T: int) -> _Model:
    return _Model(width, T)


def _rank(rank: int, world: int, port: int, T: int, width: int, repeats: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    tasks = [f"t{i}" for i in range(T)]
    g = torch.Generator().manual_seed(rank)
    xs = [torch.randn(16, width, generator=g) for _ in range(T)]
    ys = [torch.randn(16, 1, generator=g) for _ in range(T)]
    P = width * width + width

    def loss(model: torch.nn.Module, i: int) -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(xs[i], i), ys[i])

    rows = torch.randn(T, P)
    flat = [torch.randn(P) for _ in range(T)]

    def one_collective() -> None:
        dist.all_reduce(rows)

    def t_collectives() -> None:
        for f in flat:
            for start in range(0, P, BUCKET):
                dist.all_reduce(f[start : start + BUCKET])

    m_pc = _model(width, T)
    ddp_pc = torch.nn.parallel.DistributedDataParallel(m_pc)
    opt = metaopt.PCGrad(
        torch.optim.AdamW(m_pc.parameters(), lr=1e-4), tasks=tasks, shared=m_pc.enc.parameters()
    )

    def pcgrad_step() -> None:
        opt.backward({t: loss(ddp_pc, i) for i, t in enumerate(tasks)})
        opt.step()
        opt.zero_grad()

    m_t = _model(width, T)
    ddp_t = torch.nn.parallel.DistributedDataParallel(m_t, find_unused_parameters=True)
    adamw = torch.optim.AdamW(m_t.parameters(), lr=1e-4)

    def t_backwards() -> None:
        kept = []
        for i in range(T):
            adamw.zero_grad()
            loss(ddp_t, i).backward()
            kept.append([p.grad.clone() for p in m_t.enc.parameters()])
        adamw.step()

    variants = {
        "one all-reduce of the T rows": one_collective,
        "T bucketed all-reduces (T DDP backwards' volume)": t_collectives,
        "PCGrad step on DDP (opt.backward + step)": pcgrad_step,
        "T DDP backward passes + AdamW step": t_backwards,
    }
    names = list(variants)
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            dist.barrier()
            t0 = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t0)
    if rank == 0:
        torch.save(times, out)
    dist.destroy_process_group()
    leave_rank()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=9)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=12)
    args = ap.parse_args()
    port = free_port()
    out = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"metaopt_ddp_{os.getpid()}.pt")
    mp.spawn(_rank, args=(2, port, args.tasks, args.width, args.repeats, out), nprocs=2, join=True)
    times = torch.load(out)
    os.remove(out)
    P = args.width * args.width + args.width
    print(
        f"2 gloo ranks on one machine, 1 thread each; T = {args.tasks}, shared P = {P:.3g}; "
        f"{args.repeats} rotated repeats"
    )
    print(f"machine: {machine()}")
    med = {n: statistics.median(v) for n, v in times.items()}
    for n, v in med.items():
        print(f"  {n:52s} {v * 1e3:9.2f} ms")
    names = list(med)
    for a, b in ((names[0], names[1]), (names[2], names[3])):
        ratio = statistics.median(x / y for x, y in zip(times[a], times[b]))
        print(f"  {a} / {b}: {ratio:.3f} (median of paired repeats)")


if __name__ == "__main__":
    main()
