"""Any Gramian-based weighting as a metaopt method (for example TorchJD's UPGrad, MGDA, CAGrad)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .surgery import GradientSurgery

__all__ = ["Weighted"]

Weighting = Callable[[Tensor], Tensor]


def _torchjd_kind(weighting: Any) -> str | None:
    """TorchJD's own classification of a weighting: ``"matrix"`` (it reads the Jacobian),
    ``"stateful"``, or ``None`` (a Gramian weighting, or not TorchJD's). Read from the classes
    TorchJD derives its weightings from, if TorchJD is loaded at all."""
    bases = sys.modules.get("torchjd.aggregation._weighting_bases")
    mixins = sys.modules.get("torchjd._mixins")
    matrix = getattr(bases, "_MatrixWeighting", None)
    stateful = getattr(mixins, "Stateful", None)
    if isinstance(matrix, type) and isinstance(weighting, matrix):
        return "matrix"
    if isinstance(stateful, type) and isinstance(weighting, stateful):
        return "stateful"
    return None


class Weighted(GradientSurgery):
    """A multi-task method given by a weighting of the T×T Gramian ``G = J Jᵀ``: each step
    takes every task's gradient on the shared parameters (the rows of J), asks ``weighting(G)``
    for T weights ``w`` and writes ``wᵀJ`` into ``.grad``, through the same machinery as
    :class:`~metaopt.PCGrad` (the torch-style recipe, accumulation, GradScaler, DDP,
    composition such as ``SequentialReptile(Weighted(...))``).

    Any callable from a (T, T) Gramian to T weights qualifies, in particular TorchJD's Gramian
    weightings (``UPGradWeighting``, ``MGDAWeighting``, ``CAGradWeighting``, ``DualProjWeighting``,
    ``IMTLGWeighting``, ``AlignedMTLWeighting``, ...; Quinton & Rey, arXiv 2406.16232); then
    ``w @ J`` is what TorchJD's aggregator of the same name returns for J (tested in float64 to
    1e-12).

    Refused with a clear error: TorchJD weightings that read the Jacobian itself (ExcessMTL,
    MoDo, SDMGrad, and the constant/mean/sum/random ones, which TorchJD also classes so), and
    stateful ones (their state would move on a step that never runs, and is not in
    ``state_dict``). Gramians are not batched: at every backward the weighting is called once,
    with the (T, T) float64 Gramian of all the shared parameters (there is no ``groups``
    option). Anything random in the weighting (TorchJD's ``PCGradWeighting`` draws from the
    global RNG) draws from the global CPU generator reseeded from this optimizer's own
    generator, inside ``torch.random.fork_rng(devices=[])``, so runs are reproducible and
    neither the caller's CPU RNG nor any CUDA generator is touched.

    Args:
        optimizer: the torch optimizer that applies the combined gradient.
        weighting: ``G (T, T) -> w (T,)``.
        tasks, shared, retain_graph, batched, process_group, seed, allow_unused, nonfinite: see
            :class:`~metaopt.surgery.GradientSurgery`.

    Example:
        >>> import torch, metaopt
        >>> def unit_norm(G):                   # any Gramian weighting: here w_i = 1 / |g_i|
        ...     return 1.0 / G.diagonal().sqrt()
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = metaopt.Weighted(torch.optim.SGD(model.parameters(), lr=0.1),
        ...                        weighting=unit_norm, tasks=["a", "b"])
        >>> x = torch.ones(4, 3)
        >>> report = opt.step({"a": model(x).sum(), "b": -2 * model(x).sum()})
        >>> [round(w, 6) for w in report.weights.tolist()]
        [0.125, 0.0625]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        weighting: Weighting,
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
        if not callable(weighting):
            raise TypeError(f"{name}: weighting must be a callable G -> w, got {type(weighting).__name__}")
        kind = _torchjd_kind(weighting)
        if kind == "matrix":
            raise TypeError(
                f"{name}: {type(weighting).__name__} reads the Jacobian itself, not its Gramian; "
                "only Gramian weightings can be used here (UPGradWeighting, MGDAWeighting, "
                "CAGradWeighting, ...)"
            )
        if kind == "stateful":
            raise TypeError(
                f"{name}: {type(weighting).__name__} keeps state between calls, which would move "
                "on steps that never run (a GradScaler skip, a dropped backward) and is not saved "
                "in state_dict(); use a stateless weighting"
            )
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
        self.weighting = weighting

    def _rank_config(self) -> tuple[Any, ...]:
        return (*super()._rank_config(), type(self.weighting).__qualname__)

    def _weights(
        self, G: Tensor, generator: torch.Generator, state: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        name = type(self).__name__
        T = G.shape[-1]
        seed = int(torch.randint(2**62, (1,), generator=generator).item())
        out = []
        # fork_rng(devices=[]) saves and restores only the CPU generator, so only that one is
        # reseeded: torch.manual_seed would also reseed every CUDA generator for good.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            for g in G:  # the base class's one (T, T) Gramian per group; Weighted has one group
                w = self.weighting(g)
                if not isinstance(w, Tensor) or w.shape != (T,):
                    raise ValueError(
                        f"{name}: the weighting returned "
                        f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}, "
                        f"expected {T} weights (a tensor of shape ({T},)); nothing was updated"
                    )
                out.append(w.to(device=G.device, dtype=G.dtype))
        return torch.stack(out), None
