"""Reptile (Nichol, Achiam & Schulman 2018, arXiv 1803.02999), serial and batched."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .slow_fast import SlowFastOptimizer

__all__ = ["Reptile"]


class Reptile(SlowFastOptimizer):
    """Reptile: each trajectory trains on *one* task for K inner steps, starting from φ.

    Serial (``tasks_per_outer_step=1``, default): draw a task, take K inner steps on it, then
    ``φ ← φ + η(θ_K − φ)``, ``θ ← φ``. Batched (``tasks_per_outer_step=n``): n trajectories,
    each on its own drawn task and each starting from φ, then ``φ ← φ + η(mean_i θ_K^(i) − φ)``
    (the running mean lives in one extra parameter-sized buffer).

    Only intra-task gradient inner products are rewarded by Reptile's implicit objective; that
    is the contrast with :class:`~metaopt.SequentialReptile`, which mixes tasks inside a
    trajectory.

    Args:
        optimizer: the inner optimizer (a torch optimizer; wrapping a metaopt optimizer, whose
            steps need several tasks, contradicts one task per trajectory and is refused).
        tasks: task names.
        tasks_per_outer_step: trajectories averaged per outer step (meta-batch size), >= 1.

    Other options, and their defaults, are those of :class:`~metaopt.SlowFastOptimizer`
    (``local_trajectories=True`` runs one trajectory per rank: docs/scaling.md).
    ``outer_lr`` defaults to 0.1, ``inner_steps`` to 1000 (the Sequential Reptile paper's
    values, kept equal so the two are compared at the same settings).

    Example:
        >>> import torch, metaopt
        >>> model = torch.nn.Linear(3, 1)
        >>> data = {t: torch.randn(16, 3) for t in ["a", "b"]}
        >>> opt = metaopt.Reptile(torch.optim.SGD(model.parameters(), lr=0.1), tasks=["a", "b"],
        ...                       inner_steps=5, outer_lr=0.5, tasks_per_outer_step=2, seed=0)
        >>> for _ in range(10):
        ...     report = opt.step({t: model(data[t]).pow(2).mean() for t in opt.next_tasks()})
        >>> opt.outer_step_count
        1

    References:
        Nichol, Achiam & Schulman. On First-Order Meta-Learning Algorithms. arXiv:1803.02999.
    """

    _composable = False

    def _draw_tasks(self) -> list[str]:
        # the trajectory's task is held by the task stream, so a refused step puts it back too
        if self._inner_count == 0 or self.stream.held is None:
            self.stream.held = self.tasks[self.schedule.draw(self.generator)]
        return [self.stream.held]

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "task": self.stream.held}

    def _check_extra_state(self, state: Mapping[str, Any]) -> None:
        super()._check_extra_state(state)
        task = state.get("task")
        if task is not None and task not in self.tasks:
            raise ValueError(f"Reptile.load_state_dict: saved task {task!r} is not one of {list(self.tasks)}")
        if task is None and state.get("inner_count", 0) > 0:
            raise ValueError("Reptile.load_state_dict: saved mid-trajectory without the trajectory's task")

    def _check_pending_saved(self, pending: list[str], own: Mapping[str, Any]) -> None:
        self._check_pending(pending)
        if own.get("inner_count", 0) > 0 and pending != [own.get("task")]:
            raise ValueError(f"the trajectory's task is {own.get('task')!r}")

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        super()._load_extra_state(state)
        self.stream.held = state.get("task")
