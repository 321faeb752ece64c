"""One rank of the two-process Hugging Face Trainer test (test_hf_trainer.py): the example's
recipe (examples/hf_trainer.py) on 2 CPU processes (gloo, the Trainer wrapping the model in
DDP), trained uninterrupted with a checkpoint mid-trajectory, then resumed from it into a
freshly built model and optimizer. Saves the parameters, the slow weights, the counters and the
task and size of every batch each rank trained on."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import hf_trainer  # noqa: E402

from _spawn import leave  # noqa: E402

WORLD = 2
STEPS, SAVE = 10, 6  # K = 5: the checkpoint falls mid-trajectory
SPLIT = {"accelerator_config": {"split_batches": True}}  # every process gets part of the step's batch


def _train(out: str, seen: list, arguments: dict, resume: str | None = None) -> dict:
    original = hf_trainer.MultiHeadBert.forward

    def recording(self, input_ids, attention_mask, labels, task_id):  # the same signature
        seen.append((int(task_id[0]), len(task_id)))
        return original(self, input_ids, attention_mask, labels, task_id)

    hf_trainer.MultiHeadBert.forward = recording
    try:
        trainer, model, opt = hf_trainer.make_trainer(
            out, STEPS, save_steps=SAVE, ddp_backend="gloo", **arguments
        )
        trainer.train(resume_from_checkpoint=resume)
    finally:
        hf_trainer.MultiHeadBert.forward = original
    return {
        "counts": (opt.step_count, opt.clock, opt.outer_step_count),
        "params": [p.detach().clone() for p in model.parameters()],
        "slow": [w.clone() for w in opt.slow_weights],
    }


def run(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    # what a launcher (torchrun, accelerate launch) sets; the Trainer reads them with use_cpu=True
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    os.environ.update(LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    dist.init_process_group(
        "gloo", init_method=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    seen: list = []
    uninterrupted = _train(out, seen, SPLIT)
    uninterrupted["seen"] = seen
    seen = []
    resumed = _train(out, seen, SPLIT, resume=os.path.join(out, f"checkpoint-{SAVE}"))
    resumed["seen"] = seen
    torch.save({"uninterrupted": uninterrupted, "resumed": resumed}, os.path.join(out, f"rank{rank}.pt"))

    # Accelerate's default for an iterable dataset, one batch per process at each step, would
    # give the processes the batches of different steps: process 0 (which draws them all)
    # refuses its first step. It then leaves; the other process, waiting for it in a
    # collective, sees the connection close (a launcher would stop it as well).
    try:
        _train(os.path.join(out, "unsplit"), [], {})
        refusal = None
    except RuntimeError as e:
        refusal = str(e)
    if rank == 0:
        torch.save(refusal, os.path.join(out, "refusal.pt"))
    leave(0)
