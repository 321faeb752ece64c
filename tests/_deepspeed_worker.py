"""One rank of the DeepSpeed test (test_deepspeed.py): the shared model handed to
``deepspeed.initialize`` with a metaopt optimizer, on 2 CPU ranks (gloo), each rank on its half
of every batch. ZeRO stage 0: Sequential Reptile driven through the engine
(``engine.backward(loss)``, ``engine.step()``), and PCGrad whose per-task losses are computed
through ``engine.module`` (DeepSpeed's engine refuses backward passes other than its own);
saves their parameters. Stages 1 to 3: saves what the first step raised."""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from _ddp_worker import STEPS, WORLD, half  # noqa: E402

from _spawn import leave  # noqa: E402
from _stacks import Net, loss_of, make_opt  # noqa: E402

CONFIG = {
    "train_batch_size": 8,
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "zero_allow_untested_optimizer": True,  # DeepSpeed tests its own list of optimizers only
    "gradient_clipping": 0.0,  # DeepSpeed 0.19's default is 1.0
    "steps_per_print": 10**9,
}


def _engine(name: str, stage: int):
    import deepspeed

    model = Net(dtype=torch.float32)
    opt = make_opt(name, model)
    config = {**CONFIG, "zero_optimization": {"stage": stage}}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine, opt


def _step(name: str, engine, opt, rank: int, s: int, through_engine: bool = False) -> None:
    wanted = opt.next_tasks()
    xy = {t: tuple(v.float() for v in half(s, t, rank)) for t in wanted}
    if name == "sequential_reptile":
        (t,) = wanted
        engine.backward(loss_of(engine, t, xy[t], reduction="mean"))
    else:
        forward = engine if through_engine else engine.module
        opt.backward({t: loss_of(forward, t, xy[t], reduction="mean") for t in wanted})
    engine.step()


def run(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD)
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group(
        "gloo", init_method=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    import deepspeed

    # DeepSpeed would JIT-compile a shared-memory all-reduce (g++, 80 s) for the CPU; gloo's serves
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    results: dict = {}
    for name in ("sequential_reptile", "pcgrad"):
        engine, opt = _engine(name, 0)
        for s in range(STEPS):
            _step(name, engine, opt, rank, s)
        results[(0, name)] = [p.detach().clone() for p in engine.module.parameters()]
    engine, opt = _engine("pcgrad", 0)
    try:
        _step("pcgrad", engine, opt, rank, 0, through_engine=True)
        results["through_engine"] = None
    except RuntimeError as err:
        results["through_engine"] = str(err)
    for stage in (1, 2, 3):
        for name in ("sequential_reptile", "pcgrad"):
            engine, opt = _engine(name, stage)
            try:
                _step(name, engine, opt, rank, 0)
                results[(stage, name)] = None
            except (TypeError, ValueError) as err:
                results[(stage, name)] = (type(err).__name__, str(err), opt.step_count, opt.clock)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()
    leave(0)
