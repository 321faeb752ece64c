"""The state-dict layout every metaopt optimizer shares, its version, and older layouts' migration.

Version 2 is ``torch.optim``'s layout, so that tools that read an optimizer's state per
parameter (DCP, FSDP's optimizer state dicts, Accelerate, the Hugging Face Trainer) carry
metaopt's too::

    {"state": {i: {<the wrapped optimizer's fields>, "metaopt_<field>": ...}},
     "param_groups": <the wrapped optimizer's>,
     "metaopt": {"version": 2, "class": ..., "tasks": [...], "step", "clock", "generator",
                 "pending", "options": {...}, <the method's own records>,
                 "inner": <a wrapped metaopt optimizer's record>}}

:func:`split_state` takes a saved dict apart (checking its structure, not its values) into the
method's record, the wrapped optimizer's state dict and the method's per-parameter fields;
:func:`check_like` checks saved optimizer fields against a live state; every torch optimizer
metaopt holds is loaded through :func:`load_optimizer_state` and probed with
:func:`probe_optimizer_state` before a load moves anything.

>>> migrate_state_dict({"metaopt": {"version": STATE_VERSION}}, "X") == {"metaopt": {"version": 2}}
True
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "STATE_VERSION",
    "V1_MIGRATIONS",
    "check_like",
    "load_optimizer_state",
    "map_tensors",
    "migrate_state_dict",
    "probe_optimizer_state",
    "split_state",
]


STATE_VERSION = 2
"""Layout of ``MultiTaskOptimizer.state_dict``: 1 (metaopt 0.1) nested the wrapped
optimizer's state dict under ``"optimizer"`` and kept the slow weights under ``"engine"``; 2 is
torch.optim's layout with metaopt's per-parameter fields beside the wrapped optimizer's."""


V1_MIGRATIONS: dict[
    str, Callable[[Mapping[str, Any], dict[Any, dict[str, Any]], dict[str, Any], str], None]
] = {}
"""Layout-1 records that a method moves into per-parameter fields itself, by the key of the
record (registered by the module that defines the method, so that this module imports none)."""


