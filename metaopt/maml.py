"""MAML on ``torch.func``: differentiable inner loops over parameter dicts.

Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017, arXiv 1703.03400) adapts the
parameters θ to each task with a few inner steps, ``θ'_t = θ − α ∇L_t^train(θ)`` (or any
differentiable optimizer), and trains θ on the post-adaptation loss ``Σ_t L_t^test(θ'_t)``.
Second-order MAML differentiates through the inner steps (``create_graph=True``); first-order
MAML drops those second derivatives (the inner gradients are taken as constants).

Everything here is functional: the parameters are a ``{name: tensor}`` dict evaluated with
``torch.func.functional_call``, the inner optimizers (:class:`SGD`, :class:`Adam`) are pure
functions of (parameters, gradients, state), and the model is never modified, so any
``nn.Module`` works and the outer step is any torch optimizer's, on the module's parameters.
Its buffers are not written either: each forward pass runs on copies of them, which are then
dropped. So BatchNorm in train mode normalises with each batch's statistics, as usual, while its
``running_mean``, ``running_var`` and ``num_batches_tracked`` keep their values (in eval mode it
uses those running statistics, as usual).
Neither ``higher`` nor the PyPI ``functorch`` package is used.

Example:
    >>> import torch, metaopt
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Linear(1, 1)
    >>> outer = torch.optim.Adam(model.parameters(), lr=1e-2)
    >>> mse = torch.nn.functional.mse_loss
    >>> tasks = [(torch.randn(5, 1), torch.randn(5, 1), torch.randn(5, 1), torch.randn(5, 1))
    ...          for _ in range(4)]                  # (x_train, y_train, x_test, y_test)
    >>> loss = metaopt.maml.meta_loss(model, tasks, lambda out, y: mse(out, y),
    ...                               inner=metaopt.maml.SGD(lr=0.1), steps=2)
    >>> loss.backward(); outer.step(); outer.zero_grad()
    >>> model.weight.grad is None and loss.requires_grad
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["SGD", "Adam", "InnerOptimizer", "adapt", "meta_loss"]

Params = dict[str, Tensor]


def _sqrt0(x: Tensor) -> Tensor:
    """``x.sqrt()`` for ``x >= 0``, with the same values, whose gradient is 0 instead of
    ``inf`` (and ``0 · inf = NaN`` after the chain rule) where ``x == 0``: the square root
    runs only on the positive entries (the "double where"), so no infinite derivative is made."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def _call(model: nn.Module, params: Mapping[str, Tensor], args: tuple[Any, ...]) -> Any:
    """``functional_call(model, params, args)`` on copies of the module's buffers, so that a
    forward pass that writes its buffers (BatchNorm's running statistics in train mode) writes
    the copies, which are then dropped: the module's own buffers stay as they are."""
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    return functional_call(model, {**buffers, **params}, args)


