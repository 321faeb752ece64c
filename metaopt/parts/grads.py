"""Checks on losses and gradients that a step makes before anything moves.

Each is a function of the tensors it checks (no optimizer): the structure of a step's losses
(:func:`check_losses`), whether every gradient is finite in one fused pass per device and dtype
(:func:`all_finite`, read with the caller's one host sync), the step's check of ``.grad`` and
the losses (:func:`check_grads`), the summed losses' backward pass (:func:`summed_backward`),
dividing a ``GradScaler``'s scale out of ``.grad`` (:func:`unscale`), and what a user did wrong
when autograd refuses a loss (:func:`graph_problem`).

>>> import torch
>>> bool(all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])]))
False
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..jacobian import compiled_graph, reaches_any
from .placement import agree, fsdp1_managed, local_tensor, refuse_fsdp1, sharded

__all__ = [
    "all_finite",
    "bad_losses",
    "check_grads",
    "check_losses",
    "graph_problem",
    "summed_backward",
    "unscale",
]


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
            by_device.setdefault(p.grad.device, []).append(local_tensor(p.grad))
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


def summed_backward(
    losses: Mapping[str, Tensor],
    params: Sequence[Tensor],
    every: Sequence[Tensor],
    first: bool,
    where: str,
    scale: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
) -> None:
    """``.grad`` of ``params`` (the trainable ones) += the gradient of the summed ``losses``
    (each first passed through ``scale``, a ``GradScaler``'s, once the checks have passed),
    through ``torch.autograd.backward``, so that DistributedDataParallel's hooks all-reduce it
    as after ``loss.backward()``. ``first``: the first backward of a step, which clears the
    ``.grad`` of ``every`` parameter first. Raises before anything moves if a loss reaches
    none of ``params``.

    Sharded parameters (FSDP2's ``DTensor``) are not in the losses' graphs: FSDP2 computes
    with gathered copies and reduce-scatters their gradients into the shards' ``.grad`` from its
    own backward hooks. Then the backward runs as ``loss.backward()`` does (no ``inputs``),
    and whether every parameter got a gradient is checked at the step instead."""
    if not params:
        raise ValueError(f"{where}: every parameter of the optimizer is frozen")
    refuse_fsdp1(params, where)
    through_engine = sharded(params)
    stray = [] if through_engine else [t for t, v in losses.items() if not reaches_any(v, params)]
    if stray and len(losses) == 1:
        raise ValueError(
            f"{where}: the losses of {stray} reach none of the optimizer's parameters (a module "
            "left out of the optimizer?)"
        )
    if stray:
        raise ValueError(
            f"{where}: the loss of task(s) {stray} reaches none of the optimizer's "
            "parameters (a module left out of the optimizer?)"
        )
    values = list((losses if scale is None else scale(dict(losses))).values())
    total = values[0]
    for v in values[1:]:
        total = total + v
    compiled = compiled_graph(total)
    if first:
        for p in every:
            p.grad = None
    torch.autograd.backward(total, inputs=None if through_engine else list(params))
    if compiled:  # a compiled region gives unreached parameters zeros: eager gives none
        with_grad = [p for p in params if p.grad is not None]
        if with_grad:
            keep = torch.stack([p.grad.ne(0).any() for p in with_grad]).tolist()  # type: ignore[union-attr]
            for p, k in zip(with_grad, keep):
                if not k:
                    p.grad = None


def bad_losses(losses: Mapping[str, Tensor], ok: Sequence[bool]) -> dict[str, float | str]:
    """The losses flagged not ``ok``, for an error: each value, or where it is finite here, a
    note that another rank's was not (the flags of a sharded model are agreed over the ranks)."""
    out: dict[str, float | str] = {}
    for t, v, good in zip(losses, losses.values(), ok):
        if not good:
            value = float(v)
            out[t] = value if not math.isfinite(value) else "non-finite on another rank"
    return out


def check_grads(
    params: Sequence[Tensor],
    losses: Mapping[str, Tensor] | None,
    allow_unused: bool,
    param_name: Callable[[Tensor], str],
    name: str,
    group: Any = None,
    defer: bool = False,
) -> Tensor | None:
    """Before a step moves anything: some parameter of ``params`` (the trainable ones) has a
    gradient; after a ``backward(losses)`` (``losses``: the step's, detached), every one has,
    unless ``allow_unused``; every gradient and loss is finite. One host sync; with ``defer``,
    none: the finiteness is returned as a 0-dim bool on the device, for a step skipped there
    (:mod:`metaopt.parts.guard`), and only the structure raises. A sharded model's ranks decide
    together (:func:`~metaopt.parts.placement.agree`; FSDP1's over ``group``, the optimizer's,
    where a rank whose shard holds no trainable element has no gradient of its own, which
    costs a host read even with ``defer``).

    >>> w = torch.nn.Parameter(torch.ones(2)); w.grad = torch.tensor([1.0, float("inf")])
    >>> check_grads([w], None, False, str, "X")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: X.step: non-finite gradient (NaN or inf) from the backward pass; nothing was updated...
    >>> check_grads([w], None, False, str, "X", defer=True)
    tensor(False)
    """
    grads = [p.grad for p in params if p.grad is not None]
    no_grad = ValueError(
        f"{name}.step: no parameter has a gradient; call loss.backward() or "
        "opt.backward(losses) before opt.step(), or pass the losses: opt.step(losses)"
    )
    fsdp1 = fsdp1_managed(params)
    if not grads and not fsdp1:
        raise no_grad
    if losses is not None and not allow_unused:
        unused = [p for p in params if p.grad is None]
        if unused:
            raise ValueError(
                f"{name}.step: {len(unused)} parameter(s) get no gradient from the losses of "
                f"{list(losses)}, e.g. {param_name(unused[0])}. Remove them from the optimizer, "
                "or pass allow_unused=True if they are legitimately unused by some steps "
                "(task-specific heads)"
            )
    device = local_tensor(grads[0]).device if grads else None
    flags = (
        all_finite([local_tensor(g) for g in grads]).reshape(1)
        if grads
        else torch.ones(1, dtype=torch.bool, device=device)
    )
    if fsdp1:  # last: whether this rank has no gradient, and-reduced to "no rank has one"
        flags = torch.cat([flags, torch.tensor([not grads], device=flags.device)])
    if losses:
        values = list(losses.values())
        if len({(v.dtype, v.device) for v in values}) == 1:  # one op, not one per task
            loss_ok = torch.stack(values).isfinite()
        else:
            loss_ok = torch.stack([v.isfinite().to(flags.device) for v in values])
        flags = torch.cat([flags, loss_ok.to(flags.device)])
    # a sharded model's ranks decide together: every shard's gradient and every rank's losses
    flags = agree(flags, params, group)
    if fsdp1:
        if bool(flags[1]):
            raise no_grad
        flags = torch.cat([flags[:1], flags[2:]])
    if defer:
        return flags.all()
    if bool(flags.all()):
        return None
    if losses and not bool(flags[1:].all()):
        bad = bad_losses(losses, flags[1:].tolist())
        raise ValueError(f"{name}.step: non-finite loss for task(s) {bad}; nothing was updated")
    source = f"the finite loss(es) of {list(losses)}" if losses else "the backward pass"
    raise ValueError(
        f"{name}.step: non-finite gradient (NaN or inf) from {source}; nothing was updated "
        "(with a GradScaler, scaler.step(opt) skips such steps)"
    )
