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

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["ScheduleName", "TaskSchedule"]

ScheduleName = Literal["uniform", "proportional", "temperature", "round_robin", "without_replacement"]
_NAMES = ("uniform", "proportional", "temperature", "round_robin", "without_replacement", "order")


def _is_real(value: Any) -> bool:
    """A real number (int, float, numpy's, a one-element real tensor), not a bool."""
    if isinstance(value, Tensor):
        return value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive_size(value: Any, sizes: Sequence[Any]) -> float:
    """One task size as a float: a finite real number > 0, or a ``ValueError`` naming it."""
    size = math.nan
    if _is_real(value):
        try:
            size = float(value)
        except OverflowError:  # a Python int beyond float range
            size = math.inf
    if not (math.isfinite(size) and size > 0):
        raise ValueError(
            f"TaskSchedule: task_sizes must be finite positive numbers (examples per task), got "
            f"{value!r} in {list(sizes)!r}"
        )
    return size


class TaskSchedule:
    """A seeded stream of task indices.

    Args:
        num_tasks: T.
        kind: one of ``"uniform"``, ``"proportional"``, ``"temperature"``, ``"round_robin"``,
            ``"without_replacement"``, ``"order"``.
        sizes: examples per task (``task_sizes`` of the optimizers), needed by
            ``"proportional"`` and ``"temperature"``: finite real numbers > 0 (not bools,
            strings or NaN); the constructor refuses anything else, naming the value.
        temperature: τ for ``"temperature"``: a finite number > 0 (for τ → ∞ use
            ``"uniform"``). Any such τ works: the probabilities are taken in log space, so a
            tiny τ gives the largest task(s) all the probability, a huge one nearly uniform.
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
        if not _is_real(temperature):
            raise ValueError(f"TaskSchedule: temperature must be a number, got {temperature!r}")
        self.temperature = float(temperature)
        if kind == "temperature" and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"TaskSchedule: temperature must be a finite number > 0, got {temperature!r}"
                + (" (for τ → ∞ use the 'uniform' schedule)" if self.temperature == math.inf else "")
            )
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
            n = torch.tensor([_positive_size(v, sizes) for v in sizes], dtype=torch.float64)
            tau = self.temperature if kind == "temperature" else 1.0
            # p ∝ n^(1/τ), taken in log space as exp((log n − max log n) / τ): each term lies
            # in [0, 1] and the largest is 1, so nothing overflows (n^(1/τ) did: 1e5 ** 1e5)
            # and the sum is >= 1, not 0 from underflow; a small τ gives the largest task(s)
            # all the probability, a large one tends to uniform even over sizes 1e-300 … 1e308
            log_n = n.log()
            w = ((log_n - log_n.max()) / tau).exp()
        else:
            w = torch.ones(num_tasks, dtype=torch.float64)
        if not bool(w.isfinite().all() & (w >= 0).all() & (w.sum() > 0)):  # a guard: see above
            raise ValueError(
                f"TaskSchedule: task_sizes and temperature {temperature!r} give unusable task "
                f"probabilities {w.tolist()}"
            )
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
