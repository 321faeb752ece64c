"""One rank of the two-process Accelerate test (test_accelerate.py): ``Accelerator.prepare``
wraps the model in DDP, every method trains on the rank's half of each batch, and
``save_state`` / ``load_state`` (safetensors, Accelerate's default) resume it into a freshly
built model and optimizer. Saves the uninterrupted and the resumed run's parameters and
optimizer state."""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from _ddp_worker import WORLD, half  # noqa: E402

from _spawn import leave  # noqa: E402
from _stacks import REPTILE_FAMILY, Net, backward_the_torch_way, loss_of, make_opt, method_state  # noqa: E402

N, M = 5, 6  # saved after N steps (mid-trajectory for the Reptile family), then M more


def _build(name: str, seed: int):
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)  # Accelerate's state is a process-wide singleton
    GradientState._reset_state()
    handler = DistributedDataParallelKwargs(find_unused_parameters=name in REPTILE_FAMILY)
    acc = Accelerator(cpu=True, kwargs_handlers=[handler])
    model = Net(seed)
    opt = make_opt(name, model)
    pmodel, aopt = acc.prepare(model, opt)
    assert isinstance(pmodel, torch.nn.parallel.DistributedDataParallel)
    return acc, pmodel, aopt, opt


def _train(name: str, drive: str, model, aopt, opt, rank: int, steps: range) -> None:
    for s in steps:
        losses = {t: loss_of(model, t, half(s, t, rank), reduction="mean") for t in opt.next_tasks()}
        if drive == "one_loop":
            aopt.step(losses)
        else:
            backward_the_torch_way(name, opt, losses)
            aopt.step()
        aopt.zero_grad()


def _resume(name: str, drive: str, rank: int, directory: str) -> dict:
    acc, model, aopt, opt = _build(name, seed=0)
    _train(name, drive, model, aopt, opt, rank, range(N))
    acc.save_state(directory)
    clock = opt.clock
    _train(name, drive, model, aopt, opt, rank, range(N, N + M))
    uninterrupted = [p.detach().clone() for p in acc.unwrap_model(model).parameters()]
    uninterrupted_state = method_state(opt)

    acc2, model2, aopt2, opt2 = _build(name, seed=1)  # other initial values
    acc2.load_state(directory)
    loaded = opt2.clock
    _train(name, drive, model2, aopt2, opt2, rank, range(N, N + M))
    return {
        "clocks": (clock, loaded),
        "uninterrupted": uninterrupted,
        "uninterrupted_state": uninterrupted_state,
        "resumed": [p.detach().clone() for p in acc2.unwrap_model(model2).parameters()],
        "resumed_state": method_state(opt2),
    }


def run(rank: int, cases: list[tuple[str, str]], store: str, out: str) -> None:
    torch.set_num_threads(1)
    # what a launcher (torchrun, accelerate launch) sets; Accelerate reads them with cpu=True
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    os.environ.update(LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    dist.init_process_group(
        "gloo", init_method=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        results = {}
        for name, drive in cases:
            directory = os.path.join(out, f"state-{name}-{drive}")
            results[(name, drive)] = _resume(name, drive, rank, directory)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    leave(0)
