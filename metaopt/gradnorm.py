"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018, arXiv 1711.02257)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._distributed import average_, default_group
from ._options import Option, non_negative
from .base import MultiTaskOptimizer, load_optimizer_state
from .functional import unique_tensors

__all__ = ["GradNorm"]


def _inverse_training_rates(current: Tensor, initial: Tensor) -> Tensor:
    """r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0)) over the tasks whose L(0) is known.

    A task with no positive loss yet (L(0) = 0) gets r_i = 1, the mean rate; a loss that has
    fallen to or below zero gives r_i = 0. With no usable rate at all every r_i is 1.
    """
    known = initial > 0
    ratio = torch.where(
        known,
        (current / initial.where(known, torch.ones_like(initial))).clamp(min=0.0),
        torch.zeros_like(current),
    )
    count = known.sum()
    mean = ratio.sum() / count.clamp(min=1)
    usable = mean > 0
    r = torch.where(known, ratio / mean.where(usable, torch.ones_like(mean)), torch.ones_like(ratio))
    return torch.where(usable, r, torch.ones_like(r))


class GradNorm(MultiTaskOptimizer):
    """GradNorm: learnable task-loss weights that balance gradient norms at a shared layer.

    Each step the model is updated on ``Σ_i w_i L_i`` (through the wrapped optimizer, which may
    itself be a metaopt optimizer: ``GradNorm(PCGrad(Adam(...)))`` applies PCGrad to the
    weighted losses). Then the weights move to reduce
    ``L_grad = Σ_i |w_i ‖∇_W L_i‖ − Ḡ · r_i^α|`` where W is the user-named shared layer,
    ``Ḡ`` the mean of the weighted norms, ``r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0))`` the
    relative inverse training rate, and the target ``Ḡ r_i^α`` is held constant (detached).
    The weights are then floored at a small positive value and renormalised to sum to T.
    ``L_i(0)`` is task i's first *positive* loss (a task whose first batch has no labelled
    example has loss 0, which cannot serve as a reference); until it has one, its inverse
    training rate is taken as the mean (r_i = 1). ``L(0)`` is kept in the ``state_dict``, 0
    for a task still without one.

    ``‖∇_W (w_i L_i)‖ = w_i ‖∇_W L_i‖`` for a scalar w_i, so the gradient of ``L_grad`` with
    respect to the weights needs only the T norms ``‖∇_W L_i‖``: they are computed with
    ``torch.autograd.grad`` on W alone, and the GradNorm loss never touches the model's
    ``.grad``.

    Args:
        optimizer: the optimizer for the model (a torch or metaopt optimizer).
        tasks: task names; ``next_tasks()`` returns what the wrapped optimizer wants (all tasks).
        layer: the shared parameters W (usually the last shared layer) whose gradient norms are
            balanced. Every task's loss must reach them.
        alpha: restoring-force strength α >= 0. Default 1.5, the paper's NYUv2 value (it uses
            0.12 on its synthetic regression).
        weight_optimizer: ``params -> Optimizer`` for the task weights. Default Adam with lr
            0.025 (a value public ports use; the paper tunes it per problem).
        process_group: under ``torch.distributed``, the group whose ranks' per-task layer
            gradients are averaged (one collective); default: the default group when there is
            more than one rank (see :class:`~metaopt.surgery.GradientSurgery`).
        seed, allow_unused: as in :class:`~metaopt.MultiTaskOptimizer`.

    With a ``torch.amp.GradScaler``, pass it to :meth:`backward` (``opt.backward(losses,
    grad_scaler=scaler)``) rather than scaling the losses yourself: the norms are then
    unscaled, so the weight update does not depend on the loss scale.

    Example:
        >>> import torch, metaopt
        >>> torch.manual_seed(0) and None
        >>> enc, head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> params = [*enc.parameters(), *head.parameters()]
        >>> opt = metaopt.GradNorm(metaopt.MTL(torch.optim.Adam(params, lr=1e-2), tasks=["a", "b"]),
        ...                        layer=enc.parameters(), alpha=1.5)
        >>> x = torch.randn(16, 4)
        >>> for _ in range(3):
        ...     out = head(enc(x))
        ...     report = opt.step({"a": out[:, 0].pow(2).mean(), "b": 10 * out[:, 1].pow(2).mean()})
        >>> round(float(opt.weights.detach().sum()), 4)
        2.0

    References:
        Chen, Badrinarayanan, Lee & Rabinovich. GradNorm: Gradient Normalization for Adaptive
        Loss Balancing in Deep Multitask Networks. ICML 2018. arXiv:1711.02257.
    """

    MIN_WEIGHT = 1e-4
    alpha = Option(non_negative)

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        tasks: Iterable[str] | None = None,
        layer: Iterable[Tensor],
        alpha: float = 1.5,
        weight_optimizer: Callable[[list[Tensor]], Optimizer] | None = None,
        process_group: Any = None,
        seed: int = 0,
        allow_unused: bool = False,
    ) -> None:
        super().__init__(optimizer, tasks=tasks, seed=seed, allow_unused=allow_unused)
        self.process_group = process_group
        self._layer_rows: Tensor | None = None  # a backward is pending: per-task rows at W
        self._step_norms: Tensor | None = None  # the norms the step's checks computed
        self._layer_count = 0
        self._scale = 1.0
        name = "GradNorm"
        self.layer = unique_tensors(layer)
        if not self.layer:
            raise ValueError(f"{name}: layer is empty; name the shared parameters W to balance")
        ids = {id(p) for p in self._param_list}
        if any(id(p) not in ids for p in self.layer):
            raise ValueError(f"{name}: layer must be parameters of the wrapped optimizer")
        self.alpha = alpha
        T = len(self.tasks)
        device = self.layer[0].device
        self.weights = torch.ones(T, device=device, requires_grad=True)
        make = weight_optimizer or (lambda p: torch.optim.Adam(p, lr=0.025))
        self.weight_optimizer = make([self.weights])
        if not isinstance(self.weight_optimizer, Optimizer):
            raise TypeError(f"{name}: weight_optimizer must return a torch.optim.Optimizer")
        # L_i(0): the first *positive* loss of each task; 0 until that task has had one
        self.initial_losses = torch.zeros(T, device=device)

    def _draw_tasks(self) -> list[str]:
        if self.inner is not None:
            return self.inner.next_tasks()
        return list(self.tasks)

    def _backward(self, losses: dict[str, Tensor], grad_scaler: Any) -> None:
        """Per-task gradients at the layer W (for the norms, kept for the step), then the
        model's backward pass on ``Σ_i w_i L_i`` (through the wrapped optimizer)."""
        names = list(losses)
        if names != list(self.tasks):
            raise ValueError(f"GradNorm.backward: expected all tasks {list(self.tasks)}, got {names}")
        scaled = self._scaled(losses, grad_scaler)
        layer = [p for p in self.layer if p.requires_grad]
        if not layer:
            raise ValueError("GradNorm.backward: every parameter of the GradNorm layer is frozen")
        if self._layer_rows is not None and len(layer) != self._layer_count:
            raise ValueError(
                "GradNorm.backward: the GradNorm layer was frozen or unfrozen between "
                "backward passes of one step; call step() or zero_grad() first"
            )
        self._layer_count = len(layer)
        rows = []
        for t, loss in scaled.items():
            grads = torch.autograd.grad(loss, layer, retain_graph=True, allow_unused=True)
            if any(g is None for g in grads):
                raise ValueError(
                    f"GradNorm.backward: the loss of task {t!r} does not reach the GradNorm layer; "
                    "choose a layer that every task uses"
                )
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        # the T rows and the losses (for the training rates), averaged over the ranks at once
        layer_rows = torch.cat(
            [
                torch.stack(rows),
                torch.stack([v.detach() for v in scaled.values()]).to(rows[0]).reshape(-1, 1),
            ],
            dim=1,
        )
        group = default_group(self.process_group)
        if group is not None:
            average_(layer_rows, group)
        scale = 1.0 if grad_scaler is None else float(grad_scaler.get_scale())
        used = self.weights.detach()
        weighted = {t: used[i].to(v) * v for i, (t, v) in enumerate(losses.items())}
        super()._backward(weighted, grad_scaler)
        # the model's backward went through: keep this micro-batch's rows for the step
        if self._layer_rows is None:
            self._layer_rows, self._scale = layer_rows, scale
        else:
            if scale != self._scale:
                raise ValueError(
                    "GradNorm.backward: the loss scale changed between backward passes of one step"
                )
            self._layer_rows = self._layer_rows + layer_rows

    def _norms(self) -> Tensor:
        """‖∇_W L_i‖ per task, of the step's accumulated (and unscaled) layer gradients."""
        assert self._layer_rows is not None
        return torch.linalg.vector_norm(self._layer_rows[:, :-1], dim=1) / self._scale

    def _current_losses(self) -> Tensor:
        """The step's (accumulated, unscaled; under torch.distributed rank-averaged) losses."""
        assert self._layer_rows is not None
        return self._layer_rows[:, -1] / self._scale

    def _check_step(self) -> None:
        if self._layer_rows is None:
            raise ValueError(
                "GradNorm.step: no per-task gradients; call opt.backward(losses) (instead of "
                "loss.backward()) before opt.step(), or pass the losses: opt.step(losses)"
            )
        losses = self._backward_losses
        assert losses is not None
        current = self._current_losses()
        norms = self._norms()
        self._step_norms = norms
        flags = torch.stack([current.isfinite().all().to(norms.device), norms.isfinite().all()]).tolist()
        if not flags[0]:
            bad = {t: v for t, v in zip(losses, current.tolist()) if not math.isfinite(v)}
            raise ValueError(f"GradNorm.step: non-finite loss for task(s) {bad}; nothing was updated")
        if not flags[1]:
            bad_tasks = [t for t, n in zip(losses, norms.tolist()) if not math.isfinite(n)]
            raise ValueError(
                f"GradNorm.step: non-finite gradient (NaN or inf) at the GradNorm layer from the "
                f"finite loss(es) of {bad_tasks}; nothing was updated"
            )
        super()._check_step()

    def _after_step(self) -> dict[str, Any]:
        """The weight update: gradient of L_grad w.r.t. the weights only (after the model's
        step; nothing here can fail)."""
        norms = self._step_norms
        assert norms is not None
        current = self._current_losses()
        used = self.weights.detach().clone()
        initial = torch.where((self.initial_losses > 0) | (current <= 0), self.initial_losses, current)
        self.initial_losses = initial
        r = _inverse_training_rates(current, initial)
        weighted_norms = self.weights * norms
        target = (weighted_norms.mean() * r.pow(self.alpha)).detach()
        grad_loss = (weighted_norms - target).abs().sum()
        (g,) = torch.autograd.grad(grad_loss, [self.weights])
        self.weights.grad = g
        self.weight_optimizer.step()
        self.weights.grad = None
        with torch.no_grad():
            self.weights.clamp_(min=self.MIN_WEIGHT)
            self.weights.mul_(len(self.tasks) / self.weights.sum())
        return {"weights": used, "extra": {"grad_norms": norms, "gradnorm_loss": grad_loss.detach()}}

    def _clear_backward(self) -> None:
        super()._clear_backward()
        self._step_norms = None
        self._layer_rows = None
        self._scale = 1.0

    def _extra_state(self) -> dict[str, Any]:
        return {
            "weights": self.weights.detach().clone(),
            "initial_losses": self.initial_losses.clone(),
            "weight_optimizer": self.weight_optimizer.state_dict(),
        }

    def _check_extra_state(self, state: Mapping[str, Any]) -> None:
        T = len(self.tasks)
        for key in ("weights", "initial_losses"):
            v = state.get(key)
            if not isinstance(v, Tensor) or tuple(v.shape) != (T,) or not v.is_floating_point():
                raise ValueError(
                    f"GradNorm.load_state_dict: saved {key} must be a float tensor of shape ({T},), "
                    f"got {getattr(v, 'shape', v)!r}"
                )
        w, init = state["weights"], state["initial_losses"]
        if not bool((w > 0).all() & w.isfinite().all() & (init >= 0).all() & init.isfinite().all()):
            raise ValueError(
                "GradNorm.load_state_dict: saved weights must be finite and positive, "
                "saved initial losses finite and >= 0"
            )
        if not isinstance(state.get("weight_optimizer"), Mapping):
            raise ValueError("GradNorm.load_state_dict: no weight optimizer state saved")

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        w = state["weights"]
        with torch.no_grad():
            self.weights.copy_(w)
        self.initial_losses = state["initial_losses"].clone().to(self.weights.device)
        load_optimizer_state(self.weight_optimizer, state["weight_optimizer"])
