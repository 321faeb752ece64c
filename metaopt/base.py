"""The one interface every metaopt optimizer shares.

Two ways to drive it (docs/design.md). The torch way, which every training stack expects
(DDP, ``GradScaler``, clipping, accumulation, the Hugging Face Trainer)::

    (task,) = opt.next_tasks()          # Reptile family: which task the next batch comes from
    loss_fn(model, task, batch).backward()
    opt.step(); opt.zero_grad()         # inner step from .grad; the outer step every K steps

    losses = {t: loss_fn(model, t, batches[t]) for t in opt.next_tasks()}
    opt.backward(losses)                # PCGrad, GradVac, GradNorm, MTL: replaces loss.backward()
    opt.step(); opt.zero_grad()

and the one loop, ``report = opt.step(losses)``, which is ``backward(losses)`` then ``step()``:

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

One step template runs underneath both: validate, gradients (summed or per task), combine,
write ``.grad``, inner step, after-step (the outer update), count and report. ``backward``
validates the losses' structure before anything moves and leaves non-finite gradients in
``.grad`` (so that ``GradScaler`` sees them and skips the step); ``step`` checks everything
(the gradients' finiteness included) before anything moves, and a refused step raises and
changes nothing: no parameter, optimizer state, counter or schedule draw. Method state (GradVac
targets, GradNorm weights, the task draw) commits only when ``step`` runs.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._distributed import default_group
from ._options import Option, flag
from .parts.grads import check_grads, check_losses, graph_problem, summed_backward, unscale
from .parts.guard import SkipCounter, defers, guarded_step, nonfinite_mode
from .parts.params import ParamSet, deepspeed_zero
from .parts.ranks import compare_ranks
from .parts.state_dict import initialize_optimizer_state, initializes_state
from .parts.stream import StreamRecord, TaskStream
from .report import StepReport
from .state_protocol import StateDictProtocol

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


class MultiTaskOptimizer(StateDictProtocol, Optimizer):
    """Base class: wraps a :class:`torch.optim.Optimizer` (or another metaopt optimizer).

    It is a :class:`torch.optim.Optimizer` itself so that ``torch.optim.lr_scheduler`` accepts it;
    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's. Subclasses implement
    ``_draw_tasks`` and their parts of the step template (``_backward``, ``_check_step``,
    ``_after_step``). As in ``torch.optim``, ``step`` runs the global and
    per-optimizer step hooks inside a profiler range, and ``state_dict`` / ``load_state_dict``
    run their registered hooks.

    Args:
        optimizer: the inner optimizer.
        tasks: task names. When wrapping another metaopt optimizer, may be omitted (its tasks are
            used) or must equal its tasks.
        seed: seed of the optimizer's own :class:`torch.Generator` (task draws, visiting orders);
            the global RNG is never touched.
        allow_unused: by default a step whose losses (given to :meth:`backward` or
            ``step(losses)``) give some trainable parameter of the wrapped optimizer no gradient
            raises, because a disconnected parameter is usually a bug. Set ``True``
            where parameters are legitimately unused by some steps (task-specific heads): those
            keep ``grad = None`` and the inner optimizer skips them, as in plain PyTorch.
        nonfinite: what a step whose gradients or losses are not finite does. ``"raise"``:
            it is refused at once with a ``ValueError``, nothing moved (one host read of a
            device flag per step). ``"skip"``: it is skipped on the device with no host read
            (:mod:`metaopt.parts.guard`: nothing of the parameters, the wrapped optimizer's
            state on their device or this method's state moves; the task stream and the
            trajectory advance, as on a step a ``GradScaler`` skips), counted in
            :attr:`skipped_steps`, and reported by a ``RuntimeWarning`` at the next
            :meth:`state_dict` (a checkpoint, which waits for the device anyway).
            ``"auto"`` (default): ``"skip"`` when a trainable parameter is on an accelerator,
            ``"raise"`` on CPU. Steps whose structure is wrong (no gradient, an unused
            parameter) raise at once in every mode.

    Parameter groups added later go through :meth:`add_param_group`; a group added to the
    wrapped torch optimizer directly is picked up at the next step the same way. Frozen
    parameters (``requires_grad=False``) are skipped at each step, as torch.optim skips them;
    freezing or unfreezing one between steps is followed.
    """

    allow_unused = Option(flag)
    nonfinite = Option(nonfinite_mode)

    # GradScaler.step(opt) then always calls step(), with ``found_inf`` and ``grad_scale`` set
    # on the optimizer (torch.amp's contract for optimizers that handle scaling themselves): a
    # skipped step is seen here, so that it uses up its task draw like the batch it was fed
    _step_supports_amp_scaling = True

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        tasks: Iterable[str] | None = None,
        seed: int = 0,
        allow_unused: bool = False,
        nonfinite: str = "auto",
    ) -> None:
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
        self.nonfinite = nonfinite
        self.seed = seed
        self._skips = SkipCounter()  # steps skipped on the device (nonfinite="skip")
        self._step_ok: Tensor | None = None  # the last step's device flag (None: read on the host)
        self.stream = TaskStream(self.tasks, seed)  # draws, their generator, the step counters
        self._backward_losses: dict[str, Tensor] | None = None  # a backward() pending
        # torch optimizers whose state an initialization created, not a step (INITIALIZED)
        self._initialized: set[str] = set()
        self.last_report: StepReport | None = None
        """The report of the last step taken or skipped (``None`` before the first): what
        ``step()`` returned, for code that does not see that value (a Trainer's logs)."""
        self._ranks_checked = False
        # attributes torch.optim.Optimizer's machinery (hooks, schedulers, repr) expects
        self.defaults = base.defaults
        self._optimizer_step_pre_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Any] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Any] = OrderedDict()
        self._patch_step_function()  # torch.optim's step wrapper: hooks and profiler label
        self.param_set = ParamSet(base, name)  # the wrapped optimizer's parameters, followed

    # ------------------------------------------------------------------ torch.optim plumbing
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The wrapped optimizer's param groups (LR schedulers act on these)."""
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: Any) -> None:
        # DeepSpeed's ZeRO stages 1 and 2 assign them at each step
        raise TypeError(
            f"{type(self).__name__}: its param groups are the wrapped optimizer's and cannot be "
            f"replaced (add groups with add_param_group){deepspeed_zero()}"
        )

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
            raise TypeError(
                f"{type(self).__name__}.add_param_group: expected a dict, got {type(param_group).__name__}"
            )
        if self._backward_losses is not None:
            raise ValueError(
                f"{type(self).__name__}.add_param_group: a backward(...) is pending; call step() "
                "or zero_grad() before adding parameters"
            )
        group = dict(param_group)
        params = group.get("params")
        group["params"] = [params] if isinstance(params, Tensor) else list(params or [])
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
        if "process_group" in state and not isinstance(state["process_group"], str):
            state["process_group"] = None  # does not pickle: a copy uses the default group
        state["_ranks_checked"] = False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_option_nonfinite", "auto")  # pickled by an earlier version
        self.__dict__.setdefault("_skips", SkipCounter())
        self._patch_step_function()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``.grad`` (as ``torch.optim``) and drop a pending :meth:`backward`
        accumulation: the next ``backward`` starts a new step."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._clear_backward()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tasks={list(self.tasks)}, optimizer={self.optimizer!r})"

    # ------------------------------------------------------------------ the interface
    @property
    def step_count(self) -> int:
        """Inner steps taken so far."""
        return self.stream.step

    @property
    def skipped_steps(self) -> int:
        """Steps skipped on the device so far (``nonfinite="skip"``; their gradients or losses
        were not finite), by this optimizer and those it wraps, since it was built. Reads a
        device counter: one host sync, on request."""
        self._skips.take()
        return self._skips.total + (self.inner.skipped_steps if self.inner is not None else 0)

    def _report_skips(self) -> None:
        """Warn of the steps skipped on the device since the last warning (one host read;
        reading :attr:`skipped_steps` in between does not use them up)."""
        new = 0
        opt: MultiTaskOptimizer | None = self
        while opt is not None:
            opt._skips.take()
            new += opt._skips.total - opt._skips.reported
            opt._skips.reported = opt._skips.total
            opt = opt.inner
        if new:
            warnings.warn(
                f"{type(self).__name__}: {new} step(s) were skipped on the device since the last "
                "report because their gradients or losses were not finite (nonfinite='skip'; "
                f"{self.skipped_steps} in all); nothing moved on them but the task stream",
                RuntimeWarning,
                stacklevel=3,
            )

    @property
    def clock(self) -> int:
        """Steps the task stream has served: those taken plus those a ``GradScaler`` skipped
        (each skipped step used up its draw, as it used up its batch). The data side indexes
        its batches by this count (:mod:`metaopt.data`)."""
        return self.stream.clock

    @property
    def generator(self) -> torch.Generator:
        """The optimizer's own generator (task draws, visiting orders), seeded by ``seed``."""
        return self.stream.generator

    def next_tasks(self) -> list[str]:
        """The tasks whose losses the next step expects, in order (for the Reptile family, the
        task the next batch must come from).

        Calling it again before :meth:`step` returns the same tasks (a draw is made once and kept
        until a step consumes it; a refused step keeps it, a step skipped by a ``GradScaler``
        uses it up, as it used up its batch).
        """
        return self.stream.next(self._draw_tasks)

    def planned_tasks(self, steps: int) -> list[list[str]]:
        """The tasks of the next ``steps`` steps, as :meth:`next_tasks` will return them
        (nothing moves). PCGrad, GradVac, GradNorm and MTL want every task at every step; the
        Reptile family draws them (:meth:`metaopt.SlowFastOptimizer.planned_tasks`)."""
        if self.inner is not None:
            return self.inner.planned_tasks(steps)
        return [list(self._draw_tasks()) for _ in range(steps)]

    def backward(self, losses: Mapping[str, Tensor], *, grad_scaler: Any = None) -> None:
        """Compute this method's gradients of ``losses`` (``{task: scalar loss}`` for exactly
        :meth:`next_tasks`) and write the combined update into ``.grad``; replaces
        ``loss.backward()``.

        The first call after a :meth:`step` or :meth:`zero_grad` replaces ``.grad``; later calls
        (micro-batches of one step) accumulate: PCGrad and GradVac then combine the *accumulated*
        per-task gradients, so that M micro-batches give the step that their concatenation
        gives (with sum-reduced losses). Nothing but ``.grad`` moves: method state, counters
        and the task draw commit only when :meth:`step` runs, so a step skipped by
        ``GradScaler`` changes nothing.

        Non-finite gradients are left in ``.grad`` (``GradScaler`` then skips the step; a plain
        :meth:`step` refuses it). Structural errors (wrong tasks, a detached loss, a loss that
        reaches no parameter) raise before anything moves.

        Args:
            losses: ``{task: loss}``.
            grad_scaler: a ``torch.amp.GradScaler`` to scale the losses with (instead of
                scaling them yourself); GradNorm needs it, so that its weight update sees
                unscaled gradient norms. Then ``scaler.unscale_(opt)`` / ``scaler.step(opt)``
                as usual.

        Example:
            >>> import torch, metaopt
            >>> model = torch.nn.Linear(2, 2)
            >>> opt = metaopt.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), tasks=["a", "b"])
            >>> x = {"a": torch.ones(4, 2), "b": -torch.ones(4, 2)}
            >>> opt.backward({t: model(x[t]).sum() for t in opt.next_tasks()})
            >>> torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0) and None
            >>> report = opt.step(); opt.zero_grad()
            >>> report.tasks
            ('a', 'b')
        """
        with self._transaction():
            self._backward_checked(losses, grad_scaler)

    def _backward_checked(self, losses: Mapping[str, Tensor], grad_scaler: Any) -> None:
        name = type(self).__name__
        checked = self._check_losses(losses, self.next_tasks(), f"{name}.backward")
        if grad_scaler is not None and not (
            callable(getattr(grad_scaler, "scale", None))
            and callable(getattr(grad_scaler, "get_scale", None))
        ):
            raise TypeError(
                f"{name}.backward: grad_scaler must be a torch.amp.GradScaler, got "
                f"{type(grad_scaler).__name__}"
            )
        self._drop_if_cleared()
        self._prepare()
        first = self._backward_losses is None
        saved = [p.grad for p in self._param_list] if first else []
        try:
            self._backward(checked, grad_scaler)
        except BaseException as err:
            if first:  # a refused first backward leaves no trace: .grad back, nothing pending
                for p, g in zip(self._param_list, saved):
                    p.grad = g
                self._clear_backward()
                if self.inner is not None:
                    self.inner._clear_backward()
            problem = graph_problem(str(err)) if isinstance(err, RuntimeError) else None
            if problem is None:
                raise
            where = "nothing was updated" if first else "call zero_grad() and redo the step's backward passes"
            raise ValueError(f"{name}.backward: {problem}; {where}") from err
        detached = {t: v.detach() for t, v in checked.items()}
        if self._backward_losses is None:
            self._backward_losses = detached
        else:
            self._backward_losses = {t: self._backward_losses[t] + v for t, v in detached.items()}

    def step(  # type: ignore[override]
        self,
        losses: Mapping[str, Tensor] | None = None,
        closure: None = None,
    ) -> StepReport:
        """Take one step: from ``.grad`` (``step()``, after ``loss.backward()`` or
        :meth:`backward`), or on ``losses`` (``step(losses)``: :meth:`backward` then ``step()``,
        ``.grad`` replaced).

        Returns a :class:`~metaopt.StepReport`. Raises, and changes nothing (``.grad``
        included, for ``step(losses)``), on bad input: every check, the losses' and the
        gradients' finiteness included, is made before anything moves. Step hooks
        (``torch.optim.optimizer.register_optimizer_step_pre_hook`` and the optimizer's own
        ``register_step_pre_hook`` / ``register_step_post_hook``) run around it with
        ``args = (optimizer,)`` or ``(optimizer, losses)``, as in ``torch.optim``.
        """
        name = type(self).__name__
        if closure is not None:
            raise TypeError(f"{name}.step takes losses or nothing, not a closure")
        if losses is None and self._backward_losses is None and self._initializes_state():
            # DCP's get_state_dict / set_state_dict on a fresh optimizer: the wrapped one's state
            # is created (at lr 0, from zero gradients) as DCP does for any torch optimizer, and
            # nothing of metaopt's moves: no hidden step, no draw
            self.base_optimizer.step()
            self._after_initialization()
            self._initialized.add("optimizer")
            self._initialize_parts()
            return StepReport(tasks=(), losses={}, step=self.stream.step)
        if losses is None:
            # set by GradScaler.step(opt), which deletes them again once step() returns
            found_inf, grad_scale = self.__dict__.get("found_inf"), self.__dict__.get("grad_scale")
            try:
                if found_inf is not None and not self._defers() and bool(found_inf):
                    with self._transaction():  # GradScaler's own skip test, read on the host
                        return self._skip()
                with self._transaction():  # deferred: found_inf joins the step's device flag
                    return self._take_step(grad_scale=grad_scale, found_inf=found_inf)
            except BaseException:  # GradScaler does not get to delete them: never reuse them
                self.__dict__.pop("found_inf", None)
                self.__dict__.pop("grad_scale", None)
                raise
        self._drop_if_cleared()
        if self._backward_losses is not None:
            raise RuntimeError(
                f"{name}.step(losses): a backward(...) is pending; call step() with no "
                "arguments to apply it, or zero_grad() to drop it"
            )
        params = self._param_list
        saved = [p.grad for p in params]  # for a refusal; released once the checks have passed
        try:
            with self._transaction(whole_step=True):
                self.backward(losses)
                return self._take_step(checked=saved.clear)
        except BaseException:
            if saved:
                self.zero_grad(set_to_none=True)
                for p, g in zip(params, saved):
                    p.grad = g
            raise

    # ------------------------------------------------------------------ the step template
    def _initializes_state(self) -> bool:
        """Whether this ``step()`` is DCP's initialization of a fresh optimizer's state
        (:func:`metaopt.parts.state_dict.initializes_state`), for this optimizer and every
        optimizer it wraps."""
        inner = self.inner
        if inner is not None and inner._backward_losses is not None:
            return False
        return initializes_state(self.base_optimizer, self._trainable())

    def _after_initialization(self) -> None:
        """Hook: DCP's initialization stepped the wrapped optimizer (at lr 0)."""

    def _initialize_parts(self) -> None:
        """Create the state of the torch optimizers this method owns besides the wrapped one
        (an outer optimizer, GradNorm's weight optimizer) where they have not stepped yet, as
        DCP creates a torch optimizer's, and name them in :attr:`_initialized`: every saved
        state dict, and every DCP template, then has their fields."""
        for part, optimizer in self._owned_optimizers().items():
            if initialize_optimizer_state(optimizer):
                self._initialized.add(part)

    def _owned_optimizers(self) -> dict[str, Optimizer]:
        """The torch optimizers this method owns besides the wrapped one, by the names of
        :data:`metaopt.parts.state_dict.INITIALIZED`."""
        return {}

    def _drop_initialized_state(self) -> None:
        """Forget the optimizer state an initialization created (:attr:`_initialized`) at the
        next step taken or skipped, once its checks have passed (the run goes on as if it had
        never been made: Adam's step count, SGD's first momentum; a refused step keeps it), or
        before a load replaces it."""
        if not self._initialized:  # every step but the first after an initialization
            return
        owned = self._owned_optimizers()
        for part in self._initialized:
            (self.base_optimizer if part == "optimizer" else owned[part]).state.clear()
        self._initialized.clear()

    def _draw_tasks(self) -> Sequence[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Checks and re-syncs made at the start of every backward and step, before anything
        moves. Subclasses extend it (calling ``super()._prepare()``)."""
        self._sync_params()

    def _backward(self, losses: dict[str, Tensor], grad_scaler: Any) -> None:
        """Gradients and combination: write this method's update into ``.grad``. Default:
        the summed losses' gradient, through the wrapped metaopt optimizer when composed."""
        if self.inner is not None:
            with self._wrapping():
                self.inner.backward(losses, grad_scaler=grad_scaler)
        else:
            self._summed_backward(losses, grad_scaler)

    def _check_step(self) -> Tensor | None:
        """Raise if the step cannot be taken (nothing has moved yet). Default: with a wrapped
        metaopt optimizer, that optimizer's own step checks; otherwise ``.grad`` (its
        finiteness, and unused parameters after :meth:`backward`) in one host sync. Where the
        step's finiteness is decided on the device (:meth:`_defers`), returns its flag (0-dim
        bool) instead of reading it."""
        if self.inner is None:
            return self._check_grads()
        return None

    @contextmanager
    def _wrapping(self) -> Iterator[None]:
        """While this optimizer drives the one it wraps (its backward or step), that one follows
        this one's ``nonfinite`` (the outermost optimizer's option governs a composition)."""
        assert self.inner is not None
        self.inner.__dict__["_outer_nonfinite"] = self.__dict__.get("_outer_nonfinite", self.nonfinite)
        try:
            yield
        finally:
            self.inner.__dict__.pop("_outer_nonfinite", None)

    def _defers(self, trainable: list[Tensor] | None = None) -> bool:
        """Whether this step decides its finiteness on the device (the ``nonfinite`` option;
        in a composition, the outermost optimizer's applies to every one it wraps).
        ``trainable``: :meth:`_trainable`, where the caller has it already."""
        mode = self.__dict__.get("_outer_nonfinite", self.nonfinite)
        return defers(mode, self._trainable() if trainable is None else trainable)

    def _after_step(self) -> dict[str, Any]:
        """After the inner step: commit method state, the outer update; returns report fields."""
        return {}

    def _clear_backward(self) -> None:
        """Drop what :meth:`backward` accumulated for the step (extended by subclasses)."""
        self._backward_losses = None

    def _rank_config(self) -> tuple[Any, ...]:
        """Everything that must agree between ranks for their steps to agree: the class, the
        tasks and every validated option (``inner_steps``, ``outer_lr``, ``reduction``, ...).
        Subclasses add what their constructor fixes."""
        options = tuple(sorted((k, repr(getattr(self, k))) for k in self._option_names()))
        return (type(self).__name__, self.tasks, options)

    def _check_ranks(self) -> None:
        """Under ``torch.distributed``, at the first step (and after a load): every rank has the
        same configuration (:meth:`_rank_config`) and schedule state (seed, counters,
        generator, pending draw), so that all take the same steps. One all-gather of two
        digests, on every rank; ``process_group="local"`` opts out (a method run on some ranks
        only, such as an evaluation on rank 0)."""
        if self._ranks_checked:
            return
        group = default_group(getattr(self, "process_group", None))
        if group is not None:
            compare_ranks(
                self.stream.fingerprint(), self._rank_config(), group, f"{type(self).__name__}.step"
            )
        self._ranks_checked = True

    def _take_step(
        self,
        checked: Callable[[], None] | None = None,
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> StepReport:
        """The step template after the backward pass. ``checked`` runs once nothing can refuse
        the step any more (the one loop then drops the ``.grad`` it kept for a refusal, so that
        memory is free for the inner step). ``grad_scale``: the scale ``GradScaler.step`` left
        in ``.grad`` (it did not unscale them), divided out once every check has passed.
        ``found_inf``: ``GradScaler``'s flag, not read on the host, where the step is skipped
        on the device (:meth:`_defers`)."""
        tasks = tuple(self.next_tasks())
        self._drop_if_cleared()
        self._prepare()
        self._check_ranks()
        ok = self._check_step()
        if ok is not None and found_inf is not None:
            ok = ok & found_inf.to(ok.device).eq(0).reshape(())
        # everything is checked: from here on the step moves
        self._drop_initialized_state()
        if self.inner is not None:
            if ok is not None:  # this method's own flag (GradNorm's) vetoes the wrapped step
                found_inf = (~ok).to(torch.float32)
            # the wrapped optimizer divides the scale out once its own checks have passed
            passed = {"grad_scale": grad_scale, "found_inf": found_inf}
            self.inner.__dict__.update((k, v) for k, v in passed.items() if v is not None)
            try:
                with self._wrapping():
                    inner_report: StepReport | None = self.inner.step()  # refuses before it moves
            finally:
                for key in ("grad_scale", "found_inf"):
                    self.inner.__dict__.pop(key, None)
            ok = self.inner._step_ok
            if checked is not None:
                checked()
        else:
            if checked is not None:
                checked()
            self._torch_step(ok, grad_scale)
            inner_report = None
        self._step_ok = ok
        self.stream.served(taken=True)
        fields = self._after_step()
        losses = self._backward_losses or {}
        self._clear_backward()
        report = StepReport(
            tasks=tasks, losses=losses, step=self.stream.step, inner=inner_report, finite=ok, **fields
        )
        self.last_report = report
        return report

    def _torch_step(self, ok: Tensor | None, grad_scale: Tensor | None) -> None:
        """The wrapped torch optimizer's step, once every check has passed: ``grad_scale``
        divided out first, and the step conditional on ``ok`` where it was decided on the
        device. Its own frame, so that under ``torch.compile`` the graph breaks torch.optim
        makes around every step do not fall inside the step template's."""
        if grad_scale is not None:
            unscale(self._param_list, grad_scale)
        # a parameter frozen since its backward pass is skipped, as at every other step
        hidden = [(p, p.grad) for p in self._param_list if not p.requires_grad and p.grad is not None]
        for p, _ in hidden:
            p.grad = None
        try:
            if ok is None:
                self.base_optimizer.step()
            else:
                guarded_step(self.base_optimizer, self._param_list, ok)
                self._skips.add(ok)
        except BaseException:
            if grad_scale is not None:  # refused by the torch optimizer (a hook): scale back
                unscale(self._param_list, grad_scale.double().reciprocal())
            raise
        finally:
            for p, g in hidden:
                p.grad = g

    def _skip(self) -> StepReport:
        """A step ``GradScaler`` skipped (non-finite scaled gradients): a step with no update.
        The inner optimizer, method state and ``step_count`` do not move; the task stream and
        the trajectory advance as on any step (the skipped batch used up its draw), so that
        batches planned ahead stay aligned and ranks stay in step; the pending backward is
        dropped (the ``zero_grad`` that follows may be the model's, which this optimizer
        never sees)."""
        tasks = tuple(self.next_tasks())
        self._prepare()
        self._drop_initialized_state()
        self._step_ok = None
        losses = self._backward_losses or {}
        inner_report = self.inner._skip() if self.inner is not None else None
        self.stream.served(taken=False)
        fields = self._after_skip()
        self._clear_backward()
        report = StepReport(
            tasks=tasks, losses=losses, step=self.stream.step, inner=inner_report, skipped=True, **fields
        )
        self.last_report = report
        return report

    def _after_skip(self) -> dict[str, Any]:
        """Hook: a step was skipped; what a served batch moves besides the draw (the Reptile
        family's trajectory). Returns report fields."""
        return {}

    def _drop_if_cleared(self) -> None:
        """A pending :meth:`backward` whose gradients were all cleared since (``model.zero_grad()``,
        which this optimizer does not see) is dropped: the next backward starts a new step."""
        if self._backward_losses is not None and all(p.grad is None for p in self._param_list):
            self._clear_backward()

    # ------------------------------------------------------------------ the transaction
    def _streams(self) -> list[TaskStream]:
        """The task streams of this optimizer and of those it wraps, outermost first."""
        return [self.stream, *(self.inner._streams() if self.inner is not None else [])]

    @contextmanager
    def _transaction(self, whole_step: bool = False) -> Iterator[None]:
        """One step's transaction over the task streams: their records are taken when the block
        starts and put back if it raises before the step is served, so a refused step, backward
        or skip leaves every stream of the composition as it found it. A draw that a successful
        :meth:`backward` has used stays with it (its step is still to come), unless the block
        is a whole one-loop step, whose refusal drops its backward too."""
        if self.stream.pending is not None:
            yield
            return
        records: list[StreamRecord] = [s.record() for s in self._streams()]
        clock = self.stream.clock
        try:
            yield
        except BaseException:
            if self.stream.clock == clock and (whole_step or self._backward_losses is None):
                for stream, record in zip(self._streams(), records):
                    stream.restore(record)
            raise

    # ------------------------------------------------------------------ parameters
    @property
    def _param_list(self) -> list[Tensor]:
        """The wrapped optimizer's parameters, each once, frozen ones included."""
        return self.param_set.params

    def _trainable(self) -> list[Tensor]:
        """The parameters that take part in this step (``requires_grad`` now)."""
        return self.param_set.trainable()

    def _sync_params(self) -> None:
        """Pick up parameters added to the wrapped optimizer since the last look."""
        new = self.param_set.sync()
        if new:
            self._params_added(new)

    def _params_added(self, new: list[Tensor]) -> None:
        """Hook: ``new`` parameters joined the wrapped optimizer (after those already known)."""

    def _param_name(self, p: Tensor) -> str:
        return self.param_set.name(p)

    # ------------------------------------------------------------------ validation
    def _check_losses(
        self, losses: Mapping[str, Tensor], wanted: Sequence[str], where: str
    ) -> dict[str, Tensor]:
        """Structure of the losses (:func:`metaopt.parts.grads.check_losses`)."""
        return check_losses(losses, wanted, where)

    def _scaled(self, losses: dict[str, Tensor], grad_scaler: Any) -> dict[str, Tensor]:
        if grad_scaler is None:
            return losses
        return {t: grad_scaler.scale(v) for t, v in losses.items()}

    def _summed_backward(self, losses: dict[str, Tensor], grad_scaler: Any) -> None:
        """``.grad`` of the trainable parameters += the gradient of the summed losses (replaced
        at the first backward of a step; :func:`metaopt.parts.grads.summed_backward`)."""
        first = self._backward_losses is None
        where = f"{type(self).__name__}.backward"
        summed_backward(
            losses, self._trainable(), self._param_list, first, where, lambda v: self._scaled(v, grad_scaler)
        )

    def _check_grads(self) -> Tensor | None:
        """Before the inner step: every gradient and pending loss finite, and every trainable
        parameter reached after :meth:`backward` unless ``allow_unused``
        (:func:`metaopt.parts.grads.check_grads`). One host sync."""
        trainable = self._trainable()
        return check_grads(
            trainable,
            self._backward_losses,
            self.allow_unused,
            self._param_name,
            type(self).__name__,
            default_group(getattr(self, "process_group", None)),
            defer=self._defers(trainable),
        )
