"""Checks on losses and gradients that a step makes before anything moves.

Each is a function of the tensors it checks (no optimizer): the structure of a step's losses
(:func:`check_losses`), whether every gradient is finite in one fused pass per device and dtype
(:func:`all_finite`, read with the caller's one host sync), dividing a ``GradScaler``'s scale out
of ``.grad`` (:func:`unscale`), and what a user did wrong when autograd refuses a loss
(:func:`graph_problem`).

>>> import torch
>>> bool(all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])]))
False
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["all_finite", "check_losses", "graph_problem", "unscale"]


def graph_problem(message: str) -> str | None:
    """What a user did wrong, for the autograd errors a loss that cannot be used again gives."""
    if "backward through the graph a second time" in message:
        return (
            "a loss was already used by a backward pass, which freed its graph (a loss reused "
            "from an earlier step?); compute the losses anew for every step"
        )
    if message.startswith("task_jacobian: the graph of") and "already freed" in message:
        return (
            message.removeprefix("task_jacobian: ").split(". ")[0]
            + ": a loss reused from an earlier step, or losses that share part of their graph "
            "(a common encoder) without retain_graph=True"
        )
    if "modified by an inplace operation" in message:
        return (
            "a loss was computed before a tensor it depends on was changed in place (a stale "
            "loss from before the last step?); compute the losses after the previous step"
        )
    return None


def unscale(params: Sequence[Tensor], scale: Tensor) -> None:
    """``.grad`` /= ``scale`` (GradScaler's reciprocal, in float64 then float32), per device."""
    inv = scale.double().reciprocal().float()
    by_device: dict[torch.device, list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_device.setdefault(p.grad.device, []).append(p.grad)
    for device, grads in by_device.items():
        torch._foreach_mul_(grads, inv.to(device))


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """0-dim bool: every element of every tensor is finite. One fused pass per (device, dtype):
    GradScaler's own kernel, which multiplies by an ``inv_scale`` of exactly 1 (leaving every
    value bit for bit as it was) and flags any inf or NaN. The flag is read with the caller's
    single host sync."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    device = tensors[0].device
    found = []
    for (dev, _), ts in groups.items():
        flag = torch.zeros(1, dtype=torch.float32, device=dev)
        one = torch.ones(1, dtype=torch.float32, device=dev)
        torch._amp_foreach_non_finite_check_and_unscale_(ts, flag, one)
        found.append(flag.to(device))
    return (torch.cat(found) if len(found) > 1 else found[0]).eq(0).all()


def check_losses(losses: Mapping[str, Tensor], wanted: Sequence[str], where: str) -> dict[str, Tensor]:
    """The losses for exactly ``wanted``, each a 0-d floating tensor that requires grad (their
    values are checked with the gradients, at the step, in one host sync)."""
    if not isinstance(losses, Mapping):
        raise TypeError(f"{where}: losses must be a mapping {{task: loss}}, got {type(losses).__name__}")
    missing = [t for t in wanted if t not in losses]
    extra = [k for k in losses if k not in wanted]
    if missing or extra:
        raise ValueError(
            f"{where}: expected losses for exactly {list(wanted)} (next_tasks()); "
            f"missing {missing}, unexpected {extra}"
        )
    out: dict[str, Tensor] = {}
    for t in wanted:
        v = losses[t]
        if not isinstance(v, Tensor):
            raise TypeError(f"{where}: loss for task {t!r} is a {type(v).__name__}, not a Tensor")
        if v.numel() != 1:
            raise ValueError(f"{where}: loss for task {t!r} must be a scalar, got shape {tuple(v.shape)}")
        if not v.is_floating_point():
            raise ValueError(f"{where}: loss for task {t!r} has dtype {v.dtype}")
        if not v.requires_grad:
            raise ValueError(
                f"{where}: loss for task {t!r} does not require grad: it is not connected "
                "to any parameter (computed under no_grad, or detached?)"
            )
        out[t] = v.reshape(())
    return out
