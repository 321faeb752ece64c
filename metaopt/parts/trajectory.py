"""Where a Reptile-family run stands: inner steps into the trajectory, trajectories into the
outer step, outer steps taken.

Each inner step advances the clock; the K-th ends a trajectory, and with ``tasks_per_outer_step
= n`` the n-th trajectory ends the outer step (Nichol et al. 2018's batched Reptile; Lee et al.
2022, Algorithm 1, for n = 1). The trajectory mean is taken in one process when n > 1, and
across ranks with local trajectories (:meth:`TrajectoryClock.batched`). The counters are saved
as ``inner_count``, ``trajectory`` and ``outer_count``. They may exceed ``inner_steps`` and
``tasks_per_outer_step``: both can be lowered mid-run, and the trajectory, or the outer step,
then ends at the next step.

>>> clock = TrajectoryClock()
>>> [clock.advance(inner_steps=2) for _ in range(4)], clock.index
([False, True, False, True], 2)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["TrajectoryClock"]

_FIELDS = ("inner_count", "trajectory", "outer_count")


class TrajectoryClock:
    """The three counters of a slow/fast run (all 0 at the start)."""

    def __init__(self) -> None:
        self.inner = 0  # inner steps into the current trajectory
        self.index = 0  # trajectories into the current outer step
        self.outer = 0  # outer steps taken

    def advance(self, inner_steps: int) -> bool:
        """Count one inner step; True when it ended a trajectory (then θ goes back to φ)."""
        self.inner += 1
        if self.inner < inner_steps:
            return False
        self.inner = 0
        self.index += 1
        return True

    def ends_trajectory(self, inner_steps: int) -> bool:
        """Whether the coming step ends a trajectory."""
        return self.inner + 1 >= inner_steps

    def ends_outer_step(self, inner_steps: int, per_outer_step: int) -> bool:
        """Whether the coming step ends an outer step (φ moves)."""
        return self.ends_trajectory(inner_steps) and self.index + 1 >= per_outer_step

    def batched(self, per_outer_step: int, across_ranks: bool) -> bool:
        """Whether the ending trajectory is folded into a mean (several per outer step, one
        left over from before ``tasks_per_outer_step`` was lowered, or the ranks')."""
        return per_outer_step > 1 or self.index > 1 or across_ranks

    def restart(self) -> None:
        """A new trajectory from φ (``reset_slow_weights``); the outer count stays."""
        self.inner = self.index = 0

    # ------------------------------------------------------------------ the record
    def record(self) -> tuple[int, int, int]:
        return (self.inner, self.index, self.outer)

    def restore(self, record: tuple[int, int, int]) -> None:
        self.inner, self.index, self.outer = record

    def saved(self) -> dict[str, int]:
        return dict(zip(_FIELDS, self.record()))

    @staticmethod
    def check_saved(state: Mapping[str, Any], where: str) -> None:
        """Raise ``ValueError`` unless every counter is an int >= 0."""
        for key in _FIELDS:
            v = state.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{where}: saved {key} {v!r} is not an int >= 0")

    def load_saved(self, state: Mapping[str, Any]) -> None:
        self.restore((int(state["inner_count"]), int(state["trajectory"]), int(state["outer_count"])))
