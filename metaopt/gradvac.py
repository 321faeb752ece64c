"""GradVac: Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, ICLR 2021, arXiv 2010.05874)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._options import Option
from ._options import beta as beta_option
from ._options import reduction as reduction_option
from .aggregation import gradvac_weights, random_order
from .surgery import GradientSurgery

__all__ = ["GradVac"]


class GradVac(GradientSurgery):
    """Gradient Vaccine: PCGrad with adaptive, EMA-tracked cosine targets per task pair.

    For every ordered task pair (i, j) (and parameter group) GradVac keeps a target
    ``φ̂_ij`` starting at 0. Each step, task i visits the other tasks in a random order; with
    ``φ_ij`` the cosine of the current g_i with the original g_j it *first* compares: if
    ``φ_ij < φ̂_ij`` it adds the multiple of g_j that lifts the cosine to exactly ``φ̂_ij``;
    *then* it updates ``φ̂_ij ← (1 − β) φ̂_ij + β φ_ij``. With β = 0 the targets stay 0 and
    GradVac is PCGrad under the same order.

    Args:
        optimizer: the torch optimizer that applies the combined gradient.
        tasks: task names; ``next_tasks()`` always returns all of them.
        beta: EMA rate β in [0, 1]. Default 0.01: the value public re-implementations that follow
            the paper use (check the paper's appendix; LibMTL's default is 0.5).
        groups: ``"all"`` (one group, default), ``"parameter"`` (each shared tensor its own
            group, a finer granularity in the spirit of the paper's per-layer variants), or a
            list of lists of shared parameters. Each group has its own Gramian and targets.
        reduction: ``"sum"`` (default) or ``"mean"`` of the corrected gradients.
        shared, retain_graph, batched, process_group, seed, allow_unused, nonfinite: see
            :class:`~metaopt.surgery.GradientSurgery`. With ``groups`` other than ``"all"``,
            ``shared`` must be given.

    Example:
        >>> import torch, metaopt
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(4, 1)
        >>> x = {t: torch.randn(16, 4) for t in "abc"}
        >>> opt = metaopt.GradVac(torch.optim.SGD(model.parameters(), lr=0.1), tasks=list(x),
        ...                       beta=0.1, seed=0)
        >>> for _ in range(3):
        ...     report = opt.step({t: model(x[t]).pow(2).mean() for t in opt.next_tasks()})
        >>> opt.targets.shape
        torch.Size([1, 3, 3])

    References:
        Wang, Tsvetkov, Firat & Cao. Gradient Vaccine: Investigating and Improving Multi-task
        Optimization in Massively Multilingual Models. ICLR 2021. arXiv:2010.05874.
    """

    beta = Option(beta_option)
    reduction = Option(reduction_option)

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        tasks: Iterable[str] | None = None,
        beta: float = 0.01,
        groups: Literal["all", "parameter"] | Sequence[Sequence[Tensor]] = "all",
        reduction: Literal["sum", "mean"] = "sum",
        shared: Iterable[Tensor] | None = None,
        retain_graph: bool = False,
        batched: bool = False,
        process_group: Any = None,
        seed: int = 0,
        allow_unused: bool = False,
        nonfinite: str = "auto",
    ) -> None:
        shared_list = None if shared is None else list(shared)
        super().__init__(
            optimizer,
            tasks=tasks,
            shared=shared_list,
            retain_graph=retain_graph,
            batched=batched,
            process_group=process_group,
            seed=seed,
            allow_unused=allow_unused,
            nonfinite=nonfinite,
        )
        self.beta = beta
        self.reduction = reduction
        # groups as parameters; their columns follow the layout (frozen parameters drop out)
        self._group_params: list[list[Tensor]] | None = None
        shared_ids = set() if shared_list is None else {id(p) for p in shared_list}
        if isinstance(groups, str):
            if groups not in ("all", "parameter"):
                raise ValueError(f"GradVac: groups must be 'all', 'parameter' or a list, got {groups!r}")
            if groups == "parameter":
                if shared_list is None:
                    raise ValueError("GradVac: groups='parameter' needs shared= to be given")
                self._group_params = [[p] for p in self._param_list if id(p) in shared_ids]
        else:
            if shared_list is None:
                raise ValueError("GradVac: explicit groups need shared= to be given")
            listed, seen = [], set()
            for gi, group in enumerate(groups):
                group = list(group)
                if not group:
                    raise ValueError(f"GradVac: groups[{gi}] is empty")
                for p in group:
                    if id(p) not in shared_ids:
                        raise ValueError(f"GradVac: groups[{gi}] holds a tensor that is not in shared")
                    if id(p) in seen:
                        raise ValueError(f"GradVac: a parameter appears in two groups (groups[{gi}])")
                    seen.add(id(p))
                listed.append(group)
            if seen != shared_ids:
                raise ValueError("GradVac: every shared parameter must be in exactly one group")
            self._group_params = listed
        n_groups = 1 if self._group_params is None else len(self._group_params)
        T = len(self.tasks)
        self.weighting_state = torch.zeros((n_groups, T, T), dtype=torch.float64)

    def _rank_config(self) -> tuple[Any, ...]:
        groups = None if self._group_params is None else [len(g) for g in self._group_params]
        return (*super()._rank_config(), groups)

    def _groups(self, shared_runs: list[slice]) -> list[list[slice]]:
        if self._group_params is None:
            return [shared_runs]
        slice_of = {id(p): sl for p, sl in zip(self._params, self._slices)}
        # a group whose parameters are all frozen has no columns (a zero Gramian)
        return [
            [slice_of[id(p)] for p in g if id(p) in slice_of] or [slice(0, 0)] for g in self._group_params
        ]

    @property
    def targets(self) -> Tensor:
        """The EMA cosine targets φ̂, (groups, T, T) float64: the weighting's state record."""
        assert self.weighting_state is not None
        return self.weighting_state

    def _weights(
        self, G: Tensor, generator: torch.Generator, state: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        assert state is not None
        order = random_order(G.shape[-1], generator, device=G.device)
        # the targets live where the Gramian does: no device-to-host copy per step
        targets = state.to(G.device, torch.float64)
        # G and the targets are checked by the step (one host sync for the whole step)
        w, new_targets = gradvac_weights(G, order, targets, self.beta, self.reduction, validate=False)
        return w, new_targets.to(torch.float64)

    def _extra_state(self) -> dict[str, Any]:
        return {"targets": self.targets.clone(), "target_tasks": list(self.tasks)}

    def _check_extra_state(self, state: Mapping[str, Any]) -> None:
        saved = list(state.get("target_tasks", []))
        if saved != list(self.tasks):
            unseen = sorted(set(self.tasks) - set(saved))
            raise ValueError(
                f"GradVac.load_state_dict: EMA targets were saved for tasks {saved}; "
                f"tasks unseen by that state: {unseen}"
            )
        targets = state.get("targets")
        if (
            not isinstance(targets, Tensor)
            or targets.shape != self.targets.shape
            or not targets.is_floating_point()
        ):
            raise ValueError(
                f"GradVac.load_state_dict: saved targets have shape "
                f"{tuple(getattr(targets, 'shape', ()))}, expected {tuple(self.targets.shape)} "
                "(same groups and tasks)"
            )
        if not bool((targets.abs() <= 1).all()):  # NaN compares False
            raise ValueError("GradVac.load_state_dict: saved targets must be cosines in [-1, 1]")

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.weighting_state = state["targets"].clone().to(torch.float64)
