"""Slow/fast-weights machinery shared by Reptile and Sequential Reptile.

Structurally both are Lookahead-style optimizers: the wrapped optimizer moves the fast weights θ
(the model's parameters) for ``inner_steps`` steps, then the slow weights φ move toward them,
``φ ← φ + η(θ − φ)``, and θ restarts from φ. They differ only in which task feeds each inner
step; that lives in the subclasses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .base import MultiTaskOptimizer
from .functional import pack_parameters
from .interpolation import Interpolator, Method
from .report import StepReport
from .schedules import ScheduleName, TaskSchedule

__all__ = ["SlowFastOptimizer"]


def _check_fraction(value: float, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {what} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:   # also rejects NaN
        raise ValueError(f"{where}: {what} must be in [0, 1], got {value}")
    return float(value)


class SlowFastOptimizer(MultiTaskOptimizer):
    """Base of :class:`~metaopt.Reptile` and :class:`~metaopt.SequentialReptile` (see those).

    Options common to both:

    Args:
        inner_steps: K, inner steps per trajectory (>= 1).
        outer_lr: η in [0, 1]; η = 1 is plain training, η = 0 never moves φ.
        outer_lr_final, anneal_steps: anneal η linearly from ``outer_lr`` to ``outer_lr_final``
            over ``anneal_steps`` outer steps, then hold it (Nichol et al. 2018 anneal to 0).
            Default: constant η.
        outer_optimizer: a callable ``params -> torch.optim.Optimizer`` built over the slow
            weights and fed the pseudo-gradient φ − θ at every outer step (e.g.
            ``lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)``). Its lr replaces
            η, so ``outer_lr`` must then be left unset. Default: plain interpolation.
        reset_inner_state: clear the wrapped optimizer's state (Adam moments) at every outer
            step. Default ``False`` (carry it): the official Reptile code and Fish carry it, and
            only then does η = 1 equal plain training.
        schedule, task_sizes, temperature: the task schedule (:mod:`metaopt.schedules`).
        flatten: pack the parameters into one contiguous buffer per (device, dtype), as views, so
            the outer step is one fused pass (:mod:`metaopt.interpolation`). Create the optimizer
            after moving the model to its device.
        interpolation: ``"auto"``, ``"flat"``, ``"foreach"`` or ``"reference"``.
    """

    def __init__(self, optimizer: Optimizer, *, tasks: Iterable[str] | None = None,
                 inner_steps: int = 1000, outer_lr: float | None = None,
                 outer_lr_final: float | None = None, anneal_steps: int | None = None,
                 outer_optimizer: Callable[[list[Tensor]], Optimizer] | None = None,
                 reset_inner_state: bool = False, schedule: ScheduleName = "uniform",
                 task_sizes: Sequence[float] | Mapping[str, float] | None = None,
                 temperature: float = 1.0, flatten: bool = True,
                 interpolation: Method = "auto", seed: int = 0,
                 allow_unused: bool = False) -> None:
        super().__init__(optimizer, tasks=tasks, seed=seed, allow_unused=allow_unused)
        name = type(self).__name__
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int):
            raise TypeError(f"{name}: inner_steps must be an int, got {inner_steps!r}")
        if inner_steps < 1:
            raise ValueError(f"{name}: inner_steps must be >= 1, got {inner_steps}")
        if outer_optimizer is not None and outer_lr is not None:
            raise ValueError(
                f"{name}: pass either outer_lr or outer_optimizer (whose lr is the outer step size)"
            )
        self.inner_steps = inner_steps
        self.outer_lr = _check_fraction(0.1 if outer_lr is None else outer_lr, "outer_lr", name)
        if (outer_lr_final is None) != (anneal_steps is None):
            raise ValueError(f"{name}: outer_lr_final and anneal_steps go together")
        self.outer_lr_final = (
            None if outer_lr_final is None else _check_fraction(outer_lr_final, "outer_lr_final", name)
        )
        if anneal_steps is not None and (isinstance(anneal_steps, bool) or not isinstance(anneal_steps, int) or anneal_steps < 1):
            raise ValueError(f"{name}: anneal_steps must be an int >= 1, got {anneal_steps!r}")
        self.anneal_steps = anneal_steps
        self.reset_inner_state = bool(reset_inner_state)
        if isinstance(task_sizes, Mapping):
            unknown = sorted(set(task_sizes) - set(self.tasks))
            if unknown or len(task_sizes) != len(self.tasks):
                raise ValueError(
                    f"{name}: task_sizes must give a size for every task {list(self.tasks)}; "
                    f"unknown {unknown}"
                )
            task_sizes = [task_sizes[t] for t in self.tasks]
        self.schedule = TaskSchedule(len(self.tasks), schedule, sizes=task_sizes,
                                     temperature=temperature)
        params = self._trainable_params()
        if flatten:
            pack_parameters(params)
        self.engine = Interpolator(params, method=interpolation)
        self.outer_optimizer = None
        if outer_optimizer is not None:
            self.outer_optimizer = outer_optimizer(self.engine.slow_buffers)
            if not isinstance(self.outer_optimizer, Optimizer):
                raise TypeError(f"{name}: outer_optimizer must return a torch.optim.Optimizer")
        self._inner_count = 0   # inner steps into the current trajectory
        self._trajectory = 0    # trajectories into the current outer step (batched Reptile)
        self._outer_count = 0

    # ------------------------------------------------------------------ public read-outs
    @property
    def outer_step_count(self) -> int:
        return self._outer_count

    @property
    def slow_weights(self) -> list[Tensor]:
        """φ, shaped like the parameters (views into the slow buffers; float32 for half types)."""
        return self.engine.slow

    @contextmanager
    def use_slow_weights(self) -> Iterator[None]:
        """Inside the block the parameters hold the slow weights φ (as of the last outer step);
        on exit they get their fast values θ back. Evaluate a Reptile-family model here.

        Example:
            >>> import torch, metaopt
            >>> model = torch.nn.Linear(2, 1)
            >>> opt = metaopt.SequentialReptile(torch.optim.SGD(model.parameters(), lr=0.1),
            ...                                 tasks=["a"], inner_steps=5, outer_lr=0.5)
            >>> _ = opt.step({"a": model(torch.ones(1, 2)).sum()})   # θ moved, φ not yet
            >>> with opt.use_slow_weights():
            ...     at_phi = model.weight.detach().clone()
            >>> torch.equal(at_phi, opt.slow_weights[0]), torch.equal(model.weight, at_phi)
            (True, False)
        """
        fast = self.engine.fast
        with torch.no_grad():
            saved = [p.detach().clone() for p in fast]
            self.engine.sync_fast()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(fast, saved)

    def current_outer_lr(self) -> float:
        """η for the next outer step (after annealing)."""
        if self.anneal_steps is None or self.outer_lr_final is None:
            return self.outer_lr
        frac = min(self._outer_count / self.anneal_steps, 1.0)
        return (1.0 - frac) * self.outer_lr + frac * self.outer_lr_final

    # ------------------------------------------------------------------ mechanics
    def _trajectories_per_outer_step(self) -> int:
        return 1

    def _step(self, losses: dict[str, Tensor]) -> StepReport:
        inner_report = self._inner_update(losses)
        self._step_count += 1
        self._inner_count += 1
        outer = False
        if self._inner_count == self.inner_steps:
            self._inner_count = 0
            self._trajectory += 1
            outer = self._end_trajectory()
        return self._report(losses, outer_update=outer, inner=inner_report)

    @torch.no_grad()
    def _end_trajectory(self) -> bool:
        n = self._trajectories_per_outer_step()
        if n > 1:
            self.engine.accumulate(self._trajectory)   # θ folded into the mean; θ ← φ
            if self._trajectory < n:
                return False
        self._trajectory = 0
        lr = self.current_outer_lr()
        if self.outer_optimizer is not None:
            pseudo = self.engine.pseudo_gradient(accumulated=n > 1)
            for buf, g in zip(self.engine.slow_buffers, pseudo):
                buf.grad = g
            self.outer_optimizer.step()
            for buf in self.engine.slow_buffers:
                buf.grad = None
            self.engine.sync_fast()
        elif n > 1:
            self.engine.interpolate_accumulated(lr)
        else:
            self.engine.interpolate(lr)
        if self.reset_inner_state:
            self.base_optimizer.state.clear()
        self._outer_count += 1
        return True

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        return {
            "inner_count": self._inner_count,
            "trajectory": self._trajectory,
            "outer_count": self._outer_count,
            "engine": self.engine.state_dict(),
            "schedule": self.schedule.state_dict(),
            "outer_optimizer": None if self.outer_optimizer is None else self.outer_optimizer.state_dict(),
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        if (state.get("outer_optimizer") is None) != (self.outer_optimizer is None):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: outer optimizer present in one of the "
                "saved state and this optimizer but not the other"
            )
        self.engine.load_state_dict(state["engine"])
        self.schedule.load_state_dict(state["schedule"])
        if self.outer_optimizer is not None:
            self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self._inner_count = int(state["inner_count"])
        self._trajectory = int(state["trajectory"])
        self._outer_count = int(state["outer_count"])
