"""Sequential Reptile inside the Hugging Face ``Trainer``: a tiny randomly initialised BERT (no
download) with three classification heads, trained on three synthetic tasks.

The Trainer drives everything as it always does (``loss.backward()``, gradient clipping,
``optimizer.step()``, the LR scheduler, ``zero_grad()``). metaopt supplies two things: the
optimizer, passed through ``optimizers=(opt, scheduler)``, and the data side,
:class:`metaopt.data.ScheduledTaskDataset`, whose batches follow the optimizer's task schedule
and carry a ``task_id`` that the model routes to the task's head.

    pip install transformers accelerate      # the hf extra
    python examples/hf_trainer.py  # about 10 s on a laptop CPU

``run(...)`` and ``make_trainer(...)`` are also what the tests call; they check that the
Trainer's final parameters equal a hand-written loop over the same batches, and that a run
resumed from a checkpoint (``save_steps``, then ``trainer.train(resume_from_checkpoint=...)``)
ends where the uninterrupted one ends, bit for bit.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from torch import nn

import metaopt

TASKS = {"parity": 2, "majority": 2, "last_mod3": 3}  # task: number of classes
VOCAB, LENGTH = 64, 12


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # the optional extra
        from metaopt._extras import install_hint

        raise SystemExit(f"this example needs the 'hf' extra: {install_hint('hf')}") from err
    return transformers


class MultiHeadBert(nn.Module):
    """A BERT encoder and one classification head per task; ``task_id`` picks the head (every
    batch of :class:`~metaopt.data.ScheduledTaskDataset` is one task's)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        tf = _transformers()
        torch.manual_seed(seed)
        config = tf.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=LENGTH,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.encoder = tf.BertModel(config, add_pooling_layer=False)
        self.heads = nn.ModuleList(nn.Linear(32, n) for n in TASKS.values())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        task_id: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        task = int(task_id[0])
        if bool((task_id != task).any()):
            raise ValueError("a batch mixes tasks: build it from metaopt.data.ScheduledTaskDataset")
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        logits = self.heads[task](h)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def make_datasets(n: int = 64, seed: int = 0) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Three labelling rules over the same kind of random token sequences."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, list[dict[str, torch.Tensor]]] = {}
    for task in TASKS:
        ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
        if task == "parity":
            labels = ids[:, 0] % 2
        elif task == "majority":
            labels = ((ids < VOCAB // 2).sum(1) > LENGTH // 2).long()
        else:
            labels = ids[:, -1] % 3
        out[task] = [
            {"input_ids": ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": labels[i]}
            for i in range(n)
        ]
    return out


def build(
    seed: int = 0, steps: int = 150
) -> tuple[MultiHeadBert, metaopt.SequentialReptile, torch.optim.lr_scheduler.LRScheduler]:
    model = MultiHeadBert(seed)
    opt = metaopt.SequentialReptile(
        torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01),
        tasks=list(TASKS),
        inner_steps=5,
        outer_lr=0.5,
        schedule="without_replacement",
        seed=seed,
        allow_unused=True,  # two of the three heads are idle at every step
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (steps + 1))
    return model, opt, scheduler


def make_trainer(
    output_dir: str, steps: int = 150, batch_size: int = 8, seed: int = 0, **arguments: Any
) -> tuple[Any, MultiHeadBert, metaopt.SequentialReptile]:
    """The recipe: model, optimizer, scheduler, the scheduled data and the ``Trainer`` over them.

    ``arguments`` override the ``TrainingArguments`` below (``save_steps``,
    ``gradient_accumulation_steps``, ...); the data set gets ``gradient_accumulation_steps``
    batches of one task per step. To resume, build the same and call
    ``trainer.train(resume_from_checkpoint=...)``: the Trainer restores the model, the optimizer
    (its schedule included) and the scheduler, and skips the batches of the steps already taken,
    so the run goes on where the uninterrupted one would (the model has no dropout, and the
    Trainer restores the RNG state too). Keep ``ignore_data_skip`` False: the data set's
    batches are indexed by the Trainer's global step and its check refuses to train on
    batches that are not the step's. On several processes (``torchrun``), pass
    ``accelerator_config={"split_batches": True}``: each step's batch is split across them.
    """
    tf = _transformers()
    model, opt, scheduler = build(seed, steps)
    settings: dict[str, Any] = dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        max_grad_norm=1.0,
        use_cpu=True,
        seed=seed,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,  # the data set's alignment check runs where it is iterated
        remove_unused_columns=False,  # keep task_id
    )
    if "save_steps" in arguments:
        settings["save_strategy"] = "steps"
    settings.update(arguments)
    args = tf.TrainingArguments(**settings)
    stream = metaopt.data.ScheduledTaskDataset(
        opt,
        make_datasets(seed=seed),
        batch_size=batch_size,
        steps=steps,
        micro_batches=args.gradient_accumulation_steps,
        seed=seed,
    )
    trainer = tf.Trainer(
        model=model,
        args=args,
        train_dataset=stream,
        data_collator=tf.default_data_collator,
        optimizers=(opt, scheduler),
    )
    return trainer, model, opt


def run(
    steps: int = 150, batch_size: int = 8, seed: int = 0
) -> tuple[MultiHeadBert, metaopt.SequentialReptile]:
    with tempfile.TemporaryDirectory() as out:
        trainer, model, opt = make_trainer(out, steps, batch_size, seed)
        trainer.train()
    return model, opt


def evaluate(model: MultiHeadBert, seed: int = 1) -> dict[str, float]:
    """Accuracy per task on fresh examples."""
    model.eval()
    out = {}
    with torch.no_grad():
        for i, (task, examples) in enumerate(make_datasets(seed=seed).items()):
            batch = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
            logits = model(**batch, task_id=torch.full((len(examples),), i))["logits"]
            out[task] = float((logits.argmax(1) == batch["labels"]).float().mean())
    return out


if __name__ == "__main__":
    model, opt = run()
    print(f"{opt.step_count} inner steps, {opt.outer_step_count} outer steps")
    with opt.use_slow_weights():
        print("accuracy per task at the slow weights:", evaluate(model))
