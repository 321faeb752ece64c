"""Sequential Reptile through ``transformers.Trainer`` (examples/hf_trainer.py): the Trainer's
batches follow the schedule, and its final parameters equal a hand-written loop over the same
batches (loss.backward, clip, step, scheduler, zero_grad); a run resumed from a checkpoint ends
where the uninterrupted one ends, on the same batches; a consumer that trains on batches other
than the step's (no skip on resume, a wrong batch size) is refused before the step moves anything.

On two processes (gloo; the Trainer wraps the model in DDP and, with ``split_batches=True``,
gives each process half of the step's batch) the run resumes bit for bit as well, and equals the
one-process run; Accelerate's default of one batch per process is refused at the first step.

The example's model has no dropout, so the model's RNG plays no part in these equalities (the
Trainer restores the RNG state on resume as well)."""

from __future__ import annotations

import contextlib
import gc
import itertools
import subprocess
import sys
from dataclasses import dataclass
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
K = 5  # the example's inner_steps
RESUME_STEPS = 10
TASK_NAMES = list(hf_trainer.TASKS)


def _stream(opt, steps: int, batch_size: int = 8, seed: int = 0, **kwargs):
    return metaopt.data.ScheduledTaskDataset(
        opt, hf_trainer.make_datasets(seed=seed), batch_size=batch_size, steps=steps, seed=seed, **kwargs
    )


def _loader(stream, batch_size: int = 8):
    from transformers import default_data_collator

    return torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=default_data_collator)


def _hand_written(steps: int, batch_size: int = 8, seed: int = 0):
    model, opt, scheduler = hf_trainer.build(seed, steps)
    loader = _loader(_stream(opt, steps, batch_size, seed), batch_size)
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


@contextlib.contextmanager
def _recording():
    """The task of every batch the example's model is run on, in order."""
    seen: list[str] = []
    original = hf_trainer.MultiHeadBert.forward

    def recording(self, input_ids, attention_mask, labels, task_id):  # the same signature
        seen.append(TASK_NAMES[int(task_id[0])])
        return original(self, input_ids, attention_mask, labels, task_id)

    hf_trainer.MultiHeadBert.forward = recording
    try:
        yield seen
    finally:
        hf_trainer.MultiHeadBert.forward = original


def _assert_same_run(model, opt, ref_model, ref_opt):
    assert (opt.step_count, opt.clock, opt.outer_step_count) == (
        ref_opt.step_count,
        ref_opt.clock,
        ref_opt.outer_step_count,
    )
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    for a, b in zip(opt.slow_weights, ref_opt.slow_weights):
        assert torch.equal(a, b)


def test_trainer_equals_a_hand_written_loop_over_the_same_batches():
    with _recording() as seen:
        model, opt = hf_trainer.run(steps=STEPS)
    ref_model, ref_opt, ref_tasks = _hand_written(STEPS)
    assert seen == ref_tasks  # the Trainer's batches followed the schedule
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


# ---------------------------------------------------------------------- resuming the Trainer
@dataclass
class Checkpointed:
    out: Path
    save: int  # the checkpoint's global step
    accumulation: int
    model: torch.nn.Module  # the uninterrupted run's end
    opt: metaopt.SequentialReptile
    seen: list[str]  # the task of every micro-batch it trained on

    @property
    def checkpoint(self) -> str:
        return str(self.out / f"checkpoint-{self.save}")


@pytest.fixture(
    scope="module",
    params=[(6, 1), (7, 2)],  # both mid-trajectory (K = 5); the second with gradient accumulation
    ids=["checkpoint-6", "checkpoint-7-accumulation-2"],
)
def checkpointed(request, tmp_path_factory):
    save, accumulation = request.param
    assert save % K != 0  # the checkpoint falls mid-trajectory
    out = tmp_path_factory.mktemp("run")
    with _recording() as seen:
        trainer, model, opt = hf_trainer.make_trainer(
            str(out), RESUME_STEPS, save_steps=save, gradient_accumulation_steps=accumulation
        )
        trainer.train()
    assert len(seen) == RESUME_STEPS * accumulation
    return Checkpointed(out, save, accumulation, model, opt, seen)


def test_a_resumed_trainer_run_equals_the_uninterrupted_one(checkpointed):
    run = checkpointed
    with _recording() as seen:
        trainer, model, opt = hf_trainer.make_trainer(
            str(run.out), RESUME_STEPS, save_steps=run.save, gradient_accumulation_steps=run.accumulation
        )
        trainer.train(resume_from_checkpoint=run.checkpoint)
    assert seen == run.seen[run.save * run.accumulation :]  # the batches after the checkpoint
    _assert_same_run(model, opt, run.model, run.opt)