def migrate_state_dict(state_dict: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """A state dict in the current layout (:data:`STATE_VERSION`), from any saved layout."""
    own = state_dict.get("metaopt")
    if not isinstance(own, Mapping):
        raise ValueError(f"{where}.load_state_dict: not a metaopt state dict")
    version = own.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{where}.load_state_dict: the saved layout version {version!r} is not an int")
    if version == STATE_VERSION:
        return state_dict
    try:
        return _migrate_v1(state_dict, own, version, where)
    except (AttributeError, IndexError, KeyError, TypeError, RuntimeError) as err:
        raise ValueError(
            f"{where}.load_state_dict: a layout-{version} state dict that cannot be read ({err!r})"
        ) from None


def _migrate_v1(
    state_dict: Mapping[str, Any], own: Mapping[str, Any], version: int, where: str
) -> Mapping[str, Any]:
    if version != 1 or "optimizer" not in state_dict:
        raise ValueError(f"{where}.load_state_dict: not a metaopt state dict (layout {version!r})")
    inner = state_dict["optimizer"]
    if isinstance(inner, Mapping) and isinstance(inner.get("metaopt"), Mapping):
        inner = migrate_state_dict(inner, where)  # a composed optimizer's, itself version 1
    if not isinstance(inner, Mapping) or not isinstance(inner.get("state"), Mapping):
        raise ValueError(f"{where}.load_state_dict: not a metaopt state dict")
    state: dict[Any, dict[str, Any]] = {i: dict(v) for i, v in inner["state"].items()}
    new_own = dict(own)  # each migration below takes its own records out
    new_own["version"] = STATE_VERSION
    if isinstance(inner.get("metaopt"), Mapping):
        new_own["inner"] = inner["metaopt"]
    for key, migrate in V1_MIGRATIONS.items():  # the methods' own layout-1 records
        if key in own:
            migrate(own, state, new_own, where)
    return {"state": state, "param_groups": inner.get("param_groups"), "metaopt": new_own}


def map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (mappings, lists and tuples
    rebuilt; other leaves shared), e.g. a state dict cloned or moved to the CPU."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def load_optimizer_state(optimizer: Optimizer, state: Mapping[str, Any]) -> None:
    """``optimizer.load_state_dict`` on a copy of ``state``. torch.optim keeps the tensors it is
    given (``.to()`` returns the same tensor when dtype and device already match), so a state
    dict taken in memory from another optimizer would otherwise alias that optimizer's state:
    both would then step the same buffers. Every torch optimizer metaopt holds (the wrapped one,
    an outer optimizer, GradNorm's weight optimizer) is loaded through this."""
    optimizer.load_state_dict(map_tensors(state, Tensor.clone))


def probe_optimizer_state(optimizer: Optimizer, state: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError`` unless ``optimizer`` can load ``state`` and step from it: tried on a
    copy of the optimizer (and of its parameters), with zero gradients, so that a saved state it
    cannot use is refused when it is loaded, not in the middle of a later step."""
    probe = copy.deepcopy(optimizer)
    try:
        load_optimizer_state(probe, state)  # on copies: the probe's step must not move them
        for group in probe.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        probe.step()
    except Exception as err:  # whatever the optimizer raises on a state it cannot use
        raise ValueError(
            f"{where}: the optimizer cannot step from it ({type(err).__name__}: {err})"
        ) from None


def split_state(
    state_dict: Any, prefixes: tuple[str, ...], composed: bool, where: str
) -> tuple[Mapping[str, Any], dict[str, Any], dict[int, dict[str, Any]]]:
    """(the method's record, the wrapped optimizer's state dict, the method's per-parameter
    fields: those whose names start with one of ``prefixes``) of a saved state dict, migrated
    to the current layout; the structure is checked, not the values. ``composed``: the
    optimizer wraps a metaopt optimizer (whose record is then the wrapped state dict's).
    ``where`` names the optimizer in errors."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{where}.load_state_dict: not a metaopt state dict")
    state_dict = migrate_state_dict(state_dict, where)
    own = state_dict.get("metaopt")
    per_param, groups = state_dict.get("state"), state_dict.get("param_groups")
    if not isinstance(own, Mapping) or not isinstance(per_param, Mapping) or not isinstance(groups, list):
        raise ValueError(f"{where}.load_state_dict: not a metaopt state dict")
    rest: dict[Any, dict[str, Any]] = {}
    fields: dict[int, dict[str, Any]] = {}
    for i, entry in per_param.items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}.load_state_dict: the state of parameter {i!r} is not a mapping")
        for k, v in entry.items():
            if prefixes and isinstance(k, str) and k.startswith(prefixes):
                fields.setdefault(i, {})[k] = v
            else:
                rest.setdefault(i, {})[k] = v
    inner: dict[str, Any] = {"state": rest, "param_groups": groups}
    if (own.get("inner") is None) == composed:
        saved = "without" if own.get("inner") is None else "with"
        raise ValueError(
            f"{where}.load_state_dict: the state was saved {saved} a wrapped metaopt optimizer, "
            "unlike this one (another composition)"
        )
    if composed:
        inner["metaopt"] = own.get("inner")
    else:
        stray = sorted(
            {k for e in rest.values() for k in e if isinstance(k, str) and k.startswith("metaopt_")}
        )
        if stray:
            raise ValueError(
                f"{where}.load_state_dict: per-parameter fields {stray} are not this "
                "optimizer's (saved by another method or composition?)"
            )
    return own, inner, fields


def check_like(values: Any, live: Mapping[str, Any], shape: torch.Size, where: str) -> None:
    """Saved optimizer fields for one tensor: a mapping with the live state's fields (when it
    has any), each a finite tensor shaped like the tensor (or a scalar) where the live one is a
    tensor, else a plain number or None."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{where} is not a mapping of fields")
    if live and set(values) != set(live):
        raise ValueError(f"{where} has fields {sorted(values)}, expected {sorted(live)}")
    for field, v in values.items():
        ref = live.get(field)
        if isinstance(v, Tensor):
            if not (v.shape == shape or v.numel() == 1) or (isinstance(ref, Tensor) and v.shape != ref.shape):
                raise ValueError(f"{where}: {field!r} has shape {tuple(v.shape)}")
            if v.is_floating_point() and not bool(v.isfinite().all()):
                raise ValueError(f"{where}: {field!r} is not finite")
        elif isinstance(ref, Tensor) or not (v is None or isinstance(v, (bool, int, float))):
            raise ValueError(f"{where}: {field!r} is a {type(v).__name__}")
