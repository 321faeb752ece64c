"""PCGrad (Yu, Kumar, Gupta, Levine, Hausman & Finn, NeurIPS 2020, arXiv 2001.06782)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._options import Option
from ._options import reduction as reduction_option
from .aggregation import pcgrad_weights, random_order
from .surgery import GradientSurgery

__all__ = ["PCGrad"]


class PCGrad(GradientSurgery):
    """Projecting Conflicting Gradients.

    Each step takes every task's gradient g_i on the shared parameters; for each task i, in a
    random order over the other tasks j, if ``g_iᵀ g_j < 0`` the projection of the (current)
    g_i on the *original* g_j is removed. The projected gradients are summed (the paper and its
    official code) or averaged (``reduction="mean"``). Computed from the T×T Gramian: the
    weights come from ``G`` in T−1 vectorised rounds and the update ``wᵀJ`` is written straight
    into ``.grad``. Visiting orders come from the optimizer's own seeded generator.

    Args:
        optimizer: the torch optimizer that applies the combined gradient.
        tasks: task names; ``next_tasks()`` always returns all of them.
        reduction: ``"sum"`` (default, as in the paper) or ``"mean"``.
        shared, retain_graph, batched, process_group, seed, allow_unused, nonfinite: see
            :class:`~metaopt.surgery.GradientSurgery`.

    The report carries ``weights`` (T), ``cosine`` (T×T) and ``conflicts`` (the fraction of
    task pairs with negative inner product), all from the Gramian at no extra cost.

    Example:
        >>> import torch, metaopt
        >>> torch.manual_seed(0) and None
        >>> enc, heads = torch.nn.Linear(4, 8), torch.nn.ModuleDict({t: torch.nn.Linear(8, 1) for t in "ab"})
        >>> params = [*enc.parameters(), *heads.parameters()]
        >>> opt = metaopt.PCGrad(torch.optim.Adam(params, lr=1e-2), tasks=["a", "b"],
        ...                      shared=enc.parameters(), seed=0)
        >>> x = torch.randn(16, 4)
        >>> report = opt.step({t: heads[t](enc(x)).pow(2).mean() for t in opt.next_tasks()})
        >>> report.cosine.shape
        torch.Size([2, 2])

    References:
        Yu, Kumar, Gupta, Levine, Hausman & Finn. Gradient Surgery for Multi-Task Learning.
        NeurIPS 2020. arXiv:2001.06782.
    """

    reduction = Option(reduction_option)

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        tasks: Iterable[str] | None = None,
        reduction: Literal["sum", "mean"] = "sum",
        shared: Iterable[Tensor] | None = None,
        retain_graph: bool = False,
        batched: bool = False,
        process_group: Any = None,
        seed: int = 0,
        allow_unused: bool = False,
        nonfinite: str = "auto",
    ) -> None:
        super().__init__(
            optimizer,
            tasks=tasks,
            shared=shared,
            retain_graph=retain_graph,
            batched=batched,
            process_group=process_group,
            seed=seed,
            allow_unused=allow_unused,
            nonfinite=nonfinite,
        )
        self.reduction = reduction

    def _weights(
        self, G: Tensor, generator: torch.Generator, state: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        order = random_order(G.shape[-1], generator, device=G.device)
        return pcgrad_weights(G, order, self.reduction, validate=False), None
