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

from ._options import Option, flag
from .jacobian import reaches_any
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


def _copied(value: Any) -> Any:
    """``value`` with every tensor in it cloned (containers rebuilt, other leaves shared)."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, Mapping):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v) for v in value)
    return value


def load_optimizer_state(optimizer: Optimizer, state: Mapping[str, Any]) -> None:
    """``optimizer.load_state_dict`` on a copy of ``state``. torch.optim keeps the tensors it is
    given (``.to()`` returns the same tensor when dtype and device already match), so a state
    dict taken in memory from another optimizer would otherwise alias that optimizer's state:
    both would then step the same buffers. Every torch optimizer metaopt holds (the wrapped one,
    an outer optimizer, GradNorm's weight optimizer) is loaded through this."""
    optimizer.load_state_dict(_copied(state))


def _finite_norms(tensors: Sequence[Tensor]) -> Tensor:
    """0-dim bool: every tensor's 2-norm is finite (so is every element). One fused pass; the
    flag is read with the caller's single host sync."""
    norms = torch._foreach_norm(list(tensors))
    device = norms[0].device
    return torch.stack([n.isfinite().to(device) for n in norms]).all() if len({n.dtype for n in norms}) > 1 \
        or len({n.device for n in norms}) > 1 else torch.stack(list(norms)).isfinite().all()


class MultiTaskOptimizer(Optimizer):
    """Base class: wraps a :class:`torch.optim.Optimizer` (or another metaopt optimizer).

    It is a :class:`torch.optim.Optimizer` itself so that ``torch.optim.lr_scheduler`` accepts it;
    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's. Subclasses implement
    :meth:`next_tasks` and :meth:`_step`. As in ``torch.optim``, ``step`` runs the global and
    per-optimizer step hooks inside a profiler range, and ``state_dict`` / ``load_state_dict``
    run their registered hooks.

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

    Parameter groups added later go through :meth:`add_param_group`; a group added to the
    wrapped torch optimizer directly is picked up at the next step the same way.
    """

    allow_unused = Option(flag)

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
        self.allow_unused = allow_unused
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
        self._patch_step_function()   # torch.optim's step wrapper: hooks and profiler label
        self._param_list: list[Tensor] = self._collect_params()   # validate now: clear error

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
        """Add a param group to the wrapped optimizer; its parameters then take part in every
        mechanism (slow weights, surgery layout) from the next step on, as if they had been
        there from the start with their current values.

        Example:
            >>> import torch, metaopt
            >>> body, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
            >>> opt = metaopt.SequentialReptile(torch.optim.SGD(body.parameters(), lr=0.1),
            ...                                 tasks=["a"], inner_steps=2)
            >>> opt.add_param_group({"params": head.parameters(), "lr": 0.01})
            >>> len(opt.slow_weights)
            4
        """
        if not isinstance(param_group, Mapping):
            raise TypeError(f"{type(self).__name__}.add_param_group: expected a dict, got "
                            f"{type(param_group).__name__}")
        group = dict(param_group)
        params = group.get("params")
        group["params"] = [params] if isinstance(params, Tensor) else list(params or [])
        for i, p in enumerate(group["params"]):
            if isinstance(p, Tensor) and not p.requires_grad:
                raise ValueError(
                    f"{type(self).__name__}.add_param_group: params[{i}] (shape {tuple(p.shape)}) "
                    "does not require grad"
                )
        self.optimizer.add_param_group(group)
        self._sync_params()

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; keep everything,
        # with the generator as its state (a torch.Generator does not pickle). A step patched onto
        # the instance (an LR scheduler's call counter, which holds a reference to *this*
        # optimizer) is dropped, as torch.optim drops it: a copy steps itself, not the original.
        state = self.__dict__.copy()
        state.pop("step", None)
        state.pop("_opt_called", None)
        state["generator"] = self.generator.get_state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        generator = torch.Generator()
        generator.set_state(state.pop("generator"))
        self.__dict__.update(state)
        self.generator = generator
        self._patch_step_function()

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

        Returns a :class:`~metaopt.StepReport`. Raises (and changes nothing) on bad input: every
        check, the losses' and the gradients' finiteness included, is made before anything moves.
        Step hooks (``torch.optim.optimizer.register_optimizer_step_pre_hook`` and the
        optimizer's own ``register_step_pre_hook`` / ``register_step_post_hook``) run around it
        with ``args = (optimizer, losses)``, as in ``torch.optim``.
        """
        if closure is not None:
            raise TypeError(f"{type(self).__name__}.step takes losses, not a closure")
        wanted = self.next_tasks()
        checked = self._check_losses(losses, wanted)
        self._prepare()
        report = self._step(checked)
        self._pending = None
        return report

    def _draw_tasks(self) -> Sequence[str]:
        raise NotImplementedError

    def _step(self, losses: dict[str, Tensor]) -> StepReport:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Checks and re-syncs made at the start of every step, before anything moves.
        Subclasses extend it (calling ``super()._prepare()``)."""
        if self.inner is not None:
            self.inner._prepare()
        self._sync_params()

    # ------------------------------------------------------------------ parameters
    def _collect_params(self) -> list[Tensor]:
        """The wrapped optimizer's parameters, each once, checked."""
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

    def _sync_params(self) -> None:
        """Pick up parameters added to the wrapped optimizer since the last look."""
        known = self._param_list
        now = [p for g in self.base_optimizer.param_groups for p in g["params"]]
        if len(now) == len(known) and all(a is b for a, b in zip(now, known)):
            return
        current = self._collect_params()
        if len(current) < len(known) or any(a is not b for a, b in zip(known, current)):
            raise ValueError(
                f"{type(self).__name__}: parameters were removed from (or reordered in) the "
                "wrapped optimizer after wrapping; only adding param groups is supported "
                "(opt.add_param_group)"
            )
        if len(current) == len(known):
            return   # the same parameters, listed twice
        self._param_list = current
        self._params_added(current[len(known):])

    def _params_added(self, new: list[Tensor]) -> None:
        """Hook: ``new`` parameters joined the wrapped optimizer (after those already known)."""

    def _param_name(self, p: Tensor) -> str:
        for gi, group in enumerate(self.base_optimizer.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    return f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
        return f"a parameter of shape {tuple(p.shape)}"

    # ------------------------------------------------------------------ validation
    def _check_losses(self, losses: Mapping[str, Tensor], wanted: Sequence[str]) -> dict[str, Tensor]:
        """Structure of the losses (keys, type, shape, dtype, graph). Their values are checked
        with the gradients, in one host sync (:meth:`_require_finite`)."""
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
        return out

    def _require_finite(self, losses: Mapping[str, Tensor], grads_ok: Tensor | None = None, *,
                        grads: Sequence[Tensor] | None = None) -> None:
        """Every loss finite and, where given, every gradient: one host sync for all of it.

        ``grads_ok`` is a bool tensor: one entry per task (in ``losses`` order) when each task's
        gradient was checked on its own, or a 0-dim flag. ``grads`` (the gradient of the losses'
        sum) is checked through its norms, exactly re-checked only if a norm overflows.
        """
        name = type(self).__name__
        if grads is not None:
            grads_ok = _finite_norms(grads)
        loss_ok = torch.stack([v.detach().isfinite() for v in losses.values()])
        ok = loss_ok.all() if grads_ok is None else loss_ok.all() & grads_ok.to(loss_ok.device).all()
        if bool(ok):
            return
        if bool(loss_ok.all()) and grads is not None and all(bool(g.isfinite().all()) for g in grads):
            return   # finite, only too large for the norm's sum of squares
        if not bool(loss_ok.all()):
            values = {t: float(v.detach()) for t, v, good in zip(losses, losses.values(), loss_ok.tolist())
                      if not good}
            raise ValueError(f"{name}.step: non-finite loss for task(s) {values}; nothing was updated")
        assert grads_ok is not None
        if grads_ok.dim() == 0:
            bad = list(losses)
        else:
            bad = [t for t, good in zip(losses, grads_ok.tolist()) if not good]
        raise ValueError(
            f"{name}.step: non-finite gradient (NaN or inf) from the finite loss(es) of {bad}; "
            "nothing was updated"
        )

    def _gradients(self, losses: Mapping[str, Tensor], params: Sequence[Tensor]) -> list[Tensor | None]:
        """Gradients of the summed ``losses`` w.r.t. ``params``, checked (no side effect): every
        task's loss reaches some parameter, no parameter is unused unless allowed, and losses
        and gradients are finite."""
        name = type(self).__name__
        tasks = list(losses)
        values = list(losses.values())
        if len(values) > 1:   # the sum's gradient cannot tell which task reaches nothing
            stray = [t for t, v in zip(tasks, values) if not reaches_any(v, params)]
            if stray:
                raise ValueError(
                    f"{name}.step: the loss of task(s) {stray} reaches none of the optimizer's "
                    "parameters (a module left out of the optimizer?)"
                )
        total = values[0]
        for v in values[1:]:
            total = total + v
        grads: list[Tensor | None] = list(torch.autograd.grad(total, list(params), allow_unused=True))
        unused = [p for p, g in zip(params, grads) if g is None]
        if len(unused) == len(params):
            raise ValueError(
                f"{name}.step: the losses of {tasks} reach none of the optimizer's parameters"
            )
        if unused and not self.allow_unused:
            raise ValueError(
                f"{name}.step: {len(unused)} parameter(s) get no gradient from the "
                f"losses of {tasks}, e.g. {self._param_name(unused[0])}. Remove them from the "
                "optimizer, or pass allow_unused=True if they are legitimately unused by some "
                "steps (task-specific heads)"
            )
        self._require_finite(losses, grads=[g for g in grads if g is not None])
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
        params = self._param_list
        grads = self._gradients(losses, params)
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

    def _check_extra_state(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` if :meth:`_load_extra_state` would fail (nothing moves)."""

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    def _after_load(self) -> None:
        """Hook: the whole state dict was loaded."""

    @classmethod
    def _option_names(cls) -> dict[str, Option[Any]]:
        """The validated hyper-parameters of this class, by name."""
        out: dict[str, Option[Any]] = {}
        for klass in reversed(cls.__mro__):
            out.update((k, v) for k, v in vars(klass).items() if isinstance(v, Option))
        return out

    def _own_state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "metaopt": {
                "class": type(self).__name__,
                "tasks": list(self.tasks),
                "step": self._step_count,
                "generator": self.generator.get_state(),
                "pending": None if self._pending is None else list(self._pending),
                "options": {name: getattr(self, name) for name in self._option_names()},
                **self._extra_state(),
            },
        }

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Everything needed to continue identically: the wrapped optimizer's state dict, step
        counters, the generator state, the pending task draw, each method's own state and its
        hyper-parameters (``outer_lr``, ``beta``, ...: restored on load, as torch.optim restores
        the hyper-parameters of its param groups).
        Loads under ``torch.load(..., weights_only=True)``. Registered state-dict hooks run as
        in ``torch.optim``."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self._own_state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    def _check_state(self, state_dict: Mapping[str, Any]) -> tuple[Mapping[str, Any], Any]:
        name = type(self).__name__
        try:
            own = state_dict["metaopt"]
            inner = state_dict["optimizer"]
        except (KeyError, TypeError):
            raise ValueError(f"{name}.load_state_dict: not a metaopt state dict") from None
        if not isinstance(own, Mapping):
            raise ValueError(f"{name}.load_state_dict: not a metaopt state dict")
        if own.get("class") != name:
            raise ValueError(f"{name}.load_state_dict: state was saved by {own.get('class')}")
        if list(own.get("tasks", [])) != list(self.tasks):
            raise ValueError(
                f"{name}.load_state_dict: saved tasks {own.get('tasks')} differ from {list(self.tasks)}"
            )
        step = own.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{name}.load_state_dict: saved step count {step!r} is not an int >= 0")
        try:
            torch.Generator().set_state(own["generator"])
        except (KeyError, TypeError, RuntimeError, ValueError):
            raise ValueError(f"{name}.load_state_dict: the saved generator state is unreadable") from None
        pending = own.get("pending")
        if pending is not None and (not isinstance(pending, (list, tuple))
                                    or any(t not in self.tasks for t in pending)):
            raise ValueError(f"{name}.load_state_dict: saved pending draw {pending!r} names unknown tasks")
        options = own.get("options", {})
        if not isinstance(options, Mapping):
            raise ValueError(f"{name}.load_state_dict: saved options {options!r} are not a mapping")
        known = self._option_names()
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"{name}.load_state_dict: saved options {unknown} are not options of {name}")
        for key, value in options.items():
            try:
                known[key].check(value, key, name)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{name}.load_state_dict: saved option: {err}") from None
        self._check_extra_state(own)
        if self.inner is not None:
            self.inner._check_state(inner)
        return own, inner

    def _load_checked(self, own: Mapping[str, Any], inner: Any) -> None:
        for key, value in own.get("options", {}).items():
            setattr(self, key, value)   # like torch.optim's saved param-group hyper-parameters
        self._load_extra_state(own)
        if self.inner is not None:
            self.inner._load_checked(*self.inner._check_state(inner))
        else:
            load_optimizer_state(self.optimizer, inner)
        self._step_count = int(own["step"])
        self.generator.set_state(own["generator"])
        pending = own.get("pending")
        self._pending = None if pending is None else tuple(pending)
        self._after_load()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Load a :meth:`state_dict`. Everything is validated first; a load that still fails
        part-way (in the wrapped torch optimizer) is rolled back, so a failed load changes
        nothing. Registered load-state-dict hooks run as in ``torch.optim``."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        own, inner = self._check_state(state_dict)
        backup = self._own_state_dict()
        try:
            self._load_checked(own, inner)
        except BaseException:
            self._load_checked(*self._check_state(backup))
            raise
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