class InnerOptimizer:
    """A differentiable optimizer over parameter dicts: ``init(params) -> state`` and
    ``step(params, grads, state) -> (params, state)``, with no in-place operation, so that
    gradients flow through every step."""

    def init(self, params: Mapping[str, Tensor]) -> Any:
        return None

    def step(
        self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: Any
    ) -> tuple[Params, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class SGD(InnerOptimizer):
    """``θ ← θ − lr · g`` (MAML's inner step)."""

    lr: float

    def step(
        self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: Any
    ) -> tuple[Params, Any]:
        return {k: p - self.lr * grads[k] for k, p in params.items()}, state


@dataclass(frozen=True)
class Adam(InnerOptimizer):
    """``torch.optim.Adam``'s update, written functionally (its formula exactly: bias-corrected
    moments, ``eps`` added to ``sqrt(v̂)``; coupled L2 ``weight_decay``; no amsgrad):

    ``m ← β1 m + (1−β1) g``, ``v ← β2 v + (1−β2) g²``,
    ``θ ← θ − lr · (m / (1−β1^t)) / (sqrt(v / (1−β2^t)) + eps)``.
    Checked against ``torch.optim.Adam`` step by step in the tests (the eps placement differs
    from ``higher``'s ``DifferentiableAdam``).

    Where ``v`` is exactly 0 (every gradient so far 0 in that entry: a dead ReLU unit, an
    all-zero input feature), the derivative of ``sqrt`` is infinite and ``0 · inf`` would make
    second-order meta-gradients NaN; the square root's derivative counts as 0 there (as in
    ``higher``, which masks it), and the values are unchanged."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def init(self, params: Mapping[str, Tensor]) -> Any:
        return {
            "step": 0,
            "m": {k: torch.zeros_like(p) for k, p in params.items()},
            "v": {k: torch.zeros_like(p) for k, p in params.items()},
        }

    def step(
        self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: Any
    ) -> tuple[Params, Any]:
        b1, b2 = self.betas
        t = state["step"] + 1
        out: Params = {}
        m_new: Params = {}
        v_new: Params = {}
        for k, p in params.items():
            g = grads[k] + self.weight_decay * p if self.weight_decay else grads[k]
            m = b1 * state["m"][k] + (1 - b1) * g
            v = b2 * state["v"][k] + (1 - b2) * g * g
            denom = _sqrt0(v / (1 - b2**t)) + self.eps
            out[k] = p - self.lr * (m / (1 - b1**t)) / denom
            m_new[k], v_new[k] = m, v
        return out, {"step": t, "m": m_new, "v": v_new}


def adapt(
    model: nn.Module,
    params: Mapping[str, Tensor],
    loss: Callable[[Tensor], Tensor],
    inputs: Any,
    *,
    inner: InnerOptimizer,
    steps: int = 1,
    first_order: bool = False,
) -> Params:
    """``steps`` inner steps of ``inner`` from ``params`` on ``loss(model(inputs))``, evaluated
    with ``functional_call(model, params, inputs)``; returns the adapted parameters, which are
    differentiable functions of ``params`` (to second order unless ``first_order``, where the
    inner gradients count as constants). For second order, the inner forward passes run
    ``scaled_dot_product_attention`` (``nn.MultiheadAttention``, transformers) on its math
    backend: the fused kernels cannot be differentiated twice.

    Args:
        model: any module; it is not modified, its buffers included (every forward pass gets
            copies of them, so BatchNorm's running statistics do not move).
        params: the parameters to start from, e.g. ``dict(model.named_parameters())``.
        loss: ``output -> scalar``.
        inputs: the model's input (a tensor, or a tuple of positional arguments).
        inner: :class:`SGD`, :class:`Adam` or another :class:`InnerOptimizer`.
        steps: inner steps (>= 1).
        first_order: first-order MAML.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"adapt: steps must be an int >= 1, got {steps!r}")
    if not isinstance(inner, InnerOptimizer):
        raise TypeError(
            f"adapt: inner must be a metaopt.maml.InnerOptimizer (SGD, Adam), got {type(inner).__name__}"
        )
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    current = dict(params)
    if not current:
        raise ValueError("adapt: no parameters")
    state = inner.init(current)
    names = list(current)
    for _ in range(steps):
        # second order differentiates the inner backward pass again; the fused attention
        # kernels have no double backward ("derivative for ..._flash_attention..._backward is
        # not implemented"), so their inner forwards run on the math backend
        with nullcontext() if first_order else sdpa_kernel(SDPBackend.MATH):
            value = loss(_call(model, current, args))
        if not isinstance(value, Tensor) or value.dim() != 0:
            raise ValueError("adapt: loss must return a scalar tensor")
        grads = torch.autograd.grad(
            value, [current[k] for k in names], create_graph=not first_order, allow_unused=True
        )
        if any(g is None for g in grads):
            unused = [k for k, g in zip(names, grads) if g is None]
            raise ValueError(
                f"adapt: the loss does not reach parameter(s) {unused[:5]}; pass only the parameters to adapt"
            )
        by_name = {k: g for k, g in zip(names, grads)}
        current, state = inner.step(current, by_name, state)
    return current


def meta_loss(
    model: nn.Module,
    tasks: Iterable[Sequence[Any]],
    loss: Callable[[Tensor, Tensor], Tensor],
    *,
    inner: InnerOptimizer,
    steps: int = 1,
    first_order: bool = False,
    params: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """The MAML objective of a meta-batch: the mean over ``tasks`` of the post-adaptation loss.
    Each task is ``(x_train, y_train, x_test, y_test)``: adapt on the train split
    (:func:`adapt`), evaluate the adapted parameters on the test split. Call ``.backward()``
    on the result and step any torch optimizer over the model's parameters.

    Args:
        model, inner, steps, first_order: as in :func:`adapt`.
        tasks: the meta-batch.
        loss: ``(output, target) -> scalar``.
        params: the parameters to adapt (default: every parameter of ``model`` that requires
            grad); the others keep their values.
    """
    start = (
        dict(params) if params is not None else {k: p for k, p in model.named_parameters() if p.requires_grad}
    )
    total: Tensor | None = None
    count = 0
    for task in tasks:
        x_train, y_train, x_test, y_test = task

        def train_loss(out: Tensor, y: Tensor = y_train) -> Tensor:
            return loss(out, y)

        adapted = adapt(model, start, train_loss, x_train, inner=inner, steps=steps, first_order=first_order)
        args = x_test if isinstance(x_test, tuple) else (x_test,)
        value = loss(_call(model, adapted, args), y_test)
        total = value if total is None else total + value
        count += 1
    if total is None:
        raise ValueError("meta_loss: no tasks")
    return total / count
