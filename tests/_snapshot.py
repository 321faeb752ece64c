"""Bit-for-bit snapshots of everything an optimizer step may move.

A snapshot holds the parameters, their ``.grad``, the buffers, the optimizer's whole
``state_dict`` (every tensor in it cloned) and the pending task draw. ``assert_same`` compares
two snapshots exactly (NaN equal to NaN), naming the first difference.
"""

from __future__ import annotations

from typing import Any

import torch


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def snapshot(model: torch.nn.Module, opt: Any, *, draw: bool = True) -> dict[str, Any]:
    """Everything observable about ``model`` and ``opt``; the pending draw is made first (it is
    part of the state), unless ``draw=False`` (then the state dict says whether one is pending,
    and nothing is drawn here)."""
    pending = opt.next_tasks() if draw else None
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.detach().clone() for b in model.buffers()],
        "state": _clone(opt.state_dict()),
        "pending": pending,
    }


def _same(a: Any, b: Any, where: str) -> str | None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{where}: tensor against {type(b).__name__}"
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{where}: {tuple(a.shape)}/{a.dtype} against {tuple(b.shape)}/{b.dtype}"
        if a.is_floating_point():
            return (
                None
                if torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
                else f"{where}: values differ"
            )
        return None if torch.equal(a, b) else f"{where}: values differ"
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{where}: keys {sorted(map(str, a))} against {sorted(map(str, b))}"
        for k in a:
            diff = _same(a[k], b[k], f"{where}[{k!r}]")
            if diff:
                return diff
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: length {len(a)} against {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            diff = _same(x, y, f"{where}[{i}]")
            if diff:
                return diff
        return None
    return None if a == b else f"{where}: {a!r} against {b!r}"


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    diff = _same(before, after, "snapshot")
    assert diff is None, diff


def assert_unchanged(before: dict[str, Any], model: torch.nn.Module, opt: Any) -> None:
    assert_same(before, snapshot(model, opt))


# Fields of a state dict's records that a step skipped on the device moves: the task stream
# and the trajectory (served as on any step) and the options (tests force one)
SERVED = {"step", "clock", "generator", "pending", "inner_count", "trajectory", "schedule", "task", "options"}


def held_state(state: dict[str, Any], fresh_from: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a step skipped on the device must hold still, from a state dict: per-parameter
    state (the wrapped optimizer's, the slow weights) and every metaopt record's fields but
    :data:`SERVED`, outermost first. With ``fresh_from`` (the state dict before the step),
    per-parameter fields that did not exist then are left out once checked to be zeros: the
    fresh state a skipped first step leaves (metaopt.parts.guard)."""
    from metaopt.parts.state_dict import record_of

    per_param = {i: dict(fields) for i, fields in state["state"].items()}
    if fresh_from is not None:
        for i, fields in per_param.items():
            for key in set(fields) - set(fresh_from["state"].get(i, {})):
                assert not torch.as_tensor(fields.pop(key)).any(), (i, key)
        per_param = {i: f for i, f in per_param.items() if f or i in fresh_from["state"]}
    records, level = [], record_of(state)
    while isinstance(level, dict):
        records.append({k: v for k, v in level.items() if k not in SERVED and k != "inner"})
        level = level.get("inner")
    return {"state": per_param, "records": records}
