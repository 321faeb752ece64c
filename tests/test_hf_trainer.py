"""Sequential Reptile through ``transformers.Trainer`` (examples/hf_trainer.py): the Trainer's
batches follow the schedule, and its final parameters equal a hand-written loop over the same
batches (loss.backward, clip, step, scheduler, zero_grad)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import hf_trainer  # noqa: E402

import metaopt  # noqa: E402

STEPS = 23  # not a multiple of K = 5: ends mid-trajectory


def _hand_written(steps: int, batch_size: int = 8, seed: int = 0):
    from transformers import default_data_collator

    model, opt, scheduler = hf_trainer.build(seed, steps)
    stream = metaopt.data.ScheduledTaskDataset(
        opt, hf_trainer.make_datasets(seed=seed), batch_size=batch_size, steps=steps, seed=seed
    )
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=default_data_collator)
    tasks = []
    model.train()
    for batch in loader:
        tasks.append(opt.tasks[int(batch["task_id"][0])])
        assert [opt.tasks[int(batch["task_id"][0])]] == opt.next_tasks()
        model(**batch)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        scheduler.step()
        opt.zero_grad()
    return model, opt, tasks


def test_trainer_equals_a_hand_written_loop_over_the_same_batches():
    seen = []
    original = hf_trainer.MultiHeadBert.forward

    def recording(self, input_ids, attention_mask, labels, task_id):  # the same signature
        seen.append(int(task_id[0]))
        return original(self, input_ids, attention_mask, labels, task_id)

    hf_trainer.MultiHeadBert.forward = recording
    try:
        model, opt = hf_trainer.run(steps=STEPS)
    finally:
        hf_trainer.MultiHeadBert.forward = original
    ref_model, ref_opt, ref_tasks = _hand_written(STEPS)
    assert [opt.tasks[i] for i in seen] == ref_tasks  # the Trainer's batches followed the schedule
    assert opt.step_count == ref_opt.step_count == STEPS
    assert opt.outer_step_count == ref_opt.outer_step_count == STEPS // 5
    init = hf_trainer.MultiHeadBert(0)
    moved = 0
    for (name, a), b, c in zip(model.named_parameters(), ref_model.parameters(), init.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        moved += not torch.equal(a, c)
    assert moved > 0
    for a, b in zip(opt.slow_weights, ref_opt.slow_weights):
        assert torch.equal(a, b)


def test_the_example_runs_with_no_arguments_in_under_a_minute():
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "hf_trainer.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "inner steps" in out and "accuracy per task" in out
