"""The data side of the task schedule, for frameworks that own the training loop.

The Hugging Face ``Trainer``, Accelerate and Lightning fetch a batch, run ``loss.backward()``,
clip and call ``optimizer.step()``; they never ask the optimizer which task comes next. For the
Reptile family that is all the optimizer needs, provided each batch comes from the task that its
schedule draws. :class:`ScheduledTaskDataset` makes the data follow the schedule: it reads the
optimizer's plan (:meth:`~metaopt.MultiTaskOptimizer.planned_tasks`) when iteration starts and
yields whole batches of one task each, every example tagged with its task's index, so that the
model can route it to the task's head.

>>> import torch, metaopt
>>> model = torch.nn.Linear(2, 1)
>>> opt = metaopt.SequentialReptile(torch.optim.SGD(model.parameters(), lr=0.1),
...                                 tasks=["a", "b"], inner_steps=4, seed=0)
>>> data = {"a": [{"x": torch.zeros(2)}] * 6, "b": [{"x": torch.ones(2)}] * 6}
>>> stream = metaopt.data.ScheduledTaskDataset(opt, data, batch_size=3, steps=2)
>>> ids = [opt.tasks[int(item["task_id"])] for item in stream]
>>> [ids[:3], ids[3:]] == [[t] * 3 for (t,) in opt.planned_tasks(2)]
True

Built on a data loader with the same ``batch_size`` and no shuffling
(``DataLoader(stream, batch_size=3)``, or the Trainer's ``per_device_train_batch_size``), each
batch is one task's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .base import MultiTaskOptimizer

__all__ = ["ScheduledTaskDataset"]


class ScheduledTaskDataset(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """Examples in the order of the optimizer's task schedule, one task per batch.

    Step ``s`` (counted from the optimizer's ``step_count`` when iteration starts) gets
    ``micro_batches`` batches of ``batch_size`` examples of the task the optimizer will draw for
    it. Within a task, the examples of step ``s`` are a random subset (without replacement while
    the task has enough examples), drawn from a generator seeded with ``(seed, s, task)``: a
    function of the step alone, so a run resumed from a checkpoint (the optimizer's state
    restored) sees the same batches as an uninterrupted one.

    Args:
        optimizer: a metaopt optimizer whose every step wants one task (the Reptile family:
            Sequential Reptile, Reptile). Its plan is read, never advanced.
        datasets: ``{task: examples}``; each example a mapping (a dict of tensors, as Hugging
            Face datasets give), to which ``"task_id"`` (the task's index in
            ``optimizer.tasks``) is added.
        batch_size: examples per batch: the data loader's (the Trainer's
            ``per_device_train_batch_size``).
        steps: optimizer steps to yield batches for (the Trainer's ``max_steps``).
        micro_batches: batches per optimizer step (the Trainer's
            ``gradient_accumulation_steps``); all of one task.
        seed: seed of the example draws.

    Example:
        >>> import torch, metaopt
        >>> opt = metaopt.Reptile(torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1),
        ...                       tasks=["a", "b"], inner_steps=3)
        >>> data = {t: [{"v": torch.tensor(float(i))} for i in range(5)] for t in "ab"}
        >>> stream = metaopt.data.ScheduledTaskDataset(opt, data, batch_size=2, steps=3)
        >>> len({int(item["task_id"]) for item in stream})   # one trajectory: one task
        1
    """

    def __init__(
        self,
        optimizer: MultiTaskOptimizer,
        datasets: Mapping[str, Sequence[Mapping[str, Any]]],
        *,
        batch_size: int,
        steps: int,
        micro_batches: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        name = "ScheduledTaskDataset"
        if not isinstance(optimizer, MultiTaskOptimizer):
            raise TypeError(f"{name}: expected a metaopt optimizer, got {type(optimizer).__name__}")
        missing = [t for t in optimizer.tasks if t not in datasets]
        extra = [t for t in datasets if t not in optimizer.tasks]
        if missing or extra:
            raise ValueError(
                f"{name}: datasets must be given for exactly the optimizer's tasks "
                f"{list(optimizer.tasks)}; missing {missing}, unexpected {extra}"
            )
        for key, value in (("batch_size", batch_size), ("steps", steps), ("micro_batches", micro_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {key} must be an int >= 1, got {value!r}")
        for t in optimizer.tasks:
            if len(datasets[t]) < batch_size:
                raise ValueError(
                    f"{name}: task {t!r} has {len(datasets[t])} examples, fewer than batch_size {batch_size}"
                )
        self.optimizer = optimizer
        self.datasets = datasets
        self.batch_size = batch_size
        self.steps = steps
        self.micro_batches = micro_batches
        self.seed = seed

    def __len__(self) -> int:
        return self.steps * self.micro_batches * self.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        opt = self.optimizer
        start = opt.step_count
        plan = opt.planned_tasks(self.steps)
        for offset, wanted in enumerate(plan):
            if len(wanted) != 1:
                raise ValueError(
                    f"ScheduledTaskDataset: {type(opt).__name__} wants {len(wanted)} tasks per "
                    "step, which one batch cannot hold; drive it with opt.backward(losses) in "
                    "your own loop"
                )
            task = wanted[0]
            examples = self.datasets[task]
            step = start + offset
            index = opt.tasks.index(task)
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_009 + index)
            need = self.micro_batches * self.batch_size
            order: list[int] = []
            while len(order) < need:
                order += torch.randperm(len(examples), generator=g).tolist()
            task_id = torch.tensor(index)
            for i in order[:need]:
                yield {**examples[i], "task_id": task_id}
