"""The wrapped optimizer's state for each trajectory of a batched outer step.

With ``tasks_per_outer_step = n`` (batched Reptile; n mixed-task trajectories of Sequential
Reptile) every trajectory of an outer step starts from φ and carries the wrapped torch
optimizer's per-parameter state (Adam's moments) of the same trajectory of the previous outer
step, as n workers would (DiLoCo keeps one inner optimizer per worker). One trajectory's state
is live, in the optimizer; the others are parked here. Saved per parameter, beside the live
fields, as ``metaopt_slot<s>_<field>``.

>>> import torch
>>> from metaopt.parts.slots import TrajectorySlots
>>> w = torch.nn.Parameter(torch.ones(2))
>>> adam = torch.optim.Adam([w]); w.grad = torch.ones(2); adam.step()
>>> slots = TrajectorySlots(adam)
>>> slots.use(1); len(adam.state), sorted(slots.parked)
(0, [0])
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from .state_dict import check_like, probe_optimizer_state

__all__ = ["SLOT", "TrajectorySlots"]

SLOT = "metaopt_slot"
"""Prefix of a parked trajectory's per-parameter fields: ``metaopt_slot<s>_<field>``."""

Parked = dict[int, dict[int, dict[str, Any]]]
"""Parked states in saved form: ``{slot: {parameter index: {field: value}}}``."""


class TrajectorySlots:
    """Which trajectory's state is live in ``optimizer``, and the others', parked."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.live = 0
        self.parked: dict[int, Any] = {}

    def use(self, slot: int) -> None:
        """Make trajectory ``slot``'s state the live one (a fresh one if it has none)."""
        if slot == self.live:
            return
        self.parked[self.live] = self.optimizer.state
        self.optimizer.state = self.parked.pop(slot, None) or defaultdict(dict)
        self.live = slot

    def drop_from(self, n: int) -> None:
        """Forget the parked states of trajectories ``n`` and above (n was lowered)."""
        for slot in [k for k in self.parked if k >= n]:
            del self.parked[slot]

    # ------------------------------------------------------------------ saved form
    def saved(self, params: Sequence[Tensor]) -> Parked:
        """The parked states, keyed like ``torch.optim``'s (parameter index)."""
        index = {id(p): i for i, p in enumerate(params)}
        return {
            slot: {index[id(p)]: dict(v) for p, v in st.items() if id(p) in index}
            for slot, st in self.parked.items()
            if st
        }

    def check_saved(
        self,
        saved: Parked,
        params: Sequence[Tensor],
        live: Any,
        param_name: Callable[[Tensor], str],
        where: str,
    ) -> None:
        """Raise ``ValueError`` unless every saved parked state belongs to a parked trajectory
        (not ``live``, the saved live one) and the optimizer can step from it (its fields
        checked against the live state's, then tried on a copy of the optimizer)."""
        for slot, states in saved.items():
            # a slot at or above tasks_per_outer_step is legitimate once that was lowered (it is
            # dropped at the end of the outer step), so only the live trajectory is refused
            if slot == live or slot < 0:
                raise ValueError(
                    f"{where}: saved parked state for trajectory {slot}, which is not a parked "
                    f"trajectory (live {live})"
                )
            for i, values in states.items():
                p = params[i]
                check_like(
                    values,
                    self.optimizer.state.get(p, {}),
                    p.shape,
                    f"{where}: parked state of trajectory {slot} for {param_name(p)}",
                )
            probe_optimizer_state(
                self.optimizer,
                {"state": dict(states), "param_groups": self.optimizer.state_dict()["param_groups"]},
                f"{where}: the parked state of trajectory {slot}",
            )

    def load(self, saved: Parked, params: Sequence[Tensor], live: int) -> None:
        """Park the saved states (checked by :meth:`check_saved`), each value placed by
        torch.optim's own rule for a loaded state
        (``Optimizer._process_value_according_to_param_policy``: floating tensors to the
        parameter's dtype and device, ``step`` kept unless the group is fused or capturable),
        and copied; ``live`` is the saved live trajectory."""
        groups = self.optimizer.state_dict()["param_groups"]
        place = Optimizer._process_value_according_to_param_policy
        parked: dict[int, Any] = {}
        for slot, st in saved.items():
            state: defaultdict[Tensor, Any] = defaultdict(dict)
            for i, values in st.items():
                p = params[i]
                state[p] = {
                    k: place(p, v, i, groups, k).clone() if isinstance(v, Tensor) else v
                    for k, v in values.items()
                }
            parked[int(slot)] = state
        self.parked = parked
        self.live = live


def slot_field(slot: int, field: str) -> str:
    """The saved name of a parked trajectory's field."""
    return f"{SLOT}{slot}_{field}"


def parse_slot_field(name: str) -> tuple[int, str] | None:
    """``(slot, field)`` of a saved parked field's name, or ``None`` if it is not one."""
    number, _, field = name[len(SLOT) :].partition("_")
    if not name.startswith(SLOT) or not number.isdigit() or not field:
        return None
    return int(number), field
