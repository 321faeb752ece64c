"""Steps skipped on the device: the finiteness of a step decided without a host read.

On an accelerator, reading a device value on the host (``bool(flag)``, ``.item()``) stalls
the host until the device has caught up, and makes the step impossible to capture in a CUDA
graph. So there a step's finiteness check yields a 0-dim bool flag on the device, and the
wrapped optimizer's step is made conditional on it, as torch's fused optimizers skip a step
whose ``found_inf`` a ``GradScaler`` set:

* an optimizer that takes ``found_inf`` itself (``_step_supports_amp_scaling``: torch's
  ``fused=True`` Adam, AdamW, SGD, Adagrad) gets it, and skips on the device at no cost;
* any other optimizer steps, and the tensors the step may change (the parameters with a
  gradient, and their state tensors that live on the parameter's device) are put back with
  ``torch.where`` where the flag is false: one copy of them per step, in time and memory.
  State kept on the host (the step count of a non-fused, non-capturable torch Adam) cannot be
  put back without a host read, and advances on a skipped step.

A step that creates some parameter's optimizer state (its first step, or the first after the
state was cleared) puts it back to zeros where the flag is false, for the torch optimizers
whose fresh state is zeros (Adam, AdamW, SGD without dampening, ...:
:func:`fresh_state_is_zeros`). For any other optimizer it reads the flag once instead, and
steps or not: its fresh state is its own (NAdam's ``mu_product`` starts at 1).

The skips are counted on the device (:class:`SkipCounter`) and read at a point that already
synchronises, or on request.

>>> import torch
>>> w = torch.nn.Parameter(torch.ones(2))
>>> opt = torch.optim.SGD([w], lr=0.5, momentum=0.9)
>>> w.grad = torch.ones(2); guarded_step(opt, [w], torch.tensor(True))
>>> w.grad = torch.tensor([1.0, float("nan")]); guarded_step(opt, [w], torch.tensor(False))
>>> w.tolist(), opt.state[w]["momentum_buffer"].tolist()
([0.5, 0.5], [1.0, 1.0])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .placement import local_tensor

__all__ = [
    "MODES",
    "SkipCounter",
    "defers",
    "fresh_state_is_zeros",
    "guarded_step",
    "nonfinite_mode",
    "takes_found_inf",
]

MODES = ("auto", "raise", "skip")
"""``nonfinite``: ``"raise"`` refuses a non-finite step at once (one host read per step);
``"skip"`` skips it on the device and counts it; ``"auto"``: ``"skip"`` where a trainable
parameter is on a non-CPU device, ``"raise"`` otherwise."""


def nonfinite_mode(value: Any, name: str, where: str) -> str:
    """The ``nonfinite`` option: one of :data:`MODES`."""
    if value not in MODES:
        raise ValueError(f"{where}: {name} must be one of {list(MODES)}, got {value!r}")
    return str(value)


def defers(mode: str, params: Sequence[Tensor]) -> bool:
    """Whether a step over ``params`` under ``mode`` decides its finiteness on the device."""
    if mode == "auto":  # a DTensor's device is its local shard's
        return any(p.device.type != "cpu" for p in params)
    return mode == "skip"


def takes_found_inf(optimizer: Optimizer) -> bool:
    """Whether ``optimizer`` skips a step itself when given ``found_inf`` (GradScaler's contract
    for optimizers that handle scaling: torch's fused implementations)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def guarded_step(optimizer: Optimizer, params: Sequence[Tensor], ok: Tensor) -> None:
    """``optimizer.step()``, which moves nothing on the device where ``ok`` (0-dim bool) is
    false; no host read in steady state. ``params``: the parameters the step may move (those
    with a gradient are; the others are not looked at).

    A step that creates some parameter's optimizer state (its first step) puts that state
    back to zeros where ``ok`` is false, for the torch optimizers whose fresh state is zeros
    (:func:`fresh_state_is_zeros`). For any other optimizer it reads ``ok`` once instead and
    steps or not: its fresh state is its own (NAdam's ``mu_product`` starts at 1, Rprop's step
    sizes at lr), and a skipped first step must leave none."""
    moving = [p for p in params if p.grad is not None]
    fresh = [p for p in moving if not optimizer.state.get(p)]
    if fresh and not fresh_state_is_zeros(optimizer):
        if bool(ok):
            optimizer.step()
        return
    before: list[tuple[Tensor, Tensor]] = []  # (tensor the step may change, its value before)
    if takes_found_inf(optimizer):
        optimizer.found_inf = (~ok).to(torch.float32)  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
    else:
        with torch.no_grad():
            for p in moving:
                local = local_tensor(p)
                before.append((local, local.clone()))
                # .get: torch.optim's state is a defaultdict, and a stateless optimizer's must
                # not gain empty entries (they would change its state dict)
                state = optimizer.state.get(p)
                if state:
                    before.extend((t, t.clone()) for t in _device_state(state, local.device))
        optimizer.step()
    with torch.no_grad():
        flags: dict[torch.device, Tensor] = {}

        def flag(device: torch.device) -> Tensor:
            # onto another accelerator without waiting; onto the host (a model with parameters
            # there) the copy must finish before the host reads it
            return flags.setdefault(device, ok.to(device, non_blocking=device.type != "cpu"))

        for t, old in before:
            t.copy_(torch.where(flag(t.device), t, old))
        for p in fresh:  # a fused SGD fills a new momentum buffer even when told to skip
            device = local_tensor(p).device
            for t in _device_state(optimizer.state.get(p, {}), device):
                t.copy_(torch.where(flag(device), t, torch.zeros_like(t)))


_ZEROS_WHEN_FRESH = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adadelta,
)


