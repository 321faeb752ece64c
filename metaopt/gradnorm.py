"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018, arXiv 1711.02257)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._distributed import average_, default_group
from ._options import Option, non_negative
from .base import MultiTaskOptimizer
from .functional import unique_tensors
from .parts.loss_weights import LossWeights
from .parts.placement import Sharding, jacobian_through_engine, local_tensor, refuse_fsdp1

__all__ = ["GradNorm"]


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
        seed, allow_unused, nonfinite: as in :class:`~metaopt.MultiTaskOptimizer`.

    With a ``torch.amp.GradScaler``, pass it to :meth:`backward` (``opt.backward(losses,
    grad_scaler=scaler)``) rather than scaling the losses yourself: the norms are then
    unscaled, so the weight update does not depend on the loss scale.

    Overflow. A step whose layer gradient has a NaN or inf entry, or whose loss is not finite,
    is refused as non-finite (nothing moves). Finite entries whose norm overflows in their own
    dtype (float32 entries of 1e30: the sum of squares is 1e61) are not: their norms are taken
    again in float64. The weights' gradient is ``±‖∇_W L_i‖`` in the weights' dtype (float32
    by default), so a norm that is finite but does not fit that dtype (float32 entries of 2e38
    over ten parameters) is refused, with a message that says it overflows. The rest of the
    weight update (``w_i ‖∇_W L_i‖``, ``Ḡ``, the target) is computed in float64 and the
    training rates in log space, so any finite losses and ``L(0)`` give finite rates. Note that
    float32 Adam (the default weight optimizer) squares that gradient: past ~5e20 its second
    moment overflows and the weights stop moving, as for any float32 Adam on such gradients;
    pass an SGD ``weight_optimizer`` if norms that large are expected.
    :meth:`load_state_dict` refuses saved weights that are not finite, positive and summing
    to T (within rounding) in the weights' dtype, and ``L(0)`` that are not finite and >= 0.

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
        nonfinite: str = "auto",
    ) -> None:
        super().__init__(optimizer, tasks=tasks, seed=seed, allow_unused=allow_unused, nonfinite=nonfinite)
        self.process_group = process_group
        self._layer_rows: Tensor | None = None  # a backward is pending: per-task rows at W
        self._layer_sharding: Sharding | None = None  # how W's rows are spread (FSDP2)
        self._step_norms: Tensor | None = None  # the norms the step's checks computed
        self._layer_count = 0
        self._scale: float | Tensor = 1.0  # the loss scale (a device tensor where steps defer)
        self._scale_same: Tensor | None = None  # on the device: the scale stayed within the step
        name = "GradNorm"
        self.layer = unique_tensors(layer)
        if not self.layer:
            raise ValueError(f"{name}: layer is empty; name the shared parameters W to balance")
        ids = {id(p) for p in self._param_list}
        if any(id(p) not in ids for p in self.layer):
            raise ValueError(f"{name}: layer must be parameters of the wrapped optimizer")
        refuse_fsdp1(self.layer, name)
        self.alpha = alpha
        # the part holding w, L(0) and w's optimizer
        self.loss_weights = LossWeights(len(self.tasks), self.layer[0].device, weight_optimizer, name)

    @property
    def weights(self) -> Tensor:
        """The task weights w (T, ``requires_grad``; positive, summing to T)."""
        return self.loss_weights.weights

    @property
    def initial_losses(self) -> Tensor:
        """L_i(0): each task's first positive loss (0 until it has had one)."""
        return self.loss_weights.initial_losses

    @property
    def weight_optimizer(self) -> Optimizer:
        """The optimizer of the task weights."""
        return self.loss_weights.optimizer

    def _rank_config(self) -> tuple[Any, ...]:
        return (*super()._rank_config(), [tuple(p.shape) for p in self.layer], self.MIN_WEIGHT)

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
        sharding = Sharding.of(layer, "GradNorm.backward")
        rows, reached = self._layer_gradients(scaled, layer, sharding)
        for t, hit in zip(scaled, reached):
            if not hit:
                raise ValueError(
                    f"GradNorm.backward: the loss of task {t!r} does not reach the GradNorm layer; "
                    "choose a layer that every task uses"
                )
        # the T rows and the losses (for the training rates), averaged over the ranks at once;
        # FSDP2 has averaged each row already, and the ranks hold different columns of it
        losses_col = torch.stack([v.detach() for v in scaled.values()]).to(rows).reshape(-1, 1)
        group = default_group(self.process_group)
        if group is not None and sharding is not None:
            average_(losses_col, group)
        layer_rows = torch.cat([rows, losses_col], dim=1)
        if group is not None and sharding is None:
            average_(layer_rows, group)
        scale: float | Tensor = 1.0
        if grad_scaler is not None:  # on the device, read as a tensor there: no host read
            one = torch.ones((), dtype=torch.float32, device=rows.device)
            scale = grad_scaler.scale(one) if self._defers() else float(grad_scaler.get_scale())
        used = self.weights.detach()
        weighted = {t: used[i].to(v) * v for i, (t, v) in enumerate(losses.items())}
        super()._backward(weighted, grad_scaler)
        # the model's backward went through: keep this micro-batch's rows for the step
        if self._layer_rows is None:
            self._layer_rows, self._scale, self._layer_sharding = layer_rows, scale, sharding
        else:
            if isinstance(scale, Tensor) or isinstance(self._scale, Tensor):
                same = torch.as_tensor(scale == self._scale)
                self._scale_same = same if self._scale_same is None else self._scale_same & same
            elif scale != self._scale:
                raise ValueError(
                    "GradNorm.backward: the loss scale changed between backward passes of one step"
                )
            self._layer_rows = self._layer_rows + layer_rows

    def _layer_gradients(
        self, losses: dict[str, Tensor], layer: list[Tensor], sharding: Sharding | None
    ) -> tuple[Tensor, list[bool]]:
        """(T, layer size) per-task gradients at the layer W (this rank's shards under FSDP2),
        and whether each task's loss reaches all of W. The losses' graphs are kept for the
        model's backward pass."""
        if sharding is None:
            grads = [
                torch.autograd.grad(v, layer, retain_graph=True, allow_unused=True) for v in losses.values()
            ]
            reached = [all(g is not None for g in row) for row in grads]
            if not all(reached):
                return torch.empty(0), reached
            return torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in grads]), reached
        # FSDP2: one backward per task through its hooks, read from the shards' .grad; every
        # .grad of the step so far is put back afterwards
        dtype = functools.reduce(torch.promote_types, [p.dtype for p in layer])
        size = sum(local_tensor(p).numel() for p in layer)
        out = torch.empty((len(losses), size), dtype=dtype, device=layer[0].device)
        kept = [(p, p.grad) for p in self._param_list]
        try:
            tj = jacobian_through_engine(list(losses.values()), layer, out, retain_graph=True)
        finally:
            for p, g in kept:
                p.grad = g
        return tj.matrix, tj.reached.all(1).tolist()

    def _norms(self, dtype: torch.dtype | None = None) -> Tensor:
        """‖∇_W L_i‖ per task, of the step's accumulated (and unscaled) layer gradients, in
        ``dtype`` (default: the gradients' own). Under FSDP2 the squares of each rank's shards
        are summed over the ranks (in float64, where the square of any float32 norm is finite)."""
        assert self._layer_rows is not None
        rows = self._layer_rows[:, :-1]
        if self._layer_sharding is None:
            return torch.linalg.vector_norm(rows, dim=1, dtype=dtype) / self._scale
        squares = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64).square()
        self._layer_sharding.sum_(squares)
        return (squares.sqrt() / self._scale).to(rows.dtype if dtype is None else dtype)

    def _current_losses(self) -> Tensor:
        """The step's (accumulated, unscaled; under torch.distributed rank-averaged) losses."""
        assert self._layer_rows is not None
        return self._layer_rows[:, -1] / self._scale

    def _check_step(self) -> Tensor | None:
        if self._layer_rows is None:
            raise ValueError(
                "GradNorm.step: no per-task gradients; call opt.backward(losses) (instead of "
                "loss.backward()) before opt.step(), or pass the losses: opt.step(losses)"
            )
        losses = self._backward_losses
        assert losses is not None
        current = self._current_losses()
        norms = self._norms()
        # the weights' gradient is ±‖∇_W L_i‖ in the weights' dtype: every norm must fit it
        largest = torch.finfo(self.weights.dtype).max
        fits = norms.isfinite() & (norms <= largest)
        flags_t = torch.stack([current.isfinite().all().to(norms.device), fits.all()])
        if self._defers():
            # on the device, both forms at once: the norm in the gradients' dtype where it fits
            # (the host path's), else in float64, where finite entries give a finite norm (the
            # host path's second look); refused where even that does not fit the weights
            wide = self._norms(torch.float64)
            self._step_norms = torch.where(fits, norms.to(torch.float64), wide)
            ok = current.isfinite().all().to(wide.device) & (wide <= largest).all()
            if self._scale_same is not None:
                ok = ok & self._scale_same.to(ok.device)
            inner_ok = super()._check_step()
            return ok if inner_ok is None else ok & inner_ok.to(ok.device)
        if self._scale_same is not None and not bool(self._scale_same):  # the option changed
            raise ValueError("GradNorm.backward: the loss scale changed between backward passes of one step")
        flags = flags_t.tolist()
        if not flags[0]:
            bad = {t: v for t, v in zip(losses, current.tolist()) if not math.isfinite(v)}
            raise ValueError(f"GradNorm.step: non-finite loss for task(s) {bad}; nothing was updated")
        if not flags[1]:
            norms = self._refuse_or_recompute_norms(list(losses))
        self._step_norms = norms
        return super()._check_step()

    def _refuse_or_recompute_norms(self, tasks: list[str]) -> Tensor:
        """The rare path of :meth:`_check_step`, once some norm came out non-finite or too
        large in the gradients' dtype. Finite entries can still give an infinite norm there
        (entries of 1e30: their float32 sum of squares overflows), so the norms are taken again
        in float64, where the norm of finite float32 entries is always finite. Refused: a
        gradient with NaN or inf entries ("non-finite"), then a norm that is finite but does
        not fit the weights' dtype ("overflows")."""
        assert self._layer_rows is not None
        norms = self._norms(torch.float64)
        dtype = self.weights.dtype
        finite = self._layer_rows[:, :-1].isfinite().all(dim=1).to(norms.device)
        if self._layer_sharding is not None:  # every rank decides on every shard
            finite = self._layer_sharding.agree(finite)
        fits = norms.isfinite() & (norms <= torch.finfo(dtype).max)
        finite_rows, fitting = torch.stack([finite, fits]).tolist()
        nonfinite = [t for t, ok in zip(tasks, finite_rows) if not ok]
        if nonfinite:
            raise ValueError(
                f"GradNorm.step: non-finite gradient (NaN or inf) at the GradNorm layer from the "
                f"finite loss(es) of {nonfinite}; nothing was updated"
            )
        too_large = [f"{t!r}: {n:.3g}" for t, n, ok in zip(tasks, norms.tolist(), fitting) if not ok]
        if too_large:
            kind = str(dtype).replace("torch.", "")
            raise ValueError(
                f"GradNorm.step: the gradient entries at the GradNorm layer are finite, but their "
                f"norm ({', '.join(too_large)}) overflows {kind}, the dtype of the task weights "
                f"(whose gradient is ± that norm); nothing was updated. Scale the loss(es) down"
            )
        return norms

    def _after_step(self) -> dict[str, Any]:
        """The weight update: gradient of L_grad w.r.t. the weights only (after the model's
        step; nothing here can fail)."""
        norms = self._step_norms
        assert norms is not None
        used = self.weights.detach().clone()
        grad_loss = self.loss_weights.update(
            norms, self._current_losses(), self.alpha, self.MIN_WEIGHT, self._step_ok
        )
        assert self._layer_rows is not None
        report = torch.promote_types(self.weights.dtype, self._layer_rows.dtype)
        extra = {"grad_norms": norms.to(report), "gradnorm_loss": grad_loss.to(report)}
        return {"weights": used, "extra": extra}

    def _clear_backward(self) -> None:
        super()._clear_backward()
        self._step_norms = None
        self._layer_rows = None
        self._layer_sharding = None
        self._scale = 1.0
        self._scale_same = None

    def _owned_optimizers(self) -> dict[str, Optimizer]:
        return {"weights": self.loss_weights.optimizer}

    def _extra_state(self) -> dict[str, Any]:
        return self.loss_weights.saved()

    def _check_extra_state(self, state: Mapping[str, Any]) -> None:
        self.loss_weights.check_saved(state, "GradNorm.load_state_dict")

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.loss_weights.load_saved(state)