def test_resuming_with_ignore_data_skip_is_refused_before_any_step(checkpointed):
    from safetensors.torch import load_file

    run = checkpointed
    trainer, model, opt = hf_trainer.make_trainer(
        str(run.out),
        RESUME_STEPS,
        save_steps=run.save,
        gradient_accumulation_steps=run.accumulation,
        ignore_data_skip=True,  # the Trainer would train on the stream from its start
    )
    with pytest.raises(RuntimeError, match=r"placeholders(.|\n)*ignore_data_skip=False"):
        trainer.train(resume_from_checkpoint=run.checkpoint)
    assert (opt.clock, opt.step_count) == (run.save, run.save)  # nothing moved
    saved = load_file(str(Path(run.checkpoint) / "model.safetensors"))
    for name, p in model.named_parameters():
        assert torch.equal(p, saved[name]), name


# ---------------------------------------------------------------------- hand-written loops
def test_a_hand_written_loop_resumes_by_skipping_the_served_steps():
    steps, save = RESUME_STEPS, 6
    ref_model, ref_opt, ref_tasks = _hand_written(steps)
    model, opt, scheduler = hf_trainer.build(0, steps)
    for batch in itertools.islice(_loader(_stream(opt, steps)), save):
        model(**batch)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        scheduler.step()
        opt.zero_grad()
    states = [model.state_dict(), opt.state_dict(), scheduler.state_dict()]

    def resumed():
        model, opt, scheduler = hf_trainer.build(0, steps)
        for part, state in zip((model, opt, scheduler), states):
            part.load_state_dict(state)
        return model, opt, scheduler, _loader(_stream(opt, steps))

    model, opt, scheduler, loader = resumed()
    with pytest.raises(RuntimeError, match=r"placeholders(.|\n)*islice\(loader, 6, None\)"):
        for batch in loader:  # not skipping the steps served before the checkpoint
            model(**batch)["loss"].backward()
            opt.step()
    assert opt.clock == save

    model, opt, scheduler, loader = resumed()
    tasks = []
    for batch in itertools.islice(loader, save, None):
        tasks.append(opt.tasks[int(batch["task_id"][0])])
        assert tasks[-1:] == opt.next_tasks()
        model(**batch)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        scheduler.step()
        opt.zero_grad()
    assert tasks == ref_tasks[save:]
    _assert_same_run(model, opt, ref_model, ref_opt)


def test_a_grad_scaler_skipped_step_keeps_the_batches_aligned():
    steps, bad = 12, 3  # step 3 is mid-trajectory
    model, opt, scheduler = hf_trainer.build(0, steps)
    scaler = torch.amp.GradScaler("cpu")
    skipped = []
    for step, batch in enumerate(_loader(_stream(opt, steps))):
        assert opt.clock == step
        assert [opt.tasks[int(batch["task_id"][0])]] == opt.next_tasks()
        loss = model(**batch)["loss"]
        scaler.scale(loss * (float("inf") if step == bad else 1.0)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        report = scaler.step(opt)
        scaler.update()
        skipped.append(report.skipped)
        scheduler.step()
        opt.zero_grad()
    assert skipped == [step == bad for step in range(steps)]
    assert (opt.clock, opt.step_count, opt.outer_step_count) == (steps, steps - 1, steps // K)


class _Routed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(2, 2)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(2, 1) for _ in range(2))

    def forward(self, x: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        return self.heads[int(task_id[0])](self.body(x)).square().mean()


def _tiny(**stream_kwargs):
    torch.manual_seed(0)
    model = _Routed()
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.1), tasks=["a", "b"], inner_steps=3, allow_unused=True
    )
    data = {t: [{"x": torch.randn(2)} for _ in range(6)] for t in ("a", "b")}
    kwargs = {"batch_size": 2, "steps": 8, **stream_kwargs}
    return model, opt, data, kwargs


def test_the_one_loop_is_checked_too():
    model, opt, data, kwargs = _tiny()
    stream = metaopt.data.ScheduledTaskDataset(opt, data, **kwargs)
    for batch in itertools.islice(torch.utils.data.DataLoader(stream, batch_size=2), 4):
        (task,) = opt.next_tasks()
        assert opt.tasks[int(batch["task_id"][0])] == task
        opt.step({task: model(**batch)})
    assert opt.clock == 4
    # a second iteration from the start, not skipping the 4 steps served: refused
    batch = next(iter(torch.utils.data.DataLoader(stream, batch_size=2)))
    (task,) = opt.next_tasks()
    with pytest.raises(RuntimeError, match="placeholders"):
        opt.step({task: model(**batch)})
    assert opt.clock == 4


@pytest.mark.parametrize("lookahead", [1, 0])
def test_a_loader_batch_size_other_than_the_streams_is_refused(lookahead):
    model, opt, data, kwargs = _tiny(lookahead=lookahead)
    stream = metaopt.data.ScheduledTaskDataset(opt, data, **kwargs)
    # batches of two steps' examples: with one batch of look-ahead allowed (accelerate's loader),
    # the first looks like a step's batch and the batch fetched ahead; the second cannot
    refused_at = lookahead
    with pytest.raises(RuntimeError, match="ahead of the optimizer"):
        for batch in torch.utils.data.DataLoader(stream, batch_size=4):
            model(batch["x"], batch["task_id"]).backward()
            opt.step()
            opt.zero_grad()
    assert opt.clock == refused_at


