"""Task schedules: which task feeds the next step.

Every schedule draws from a :class:`torch.Generator` owned by the optimizer (never the global
RNG), so a seeded run is reproducible and a saved ``state_dict`` continues the same sequence.

* ``"uniform"``: every task with probability 1/T (default: the paper samples "from all the
  tasks" without naming a distribution; uniform is the neutral choice and gives each pair of
  tasks the same share of the trajectory).
* ``"proportional"``: probability ∝ n_t, the number of training examples of task t.
* ``"temperature"``: probability ∝ n_t^(1/τ) (τ = 1 is proportional, τ → ∞ uniform); the
  multilingual-BERT practice for unbalanced languages.
* ``"round_robin"``: every task once per round, in a fresh random order each round; the round
  carries over from one outer step to the next.
* ``"without_replacement"``: like round robin, but every outer step starts a fresh round, so a
  trajectory of K ≤ T inner steps visits K distinct tasks (Fish's inner loop; Shi et al. 2022).
* a sequence of task names (the optimizer's ``schedule=["fr", "de", ...]``): that order,
  cycled; the data side can then follow it (:mod:`metaopt.data`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["ScheduleName", "TaskSchedule"]

ScheduleName = Literal["uniform", "proportional", "temperature", "round_robin", "without_replacement"]
_NAMES = ("uniform", "proportional", "temperature", "round_robin", "without_replacement", "order")


class TaskSchedule:
    """A seeded stream of task indices.

    Args:
        num_tasks: T.
        kind: one of ``"uniform"``, ``"proportional"``, ``"temperature"``, ``"round_robin"``,
            ``"without_replacement"``, ``"order"``.
        sizes: examples per task, needed by ``"proportional"`` and ``"temperature"``.
        temperature: τ > 0 for ``"temperature"``.
        order: the task indices to cycle through, for ``"order"``.

    Example:
        >>> import torch
        >>> s = TaskSchedule(3, "round_robin")
        >>> g = torch.Generator().manual_seed(0)
        >>> sorted(s.draw(g) for _ in range(3))
        [0, 1, 2]
    """

    def __init__(
        self,
        num_tasks: int,
        kind: str = "uniform",
        *,
        sizes: Sequence[float] | None = None,
        temperature: float = 1.0,
        order: Sequence[int] | None = None,
    ) -> None:
        if num_tasks < 1:
            raise ValueError(f"TaskSchedule: need at least one task, got {num_tasks}")
        if kind not in _NAMES:
            raise ValueError(
                f"TaskSchedule: schedule must be one of {_NAMES[:-1]} or a list of task names, got {kind!r}"
            )
        self.num_tasks = num_tasks
        self.kind = kind
        self.temperature = float(temperature)
        self._order: list[int] = []
        self._sequence: list[int] = []
        self._position = 0
        if kind == "order":
            seq = list(order or [])
            if not seq or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_tasks for i in seq
            ):
                raise ValueError(
                    f"TaskSchedule: an order must be a non-empty list of task indices "
                    f"below {num_tasks}, got {order!r}"
                )
            self._sequence = seq
        if kind in ("proportional", "temperature"):
            if sizes is None:
                raise ValueError(f"TaskSchedule: schedule {kind!r} needs task_sizes")
            if len(sizes) != num_tasks:
                raise ValueError(f"TaskSchedule: {len(sizes)} task sizes given for {num_tasks} tasks")
            if any(not (float(n) > 0) for n in sizes):
                raise ValueError(f"TaskSchedule: task sizes must be positive, got {list(sizes)}")
            if kind == "temperature" and not self.temperature > 0:
                raise ValueError(f"TaskSchedule: temperature must be > 0, got {temperature}")
            tau = self.temperature if kind == "temperature" else 1.0
            w = torch.tensor([float(n) for n in sizes], dtype=torch.float64) ** (1.0 / tau)
        else:
            w = torch.ones(num_tasks, dtype=torch.float64)
        self._probs: Tensor = w / w.sum()

        if kind == "order":
            counts = torch.bincount(torch.tensor(self._sequence), minlength=num_tasks).double()
            self._probs = counts / counts.sum()

    @property
    def probabilities(self) -> Tensor:
        """Probability of each task on one draw (round robin, without replacement and a given
        order: its long-run frequency)."""
        return self._probs.clone()

    def restart(self) -> None:
        """A new outer step begins: ``"without_replacement"`` starts a fresh round."""
        if self.kind == "without_replacement":
            self._order = []

    def draw(self, generator: torch.Generator) -> int:
        """Index of the next task."""
        if self.kind == "order":
            i = self._sequence[self._position % len(self._sequence)]
            self._position += 1
            return i
        if self.kind in ("round_robin", "without_replacement"):
            if not self._order:
                self._order = torch.randperm(self.num_tasks, generator=generator).tolist()
            return self._order.pop(0)
        if self.kind == "uniform":
            return int(torch.randint(self.num_tasks, (1,), generator=generator).item())
        return int(torch.multinomial(self._probs, 1, generator=generator).item())

    def state_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "order": list(self._order), "position": self._position}

    def check_state_dict(self, state: Mapping[str, object]) -> None:
        """Raise ``ValueError`` if :meth:`load_state_dict` would fail on ``state``."""
        if not isinstance(state, Mapping) or state.get("kind") != self.kind:
            saved = state.get("kind") if isinstance(state, Mapping) else None
            raise ValueError(f"load_state_dict: saved schedule is {saved!r}, this one is {self.kind!r}")
        order = state.get("order", [])
        if not isinstance(order, (list, tuple)) or any(
            isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_tasks for i in order
        ):
            raise ValueError(
                f"load_state_dict: saved round-robin order {order!r} is not a list of "
                f"task indices below {self.num_tasks}"
            )
        position = state.get("position", 0)
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ValueError(f"load_state_dict: saved schedule position {position!r} is not an int >= 0")

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.check_state_dict(state)
        order = state.get("order", [])
        assert isinstance(order, (list, tuple))
        self._order = [int(i) for i in order]
        self._position = int(state.get("position", 0))  # type: ignore[call-overload]
