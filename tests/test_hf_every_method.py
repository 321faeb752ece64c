"""``metaopt.hf.Trainer``: the Hugging Face Trainer for every method. Per-task methods (and MTL,
and compositions) train on batches holding every task's examples, the model returning each
task's loss; the run equals a hand-written loop over the same batches (``opt.backward(losses)``,
``opt.step()``), bit for bit. The Reptile family is evaluated at the slow weights, and the
training logs carry the step report's figures."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import transformers  # noqa: E402

from metaopt.hf import Trainer  # noqa: E402

from _stacks import METHODS, REPTILE_FAMILY, TASKS, Net, batch, make_opt  # noqa: E402

STEPS, B = 6, 8
PER_TASK = [m for m in METHODS if m not in REPTILE_FAMILY]


class Routed(Net):
    """Every task's examples in one batch, ``task_id`` telling them apart: each task's MSE."""

    def forward(self, x, y, task_id):  # type: ignore[override]
        losses = {}
        for i, t in enumerate(TASKS):
            rows = task_id == i
            losses[t] = torch.nn.functional.mse_loss(super().forward(x[rows], t), y[rows])
        return {"losses": losses, "loss": sum(losses.values())}


class Steps(torch.utils.data.IterableDataset):
    """Step ``s`` is every task's batch ``batch(s, t)``, in task order: one loader batch of
    ``len(TASKS) * B`` examples per step."""

    def __init__(self, steps: int, offset: int = 0) -> None:
        self.steps, self.offset = steps, offset

    def __iter__(self):
        for s in range(self.offset, self.offset + self.steps):
            for i, t in enumerate(TASKS):
                x, y = batch(s, t, n=B)
                for k in range(B):
                    yield {"x": x[k], "y": y[k], "task_id": torch.tensor(i)}

    def __len__(self) -> int:
        return self.steps * len(TASKS) * B


def _args(out, **kw) -> transformers.TrainingArguments:
    base = dict(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=len(TASKS) * B,
        per_device_eval_batch_size=len(TASKS) * B,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
        max_grad_norm=0.0,  # no clipping: the hand-written loop does none
        logging_steps=2,
        dataloader_drop_last=False,
    )
    return transformers.TrainingArguments(**{**base, **kw})


def _trainer(name, out, **kw):
    model = Routed()
    opt = make_opt(name, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    logs: list[dict] = []

    class Keep(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **k):  # noqa: ARG002
            logs_.append(dict(logs or {}))

    logs_ = logs
    trainer = Trainer(
        model=model,
        args=_args(out, **kw),
        train_dataset=Steps(STEPS),
        optimizers=(opt, scheduler),
        callbacks=[Keep()],
    )
    return trainer, model, opt, logs


@pytest.mark.parametrize("name", PER_TASK)
def test_the_trainer_equals_a_hand_written_loop(tmp_path, name):
    trainer, model, opt, _ = _trainer(name, tmp_path)
    trainer.train()
    ref_model = Routed()
    ref = make_opt(name, ref_model)
    loader = torch.utils.data.DataLoader(Steps(STEPS), batch_size=len(TASKS) * B)
    for inputs in loader:
        ref.backward(ref_model(**inputs)["losses"])
        ref.step()
        ref.zero_grad()
    assert opt.step_count == ref.step_count == STEPS
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_the_logs_carry_the_step_reports_figures(tmp_path):
    _, _, _, logs = (t := _trainer("pcgrad", tmp_path))
    t[0].train()
    training = [entry for entry in logs if "loss" in entry]
    assert len(training) == STEPS // 2
    for entry in training:
        assert {f"metaopt/loss/{task}" for task in TASKS} <= set(entry)
        assert {f"metaopt/weight/{task}" for task in TASKS} <= set(entry)
        assert {"metaopt/cosine", "metaopt/conflicts", "metaopt/skipped_steps"} <= set(entry)
        assert -1.0 <= entry["metaopt/cosine"] <= 1.0
    last = t[2].last_report
    assert training[-1]["metaopt/loss/a"] == float(last.losses["a"])


def test_evaluation_is_at_the_slow_weights(tmp_path):
    """Sequential Reptile over GradVac, stopped mid-trajectory (θ ≠ φ): ``evaluate`` reports the
    loss at φ, and training resumes from θ afterwards."""
    trainer, model, opt, logs = _trainer(
        "sequential_reptile_gradvac", tmp_path, max_steps=3, label_names=["y"]
    )
    trainer.train()
    assert any("metaopt/outer_steps" in entry for entry in logs)
    held_out = Steps(1, offset=100)
    inputs = next(iter(torch.utils.data.DataLoader(held_out, batch_size=len(TASKS) * B)))
    fast = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        at_theta = float(model(**inputs)["loss"])
        with opt.use_slow_weights():
            at_phi = float(model(**inputs)["loss"])
    assert at_phi != at_theta
    metrics = trainer.evaluate(eval_dataset=held_out)
    assert metrics["eval_loss"] == pytest.approx(at_phi, rel=1e-12)
    assert all(torch.equal(a, p) for a, p in zip(fast, model.parameters()))


def test_for_the_reptile_family_it_is_the_trainers_own_step(tmp_path):
    """One task per step: ``metaopt.hf.Trainer`` leaves the step to ``transformers.Trainer``
    (one forward, ``loss.backward()``): the example's run is the same with either, bit for bit."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import hf_trainer

    finals = []
    for ours in (False, True):
        plain, model, opt = hf_trainer.make_trainer(str(tmp_path / f"run{ours}"), steps=12)
        trainer = plain
        if ours:
            trainer = Trainer(
                model=model,
                args=plain.args,
                train_dataset=plain.train_dataset,
                data_collator=plain.data_collator,
                optimizers=(opt, plain.lr_scheduler),
            )
        trainer.train()
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals):
        assert torch.equal(a, b)


