"""The one interface every metaopt optimizer shares.

``Class(torch_optimizer, **options)``, ``next_tasks()``, ``step(losses)``:

>>> import torch, metaopt
>>> model = torch.nn.Linear(4, 1)
>>> opt = metaopt.SequentialReptile(torch.optim.SGD(model.parameters(), lr=0.1),
...                                 tasks=["a", "b"], inner_steps=2, outer_lr=0.5, seed=0)
>>> x = {"a": torch.randn(8, 4), "b": torch.randn(8, 4)}
>>> for _ in range(4):
...     wanted = opt.next_tasks()
...     report = opt.step({t: model(x[t]).pow(2).mean() for t in wanted})
>>> report.outer_update
True

``step`` owns the backward pass: it validates the losses (keys, shape, finiteness) *before*
anything moves, computes the gradients itself and writes them into ``.grad`` (replacing what was
there), then steps the wrapped optimizer. A rejected step raises and changes nothing: no
parameter, optimizer state, counter or schedule draw.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .report import StepReport

__all__ = ["MultiTaskOptimizer"]


def _check_tasks(tasks: Iterable[str] | None, where: str) -> tuple[str, ...]:
    if tasks is None:
        raise ValueError(f"{where}: tasks must be given (a non-empty list of task names)")
    if isinstance(tasks, str):
        raise TypeError(f"{where}: tasks must be a list of names, got the string {tasks!r}")
    out = tuple(tasks)
    if not out:
        raise ValueError(f"{where}: the task list is empty")
    for t in out:
        if not isinstance(t, str):
            raise TypeError(f"{where}: task names must be strings, got {t!r}")
    dup = sorted({t for t in out if out.count(t) > 1})
    if dup:
        raise ValueError(f"{where}: duplicate task names {dup}")
    return out


class MultiTaskOptimizer(Optimizer):
    """Base class: wraps a :class:`torch.optim.Optimizer` (or another metaopt optimizer).

    It is a :class:`torch.optim.Optimizer` itself so that ``torch.optim.lr_scheduler`` accepts it;
    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's. Subclasses implement
    :meth:`next_tasks` and :meth:`_step`.

    Args:
        optimizer: the inner optimizer. Every parameter in it must require grad.
        tasks: task names. When wrapping another metaopt optimizer, may be omitted (its tasks are
            used) or must equal its tasks.
        seed: seed of the optimizer's own :class:`torch.Generator` (task draws, visiting orders);
            the global RNG is never touched.
        allow_unused: by default a step whose losses give some parameter of the wrapped optimizer
            no gradient raises, because a disconnected parameter is usually a bug. Set ``True``
            where parameters are legitimately unused by some steps (task-specific heads): those
            keep ``grad = None`` and the inner optimizer skips them, as in plain PyTorch.
    """

    def __init__(self, optimizer: Optimizer, *, tasks: Iterable[str] | None = None,
                 seed: int = 0, allow_unused: bool = False) -> None:
        name = type(self).__name__
        if isinstance(optimizer, MultiTaskOptimizer):
            self.inner: MultiTaskOptimizer | None = optimizer
            base = optimizer.base_optimizer
            if tasks is None:
                tasks = optimizer.tasks
            elif tuple(tasks) != optimizer.tasks:
                raise ValueError(
                    f"{name}: tasks {list(tasks)} differ from the wrapped "
                    f"{type(optimizer).__name__}'s tasks {list(optimizer.tasks)}"
                )
        elif isinstance(optimizer, Optimizer):
            self.inner = None
            base = optimizer
        else:
            raise TypeError(
                f"{name}: expected a torch.optim.Optimizer or a metaopt optimizer, "
                f"got {type(optimizer).__name__}"
            )
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"{name}: seed must be an int, got {seed!r}")
        self.tasks: tuple[str, ...] = _check_tasks(tasks, name)
        self.optimizer = optimizer
        self.base_optimizer: Optimizer = base
        self.allow_unused = bool(allow_unused)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._step_count = 0
        self._pending: tuple[str, ...] | None = None
        # attributes torch.optim.Optimizer's machinery (hooks, schedulers, repr) expects
        self.defaults = base.defaults
        self._optimizer_step_pre_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Any] = OrderedDict()
        self._trainable_params()  # validate now: clear error at construction

    # ------------------------------------------------------------------ torch.optim plumbing
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The wrapped optimizer's param groups (LR schedulers act on these)."""
        return self.base_optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The wrapped optimizer's per-parameter state."""
        return self.base_optimizer.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise NotImplementedError(
            f"{type(self).__name__}: add parameter groups to the torch optimizer before wrapping it"
        )

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; keep everything,
        # with the generator as its state (a torch.Generator does not pickle)
        state = self.__dict__.copy()
        state["generator"] = self.generator.get_state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        generator = torch.Generator()
        generator.set_state(state.pop("generator"))
        self.__dict__.update(state)
        self.generator = generator

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tasks={list(self.tasks)}, optimizer={self.optimizer!r})"

    # ------------------------------------------------------------------ the interface
    @property
    def step_count(self) -> int:
        """Inner steps taken so far."""
        return self._step_count

    def next_tasks(self) -> list[str]:
        """The tasks whose losses the next :meth:`step` expects, in order.

        Calling it again before :meth:`step` returns the same tasks (a draw is made once and kept
        until a step consumes it).
        """
        if self._pending is None:
            self._pending = tuple(self._draw_tasks())
        return list(self._pending)

    def step(self, losses: Mapping[str, Tensor], closure: None = None) -> StepReport:  # type: ignore[override]
        """Take one step on ``losses`` (``{task: scalar loss}`` for exactly :meth:`next_tasks`).

        Returns a :class:`~metaopt.StepReport`. Raises (and changes nothing) on bad input.
        Step hooks registered on this optimizer (``register_step_pre_hook`` /
        ``register_step_post_hook``) run before and after it, as in ``torch.optim``.
        """
        if closure is not None:
            raise TypeError(f"{type(self).__name__}.step takes losses, not a closure")
        args: tuple[Any, ...] = (losses,)
        kwargs: dict[str, Any] = {}
        for pre_hook in list(self._optimizer_step_pre_hooks.values()):
            result = pre_hook(self, args, kwargs)
            if result is not None:
                args, kwargs = result
        (losses,) = args
        wanted = self.next_tasks()
        checked = self._check_losses(losses, wanted)
        report = self._step(checked)
        self._pending = None
        for post_hook in list(self._optimizer_step_post_hooks.values()):
            post_hook(self, args, kwargs)
        return report

    def _draw_tasks(self) -> Sequence[str]:
        raise NotImplementedError

    def _step(self, losses: dict[str, Tensor]) -> StepReport:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared helpers
    def _trainable_params(self) -> list[Tensor]:
        params: list[Tensor] = []
        seen: set[int] = set()
        for gi, group in enumerate(self.base_optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                if not p.requires_grad:
                    raise ValueError(
                        f"{type(self).__name__}: param_groups[{gi}]['params'][{pi}] (shape "
                        f"{tuple(p.shape)}) does not require grad; remove frozen parameters "
                        "from the optimizer"
                    )
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        if not params:
            raise ValueError(f"{type(self).__name__}: the wrapped optimizer has no parameters")
        return params

    def _param_name(self, p: Tensor) -> str:
        for gi, group in enumerate(self.base_optimizer.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    return f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
        return f"a parameter of shape {tuple(p.shape)}"

    def _check_losses(self, losses: Mapping[str, Tensor], wanted: Sequence[str]) -> dict[str, Tensor]:
        name = type(self).__name__
        if not isinstance(losses, Mapping):
            raise TypeError(
                f"{name}.step: losses must be a mapping {{task: loss}}, got {type(losses).__name__}"
            )
        missing = [t for t in wanted if t not in losses]
        extra = [k for k in losses if k not in wanted]
        if missing or extra:
            raise ValueError(
                f"{name}.step: expected losses for exactly {list(wanted)} (next_tasks()); "
                f"missing {missing}, unexpected {extra}"
            )
        out: dict[str, Tensor] = {}
        for t in wanted:
            v = losses[t]
            if not isinstance(v, Tensor):
                raise TypeError(f"{name}.step: loss for task {t!r} is a {type(v).__name__}, not a Tensor")
            if v.numel() != 1:
                raise ValueError(
                    f"{name}.step: loss for task {t!r} must be a scalar, got shape {tuple(v.shape)}"
                )
            if not v.is_floating_point():
                raise ValueError(f"{name}.step: loss for task {t!r} has dtype {v.dtype}")
            if not v.requires_grad:
                raise ValueError(
                    f"{name}.step: loss for task {t!r} does not require grad: it is not connected "
                    "to any parameter (computed under no_grad, or detached?)"
                )
            out[t] = v.reshape(())
        finite = torch.stack([v.detach().to(torch.float32) for v in out.values()]).isfinite()
        if not bool(finite.all()):
            bad = [t for t, ok in zip(out, finite.tolist()) if not ok]
            values = {t: float(out[t].detach()) for t in bad}
            raise ValueError(f"{name}.step: non-finite loss for task(s) {values}; nothing was updated")
        return out

    def _gradients(self, total: Tensor, tasks: Sequence[str], params: Sequence[Tensor]) -> list[Tensor | None]:
        """Gradients of ``total`` w.r.t. ``params``, checked for unused parameters (no side effect)."""
        grads: list[Tensor | None] = list(torch.autograd.grad(total, list(params), allow_unused=True))
        unused = [p for p, g in zip(params, grads) if g is None]
        if len(unused) == len(params):
            raise ValueError(
                f"{type(self).__name__}.step: the losses of {list(tasks)} reach none of the "
                "optimizer's parameters"
            )
        if unused and not self.allow_unused:
            raise ValueError(
                f"{type(self).__name__}.step: {len(unused)} parameter(s) get no gradient from the "
                f"losses of {list(tasks)}, e.g. {self._param_name(unused[0])}. Remove them from the "
                "optimizer, or pass allow_unused=True if they are legitimately unused by some "
                "steps (task-specific heads)"
            )
        return grads

    def _inner_update(self, losses: dict[str, Tensor]) -> StepReport | None:
        """One step of the wrapped optimizer on the (summed) losses; its report when composed."""
        if self.inner is not None:
            wanted = self.inner.next_tasks()
            if list(losses) != wanted:
                raise ValueError(
                    f"{type(self).__name__}: the wrapped {type(self.inner).__name__} expects "
                    f"{wanted}, got {list(losses)}"
                )
            report = self.inner._step(losses)
            self.inner._pending = None
            return report
        params = self._trainable_params()
        values = list(losses.values())
        total = values[0]
        for v in values[1:]:
            total = total + v
        grads = self._gradients(total, list(losses), params)
        for p, g in zip(params, grads):
            p.grad = g
        self.base_optimizer.step()
        return None

    def _report(self, losses: Mapping[str, Tensor], **kw: Any) -> StepReport:
        return StepReport(
            tasks=tuple(losses),
            losses={t: v.detach() for t, v in losses.items()},
            step=self._step_count,
            **kw,
        )

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Everything needed to continue identically: the wrapped optimizer's state dict, step
        counters, the generator state, the pending task draw and each method's own state."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "metaopt": {
                "class": type(self).__name__,
                "tasks": list(self.tasks),
                "step": self._step_count,
                "generator": self.generator.get_state(),
                "pending": None if self._pending is None else list(self._pending),
                **self._extra_state(),
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        name = type(self).__name__
        try:
            own = state_dict["metaopt"]
            inner = state_dict["optimizer"]
        except (KeyError, TypeError):
            raise ValueError(f"{name}.load_state_dict: not a metaopt state dict") from None
        if own.get("class") != name:
            raise ValueError(f"{name}.load_state_dict: state was saved by {own.get('class')}")
        if list(own.get("tasks", [])) != list(self.tasks):
            raise ValueError(
                f"{name}.load_state_dict: saved tasks {own.get('tasks')} differ from {list(self.tasks)}"
            )
        self._load_extra_state(own)
        self.optimizer.load_state_dict(inner)
        self._step_count = int(own["step"])
        self.generator.set_state(own["generator"])
        pending = own.get("pending")
        self._pending = None if pending is None else tuple(pending)
