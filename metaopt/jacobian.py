"""Per-task gradients of a list of parameters, as the rows of one (T, P) matrix.

This is the "per-task grads" layer (docs/design.md): it turns T scalar losses into the
Jacobian ``J`` that :mod:`metaopt.aggregation` reduces to one update. Row ``t`` of ``J`` is the
gradient of ``losses[t]`` with respect to ``params``, each parameter flattened and the pieces
concatenated in order (:func:`parameter_slices` gives each parameter's columns).

Two ways to compute it:

* **loop** (default): one ``torch.autograd.grad`` per task. Each task's gradients are copied
  into their preallocated row and dropped at once, so memory beyond the graph is the T rows plus
  one task's gradients. With ``retain_graph=False`` each task's graph is released as soon as its
  row is done; losses that *share* part of a graph (a common encoder) therefore need
  ``retain_graph=True``, and a clear error says so otherwise.
* **batched** (``batched=True``): one ``torch.autograd.grad`` on the stacked losses with
  ``is_grads_batched=True`` (``vmap`` over the backward pass): fewer Python round trips, but the
  backward's intermediates are T times larger. If ``vmap`` cannot handle an operation, a
  ``RuntimeWarning`` is issued and the loop is used instead; so that this fallback stays
  possible, the batched pass always keeps the graph (it is freed with the losses).

Parameters that a loss does not reach get zeros in that loss's row. Whether a zero block
means "unreached" or "reached with a zero gradient" is reported by :func:`task_jacobian`
(``reached[t, k]`` for loss ``t`` and parameter ``k``), or by :func:`reached_parameters` without
any backward pass.

>>> import torch
>>> w = torch.tensor([1.0, 2.0], requires_grad=True)
>>> head = torch.tensor(3.0, requires_grad=True)
>>> losses = [(w ** 2).sum(), (w[0] * head)]
>>> task_gradients(losses, [w, head])
tensor([[2., 4., 0.],
        [3., 0., 1.]])
>>> task_jacobian([(w ** 2).sum(), (w[0] * head)], [w, head]).reached
tensor([[ True, False],
        [ True,  True]])
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

from .layout import Layout

__all__ = [
    "TaskJacobian",
    "compiled_graph",
    "parameter_slices",
    "reached_parameters",
    "reaches_any",
    "task_gradients",
    "task_jacobian",
]


class TaskJacobian(NamedTuple):
    """Result of :func:`task_jacobian`."""

    matrix: Tensor
    """(T, P) per-task gradients; unreached blocks are zeros."""
    reached: Tensor
    """(T, len(params)) bool on CPU: ``reached[t, k]`` is False iff ``losses[t]`` does not
    depend on ``params[k]`` (its block in row ``t`` is then zeros)."""


def parameter_slices(params: Iterable[Tensor]) -> list[slice]:
    """Columns of each parameter in the flattened rows built by :func:`task_gradients`
    (:class:`metaopt.layout.Layout`).

    >>> parameter_slices([torch.zeros(2, 3), torch.zeros(4)])
    [slice(0, 6, None), slice(6, 10, None)]
    """
    return Layout.of(params).slices


def _check_params(params: Iterable[Tensor], where: str) -> list[Tensor]:
    if isinstance(params, Tensor):
        raise TypeError(f"{where}: params must be a sequence of tensors, not a single tensor")
    ps = list(params)
    if not ps:
        raise ValueError(f"{where}: params is empty")
    seen: set[int] = set()
    for k, p in enumerate(ps):
        if not isinstance(p, Tensor):
            raise TypeError(f"{where}: params[{k}] is a {type(p).__name__}, not a tensor")
        if not p.requires_grad:
            raise ValueError(f"{where}: params[{k}] does not require grad")
        if not p.is_floating_point():
            raise ValueError(f"{where}: params[{k}] must be floating point, got {p.dtype}")
        if id(p) in seen:
            raise ValueError(
                f"{where}: params[{k}] appears twice; pass each (tied) parameter once so its "
                "gradient is not counted twice in the Gramian"
            )
        seen.add(id(p))
    devices = {p.device for p in ps}
    if len(devices) > 1:
        raise ValueError(f"{where}: all params must be on one device, got {sorted(map(str, devices))}")
    return ps


def _check_losses(losses: Sequence[Tensor], where: str) -> list[Tensor]:
    if isinstance(losses, Tensor):
        raise TypeError(
            f"{where}: losses must be a sequence of scalar tensors (one per task), not one tensor"
        )
    ls = list(losses)
    if not ls:
        raise ValueError(f"{where}: losses is empty")
    for t, loss in enumerate(ls):
        if not isinstance(loss, Tensor):
            raise TypeError(f"{where}: losses[{t}] is a {type(loss).__name__}, not a tensor")
        if loss.numel() != 1:
            raise ValueError(f"{where}: losses[{t}] must be a scalar, got shape {tuple(loss.shape)}")
    # a 0-d loss is used as it is: a reshape would add one more node to every task's backward
    return [loss if loss.dim() == 0 else loss.reshape(()) for loss in ls]


def _check_out(out: Tensor | None, T: int, P: int, params: list[Tensor], where: str) -> Tensor:
    device = params[0].device
    if out is None:
        dtype = params[0].dtype
        for p in params[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        return torch.empty((T, P), dtype=dtype, device=device)
    if not isinstance(out, Tensor):
        raise TypeError(f"{where}: out must be a tensor, got {type(out).__name__}")
    if tuple(out.shape) != (T, P):
        raise ValueError(f"{where}: out must have shape (T, P) = ({T}, {P}), got {tuple(out.shape)}")
    if out.device != device:
        raise ValueError(f"{where}: out is on {out.device} but params are on {device}")
    if out.requires_grad:
        raise ValueError(f"{where}: out must not require grad")
    return out


def reached_parameters(losses: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """Which parameters each loss depends on, read off the autograd graph (no backward pass).

    Walks each loss's graph once (cost linear in the graph size). A parameter counts as
    reached when its gradient edge appears in the loss's graph, whether or not the gradient
    that flows there happens to be zero.

    Args:
        losses: T scalar losses.
        params: the parameters, as for :func:`task_gradients`.

    Returns:
        (T, len(params)) bool tensor on CPU.

    Example:
        >>> a = torch.ones(2, requires_grad=True); b = torch.ones(1, requires_grad=True)
        >>> reached_parameters([a.sum(), (a * b).sum()], [a, b])
        tensor([[ True, False],
                [ True,  True]])
    """
    where = "reached_parameters"
    ps = _check_params(params, where)
    ls = _check_losses(losses, where)
    edges = [get_gradient_edge(p) for p in ps]
    out = torch.zeros((len(ls), len(ps)), dtype=torch.bool)
    for t, loss in enumerate(ls):
        if not loss.requires_grad:
            continue
        root = get_gradient_edge(loss)
        seen_edges = {(root.node, root.output_nr)}
        seen_nodes = {root.node}
        stack = [root.node]
        while stack:
            node = stack.pop()
            for nxt, nr in node.next_functions:
                if nxt is None:
                    continue
                seen_edges.add((nxt, nr))
                if nxt not in seen_nodes:
                    seen_nodes.add(nxt)
                    stack.append(nxt)
        out[t] = torch.tensor([(e.node, e.output_nr) in seen_edges for e in edges])
    return out


def reaches_any(loss: Tensor, params: Sequence[Tensor]) -> bool:
    """Whether ``loss`` depends on at least one of the leaf tensors ``params``.

    Walks the autograd graph from ``loss`` and stops at the first gradient accumulator of one
    of ``params``; each node's inputs are looked at before any is descended into, so a loss
    whose own head is among ``params`` is answered within a few nodes.

    >>> a = torch.ones(2, requires_grad=True); b = torch.ones(2, requires_grad=True)
    >>> reaches_any((a * 2).sum(), [b]), reaches_any((a * b).sum(), [b])
    (False, True)
    """
    if loss.grad_fn is None:
        return loss.requires_grad and any(loss is p for p in params)
    wanted = {id(p) for p in params}
    stack = [loss.grad_fn]
    seen = {loss.grad_fn}
    while stack:
        node = stack.pop()
        children = [nxt for nxt, _ in node.next_functions if nxt is not None]
        for nxt in children:
            variable = getattr(nxt, "variable", None)
            if variable is not None and id(variable) in wanted:
                return True
        for nxt in children:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return False


def compiled_graph(loss: Tensor, limit: int = 32) -> bool:
    """Whether ``loss`` was computed through a ``torch.compile``d region (a
    ``CompiledFunctionBackward`` node within the first ``limit`` nodes of its graph).

    A compiled region is one node for autograd: every parameter inside it looks reached by any
    loss computed from its outputs, and one the loss does not depend on gets a zero gradient
    instead of none. Where this returns True, metaopt counts a parameter whose gradient is
    exactly zero as unreached, which is what eager autograd reports.

    >>> w = torch.ones(2, requires_grad=True)
    >>> compiled_graph((w * 2).sum())
    False
    """
    if loss.grad_fn is None:
        return False
    queue, seen = deque([loss.grad_fn]), {loss.grad_fn}
    while queue and len(seen) <= limit:
        node = queue.popleft()
        if "CompiledFunction" in type(node).__name__:
            return True
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return False


def nonzero_blocks(J: Tensor, slices: Sequence[slice]) -> Tensor:
    """(T, len(slices)) bool on CPU: whether row t has a non-zero entry in each block."""
    return torch.stack([J[:, sl].ne(0).any(dim=1) for sl in slices], dim=1).cpu()


_FREED_MARKERS = ("second time", "already been freed")


def _loop(ls: list[Tensor], ps: list[Tensor], J: Tensor, retain_graph: bool, where: str) -> Tensor:
    slices = parameter_slices(ps)
    # built in Python and converted once: a tensor setitem per block costs more
    reached: list[list[bool]] = []
    for t, loss in enumerate(ls):
        row = J[t]
        if not loss.requires_grad:  # a constant loss reaches nothing
            row.zero_()
            reached.append([False] * len(ps))
            continue
        try:
            grads = torch.autograd.grad(loss, ps, retain_graph=retain_graph, allow_unused=True)
        except RuntimeError as err:
            if any(m in str(err) for m in _FREED_MARKERS):
                raise RuntimeError(
                    f"{where}: the graph of losses[{t}] was already freed. Losses that share part "
                    "of their graph (e.g. a common encoder) need retain_graph=True; the graphs are "
                    "then released when the losses go out of scope."
                ) from err
            raise
        if len(ps) == 1 and grads[0] is not None:  # one parameter: its gradient is the whole row
            row.copy_(grads[0].reshape(-1))
        else:
            for g, sl in zip(grads, slices, strict=True):
                if g is None:
                    row[sl].zero_()
                else:
                    row[sl].copy_(g.reshape(-1))
        reached.append([g is not None for g in grads])
        del grads  # this task's gradients are in its row now; drop them before the next task
    return torch.tensor(reached, dtype=torch.bool).reshape(len(ls), len(ps))


def _batched(ls: list[Tensor], ps: list[Tensor], J: Tensor) -> None:
    slices = parameter_slices(ps)
    T = len(ls)
    if not any(loss.requires_grad for loss in ls):
        J.zero_()
        return
    stacked = torch.stack(ls)
    eye = torch.eye(T, dtype=stacked.dtype, device=stacked.device)
    # retain_graph=True so that the loop fallback still has a graph to walk if vmap fails midway.
    grads = torch.autograd.grad(stacked, ps, eye, retain_graph=True, allow_unused=True, is_grads_batched=True)
    for g, sl in zip(grads, slices, strict=True):
        if g is None:
            J[:, sl].zero_()
        else:
            J[:, sl].copy_(g.reshape(T, -1))


def _compute(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    out: Tensor | None,
    retain_graph: bool,
    batched: bool,
    want_reached: bool,
    where: str,
) -> TaskJacobian:
    ps = _check_params(params, where)
    ls = _check_losses(losses, where)
    T, P = len(ls), sum(p.numel() for p in ps)
    J = _check_out(out, T, P, ps, where)
    if want_reached and any(compiled_graph(loss) for loss in ls):
        # autograd cannot tell inside a compiled region: exactly-zero blocks count as unreached
        tj = _compute(ls, ps, J, retain_graph, batched, False, where)
        return TaskJacobian(tj.matrix, nonzero_blocks(tj.matrix, parameter_slices(ps)))
    if batched:
        try:
            _batched(ls, ps, J)
        except RuntimeError as err:
            warnings.warn(
                f"{where}(batched=True): vmap over the backward pass failed ({err}); "
                "falling back to one backward pass per task",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            if want_reached:
                return TaskJacobian(J, reached_parameters(ls, ps))
            return TaskJacobian(J, torch.ones((T, len(ps)), dtype=torch.bool))
    reached = _loop(ls, ps, J, retain_graph, where)
    return TaskJacobian(J, reached)


def task_jacobian(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    out: Tensor | None = None,
    retain_graph: bool = False,
    batched: bool = False,
) -> TaskJacobian:
    """Per-task gradients ``J`` (T, P) and the (T, len(params)) ``reached`` mask.

    Same computation and arguments as :func:`task_gradients`; ``reached`` comes for free on the
    loop path (autograd reports unused inputs) and costs one graph walk per loss on the batched
    path (see :func:`reached_parameters`).

    >>> x = torch.ones(3, requires_grad=True)
    >>> tj = task_jacobian([x.sum(), (2 * x).sum()], [x])
    >>> tj.matrix
    tensor([[1., 1., 1.],
            [2., 2., 2.]])
    >>> tj.reached.tolist()
    [[True], [True]]
    """
    return _compute(losses, params, out, retain_graph, batched, True, "task_jacobian")


def task_gradients(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    out: Tensor | None = None,
    retain_graph: bool = False,
    batched: bool = False,
) -> Tensor:
    """Per-task gradients: row ``t`` is the flattened gradient of ``losses[t]`` w.r.t. ``params``.

    Args:
        losses: T scalar losses.
        params: the parameters (each appears once; all on one device). Their gradients are
            flattened and concatenated in this order (see :func:`parameter_slices`).
        out: optional preallocated (T, P) buffer to fill (it is returned); by default a new
            tensor of the params' promoted dtype.
        retain_graph: keep the graphs alive after the call. Needed when losses share part of
            their graph (a common trunk). The loop path otherwise frees each task's graph as
            soon as its row is written; the batched path always keeps the graph until the
            losses are released (it must stay walkable for the loop fallback).
        batched: one vmapped backward pass over the stacked losses instead of T passes
            (falls back to the loop, with a ``RuntimeWarning``, when vmap fails).

    Returns:
        the (T, P) matrix; parameters a loss does not reach are zeros in its row (use
        :func:`task_jacobian` to tell those apart from zero gradients).

    Example:
        >>> x = torch.tensor([1.0, -1.0], requires_grad=True)
        >>> task_gradients([x.pow(2).sum(), x.sum()], [x])
        tensor([[ 2., -2.],
                [ 1.,  1.]])
    """
    return _compute(losses, params, out, retain_graph, batched, False, "task_gradients").matrix
