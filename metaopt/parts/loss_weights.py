"""GradNorm's loss weights: the task weights w, the reference losses L(0), and w's optimizer.

GradNorm (Chen et al., ICML 2018, arXiv 1711.02257) weights the task losses with ``w`` (kept
positive and summing to T) and moves ``w`` after each step so that each task's weighted
gradient norm at a shared layer W tracks the mean norm times its inverse training rate to the
power α: ``L_grad = Σ_i |w_i ‖∇_W L_i‖ − mean_j(w_j ‖∇_W L_j‖) r_i^α|``. :class:`LossWeights`
holds that state and its update (:meth:`LossWeights.update`, run at the step's commit point,
after every check), and checks a saved record whole before a load moves anything.

>>> import torch
>>> part = LossWeights(2, torch.device("cpu"), None, "GradNorm")
>>> _ = part.update(torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.5]), alpha=1.5, min_weight=1e-4)
>>> round(float(part.weights.detach().sum()), 6)
2.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .guard import guarded_step
from .state_dict import load_optimizer_state, probe_optimizer_state

__all__ = ["LossWeights"]


def inverse_training_rates(current: Tensor, initial: Tensor) -> Tensor:
    """r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0)) over the tasks whose L(0) is known, in
    float64.

    A task with no positive loss yet (L(0) = 0) gets r_i = 1, the mean rate; a loss that has
    fallen to or below zero gives r_i = 0. With no usable rate at all every r_i is 1. The rates
    are taken in log space, ``r_i = exp(log L_i − log L_i(0) − log mean_j(...))``: a ratio such
    as 1e13 / 1e-40 overflows (and 1e-40 / 1e30 underflows) in any float dtype, but every r_i
    lies in [0, T], so any finite losses give finite rates.
    """
    current, initial = current.to(torch.float64), initial.to(torch.float64)
    known = initial > 0
    rated = known & (current > 0)
    ones = torch.ones_like(current)
    log_ratio = torch.where(
        rated, current.where(rated, ones).log() - initial.where(rated, ones).log(), -math.inf
    )
    log_total = torch.logsumexp(log_ratio, dim=0)  # -inf when no task has a positive ratio
    usable = log_total.isfinite()
    count = known.sum().clamp(min=1).to(torch.float64)
    log_mean = log_total.where(usable, torch.zeros_like(log_total)) - count.log()
    r = torch.where(known, (log_ratio - log_mean).exp(), ones)
    return torch.where(usable, r, ones)


class LossWeights:
    """w (T, ``requires_grad``), L(0) (T) and the optimizer of w.

    Args:
        T: the number of tasks.
        device: where w lives (the shared layer's device).
        weight_optimizer: ``params -> torch.optim.Optimizer`` over ``[w]``; default Adam at
            lr 0.025 (a value public ports use; the paper tunes it per problem).
        where: the optimizer's name, for errors.
    """

    def __init__(
        self,
        T: int,
        device: torch.device,
        weight_optimizer: Callable[[list[Tensor]], Optimizer] | None,
        where: str,
    ) -> None:
        self.weights = torch.ones(T, device=device, requires_grad=True)
        make = weight_optimizer or (lambda p: torch.optim.Adam(p, lr=0.025))
        self.optimizer = make([self.weights])
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(f"{where}: weight_optimizer must return a torch.optim.Optimizer")
        # L_i(0): the first *positive* loss of each task; 0 until that task has had one
        self.initial_losses = torch.zeros(T, device=device)

    def update(
        self, norms: Tensor, current: Tensor, alpha: float, min_weight: float, ok: Tensor | None = None
    ) -> Tensor:
        """One update of w from this step's layer-gradient norms ‖∇_W L_i‖ (checked to fit w's
        dtype) and (unscaled) losses, each weight then floored at ``min_weight`` and the weights
        renormalised to sum T; records L(0) for tasks with their first positive loss. Returns
        ``L_grad``. Nothing here can fail. ``ok``: the step's flag where it was decided on the
        device (:mod:`metaopt.parts.guard`): where false, nothing here moves."""
        initial = torch.where((self.initial_losses > 0) | (current <= 0), self.initial_losses, current)
        if ok is not None:
            initial = torch.where(ok.to(initial.device), initial, self.initial_losses)
            kept = self.weights.detach().clone()
        self.initial_losses = initial
        r = inverse_training_rates(current, initial)
        # in float64: w_i ‖∇_W L_i‖, their mean and the target cannot overflow there, and the
        # weights' gradient (±‖∇_W L_i‖, which the step's checks made sure fits) is cast back
        weighted_norms = self.weights.to(torch.float64) * norms.to(torch.float64)
        mean = weighted_norms.mean()
        target = torch.where(mean > 0, mean * r.pow(alpha), torch.zeros_like(r)).detach()
        grad_loss = (weighted_norms - target).abs().sum()
        (g,) = torch.autograd.grad(grad_loss, [self.weights])
        self.weights.grad = g
        if ok is None:
            self.optimizer.step()
        else:
            guarded_step(self.optimizer, [self.weights], ok)
        self.weights.grad = None
        with torch.no_grad():
            self.weights.clamp_(min=min_weight)
            self.weights.mul_(len(self.weights) / self.weights.sum())
            if ok is not None:
                self.weights.copy_(torch.where(ok.to(kept.device), self.weights, kept))
        return grad_loss.detach()

    # ------------------------------------------------------------------ saved form
    def saved(self) -> dict[str, Any]:
        return {
            "weights": self.weights.detach().clone(),
            "initial_losses": self.initial_losses.clone(),
            "weight_optimizer": self.optimizer.state_dict(),
        }

    def check_saved(self, state: Mapping[str, Any], name: str) -> None:
        """Every field GradNorm owns, before anything is assigned (a refused load changes
        nothing). ``weights``: a float tensor of shape (T,) whose values, in the weights' dtype,
        are finite, positive and sum to T (each step renormalises them so; a small rounding
        tolerance). ``initial_losses``: a float tensor of shape (T,), finite and >= 0. Any such
        L(0) is one GradNorm could have recorded (a first loss of 1e30 or 1e-40 is finite), so
        it loads; the training rates are taken in log space, where no finite L(0) over- or
        underflows them."""
        T = len(self.weights)
        for key in ("weights", "initial_losses"):
            v = state.get(key)
            if not isinstance(v, Tensor) or tuple(v.shape) != (T,) or not v.is_floating_point():
                raise ValueError(
                    f"{name}: saved {key} must be a float tensor of shape ({T},), got "
                    f"{getattr(v, 'dtype', type(v).__name__)} of shape {getattr(v, 'shape', None)!r}"
                )
        # small (T values) and read on the host anyway; the weights as load_saved casts them
        w = state["weights"].detach().to("cpu", self.weights.dtype)
        init = state["initial_losses"].detach().to("cpu")
        eps = torch.finfo(self.weights.dtype).eps
        tolerance = T * max(1e-4, 16 * eps)
        total = w.to(torch.float64).sum()
        flags = torch.stack(
            [
                (w.isfinite() & (w > 0)).all(),
                (total - T).abs() <= tolerance,
                (init.isfinite() & (init >= 0)).all(),
            ]
        ).tolist()
        if not flags[0]:
            raise ValueError(
                f"{name}: saved weights must be finite and positive in "
                f"{str(self.weights.dtype).replace('torch.', '')}, got {w.tolist()}"
            )
        if not flags[1]:
            raise ValueError(
                f"{name}: saved weights must sum to the number of tasks, {T} (GradNorm "
                f"renormalises them so at every step), got {w.tolist()} with sum {float(total):.6g}"
            )
        if not flags[2]:
            raise ValueError(
                f"{name}: saved initial_losses (each task's reference loss L(0); 0 for a task "
                f"without one yet) must be finite and >= 0, got {init.tolist()}"
            )
        if not isinstance(state.get("weight_optimizer"), Mapping):
            raise ValueError(f"{name}: no weight optimizer state saved")
        probe_optimizer_state(
            self.optimizer, state["weight_optimizer"], f"{name}: the weight optimizer's state"
        )

    def load_saved(self, state: Mapping[str, Any]) -> None:
        """Take what :meth:`check_saved` accepted."""
        with torch.no_grad():
            self.weights.copy_(state["weights"])
        self.initial_losses = state["initial_losses"].clone().to(self.weights.device)
        load_optimizer_state(self.optimizer, state["weight_optimizer"])
