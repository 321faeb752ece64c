"""Backward passes counted as they run: the load-independent half of the cost measurement.

A :class:`BackwardCounter` hooks the trainable parameters of a model and, while it is
``counting()``, records every backward pass (``Tensor.backward``, ``torch.autograd.backward`` or
``torch.autograd.grad``) that computes a gradient for at least one of them:

* ``passes``: backward passes that reached any trainable parameter
  (``torch.autograd.graph.register_multi_grad_hook`` in ``"any"`` mode fires once per pass);
* ``full_passes``: passes that went through *all* of them, read as the smallest number of
  gradients any one trainable tensor received (a tensor hook per parameter). GradNorm's per-task
  gradients at its one shared layer are passes, but not full passes: ``passes - full_passes``
  is the number of partial passes.

A pass that computes no gradient for the model (GradNorm's gradient of its own loss weights) is
not counted. A ``vmap``-ed backward (``is_grads_batched=True``, the ``batched=True`` option of
``metaopt.jacobian``) counts as one pass although it carries T gradient rows; the benchmark's
methods do not use it.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> counter = BackwardCounter(model.parameters())
    >>> x = torch.ones(4, 3)
    >>> with counter.counting():
    ...     loss = model(x).sum()
    ...     grads = [torch.autograd.grad(loss, [model.weight], retain_graph=True) for _ in range(2)]
    ...     loss.backward()
    >>> model(x).sum().backward()           # outside counting(): not counted
    >>> counter.passes, counter.full_passes
    (3, 1)
    >>> counter.remove()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.autograd.graph import register_multi_grad_hook


class BackwardCounter:
    """Counts the backward passes that reach the given parameters (see the module docstring)."""

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("BackwardCounter: no parameter requires grad, nothing to count")
        self.passes = 0
        self._per_param = [0] * len(self.params)
        self._active = False
        self._handles: list[Any] = [register_multi_grad_hook(self.params, self._on_pass, mode="any")]
        self._handles += [p.register_hook(self._param_hook(i)) for i, p in enumerate(self.params)]

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Count the passes run inside this block (and only those)."""
        self._active = True
        try:
            yield
        finally:
            self._active = False

    @property
    def full_passes(self) -> int:
        """Passes that computed a gradient for every trainable parameter."""
        return min(self._per_param)

    def remove(self) -> None:
        """Unregister the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _on_pass(self, grad: torch.Tensor) -> None:
        if self._active:
            self.passes += 1

    def _param_hook(self, index: int) -> Any:
        def hook(grad: torch.Tensor) -> None:
            if self._active:
                self._per_param[index] += 1

        return hook


__all__ = ["BackwardCounter"]
