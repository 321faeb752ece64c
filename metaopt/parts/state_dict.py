"""The state-dict layout every metaopt optimizer shares, its version, and older layouts' migration.

Version 3 is ``torch.optim``'s layout, with nothing beside ``state`` and ``param_groups``, so
that tools that rebuild an optimizer's state dict from those two (``torch.distributed.checkpoint``
's ``get_state_dict``, FSDP's optimizer state dicts, Accelerate, the Hugging Face Trainer)
carry metaopt's too::

    {"state": {i: {<the wrapped optimizer's fields>, "metaopt_<field>": ...}},
     "param_groups": [{<the wrapped optimizer's first group>,
                       "metaopt": {"version": 3, "class": ..., "tasks": [...], "step", "clock",
                                   "generator", "pending", "options": {...},
                                   <the method's own records>,
                                   "inner": <a wrapped metaopt optimizer's record>}},
                      <the wrapped optimizer's other groups>]}

Version 2 kept the record beside ``state`` and ``param_groups`` (``get_state_dict`` dropped it);
version 1 (metaopt 0.1) nested the wrapped optimizer's state dict. Both are migrated.

:func:`split_state` takes a saved dict apart (checking its structure, not its values) into the
method's record, the wrapped optimizer's state dict and the method's per-parameter fields;
:func:`check_like` checks saved optimizer fields against a live state; every torch optimizer
metaopt holds is loaded through :func:`load_optimizer_state` and probed with
:func:`probe_optimizer_state` before a load moves anything.

>>> v2 = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}], "metaopt": {"version": 2}}
>>> record_of(migrate_state_dict(v2, "X"))
{'version': 3}
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .placement import local_tensor

__all__ = [
    "STATE_VERSION",
    "V1_MIGRATIONS",
    "check_like",
    "INITIALIZED",
    "initialize_optimizer_state",
    "initializes_state",
    "load_optimizer_state",
    "map_tensors",
    "migrate_state_dict",
    "probe_optimizer_state",
    "record_of",
    "split_state",
    "with_record",
]


STATE_VERSION = 3
"""Layout of ``MultiTaskOptimizer.state_dict``: 1 (metaopt 0.1) nested the wrapped
optimizer's state dict under ``"optimizer"`` and kept the slow weights under ``"engine"``; 2 is
torch.optim's layout with metaopt's per-parameter fields beside the wrapped optimizer's and its
record under ``"metaopt"``; 3 moves that record into the first param group."""

RECORD = "metaopt"
"""The key of metaopt's record: in the first param group (layout 3), at the top (1 and 2).
Local trajectories key it by the trajectory, ``"metaopt@rank<r>"`` (:func:`with_record`)."""

SHARED_FIELDS = ("metaopt_slow", "metaopt_outer_")
"""Per-parameter fields every trajectory of a local-trajectory run holds alike (φ and the outer
optimizer's state); the others (the wrapped optimizer's, the trajectory mean, parked states)
are the trajectory's own."""


def _record_key(group: Mapping[str, Any]) -> str | None:
    if RECORD in group:
        return RECORD
    keyed = [k for k in group if isinstance(k, str) and k.startswith(RECORD + "@")]
    return keyed[0] if len(keyed) == 1 else None


def record_of(state_dict: Mapping[str, Any]) -> Any:
    """The metaopt record of a saved state dict of any layout (``None`` if it has none)."""
    groups = state_dict.get("param_groups")
    if isinstance(groups, list) and groups and isinstance(groups[0], Mapping):
        key = _record_key(groups[0])
        if key is not None:
            return groups[0][key]
    return state_dict.get(RECORD)


def with_record(
    state: Mapping[Any, Any], groups: Sequence[Mapping[str, Any]], record: Any, trajectory: str | None = None
) -> dict[str, Any]:
    """A layout-3 state dict: ``state``, and ``groups`` (without any record of their own, such
    as a wrapped metaopt optimizer's) with ``record`` in the first one.

    ``trajectory`` (``"rank<r>"``, local trajectories): the record and every per-parameter
    field that is the trajectory's own (not :data:`SHARED_FIELDS`) are keyed by it, so that
    ``torch.distributed.checkpoint``, which keeps one copy of a key that every rank saves,
    keeps each trajectory's state apart; :func:`split_state` takes the keys off again."""
    clean = [{k: v for k, v in g.items() if _record_key({k: v}) is None} for g in groups]
    if trajectory is None:
        clean[0][RECORD] = record
        return {"state": state, "param_groups": clean}
    clean[0][f"{RECORD}@{trajectory}"] = record
    keyed = {
        i: {
            (f if isinstance(f, str) and f.startswith(SHARED_FIELDS) else f"{trajectory}/{f}"): v
            for f, v in e.items()
        }
        for i, e in state.items()
    }
    return {"state": keyed, "param_groups": clean}


V1_MIGRATIONS: dict[
    str, Callable[[Mapping[str, Any], dict[Any, dict[str, Any]], dict[str, Any], str], None]
] = {}
"""Layout-1 records that a method moves into per-parameter fields itself, by the key of the
record (registered by the module that defines the method, so that this module imports none)."""


