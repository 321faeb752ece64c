"""The task stream: which tasks each step wants, and the counters that index it.

A draw is made once (:meth:`TaskStream.next`) and kept until a step is served: taken, or
skipped by a ``GradScaler`` (:meth:`TaskStream.served`). Everything a draw moves (the
generator, the pending draw, the schedule's round, the task held for a whole trajectory) is in
one :class:`StreamRecord`, so that a refused step puts the stream back exactly
(:meth:`TaskStream.record` before, :meth:`TaskStream.restore` on refusal) and a plan of future
draws (``planned_tasks``) runs on the real stream and restores it.

>>> import torch
>>> from metaopt.parts.stream import TaskStream
>>> stream = TaskStream(("a", "b"), seed=0)
>>> before = stream.record()
>>> stream.next(lambda: [["a", "b"][int(torch.randint(2, (1,), generator=stream.generator))]])
['a']
>>> stream.restore(before); stream.pending is None
True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._distributed import fingerprint
from ..schedules import TaskSchedule

__all__ = ["StreamRecord", "TaskStream"]


@dataclass(frozen=True)
class StreamRecord:
    """Everything the task stream holds, as of one moment (a copy: the stream may move on)."""

    step: int
    """Steps taken."""
    clock: int
    """Steps served: taken, or skipped by a ``GradScaler`` (each used up its draw)."""
    generator: Tensor
    """The draws' ``torch.Generator`` state."""
    pending: tuple[str, ...] | None
    """The draw the next step wants, once made."""
    schedule: dict[str, Any] | None
    """The task schedule's state (its round), where the method has a schedule."""
    held: str | None
    """A task held for a whole trajectory (Reptile), or ``None``."""


def _on_cpu(state: Any) -> Any:
    """A generator state as ``torch.Generator.set_state`` takes it: on the CPU. Tools that move
    a whole optimizer state dict to the model's device (Accelerate's ``prepare`` does, through
    ``load_state_dict``) move the saved state too."""
    return state.cpu() if isinstance(state, torch.Tensor) else state


class TaskStream:
    """The draws and counters of one optimizer (each optimizer of a composition has its own).

    Args:
        tasks: the task names.
        seed: seed of the stream's own generator (the global RNG is never touched).
        schedule: the method's task schedule, whose round is part of the stream, or ``None``.
    """

    def __init__(self, tasks: Sequence[str], seed: int, schedule: TaskSchedule | None = None) -> None:
        self.tasks = tuple(tasks)
        self.generator = torch.Generator().manual_seed(seed)
        self.schedule = schedule
        self.step = 0
        self.clock = 0
        self.pending: tuple[str, ...] | None = None
        self.held: str | None = None

    # ------------------------------------------------------------------ draws and counters
    def next(self, draw: Callable[[], Sequence[str]]) -> list[str]:
        """The pending draw, made with ``draw`` first if there is none."""
        if self.pending is None:
            self.pending = tuple(draw())
        return list(self.pending)

    def served(self, *, taken: bool) -> None:
        """A step used up the pending draw: taken (counted), or skipped."""
        self.step += int(taken)
        self.clock += 1
        self.pending = None

    # ------------------------------------------------------------------ the record
    def record(self) -> StreamRecord:
        return StreamRecord(
            step=self.step,
            clock=self.clock,
            generator=self.generator.get_state(),
            pending=self.pending,
            schedule=None if self.schedule is None else self.schedule.state_dict(),
            held=self.held,
        )

    def restore(self, record: StreamRecord) -> None:
        self.step, self.clock = record.step, record.clock
        self.generator.set_state(record.generator)
        self.pending, self.held = record.pending, record.held
        if self.schedule is not None and record.schedule is not None:
            self.schedule.load_state_dict(record.schedule)

    def fingerprint(self) -> int:
        """A digest of the record (every rank of a data-parallel run must hold the same)."""
        return fingerprint(self.generator.get_state(), self.tasks, self.step, self.clock, self.pending)

    # ------------------------------------------------------------------ saved form
    def saved(self) -> dict[str, Any]:
        """The fields a state dict's ``metaopt`` record holds for the stream (the schedule and
        a held task are saved by the methods that have them, under ``schedule`` and ``task``)."""
        return {
            "step": self.step,
            "clock": self.clock,
            "generator": self.generator.get_state(),
            "pending": None if self.pending is None else list(self.pending),
        }

    def check_saved(self, own: Mapping[str, Any], where: str) -> None:
        """Raise ``ValueError`` unless ``own`` holds a stream this one can load: counters that
        are ints with ``clock >= step >= 0``, a readable generator state, a pending draw of
        known tasks (whether the method can make it is the method's check)."""
        step = own.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{where}: saved step count {step!r} is not an int >= 0")
        clock = own.get("clock", step)  # saved before skipped steps were counted: none were
        if isinstance(clock, bool) or not isinstance(clock, int) or clock < step:
            raise ValueError(f"{where}: saved clock {clock!r} is not an int >= the step count {step}")
        try:
            torch.Generator().set_state(_on_cpu(own["generator"]))
        except (KeyError, TypeError, RuntimeError, ValueError, NotImplementedError):
            raise ValueError(f"{where}: the saved generator state is unreadable") from None
        pending = own.get("pending")
        if pending is not None and (
            not isinstance(pending, (list, tuple)) or any(t not in self.tasks for t in pending)
        ):
            raise ValueError(f"{where}: saved pending draw {pending!r} names unknown tasks")

    def load_saved(self, own: Mapping[str, Any]) -> None:
        """Take the fields :meth:`check_saved` accepted."""
        self.step = int(own["step"])
        self.clock = int(own.get("clock", self.step))
        self.generator.set_state(_on_cpu(own["generator"]))
        pending = own.get("pending")
        self.pending = None if pending is None else tuple(pending)

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["generator"] = self.generator.get_state()  # a torch.Generator does not pickle
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        generator = torch.Generator()
        generator.set_state(state.pop("generator"))
        self.__dict__.update(state)
        self.generator = generator
