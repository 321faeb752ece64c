"""Shared machinery of the gradient-surgery optimizers (PCGrad, GradVac): per-task gradients of
the shared parameters, their Gramian, weights from the Gramian, and the update ``wᵀJ`` written
straight into ``.grad``.

Task-specific parameters (heads) never take part in the aggregation: each gets the sum of the
gradients of the losses that reach it, so one task's head gradient cannot leak into another
task's projection (the bug of the most-copied PCGrad port).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._distributed import average_, default_group
from ._options import Option, flag
from .aggregation import aggregate, conflict_fraction, cosine_from_gramian, gramian
from .aggregation._scaling import update_bound, update_flags, update_limit
from .aggregation._validate import compute_dtype
from .base import MultiTaskOptimizer
from .interpolation import master_dtype
from .jacobian import parameter_slices, task_jacobian
from .parts.grads import bad_losses
from .parts.placement import Sharding, jacobian_through_engine, local_tensor, placed_like, refuse_fsdp1

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


@dataclass(frozen=True)
class Proposal:
    """What one backward pass proposes, committed whole by the step that applies it (and
    dropped with the backward otherwise): as optax's ``update`` returns its new state instead
    of setting it."""

    generator: Tensor
    """The generator's state after the weighting's draws (visiting orders)."""
    state: Tensor | None
    """The weighting's next state (GradVac's targets), or ``None`` for a stateless one."""
    report: dict[str, Any]
    """The step report's fields: ``weights``, ``cosine``, ``conflicts``."""


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
        process_group: under ``torch.distributed`` (DistributedDataParallel), the group whose
            ranks' per-task gradient rows are averaged before combining (one collective over
            the T rows per backward pass). Default ``None``: the default group when
            ``torch.distributed`` is initialized with more than one rank, else no averaging.
        seed, allow_unused, nonfinite: as in :class:`~metaopt.MultiTaskOptimizer`.

    Driven the torch way, :meth:`backward` replaces ``loss.backward()``: it takes the per-task
    gradients (each task on its own graph, freed when done unless ``retain_graph``), combines
    them and writes the update into ``.grad``, where ``GradScaler.unscale_`` and
    ``clip_grad_norm_`` can act on it before ``step()``. The visiting order and GradVac's
    targets commit at ``step()``.
    """

    retain_graph = Option(flag)
    batched = Option(flag)

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        tasks: Iterable[str] | None = None,
        shared: Iterable[Tensor] | None = None,
        retain_graph: bool = False,
        batched: bool = False,
        process_group: Any = None,
        seed: int = 0,
        allow_unused: bool = False,
        nonfinite: str = "auto",
    ) -> None:
        name = type(self).__name__
        if isinstance(optimizer, MultiTaskOptimizer):
            raise TypeError(
                f"{name}: wrap a torch optimizer; to combine with Sequential Reptile or GradNorm, "
                f"wrap the {name} in them instead"
            )
        super().__init__(optimizer, tasks=tasks, seed=seed, allow_unused=allow_unused, nonfinite=nonfinite)
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
        self.process_group = process_group
        self._grad_buffers: list[Tensor] = []
        self._scratch: Tensor | None = None
        self._rows: int | None = None  # a backward is pending: its rows are in J
        self._reached: Tensor | None = None
        self._proposal: Proposal | None = None  # the pending backward's, for step() to commit
        self._refusal: str | None = None
        self._backward_ok: Tensor | None = None  # the backward's flags, decided on the device
        self.weighting_state: Tensor | None = None  # the weighting's record (GradVac's targets)
        self._lay_out_columns()
        self.retain_graph = retain_graph
        self.batched = batched

    def _rank_config(self) -> tuple[Any, ...]:
        shared = None if self._shared is None else [tuple(p.shape) for p in self._shared]
        return (*super()._rank_config(), shared, [tuple(p.shape) for p in self._param_list])

    def _lay_out_columns(self) -> None:
        """Columns of J over the trainable parameters: shared ones first (one contiguous
        range), then the others."""
        self._all_params = list(self._param_list)
        self._trainable_mask = [p.requires_grad for p in self._all_params]
        params = [p for p in self._all_params if p.requires_grad]
        if self._shared is None:
            ordered = list(params)
        else:
            shared_ids = {id(p) for p in self._shared}
            ordered = [p for p in params if id(p) in shared_ids] + [
                p for p in params if id(p) not in shared_ids
            ]
        devices = {(p.device, master_dtype(p.dtype)) for p in ordered}
        if len(devices) > 1:
            raise ValueError(
                f"{type(self).__name__}: parameters must share one device and dtype family, got "
                f"{sorted(map(str, devices))}"
            )
        self._params = ordered
        # FSDP2: the columns are this rank's shards, and the Gramian is summed over the ranks
        refuse_fsdp1(ordered, type(self).__name__)
        self._sharding = Sharding.of(ordered, type(self).__name__)
        self._slices = parameter_slices([local_tensor(p) for p in ordered])
        self.num_params = self._slices[-1].stop if ordered else 0
        self._jacobian: Tensor | None = None  # persistent (T, P) buffer

    def _params_added(self, new: list[Tensor]) -> None:
        self._lay_out_columns()  # new parameters come after the shared ones: no column moves

    # ------------------------------------------------------------------ hooks for subclasses
    def _groups(self, shared_runs: list[slice]) -> list[list[slice]]:
        """Column ranges of each aggregation group (default: all shared columns, one group)."""
        return [shared_runs]

    def _weights(
        self, G: Tensor, generator: torch.Generator, state: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """The weighting: ``(weights, next_state)`` from the (n_groups, T, T) Gramians and the
        weighting's current ``state`` (:attr:`weighting_state`), without setting anything;
        draws from ``generator``, a copy of the task stream's, whose state the step commits."""
        raise NotImplementedError

    # ------------------------------------------------------------------ mechanics
    def _draw_tasks(self) -> list[str]:
        return list(self.tasks)

    def _layout_for_step(self) -> None:
        """Columns of J over the parameters trainable now (re-laid out when one was frozen or
        unfrozen; refused between two backward passes of one step)."""
        trainable = [p.requires_grad for p in self._all_params]
        if trainable == self._trainable_mask:
            return
        if self._rows is not None:
            raise ValueError(
                f"{type(self).__name__}.backward: parameters were frozen or unfrozen between two "
                "backward passes of one step; call step() or zero_grad() first"
            )
        self._lay_out_columns()

    def _grad_buffer(self, like: Tensor) -> Tensor:
        """The (P,) buffer the combined update is written into, ``.grad`` being views of it.
        Of two, the one that the current ``.grad`` do not view: a refused step restores the
        previous ``.grad`` untouched (a fresh buffer per step would be page-faulted in each time)."""
        dtype = master_dtype(like.dtype)
        bufs = [
            b
            for b in self._grad_buffers
            if b.shape == (self.num_params,) and b.dtype == dtype and b.device == like.device
        ]
        while len(bufs) < 2:
            bufs.append(torch.empty(self.num_params, dtype=dtype, device=like.device))
        self._grad_buffers = bufs
        # any parameter's .grad may view it (the first may have got none): check them all
        first = bufs[0].untyped_storage().data_ptr()
        live = any(
            p.grad is not None and local_tensor(p.grad).untyped_storage().data_ptr() == first
            for p in self._all_params
        )
        return bufs[1] if live else bufs[0]

    def _jacobian_buffer(self, T: int, like: Tensor, scratch: bool) -> Tensor:
        dtype = master_dtype(like.dtype)
        key = "_scratch" if scratch else "_jacobian"
        J = getattr(self, key)
        if J is None or J.shape != (T, self.num_params) or J.dtype != dtype or J.device != like.device:
            J = torch.empty((T, self.num_params), dtype=dtype, device=like.device)
            setattr(self, key, J)
        return J

    def _column_runs(
        self, this: Tensor, reached: Tensor, names: Sequence[str], name: str
    ) -> tuple[list[bool], list[slice], list[slice]]:
        """From ``reached`` (T, parameters) on CPU, the step's layout: which parameters some loss
        reaches, the column ranges of the shared parameters and those of the others reached
        (heads). Raises if a task's loss (``this``: this backward's) reaches no parameter, or
        nothing is shared. The same masks come back step after step: the last layout is kept
        and reused while the masks and the columns stay the same."""
        key = (this.numpy().tobytes(), reached.numpy().tobytes(), this.shape)
        cached = getattr(self, "_runs_cache", None)
        if cached is not None and cached[0] is self._slices and cached[1] == key:
            return cached[2]
        stray = [t for t, hit in zip(names, this.any(1).tolist()) if not hit]
        if stray:
            fsdp = (
                "; under FSDP2, is gradient sync off (set_requires_gradient_sync(False))? A per-task "
                "method reads each task's reduce-scattered gradient: accumulate micro-batches with "
                "opt.backward(losses) and sync on"
                if self._sharding is not None
                else ""
            )
            raise ValueError(
                f"{name}: the loss of task(s) {stray} reaches none of the optimizer's "
                f"parameters (a module left out of the optimizer?){fsdp}"
            )
        by_any = reached.any(0).tolist()
        if self._shared is None:
            shared_mask = reached.all(0).tolist()
        else:
            shared_ids = {id(p) for p in self._shared}
            shared_mask = [id(p) in shared_ids for p in self._params]
        shared_runs = _runs(shared_mask, self._slices)
        if not shared_runs:
            raise ValueError(
                f"{name}: no parameter is reached by every task's loss, so there is nothing "
                "to aggregate; pass shared= explicitly"
            )
        head_runs = _runs([a and not s for a, s in zip(by_any, shared_mask)], self._slices)
        result = (by_any, shared_runs, head_runs)
        self._runs_cache = (self._slices, key, result)
        return result

    def _backward(self, losses: dict[str, Tensor], grad_scaler: Any) -> None:
        name = f"{type(self).__name__}.backward"
        names = list(losses)
        self._layout_for_step()
        params = self._params
        if not params:
            raise ValueError(f"{name}: every parameter of the optimizer is frozen")
        first = self._rows is None
        # this backward's rows go into J directly at the first pass of a step, else a scratch
        rows = self._jacobian_buffer(len(names), params[0], scratch=not first)
        scaled = list(self._scaled(losses, grad_scaler).values())
        sharding = self._sharding
        if sharding is None:
            tj = task_jacobian(scaled, params, out=rows, retain_graph=self.retain_graph, batched=self.batched)
        else:  # FSDP2's shards are not in the losses' graphs: one backward per task through it
            tj = jacobian_through_engine(scaled, params, rows, self.retain_graph)
        reached = tj.reached if self._reached is None else (self._reached | tj.reached)
        by_any, shared_runs, head_runs = self._column_runs(tj.reached, reached, names, name)
        # the T rows averaged over the ranks: one collective, before combining (FSDP2 averages
        # each task's gradient as it reduce-scatters it)
        group = default_group(self.process_group) if sharding is None else None
        if group is not None:
            average_(rows, group)
        # nothing has moved so far but internal buffers; from here on this backward counts
        J = self._jacobian_buffer(len(names), params[0], scratch=False)
        if not first:
            J.add_(rows)
        self._proposal = None
        self._rows, self._reached = len(names), reached
        groups = self._groups(shared_runs)
        # One Gramian per group, summed over the group's column ranges, accumulated in float64:
        # finite and accurate for any finite float32 gradients (see metaopt.aggregation.gramian).
        cdt = compute_dtype(J)
        grams = [
            sum((gramian(J[:, sl], dtype=cdt) for sl in g[1:]), gramian(J[:, g[0]], dtype=cdt))
            for g in groups
        ]
        G = grams[0].unsqueeze(0) if len(grams) == 1 else torch.stack(grams)
        if sharding is not None:  # this rank's shards' share: one all-reduce of n_groups × T × T
            sharding.sum_(G)
        # Weights first, checks after, so that one host sync covers them all. The weighting
        # draws on a copy of the generator and returns its next state: both are proposed, and
        # committed by step(); a non-finite G is zeroed for it (such a step is refused anyway).
        generator = torch.Generator()
        generator.set_state(self.generator.get_state())
        finite_G = torch.nan_to_num(G, nan=0.0, posinf=0.0, neginf=0.0)
        weights, next_state = self._weights(finite_G, generator, self.weighting_state)
        # every task's gradient finite (the Gramian's diagonal; heads: each row's largest entry),
        # and the update wᵀJ and the head sums within J's dtype (metaopt.aggregation._scaling)
        ok = G.diagonal(dim1=-2, dim2=-1).isfinite().all(0)
        heads = torch.zeros((), dtype=cdt, device=J.device)  # bounds the head sums' entries
        for sl in head_runs:
            if sl.stop == sl.start:  # a head whose shard on this rank is empty (FSDP2)
                continue
            row_max = torch.linalg.vector_norm(J[:, sl], ord=float("inf"), dim=1)
            ok = ok & row_max.isfinite()
            heads = torch.maximum(heads, row_max.to(cdt).sum())
        fits, split = update_flags(weights, G, J.dtype)
        # the losses of the step so far (every micro-batch's)
        values = [v.detach() for v in losses.values()]
        if self._backward_losses is not None:
            values = [a + b for a, b in zip(self._backward_losses.values(), values)]
        loss_ok = torch.stack(values).isfinite().to(ok.device)
        # the one host sync of the backward pass: losses, each task's gradient, the update's
        # range, split
        flags_t = torch.cat([ok, loss_ok, torch.stack([fits & (heads <= update_limit(J.dtype)), split])])
        if sharding is not None:
            flags_t = sharding.agree(flags_t)
        T = len(names)
        grad = self._grad_buffer(params[0])
        if self._defers():  # no host read: the flags join the step's, which skips on the device
            self._refusal = None
            self._backward_ok = flags_t[:-1].all()
            self._write_update(groups, weights, J, head_runs, grad)
            self._place_grads(params, by_any, grad, weights, G, groups, generator, next_state)
            return
        self._backward_ok = None
        flags = flags_t.tolist()
        bad = [t for t, good in zip(names, flags[:T]) if not good]
        bad_loss = bad_losses(dict(zip(names, values)), flags[T : 2 * T])
        flags = flags[:T] + flags[2 * T :]
        if bad_loss:
            self._refusal = f"non-finite loss for task(s) {bad_loss}; nothing was updated"
            torch.sum(J, dim=0, out=grad)
        elif bad:
            self._refusal = (
                f"non-finite gradient (NaN or inf) for task(s) {bad}; nothing was "
                "updated (with a GradScaler, scaler.step(opt) skips such steps)"
            )
            torch.sum(J, dim=0, out=grad)  # non-finite, as GradScaler must see it
        elif not flags[T]:
            size = max(float(update_bound(weights, G).max()), float(heads))
            self._refusal = (
                f"the combined update does not fit {J.dtype}: its norm is bounded by "
                f"sum_k |w_k| |g_k| = {size:.3g}, above the {update_limit(J.dtype):.3g} "
                "accepted; nothing was updated"
            )
            grad.fill_(float("inf"))
        else:
            self._refusal = None
            # weights outside J's dtype's range are applied split (exactly), the others cast
            self._write_update(groups, weights if flags[-1] else weights.to(J.dtype), J, head_runs, grad)
        self._place_grads(params, by_any, grad, weights, G, groups, generator, next_state)

    @staticmethod
    def _write_update(
        groups: list[list[slice]], weights: Tensor, J: Tensor, head_runs: list[slice], grad: Tensor
    ) -> None:
        """``grad`` ← each group's ``wᵀJ`` over its columns, and each head's row sum. Weights
        wider than ``J``'s dtype are applied split, exactly (:func:`~metaopt.aggregation.aggregate`)."""
        for g, w in zip(groups, weights):
            for sl in g:
                aggregate(J[:, sl], w, out=grad[sl])
        for sl in head_runs:
            torch.sum(J[:, sl], dim=0, out=grad[sl])

    def _place_grads(
        self,
        params: list[Tensor],
        by_any: list[bool],
        grad: Tensor,
        weights: Tensor,
        G: Tensor,
        groups: list[list[slice]],
        generator: torch.Generator,
        next_state: Tensor | None,
    ) -> None:
        """``.grad`` of each parameter some loss reaches ← its view of ``grad``; the others
        ``None``; the proposal (draws, weighting state, report) for :meth:`step` to commit."""
        for p, sl, used in zip(params, self._slices, by_any):
            if not used:
                p.grad = None
            else:
                view = grad[sl].view_as(local_tensor(p))
                view = view if grad.dtype == p.dtype else view.to(p.dtype)
                p.grad = placed_like(view, p)  # a DTensor placed as p where p is one
        for p in self._all_params:
            if not p.requires_grad:
                p.grad = None
        G_all = G[0] if len(groups) == 1 else G.sum(0)
        report = {
            "weights": weights[0] if len(groups) == 1 else weights,
            "cosine": cosine_from_gramian(G_all),
            "conflicts": conflict_fraction(G_all),
        }
        self._proposal = Proposal(generator.get_state(), next_state, report)

    def _check_step(self) -> Tensor | None:
        name = type(self).__name__
        if self._proposal is None and self._rows is not None:
            # rows were accumulated, then the backward raised before it proposed its update
            raise ValueError(
                f"{name}.step: the last backward(...) of this step failed part-way, after its "
                "gradient rows were accumulated; call zero_grad() and redo the step's backward "
                "passes. Nothing was updated"
            )
        if self._proposal is None:
            raise ValueError(
                f"{name}.step: no per-task gradients; call opt.backward(losses) (instead of "
                "loss.backward()) before opt.step(), or pass the losses: opt.step(losses)"
            )
        if self._refusal is not None and not self._defers():
            raise ValueError(f"{name}.step: {self._refusal}")
        # .grad as it is now (clipped, unscaled, or written to since the backward): present
        # where the backward put it and finite, as for a step after loss.backward()
        ok = self._check_grads()
        if self._refusal is not None and ok is not None:  # refused at the backward, read on the
            return torch.zeros_like(ok)  # host there; the option now skips it on the device
        backward_ok = self._backward_ok  # the backward's flags, where it decided on the device
        if backward_ok is None:
            return ok
        if ok is not None:
            return ok & backward_ok.to(ok.device)
        if not bool(backward_ok):  # the option changed since the backward: read it now
            raise ValueError(
                f"{name}.step: non-finite gradient or loss, or an update outside the gradients' "
                "dtype, in the backward pass; nothing was updated"
            )
        return None

    def _after_step(self) -> dict[str, Any]:
        # the commit point of the backward's proposal: the draws and the weighting's state (on
        # a step skipped on the device, the state stays as it was)
        proposal = self._proposal
        assert proposal is not None
        self.generator.set_state(proposal.generator)
        new, ok = proposal.state, self._step_ok
        if ok is not None and new is not None and self.weighting_state is not None:
            old = self.weighting_state.to(new.device)
            new = torch.where(ok.to(new.device), new, old)
        self.weighting_state = new
        return dict(proposal.report)

    def _clear_backward(self) -> None:
        super()._clear_backward()
        self._rows = None
        self._reached = None
        self._proposal = None
        self._backward_ok = None
        self._refusal = None
