"""The slow weights and the rule that moves them at an outer step.

The Reptile family's outer step (Nichol et al. 2018; Lee et al. 2022, Algorithm 1) moves the
slow weights φ toward the fast weights θ reached by a trajectory, or toward the mean of several
(batched, or across ranks), then θ restarts from φ. :class:`OuterStep` holds φ and the
trajectory mean (an :class:`~metaopt.interpolation.Interpolator` over the fast tensors as they
are) and one of two rules: interpolation at η, ``φ ← φ + η(mean θ − φ)``, or an outer
``torch.optim`` optimizer built over φ and fed the pseudo-gradient φ − mean θ (DiLoCo's outer
Nesterov, Douillard et al. 2023).

Its saved form is per fast tensor, beside the wrapped optimizer's fields: ``metaopt_slow`` (φ),
``metaopt_acc`` (the mean of the finished trajectories, mid outer step) and
``metaopt_outer_<field>`` (the outer optimizer's state); :func:`parse_fields` reads them back.

>>> import torch
>>> from metaopt.interpolation import Interpolator
>>> w = torch.nn.Parameter(torch.zeros(2))
>>> outer = OuterStep(Interpolator({"p0": w}), None, "X")
>>> with torch.no_grad():
...     _ = w.fill_(1.0)
>>> outer.apply(0.5, batched=False, average=None, bucket=None)
>>> w.detach()
tensor([0.5000, 0.5000])
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from .._distributed import Reduce
from ..interpolation import Interpolator
from .slots import parse_slot_field, slot_field
from .state_dict import check_like, load_optimizer_state, probe_optimizer_state

__all__ = ["ACC", "OUTER", "SLOW", "OuterRecord", "OuterStep", "migrate_v1", "parse_fields"]

SLOW, ACC, OUTER = "metaopt_slow", "metaopt_acc", "metaopt_outer_"
"""Saved per-tensor fields: φ, the trajectory mean, the outer optimizer's fields (a prefix)."""


class OuterRecord(NamedTuple):
    """The outer step's saved record, read back from the per-parameter fields by
    :func:`parse_fields` (then checked whole by :meth:`OuterStep.check_saved`)."""

    slow: dict[str, Any]
    """φ by fast-tensor key (``"p<i>"``, ``"b:<name>"``)."""
    acc: dict[str, Any] | None
    """The mean of the trajectories finished in this outer step, or ``None``."""
    outer: dict[int, Any]
    """The outer optimizer's per-tensor state, by its parameter index."""
    groups: Any
    """The outer optimizer's saved param groups (``None`` without one)."""