def test_evaluate_before_train_is_at_the_slow_weights(tmp_path):
    """Found by review: before ``train()`` the Trainer holds the metaopt optimizer itself (not
    Accelerate's wrapper), whose ``.optimizer`` is the wrapped one: ``evaluate`` must still see
    the metaopt optimizer (an evaluation-only script after a resume)."""
    trainer, model, opt, _ = _trainer("sequential_reptile_gradvac", tmp_path, label_names=["y"])
    for s in range(3):  # mid-trajectory (inner_steps 2 in _stacks): θ ≠ φ
        opt.step(
            model(**next(iter(torch.utils.data.DataLoader(Steps(1, offset=s), batch_size=len(TASKS) * B))))[
                "losses"
            ]
        )
    held_out = Steps(1, offset=100)
    inputs = next(iter(torch.utils.data.DataLoader(held_out, batch_size=len(TASKS) * B)))
    with torch.no_grad(), opt.use_slow_weights():
        at_phi = float(model(**inputs)["loss"])
    assert trainer.evaluate(eval_dataset=held_out)["eval_loss"] == pytest.approx(at_phi, rel=1e-12)


class OneLoss(Routed):
    def forward(self, x, y, task_id):  # type: ignore[override]
        return {"loss": super().forward(x, y, task_id)["loss"]}


def test_mtl_with_one_loss_is_the_trainers_own_step(tmp_path):
    """MTL needs only the summed loss (``loss.backward()``): with a model that returns only
    ``"loss"`` it trains under ``metaopt.hf.Trainer`` as under ``transformers.Trainer``."""
    finals = []
    for cls in (transformers.Trainer, Trainer):
        model = OneLoss()
        opt = make_opt("mtl", model)
        cls(
            model=model,
            args=_args(tmp_path / cls.__module__, max_grad_norm=1.0),
            train_dataset=Steps(STEPS),
            optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)),
        ).train()
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals):
        assert torch.equal(a, b)
