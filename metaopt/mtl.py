"""Plain multi-task learning: the sum (or mean) of all task losses, one backward pass."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from torch import Tensor
from torch.optim import Optimizer

from ._distributed import default_group
from ._options import Option
from ._options import reduction as reduction_option
from .base import MultiTaskOptimizer

__all__ = ["MTL"]


class MTL(MultiTaskOptimizer):
    """The baseline every multi-task benchmark needs: minimise ``Σ_t L_t`` (or the mean).

    Each step asks for all tasks and takes one backward pass through their combined loss
    (:meth:`backward`, or ``step(losses)``); ``step()`` after your own ``loss.backward()`` steps
    on ``.grad`` as it is.
    (Plain training with one *sampled* task per step is ``SequentialReptile(..., outer_lr=1)``.)

    Args:
        optimizer: the torch optimizer (a metaopt optimizer is refused with ``TypeError``; MTL
            itself can be wrapped, e.g. by :class:`~metaopt.GradNorm`).
        tasks: task names.
        reduction: ``"sum"`` (default) or ``"mean"``.
        process_group: under ``torch.distributed``, the ranks whose options and schedules the
            first step compares (DDP averages the gradients themselves); ``"local"`` opts out,
            for a run on some ranks only. Default ``None``: the default group.
        seed, allow_unused, nonfinite: as in :class:`~metaopt.MultiTaskOptimizer`.

    Example:
        >>> import torch, metaopt
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = metaopt.MTL(torch.optim.SGD(model.parameters(), lr=0.1), tasks=["a", "b"])
        >>> x = torch.ones(4, 2)
        >>> report = opt.step({t: model(x).pow(2).mean() for t in opt.next_tasks()})
        >>> report.tasks
        ('a', 'b')
    """

    reduction = Option(reduction_option)

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        tasks: Iterable[str] | None = None,
        reduction: Literal["sum", "mean"] = "sum",
        process_group: Any = None,
        seed: int = 0,
        allow_unused: bool = False,
        nonfinite: str = "auto",
    ) -> None:
        if isinstance(optimizer, MultiTaskOptimizer):
            raise TypeError("MTL: wrap a torch optimizer")
        super().__init__(optimizer, tasks=tasks, seed=seed, allow_unused=allow_unused, nonfinite=nonfinite)
        self.reduction = reduction
        default_group(process_group)  # validated: a group, None or "local"
        self.process_group = process_group

    def _draw_tasks(self) -> list[str]:
        return list(self.tasks)

    def _backward(self, losses: dict[str, Tensor], grad_scaler: Any) -> None:
        if self.reduction == "mean":
            n = len(losses)
            losses = {t: v / n for t, v in losses.items()}
        self._summed_backward(losses, grad_scaler)