def test_a_grad_scaler_step_refused_by_the_check_leaves_no_skip_flags_behind():
    model, opt, data, kwargs = _tiny(lookahead=0)
    stream = metaopt.data.ScheduledTaskDataset(opt, data, **kwargs)
    batch = next(iter(torch.utils.data.DataLoader(stream, batch_size=4)))
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(batch["x"], batch["task_id"])).backward()
    with pytest.raises(RuntimeError, match="ahead of the optimizer"):
        scaler.step(opt)
    assert "found_inf" not in vars(opt) and "grad_scale" not in vars(opt)


def test_one_hook_per_optimizer_checking_the_latest_dataset_only():
    model, opt, data, kwargs = _tiny()
    hooks = len(opt._optimizer_step_pre_hooks)
    first = metaopt.data.ScheduledTaskDataset(opt, data, **kwargs)
    stale = iter(torch.utils.data.DataLoader(first, batch_size=2))
    next(stale), next(stale), next(stale)  # the first dataset is now three steps ahead
    # a new dataset over the same optimizer (a new Trainer.train call) takes over the check
    second = metaopt.data.ScheduledTaskDataset(opt, data, **kwargs)
    for batch in itertools.islice(torch.utils.data.DataLoader(second, batch_size=2), 2):
        model(**batch).backward()
        opt.step()
        opt.zero_grad()
    assert len(opt._optimizer_step_pre_hooks) == hooks + 1
    # once the datasets are gone, the hook checks nothing
    del first, second, stale, batch
    gc.collect()
    model(torch.ones(1, 2), torch.tensor([int(opt.tasks.index(opt.next_tasks()[0]))])).backward()
    opt.step()
    assert opt.clock == 3


def test_several_data_loader_workers_are_refused(monkeypatch):
    model, opt, data, kwargs = _tiny()
    stream = metaopt.data.ScheduledTaskDataset(opt, data, **kwargs)

    class Info:
        num_workers = 2

    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: Info())
    with pytest.raises(ValueError, match="num_workers=0"):
        iter(stream)


def test_the_stream_holds_placeholders_for_the_steps_served_before_it():
    model, opt, data, kwargs = _tiny()
    plan = [t for (t,) in opt.planned_tasks(kwargs["steps"])]
    for _ in range(3):
        (task,) = opt.next_tasks()
        opt.step({task: model(torch.ones(1, 2), torch.tensor([opt.tasks.index(task)]))})
    items = list(metaopt.data.ScheduledTaskDataset(opt, data, **kwargs))
    assert len(items) == kwargs["steps"] * kwargs["batch_size"]
    placeholders = items[: 3 * 2]
    assert all(torch.equal(i["x"], data["a"][0]["x"]) and int(i["task_id"]) == 0 for i in placeholders)
    assert [opt.tasks[int(i["task_id"])] for i in items[6::2]] == plan[3:]
    fresh = list(metaopt.data.ScheduledTaskDataset(_tiny()[1], data, **kwargs))
    for a, b in zip(items[6:], fresh[6:]):  # the same examples as a stream read from step 0
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["task_id"], b["task_id"])


def test_the_example_runs_with_no_arguments():
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "hf_trainer.py")],
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard, not a speed test
        check=True,
    ).stdout
    assert "inner steps" in out and "accuracy per task" in out


# ---------------------------------------------------------------------- two processes
@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    import _hf_worker

    from _spawn import file_store, spawn

    out = tmp_path_factory.mktemp("hf2")
    spawn(_hf_worker.run, 2, (file_store(str(out)), str(out)))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return ranks, torch.load(out / "refusal.pt", weights_only=True)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_processes_resume_bit_for_bit_and_equal_one_process(two_processes):
    import _hf_worker as w

    ranks, _ = two_processes
    ref_model, ref_opt, ref_tasks = _hand_written(w.STEPS)
    for rank in ranks:
        run, resumed = rank["uninterrupted"], rank["resumed"]
        assert run["counts"] == resumed["counts"] == (w.STEPS, w.STEPS, w.STEPS // K)
        # every process trained on half of each step's batch, of the step's task
        assert run["seen"] == [(TASK_NAMES.index(t), 4) for t in ref_tasks]
        assert resumed["seen"] == run["seen"][w.SAVE :]
        for a, b in zip([*run["params"], *run["slow"]], [*resumed["params"], *resumed["slow"]]):
            assert torch.equal(a, b)
    for a, b in zip(ranks[0]["uninterrupted"]["params"], ranks[1]["uninterrupted"]["params"]):
        assert torch.equal(a, b)  # the replicas agree
    # DDP's mean of the halves' mean gradients is the whole batch's (float32: to rounding)
    for a, b in zip(ranks[0]["uninterrupted"]["params"], ref_model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=5e-5)  # it moved 8e-3


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_processes_without_split_batches_are_refused_at_the_first_step(two_processes):
    _, refusal = two_processes
    assert refusal is not None
    assert "step 0" in refusal and "The step was not taken" in refusal
    assert 'accelerator_config={"split_batches": True}' in refusal
