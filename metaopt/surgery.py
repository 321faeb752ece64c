"""Shared machinery of the gradient-surgery optimizers (PCGrad, GradVac): per-task gradients of
the shared parameters, their Gramian, weights from the Gramian, and the update ``wᵀJ`` written
straight into ``.grad``.

Task-specific parameters (heads) never take part in the aggregation: each gets the sum of the
gradients of the losses that reach it, so one task's head gradient cannot leak into another
task's projection (the bug of the most-copied PCGrad port).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._options import Option, flag
from .aggregation import aggregate, conflict_fraction, cosine_from_gramian, gramian
from .aggregation._scaling import update_bound, update_flags, update_limit
from .aggregation._validate import compute_dtype
from .base import MultiTaskOptimizer
from .interpolation import master_dtype
from .jacobian import parameter_slices, task_jacobian
from .report import StepReport

__all__ = ["GradientSurgery"]


def _runs(mask: Sequence[bool], slices: Sequence[slice]) -> list[slice]:
    """Maximal column ranges of consecutive parameters with ``mask`` True."""
    out: list[slice] = []
    for m, sl in zip(mask, slices):
        if not m:
            continue
        if out and out[-1].stop == sl.start:
            out[-1] = slice(out[-1].start, sl.stop)
        else:
            out.append(sl)
    return out


class GradientSurgery(MultiTaskOptimizer):
    """Base class: every step asks for all tasks, takes their gradients on the shared
    parameters and combines them with weights computed from the Gramian ``G = J Jᵀ``.

    Args:
        optimizer: the torch optimizer that applies the combined gradient.
        tasks: task names.
        shared: the parameters whose per-task gradients are aggregated. Default ``None``: at
            each step, the parameters that *every* task's loss reaches; parameters reached by
            only some losses (task heads) get the plain sum of those losses' gradients.
        retain_graph: keep each task's graph after its backward pass. Needed when the losses
            share part of one graph (one forward pass over a mixed batch); by default each
            task's graph is freed as soon as its gradient row is taken.
        batched: compute the T gradient rows with one vmapped backward pass
            (``is_grads_batched``) instead of T passes (falls back to the loop with a warning).
        seed, allow_unused: as in :class:`~metaopt.MultiTaskOptimizer`.
    """

    retain_graph = Option(flag)
    batched = Option(flag)

    def __init__(self, optimizer: Optimizer, *, tasks: Iterable[str] | None = None,
                 shared: Iterable[Tensor] | None = None, retain_graph: bool = False,
                 batched: bool = False, seed: int = 0, allow_unused: bool = False) -> None:
        name = type(self).__name__
        if isinstance(optimizer, MultiTaskOptimizer):
            raise TypeError(
                f"{name}: wrap a torch optimizer; to combine with Sequential Reptile or GradNorm, "
                f"wrap the {name} in them instead"
            )
        super().__init__(optimizer, tasks=tasks, seed=seed, allow_unused=allow_unused)
        params = self._param_list
        if shared is None:
            self._shared: list[Tensor] | None = None
        else:
            shared_list = list(shared)
            if not shared_list:
                raise ValueError(f"{name}: shared is empty; leave it None to detect shared parameters")
            ids = {id(p) for p in params}
            stray = [p for p in shared_list if id(p) not in ids]
            if stray:
                raise ValueError(
                    f"{name}: {len(stray)} shared tensor(s) are not parameters of the wrapped "
                    f"optimizer (first has shape {tuple(stray[0].shape)})"
                )
            # the tensors themselves, not their id()s: a deepcopy or pickle maps them along
            self._shared = shared_list
        self._lay_out_columns()
        self.retain_graph = retain_graph
        self.batched = batched

    def _lay_out_columns(self) -> None:
        """Columns of J: shared parameters first (one contiguous range), then the others."""
        params = self._param_list
        if self._shared is None:
            ordered = list(params)
        else:
            shared_ids = {id(p) for p in self._shared}
            ordered = [p for p in params if id(p) in shared_ids] + \
                      [p for p in params if id(p) not in shared_ids]
        devices = {(p.device, master_dtype(p.dtype)) for p in ordered}
        if len(devices) != 1:
            raise ValueError(
                f"{type(self).__name__}: parameters must share one device and dtype family, got "
                f"{sorted(map(str, devices))}"
            )
        self._params = ordered
        self._slices = parameter_slices(ordered)
        self.num_params = self._slices[-1].stop
        self._jacobian: Tensor | None = None   # persistent (T, P) buffer
        self._grad: Tensor | None = None       # persistent (P,) buffer; .grad are views into it

    def _params_added(self, new: list[Tensor]) -> None:
        self._lay_out_columns()   # new parameters come after the shared ones: no column moves

    # ------------------------------------------------------------------ hooks for subclasses
    def _groups(self, shared_runs: list[slice]) -> list[list[slice]]:
        """Column ranges of each aggregation group (default: all shared columns, one group)."""
        return [shared_runs]

    def _weights(self, G: Tensor, losses: Mapping[str, Tensor]) -> Tensor:
        """(n_groups, T) weights from the (n_groups, T, T) Gramians. Must not change state."""
        raise NotImplementedError

    def _commit(self) -> None:
        """Apply state changes prepared by :meth:`_weights`, once the step is accepted."""

    # ------------------------------------------------------------------ mechanics
    def _draw_tasks(self) -> list[str]:
        return list(self.tasks)

    def _buffers(self, T: int, like: Tensor) -> tuple[Tensor, Tensor]:
        dtype = master_dtype(like.dtype)
        if self._jacobian is None or self._jacobian.shape != (T, self.num_params):
            self._jacobian = torch.empty((T, self.num_params), dtype=dtype, device=like.device)
            self._grad = torch.empty(self.num_params, dtype=dtype, device=like.device)
        assert self._grad is not None
        return self._jacobian, self._grad

    def _step(self, losses: dict[str, Tensor]) -> StepReport:
        name = type(self).__name__
        names = list(losses)
        params = self._params
        J, grad = self._buffers(len(names), params[0])
        tj = task_jacobian(list(losses.values()), params, out=J,
                           retain_graph=self.retain_graph, batched=self.batched)
        reached = tj.reached                              # (T, n_params) bool, CPU
        by_any = reached.any(0).tolist()
        by_all = reached.all(0).tolist()
        stray = [t for t, hit in zip(names, reached.any(1).tolist()) if not hit]
        if stray:
            raise ValueError(
                f"{name}.step: the loss of task(s) {stray} reaches none of the optimizer's "
                "parameters (a module left out of the optimizer?)"
            )
        unused = [p for p, r in zip(params, by_any) if not r]
        if unused and not self.allow_unused:
            raise ValueError(
                f"{name}.step: {len(unused)} parameter(s) get no gradient from any loss, e.g. "
                f"{self._param_name(unused[0])}; remove them or pass allow_unused=True"
            )
        if self._shared is None:
            shared_mask = by_all
        else:
            shared_ids = {id(p) for p in self._shared}
            shared_mask = [id(p) in shared_ids for p in params]
        shared_runs = _runs(shared_mask, self._slices)
        if not shared_runs:
            raise ValueError(
                f"{name}.step: no parameter is reached by every task's loss, so there is nothing "
                "to aggregate; pass shared= explicitly"
            )
        head_runs = _runs([a and not s for a, s in zip(by_any, shared_mask)], self._slices)
        groups = self._groups(shared_runs)
        # One Gramian per group, summed over the group's column ranges, accumulated in float64:
        # finite and accurate for any finite float32 gradients (see metaopt.aggregation.gramian).
        cdt = compute_dtype(J)
        G = torch.stack([sum((gramian(J[:, sl], dtype=cdt) for sl in g[1:]), gramian(J[:, g[0]], dtype=cdt))
                         for g in groups])
        # Weights first, checks after, so that one host sync covers them all. _weights only
        # prepares state; the order it draws is undone if the step is refused. A non-finite G
        # is zeroed for it (the step is then refused anyway).
        drawn = self.generator.get_state()
        try:
            weights = self._weights(torch.nan_to_num(G, nan=0.0, posinf=0.0, neginf=0.0), losses)
        except BaseException:
            self.generator.set_state(drawn)
            raise
        # every task's gradient finite (the Gramian's diagonal; heads: each row's largest entry),
        # and the update wᵀJ and the head sums within J's dtype (metaopt.aggregation._scaling)
        ok = G.diagonal(dim1=-2, dim2=-1).isfinite().all(0)
        heads = torch.zeros((), dtype=cdt, device=J.device)  # bounds the head sums' entries
        for sl in head_runs:
            row_max = torch.linalg.vector_norm(J[:, sl], ord=float("inf"), dim=1)
            ok = ok & row_max.isfinite()
            heads = torch.maximum(heads, row_max.to(cdt).sum())
        fits, split = update_flags(weights, G, J.dtype)
        loss_ok = torch.stack([v.detach().isfinite() for v in losses.values()]).all().to(ok.device)
        # the one host sync of the step: losses, each task's gradient, the update's range, split
        flags = torch.cat([ok, torch.stack([loss_ok, fits & (heads <= update_limit(J.dtype)), split])]).tolist()
        if not all(flags[:-1]):
            self.generator.set_state(drawn)
            T = len(names)
            if not flags[T]:
                self._require_finite(losses)   # raises, naming the tasks with a non-finite loss
            bad = [t for t, good in zip(names, flags) if not good]
            if bad:
                raise ValueError(
                    f"{name}.step: non-finite gradient (NaN or inf) for task(s) {bad}; nothing was updated"
                )
            size = max(float(update_bound(weights, G).max()), float(heads))
            raise ValueError(
                f"{name}.step: the combined update does not fit {J.dtype}: its norm is bounded by "
                f"sum_k |w_k| |g_k| = {size:.3g}, above the {update_limit(J.dtype):.3g} accepted; "
                "nothing was updated"
            )
        # the step is accepted from here on
        self._commit()
        # weights outside J's dtype's range are applied split (exactly), the others cast
        applied = weights if flags[-1] else weights.to(J.dtype)
        for g, w in zip(groups, applied):
            for sl in g:
                aggregate(J[:, sl], w, out=grad[sl])
        for sl in head_runs:
            torch.sum(J[:, sl], dim=0, out=grad[sl])
        for p, sl, used in zip(params, self._slices, by_any):
            if not used:
                p.grad = None
            elif grad.dtype == p.dtype:
                p.grad = grad[sl].view_as(p)
            else:
                p.grad = grad[sl].view_as(p).to(p.dtype)
        self.base_optimizer.step()
        self._step_count += 1
        G_all = G.sum(0)
        return self._report(
            losses,
            weights=weights[0] if len(groups) == 1 else weights,
            cosine=cosine_from_gramian(G_all),
            conflicts=conflict_fraction(G_all),
        )
