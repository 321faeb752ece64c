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
...                                 tasks=["a", "b"], inner_steps=2, seed=0)
>>> data = {"a": [{"x": torch.zeros(2)}] * 6, "b": [{"x": torch.ones(2)}] * 6}
>>> stream = metaopt.data.ScheduledTaskDataset(opt, data, batch_size=3, steps=2)
>>> ids = [opt.tasks[int(item["task_id"])] for item in stream]
>>> [ids[:3], ids[3:]] == [[t] * 3 for (t,) in opt.planned_tasks(2)]
True

Built on a data loader with the same ``batch_size`` and no shuffling
(``DataLoader(stream, batch_size=3)``, or the Trainer's ``per_device_train_batch_size``), each
batch is one task's.

The stream is indexed by the absolute step (the Trainer's ``global_step``), so that a resumed run
works the way the Trainer resumes: it skips the batches of the steps already taken and trains on
the rest, which are the uninterrupted run's. The steps served before iteration started
(:attr:`~metaopt.MultiTaskOptimizer.clock`, restored with the optimizer's state) hold
placeholders for the consumer to skip; a step pre-hook on the optimizer checks, at every step,
that the batches trained on are that step's, and raises with the fix otherwise (a consumer that
does not skip, ``TrainingArguments(ignore_data_skip=True)``, a loader batch size other than
``batch_size``).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .base import MultiTaskOptimizer

__all__ = ["ScheduledTaskDataset"]


@dataclass
class _Progress:
    """One iteration over the stream: the optimizer's clock when it began, examples yielded."""

    start: int
    yielded: int = 0


@dataclass
class _Watch:
    """The step pre-hook on one optimizer, and the dataset whose stream it checks (the one most
    recently iterated over that optimizer; a weak reference, so the hook keeps no dataset
    alive and checks nothing once it is gone)."""

    handle: Any  # torch.utils.hooks.RemovableHandle
    dataset: weakref.ref[ScheduledTaskDataset]


# one hook per optimizer, however many datasets are built over it (one per Trainer.train call);
# weak keys: the entry goes with the optimizer
_WATCHES: weakref.WeakKeyDictionary[MultiTaskOptimizer, _Watch] = weakref.WeakKeyDictionary()


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _dispatched_from_process_0() -> bool:
    """Whether this process is one that Accelerate's ``DataLoaderDispatcher`` (the default for
    an iterable dataset on several processes) feeds by broadcast: it creates an iterator over
    the stream on every process but draws from it on process 0 only."""
    return _world_size() > 1 and torch.distributed.get_rank() != 0


def _check_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    """Step pre-hook (``hook(optimizer, args, kwargs)``, torch.optim's): runs before every
    ``step()``, ``step(losses)`` and step skipped by a GradScaler; raising prevents the step."""
    watch = _WATCHES.get(optimizer)
    dataset = watch.dataset() if watch is not None else None
    if dataset is not None:
        dataset._check(optimizer)


class ScheduledTaskDataset(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """Examples in the order of the optimizer's task schedule, one task per batch.

    The stream holds ``steps`` steps, indexed by absolute step (the Trainer's ``global_step``):
    step ``d`` is ``micro_batches`` batches of ``batch_size`` examples, at position ``d`` in the
    stream whatever the optimizer's position when iteration starts. From ``d = opt.clock``
    (read when iteration starts) on, step ``d`` holds the task the optimizer will draw for it,
    and its examples are a random subset of that task's (without replacement while the task has
    enough examples) drawn from a generator seeded with ``(seed, d, task)``: a function of the
    step alone, so that a resumed run sees the uninterrupted run's batches.

    The steps before ``opt.clock`` were served before iteration started (a run resumed from a
    checkpoint): their tasks are no longer known, and they hold **placeholders** for the
    consumer to skip, each example the first example of the first task, tagged with that task.
    The Hugging Face Trainer skips them when it resumes from a checkpoint (it skips
    ``global_step * gradient_accumulation_steps`` batches); a loop of your own must skip them too,
    e.g. ``itertools.islice(loader, opt.clock * micro_batches, None)``.

    The check: iterating registers a step pre-hook on the optimizer (one per optimizer, checking
    the dataset most recently iterated over it, and nothing once that dataset is gone). Before
    the optimizer takes (or a GradScaler skips) step ``c = opt.clock``, the data loader must
    have drawn exactly the batches up to step ``c``, plus at most ``lookahead`` batches of step
    ``c + 1`` (accelerate's data loader, which the Trainer uses, fetches one batch ahead; a plain
    ``DataLoader`` none). Otherwise the hook raises a ``RuntimeError`` that names the cause and
    the fix, and the step is not taken: nothing moves. It catches a consumer training on the
    placeholders (``TrainingArguments(ignore_data_skip=True)``, a loop that resumes without
    skipping), one that skipped too much (a Trainer resumed without the optimizer's state), a
    data loader batch size other than ``batch_size`` and a Trainer run longer than ``steps``. The
    check needs the stream iterated in the process that steps the optimizer. On several
    processes under Accelerate's dispatcher (the Trainer's default for this iterable dataset),
    process 0 draws every batch and alone checks them: the other processes, whose iterator
    draws nothing, skip the check, and a refusal on process 0 stops it (a launcher, torchrun
    or ``accelerate launch``, then stops the others). With
    ``num_workers=1`` it cannot run (a warning says so), and more workers would each yield the
    whole stream, which raises. The examples are in memory: use ``num_workers=0``.

    Args:
        optimizer: a metaopt optimizer whose every step wants one task (the Reptile family:
            Sequential Reptile, Reptile). Its plan is read, never advanced.
        datasets: ``{task: examples}``; each example a mapping (a dict of tensors, as Hugging
            Face datasets give), to which ``"task_id"`` (the task's index in
            ``optimizer.tasks``) is added.
        batch_size: examples per batch: the data loader's (the Trainer's
            ``per_device_train_batch_size``).
        steps: optimizer steps the stream holds, counted from the start of training (the
            Trainer's ``max_steps``), including those served before a resume.
        micro_batches: batches per optimizer step (the Trainer's
            ``gradient_accumulation_steps``); all of one task.
        seed: seed of the example draws.
        lookahead: batches the data loader may have fetched beyond those of the step being
            taken (default 1: accelerate's ``DataLoaderShard``, which the Trainer and
            Accelerate use, and Lightning's prefetcher fetch one batch ahead; a plain
            ``DataLoader`` fetches none, and ``lookahead=0`` makes the check exact there).

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
        lookahead: int = 1,
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
        if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
            raise ValueError(f"{name}: lookahead must be an int >= 0, got {lookahead!r}")
        for t in optimizer.tasks:
            if len(datasets[t]) < batch_size:
                raise ValueError(
                    f"{name}: task {t!r} has {len(datasets[t])} examples, fewer than batch_size {batch_size}"
                )
        inner_steps = getattr(optimizer, "inner_steps", None)
        if isinstance(inner_steps, int) and steps < inner_steps:
            warnings.warn(
                f"{name}: a stream of {steps} step(s) is shorter than one trajectory "
                f"(inner_steps={inner_steps}): the run takes no outer step and its slow weights "
                "stay the initial model; lower inner_steps or train longer",
                UserWarning,
                stacklevel=2,
            )
        self.optimizer = optimizer
        self.datasets = datasets
        self.batch_size = batch_size
        self.steps = steps
        self.micro_batches = micro_batches
        self.seed = seed
        self.lookahead = lookahead
        self._progress: _Progress | None = None  # the latest iteration, for the step check

    def __len__(self) -> int:
        return self.steps * self.micro_batches * self.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        opt = self.optimizer
        start = opt.clock  # steps served before this iteration: placeholders
        plan = opt.planned_tasks(self.steps - start) if start < self.steps else []
        for wanted in plan:
            if len(wanted) != 1:
                raise ValueError(
                    f"ScheduledTaskDataset: {type(opt).__name__} wants {len(wanted)} tasks per "
                    "step, which one batch cannot hold; drive it with opt.backward(losses) in "
                    "your own loop"
                )
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.num_workers > 1:
            raise ValueError(
                f"ScheduledTaskDataset: iterated by {worker.num_workers} DataLoader workers, each "
                "of which would yield the whole stream (every batch repeated); use num_workers=0 "
                "(the Trainer's dataloader_num_workers=0)"
            )
        progress = _Progress(start=min(start, self.steps))
        if worker is None:
            self._progress = progress
            self._watch()
        else:
            warnings.warn(
                "ScheduledTaskDataset: iterated in a DataLoader worker, where the check that the "
                "batches trained on are those of the optimizer's step cannot see the optimizer; "
                "use num_workers=0 (the examples are in memory) to keep it",
                stacklevel=2,
            )
        return self._items(progress, [task for (task,) in plan])

    def _items(self, progress: _Progress, plan: list[str]) -> Iterator[dict[str, Any]]:
        tasks = self.optimizer.tasks
        need = self.micro_batches * self.batch_size
        filler = {**self.datasets[tasks[0]][0], "task_id": torch.tensor(0)}
        for _ in range(progress.start * need):
            progress.yielded += 1
            yield dict(filler)
        for step, task in enumerate(plan, start=progress.start):
            examples = self.datasets[task]
            index = tasks.index(task)
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_009 + index)
            order: list[int] = []
            while len(order) < need:
                order += torch.randperm(len(examples), generator=g).tolist()
            task_id = torch.tensor(index)
            for i in order[:need]:
                progress.yielded += 1
                yield {**examples[i], "task_id": task_id}

    def _watch(self) -> None:
        """Make this dataset the one the optimizer's step pre-hook checks (registering the hook
        at the first dataset iterated over this optimizer)."""
        opt = self.optimizer
        watch = _WATCHES.get(opt)
        if watch is None:
            _WATCHES[opt] = _Watch(opt.register_step_pre_hook(_check_step), weakref.ref(self))
        else:
            watch.dataset = weakref.ref(self)

    def _check(self, opt: MultiTaskOptimizer) -> None:
        progress = self._progress
        if progress is None:
            return
        step, drawn = opt.clock, progress.yielded
        if drawn == 0 and _dispatched_from_process_0():
            return  # Accelerate's dispatcher: process 0 draws every batch and checks them
        per_step = self.micro_batches * self.batch_size
        low = (step + 1) * per_step  # every batch of steps 0..step
        if low <= drawn <= low + self.lookahead * self.batch_size:
            return
        # refused before the step ran: GradScaler does not get to clear what it set for it
        vars(opt).pop("found_inf", None)
        vars(opt).pop("grad_scale", None)
        raise RuntimeError(self._misaligned(step, drawn, progress.start))

    def _misaligned(self, step: int, drawn: int, start: int) -> str:
        per_step, m = self.micro_batches * self.batch_size, self.micro_batches
        where = f"batch {step}" if m == 1 else f"batches {step * m}..{(step + 1) * m - 1}"
        head = (
            f"ScheduledTaskDataset: the optimizer is about to take step {step} (opt.clock), but "
            f"the data loader has drawn {drawn} examples ({drawn / self.batch_size:g} batches of "
            f"{self.batch_size})"
            + (f", the last of step {(drawn - 1) // per_step}" if drawn else "")
            + f", where step {step} is {where} of the stream (indexed by absolute step: the "
            "Trainer's global_step). The step was not taken. "
        )
        if step >= self.steps:
            return head + (
                f"The dataset holds steps 0..{self.steps - 1} only: build it with steps = the "
                "Trainer's max_steps, counted from the start of training"
            )
        behind = drawn < (step + 1) * per_step
        if behind and start > 0 and drawn - self.lookahead * self.batch_size <= start * per_step:
            skip = start * m
            return head + (
                f"The stream's first {start} step(s) were served before this iteration began "
                "(a resumed run) and hold placeholders, which the data loader did not skip. "
                f"Fix: skip their {skip} batch(es). The Hugging Face Trainer does so when it "
                "resumes from a checkpoint, unless TrainingArguments(ignore_data_skip=True): "
                "leave ignore_data_skip=False. In your own loop: "
                f"itertools.islice(loader, {skip}, None)"
            )
        if behind:
            return head + (
                "The data loader is behind the optimizer: it feeds fewer examples per step than "
                f"micro_batches * batch_size = {m} * {self.batch_size} (make the loader's batch "
                "size batch_size, and gradient_accumulation_steps micro_batches), or the "
                "optimizer moved after this iteration began (it stepped on other data, or its "
                "state was loaded: iterate after loading it)"
            )
        return head + (
            f"The data loader is ahead of the optimizer: it skipped more than the {start} "
            "step(s) served before this iteration began (a Trainer resumed without the "
            "optimizer's state, e.g. save_only_model=True, skips global_step steps' batches "
            f"while opt.clock was {start}), or its batches hold more than batch_size = "
            f"{self.batch_size} examples, or it fetches more than lookahead = {self.lookahead} "
            "batch(es) ahead of the step being taken (then raise lookahead)"
            + (
                ". With several processes, Accelerate's dispatcher (the Trainer's, for this "
                "iterable dataset) draws one batch per process at each step, so that the "
                "processes would train on the batches of different steps: give each step's "
                "batch to all processes, split, with split_batches=True (the Trainer's "
                'accelerator_config={"split_batches": True}, or Accelerator(dataloader_config='
                "DataLoaderConfiguration(split_batches=True)))"
                if _world_size() > 1
                else ""
            )
        )