def fresh_state_is_zeros(optimizer: Optimizer) -> bool:
    """Whether every tensor of a fresh per-parameter state of ``optimizer`` is zeros, so that
    zeros stand for "no state yet": torch's Adam, AdamW, Adamax, RAdam, RMSprop and Adadelta
    (their moments and step count start at 0), Adagrad with ``initial_accumulator_value=0``,
    and SGD without dampening (its momentum buffer starts as the first gradient, and a zero
    buffer gives that gradient at the next step) or without momentum (no state). Exactly these
    classes, not subclasses."""
    kind = type(optimizer)
    groups = optimizer.param_groups
    if kind in _ZEROS_WHEN_FRESH:
        return True
    if kind is torch.optim.SGD:  # without momentum it keeps no state at all
        return all(g.get("dampening", 0) == 0 or g.get("momentum", 0) == 0 for g in groups)
    if kind is torch.optim.Adagrad:
        return all(g.get("initial_accumulator_value", 0) == 0 for g in groups)
    return False


def _device_state(state: dict[str, Any], device: torch.device) -> list[Tensor]:
    """The tensors of one parameter's optimizer state that live on ``device``."""
    return [
        local_tensor(v) for v in state.values() if isinstance(v, Tensor) and local_tensor(v).device == device
    ]


class SkipCounter:
    """Steps skipped on the device, counted there: :meth:`add` takes a step's flag with no
    host read; :meth:`take` reads the count into :attr:`total` (one host read), and
    :attr:`reported` is the total at the last warning."""

    def __init__(self) -> None:
        self.count: Tensor | None = None
        self.total = 0  # read so far
        self.reported = 0  # of which a warning told

    def add(self, ok: Tensor) -> None:
        skipped = (~ok).to(torch.int64)
        self.count = skipped if self.count is None else self.count + skipped.to(self.count.device)

    def take(self) -> int:
        """Steps skipped since the last :meth:`take` (added to :attr:`total`)."""
        if self.count is None:
            return 0
        n = int(self.count)
        self.count = None
        self.total += n
        return n