def migrate_state_dict(state_dict: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """A state dict in the current layout (:data:`STATE_VERSION`), from any saved layout."""
    own = record_of(state_dict)
    if not isinstance(own, Mapping):
        raise ValueError(f"{where}.load_state_dict: not a metaopt state dict")
    version = own.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{where}.load_state_dict: the saved layout version {version!r} is not an int")
    if version == STATE_VERSION:
        return state_dict
    try:
        if version == 2:
            return _migrate_v2(state_dict, own)
        return _migrate_v1(state_dict, own, version, where)
    except (AttributeError, IndexError, KeyError, TypeError, RuntimeError) as err:
        raise ValueError(
            f"{where}.load_state_dict: a layout-{version} state dict that cannot be read ({err!r})"
        ) from None


def _migrate_v2(state_dict: Mapping[str, Any], own: Mapping[str, Any]) -> Mapping[str, Any]:
    """Layout 2 → 3: the record (and a wrapped optimizer's, nested in it) moves into the
    first param group."""
    new_own = {**own, "version": STATE_VERSION}
    if isinstance(own.get("inner"), Mapping):
        new_own["inner"] = {**own["inner"], "version": STATE_VERSION}
    return with_record(state_dict["state"], list(state_dict["param_groups"]), new_own)


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
    inner_own = record_of(inner)
    if isinstance(inner_own, Mapping):
        new_own["inner"] = inner_own
    for key, migrate in V1_MIGRATIONS.items():  # the methods' own layout-1 records
        if key in own:
            migrate(own, state, new_own, where)
    return with_record(state, list(inner["param_groups"]), new_own)


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


def _by_index(
    per_param: Mapping[Any, Any], groups: list[dict[str, Any]], where: str
) -> tuple[Mapping[Any, Any], list[dict[str, Any]]]:
    """``state`` and ``param_groups`` keyed by torch.optim's parameter index. DCP's
    ``set_state_dict`` passes them keyed by parameter name (torch.optim maps them by their
    position in the param groups, as done here)."""
    names = [k for g in groups if isinstance(g, Mapping) for k in g.get("params", [])]
    if all(isinstance(k, int) and not isinstance(k, bool) for k in names):
        return per_param, groups
    position = {k: i for i, k in enumerate(names)}
    unknown = [k for k in per_param if k not in position]
    if len(position) != len(names) or unknown:
        raise ValueError(
            f"{where}.load_state_dict: the state of {unknown[:3]} is keyed by names that the param "
            "groups do not list once each"
        )
    return (
        {position[k]: v for k, v in per_param.items()},
        [{**g, "params": [position[k] for k in g.get("params", [])]} for g in groups],
    )


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
    own = record_of(state_dict)
    per_param, groups = state_dict.get("state"), state_dict.get("param_groups")
    if not isinstance(own, Mapping) or not isinstance(per_param, Mapping) or not isinstance(groups, list):
        raise ValueError(f"{where}.load_state_dict: not a metaopt state dict")
    key = _record_key(groups[0]) if groups and isinstance(groups[0], Mapping) else None
    groups = [{k: v for k, v in g.items() if _record_key({k: v}) is None} for g in groups]
    if key is not None and key != RECORD:  # a trajectory's keys (local trajectories)
        prefix = key.removeprefix(RECORD + "@") + "/"
        per_param = {
            i: {(f.removeprefix(prefix) if isinstance(f, str) else f): v for f, v in e.items()}
            if isinstance(e, Mapping)
            else e
            for i, e in per_param.items()
        }
    per_param, groups = _by_index(per_param, groups, where)
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
        inner = with_record(rest, groups, own.get("inner"))
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


INITIALIZED = ("optimizer", "outer", "weights")
"""The torch optimizers of a metaopt optimizer whose state an initialization can create: the
wrapped one (DCP's ``get_state_dict`` / ``set_state_dict`` step it at lr 0), an outer optimizer
and GradNorm's weight optimizer (created by :func:`initialize_optimizer_state` when a state dict
is taken before their first step, so that every saved dict, and every DCP template, has their
fields). Such state is named in the record (``"initialized"``) and dropped at the next real
step in whichever run holds it, the saving one or the resumed one: a run goes on as if it had
never been made."""


@torch.no_grad()
def initialize_optimizer_state(optimizer: Optimizer) -> bool:
    """Create ``optimizer``'s state as ``torch.distributed.checkpoint`` creates a torch
    optimizer's: a step at lr 0 from zero gradients (its parameters do not move). Returns
    whether it did (``False`` when the optimizer has state already)."""
    if optimizer.state:
        return False
    params = [p for g in optimizer.param_groups for p in g["params"]]
    lrs = [g["lr"] for g in optimizer.param_groups]
    grads = [p.grad for p in params]
    try:
        for g in optimizer.param_groups:
            g["lr"] = 0.0
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        for p, grad in zip(params, grads):
            p.grad = grad
    return True


def initializes_state(optimizer: Optimizer, trainable: list[Tensor]) -> bool:
    """Whether a ``step()`` now is ``torch.distributed.checkpoint``'s initialization of a fresh
    optimizer's state (``get_state_dict`` and ``set_state_dict`` call ``step()`` on an optimizer
    whose ``state`` is empty, after giving every parameter a zero gradient and every param group
    an lr of 0, so that a load template has the fields to load into): the wrapped ``optimizer``'s
    state is empty, every lr is 0 and every one of the ``trainable`` parameters has a gradient
    of zeros. The caller checks that no backward is pending. Cheap checks first: a stateful
    optimizer that has stepped returns at once, with no host read."""
    if optimizer.state or not trainable:
        return False
    if any(g.get("lr", 0) != 0 for g in optimizer.param_groups):
        return False
    if any(p.grad is None for p in trainable):
        return False
    return not any(bool(local_tensor(p.grad).any()) for p in trainable)  # type: ignore[arg-type]


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