class OuterStep:
    """φ, the trajectory mean, and the outer rule.

    Args:
        engine: the slow weights over the fast tensors.
        outer_optimizer: ``params -> torch.optim.Optimizer`` built over φ, or ``None``
            (interpolation at the ``lr`` given to :meth:`apply`).
        where: the optimizer's name, for errors.
    """

    def __init__(
        self,
        engine: Interpolator,
        outer_optimizer: Callable[[list[Tensor]], Optimizer] | None,
        where: str,
    ) -> None:
        self.engine = engine
        self.optimizer: Optimizer | None = None
        if outer_optimizer is not None:
            self.optimizer = outer_optimizer(engine.slow)
            if not isinstance(self.optimizer, Optimizer):
                raise TypeError(f"{where}: outer_optimizer must return a torch.optim.Optimizer")

    @property
    def keep_buffers(self) -> bool:
        """Whether φ's tensors must stay the same objects (an outer optimizer keys its state
        by them)."""
        return self.optimizer is not None

    @torch.no_grad()
    def apply(self, lr: float | None, *, batched: bool, average: Reduce | None, bucket: int | None) -> None:
        """Move φ (toward the trajectory mean if ``batched``, else toward θ), then θ ← φ.
        ``average``: the ranks' all-reduce of the mean (local trajectories), in buckets of
        ``bucket`` elements; ``lr``: η, without an outer optimizer."""
        if self.optimizer is not None:
            if average is not None:
                self.engine.reduce_accumulated(average, bucket)
            pseudo = self.engine.accumulated_pseudo_gradient() if batched else self.engine.pseudo_gradient()
            for phi, g in zip(self.engine.slow, pseudo):
                phi.grad = g
            self.optimizer.step()
            for phi in self.engine.slow:
                phi.grad = None
            self.engine.sync_fast()
            return
        assert lr is not None
        if batched:
            self.engine.interpolate_accumulated(lr, reduce=average, bucket=bucket)
        else:
            self.engine.interpolate(lr)

    def rebind(self, where: str) -> None:
        """Point the outer optimizer at φ again after a copy or unpickle, which rebuilt φ as
        views of the copied slow buffers while the optimizer got tensors of its own (equal
        values; the state it keys by them moves along)."""
        outer = self.optimizer
        if outer is None:
            return
        old = [p for g in outer.param_groups for p in g["params"]]
        new = self.engine.slow
        if len(old) != len(new):
            raise RuntimeError(f"{where}: the outer optimizer lost track of the slow weights")
        into = {id(p): q for p, q in zip(old, new)}
        for g in outer.param_groups:
            g["params"] = [into[id(p)] for p in g["params"]]
        outer.state = defaultdict(dict, {into[id(p)]: v for p, v in outer.state.items()})

    # ------------------------------------------------------------------ saved form
    def fields(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Saved fields of the fast tensors whose keys start with ``prefix`` ("p": parameters,
        "b:": buffers), each tensor copied once."""
        engine = self.engine.state_dict(prefix)
        slow: Mapping[str, Tensor] = engine["slow"]  # type: ignore[assignment]
        acc: Mapping[str, Tensor] = engine["acc"] or {}  # type: ignore[assignment]
        out: dict[str, dict[str, Any]] = {k: {SLOW: v} for k, v in slow.items()}
        for k, v in acc.items():
            out[k][ACC] = v
        keys = self.engine.keys
        if self.optimizer is not None and any(k.startswith(prefix) for k in keys):
            for j, values in self.optimizer.state_dict()["state"].items():
                if keys[j].startswith(prefix):
                    out[keys[j]].update((OUTER + f, v) for f, v in values.items())
        return out

    def param_groups(self) -> list[dict[str, Any]] | None:
        """The outer optimizer's saved param groups (``None`` without one)."""
        return None if self.optimizer is None else self.optimizer.state_dict()["param_groups"]

    def check_saved(self, fast: Mapping[str, Tensor], record: OuterRecord, where: str) -> None:
        """Raise ``ValueError`` unless ``record`` loads over ``fast``, the fast tensors after the
        load: shapes, finiteness, the same outer-optimizer set-up, a state the outer optimizer
        can step from (tried on a copy)."""
        slow, acc, outer, groups = record
        if self.optimizer is not None and list(fast) != self.engine.keys:
            raise ValueError(
                f"{where}: the saved slow weights are for {sorted(slow)}, this optimizer's outer "
                f"optimizer holds {self.engine.keys}: the same trainable parameters are needed"
            )
        if acc is not None and set(acc) != set(slow):
            raise ValueError(
                f"{where}: saved accumulator are for other tensors than the slow weights "
                f"({sorted(set(acc) ^ set(slow))[:5]})"
            )
        Interpolator.check_state(fast, self._full(fast, slow, acc))
        if (groups is None) != (self.optimizer is None) or (outer and self.optimizer is None):
            raise ValueError(
                f"{where}: outer optimizer present in one of the saved state and this optimizer "
                "but not the other"
            )
        if self.optimizer is None:
            return
        n = len(self.engine.slow)
        if not isinstance(groups, list) or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups
        ):
            raise ValueError(f"{where}: saved outer_param_groups are not param groups")
        indices = [i for g in groups for i in g["params"]]
        if sorted(indices, key=repr) != list(range(n)):
            raise ValueError(
                f"{where}: saved outer_param_groups list parameters {indices}, expected each of "
                f"0..{n - 1} once"
            )
        for j, values in outer.items():
            phi = self.engine.slow[j]
            check_like(
                values,
                self.optimizer.state.get(phi, {}),
                phi.shape,
                f"{where}: outer-optimizer state of {self.engine.keys[j]}",
            )
        saved = {"state": dict(outer), "param_groups": groups}
        probe_optimizer_state(self.optimizer, saved, f"{where}: the outer-optimizer state")

    def load_saved(self, fast: Mapping[str, Tensor], record: OuterRecord) -> None:
        """Take what :meth:`check_saved` accepted."""
        self.engine.refresh(dict(fast), keep_buffers=self.keep_buffers)
        self.engine.load_state_dict(self._full(fast, record.slow, record.acc))
        if self.optimizer is not None:
            load_optimizer_state(self.optimizer, {"state": dict(record.outer), "param_groups": record.groups})

    @staticmethod
    def _full(
        fast: Mapping[str, Tensor], slow: Mapping[str, Any], acc: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """The engine's saved form over ``fast``: a tensor without saved values takes θ (as at
        the end of a trajectory)."""
        return {
            "slow": {k: slow.get(k, t) for k, t in fast.items()},
            "acc": None if acc is None else {k: acc.get(k, t) for k, t in fast.items()},
        }


def parse_fields(
    by_key: Mapping[str, Mapping[str, Any]], keys: list[str], groups: Any, where: str
) -> tuple[OuterRecord, dict[int, dict[int, dict[str, Any]]]]:
    """(the outer step's record, the parked slots) from saved per-key fields (``"p<i>"``,
    ``"b:<name>"``); ``keys``: the engine's keys, which index the outer optimizer's state;
    ``groups``: its saved param groups. Raises ``ValueError`` on any field that is not one of
    these."""
    slow: dict[str, Any] = {}
    acc: dict[str, Any] = {}
    outer: dict[str, dict[str, Any]] = {}
    slots: dict[int, dict[int, dict[str, Any]]] = {}
    for key, f in by_key.items():
        for field, v in f.items():
            parked = parse_slot_field(field) if key.startswith("p") else None
            if field == SLOW:
                slow[key] = v
            elif field == ACC:
                acc[key] = v
            elif field.startswith(OUTER):
                outer.setdefault(key, {})[field[len(OUTER) :]] = v
            elif parked is not None:
                slots.setdefault(parked[0], {}).setdefault(int(key[1:]), {})[parked[1]] = v
            else:
                raise ValueError(f"{where}: unknown per-parameter field {field!r} for {key}")
    stray = sorted(set(outer) - set(keys))
    if stray:
        raise ValueError(f"{where}: outer-optimizer state for {stray}, which have no slow weights")
    record = OuterRecord(slow, acc or None, {keys.index(k): v for k, v in outer.items()}, groups)
    return record, slots


def migrate_v1(
    own: Mapping[str, Any], state: dict[Any, dict[str, Any]], new_own: dict[str, Any], where: str
) -> None:
    """Move a metaopt 0.1 slow/fast record (``engine``, ``inner_slots``, ``outer_optimizer``)
    into the per-parameter fields of the current layout, in place (out of ``new_own``)."""
    for key in ("engine", "inner_slots", "outer_optimizer"):
        new_own.pop(key, None)
    engine = own.get("engine")
    if not isinstance(engine, Mapping) or not isinstance(engine.get("slow"), Mapping):
        raise ValueError(f"{where}.load_state_dict: the saved state has no slow weights")
    buffers: dict[str, dict[str, Any]] = {}

    def fields_of(key: str) -> dict[str, Any]:
        if key.startswith("b:"):
            return buffers.setdefault(key[2:], {})
        if not key.startswith("p") or not key[1:].isdigit():
            raise ValueError(f"{where}.load_state_dict: saved slow weights for {key!r}, not a parameter")
        return state.setdefault(int(key[1:]), {})

    slow = engine["slow"]
    for key, v in slow.items():
        fields_of(key)[SLOW] = v
    for key, v in (engine.get("acc") or {}).items():
        fields_of(key)[ACC] = v
    for slot, states in (own.get("inner_slots") or {}).items():
        for i, values in states.items():
            for f, v in values.items():
                state.setdefault(i, {})[slot_field(slot, f)] = v
    outer = own.get("outer_optimizer")
    new_own["buffers"] = buffers
    new_own["outer_param_groups"] = None
    if outer is None:
        return
    # 0.1 built the outer optimizer over one flat buffer per (device, dtype), the slow weights
    # end to end in the saved order: split each flat field back per tensor
    runs: list[list[str]] = []
    for key, v in slow.items():
        if runs and (slow[runs[-1][-1]].dtype, slow[runs[-1][-1]].device) == (v.dtype, v.device):
            runs[-1].append(key)
        else:
            runs.append([key])
    groups = outer.get("param_groups")
    if not isinstance(groups, list) or len(groups) != 1:
        raise ValueError(
            f"{where}.load_state_dict: cannot migrate a 0.1 outer optimizer with several param groups"
        )
    keys = [k for run in runs for k in run]
    for j, fields in outer.get("state", {}).items():
        run = runs[j]
        sizes = [slow[k].numel() for k in run]
        for f, v in fields.items():
            if isinstance(v, Tensor) and v.numel() == sum(sizes) and v.numel() > 1:
                for k, part in zip(run, v.reshape(-1).split(sizes)):
                    fields_of(k)[OUTER + f] = part.reshape(slow[k].shape).clone()
            elif isinstance(v, Tensor) and v.numel() > 1:
                raise ValueError(
                    f"{where}.load_state_dict: cannot migrate the 0.1 outer optimizer's {f!r} "
                    "(its slow buffer was packed with gaps); re-create the outer optimizer"
                )
            else:
                for k in run:
                    fields_of(k)[OUTER + f] = v
    new_own["outer_param_groups"] = [{**groups[0], "params": list(range(len(keys)))}]
