"""Slow/fast-weights machinery shared by Reptile and Sequential Reptile.

Structurally both are Lookahead-style optimizers: the wrapped optimizer moves the fast weights θ
(the model's parameters) for ``inner_steps`` steps, then the slow weights φ move toward them,
``φ ← φ + η(θ − φ)``, and θ restarts from φ. They differ only in which task feeds each inner
step; that lives in the subclasses.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import _distributed
from ._options import Option, flag, optional_fraction, optional_positive, optional_positive_int, positive_int
from .base import MultiTaskOptimizer
from .interpolation import Interpolator, Method
from .parts.outer import ACC, OUTER, SLOW, OuterRecord, OuterStep, migrate_v1, parse_fields
from .parts.placement import check_replica_group, local_tensor, placed_like, reshard_gathered, sharded
from .parts.ranks import compare_local_ranks
from .parts.slots import SLOT, TrajectorySlots, slot_field
from .parts.state_dict import V1_MIGRATIONS
from .parts.trajectory import TrajectoryClock
from .schedules import ScheduleName, TaskSchedule

__all__ = ["SlowFastOptimizer"]

_WORLD = "world"  # local trajectories over the default group, looked up at each use


class SlowFastOptimizer(MultiTaskOptimizer):
    """Base of :class:`~metaopt.Reptile` and :class:`~metaopt.SequentialReptile` (see those).

    Options common to both (each is validated again when assigned later, e.g.
    ``opt.outer_lr = 0.05`` between steps):

    Args:
        inner_steps: K, inner steps per trajectory (>= 1).
        outer_lr: η in [0, 1]; η = 1 is plain training, η = 0 never moves φ. Default 0.1.
        outer_lr_final, anneal_steps: anneal η linearly from ``outer_lr`` to ``outer_lr_final``
            over ``anneal_steps`` outer steps, then hold it (Nichol et al. 2018 anneal to 0).
            Default: constant η.
        outer_optimizer: a callable ``params -> torch.optim.Optimizer`` built over the slow
            weights and fed the pseudo-gradient φ − θ at every outer step (e.g.
            ``lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)``). Its lr replaces
            η, so ``outer_lr`` and the annealing options must then be left unset (schedule its lr
            with a ``torch.optim.lr_scheduler`` on the outer optimizer instead). Default: plain
            interpolation.
        reset_inner_state: clear the wrapped optimizer's state (Adam moments) at every outer
            step. Default ``False`` (carry it): the official Reptile code and Fish carry it, and
            only then does η = 1 equal plain training.
        tasks_per_outer_step: n, the trajectories averaged per outer step, each starting from
            φ: ``φ ← φ + η(mean_i θ_K^(i) − φ)`` (batched Reptile's meta-batch; for Sequential
            Reptile, n mixed-task trajectories). Default 1. Trajectory i of every outer step
            carries the wrapped torch optimizer's per-parameter state (Adam's moments) of
            trajectory i of the previous one, as n workers would (DiLoCo keeps one inner
            optimizer per worker), so that one process with n trajectories computes what
            ``local_trajectories`` on n ranks computes; the n states cost n times the memory.
        schedule, task_sizes, temperature: the task schedule (:mod:`metaopt.schedules`): a name
            (``"uniform"``, ``"proportional"``, ``"temperature"``, ``"round_robin"``,
            ``"without_replacement"``) or a list of task names to cycle through.
        buffers: a module whose floating-point buffers (BatchNorm running statistics) are slow
            weights too: interpolated at every outer step and swapped in by
            :meth:`use_slow_weights`, as Fish interpolates the whole ``state_dict``. Integer
            buffers (``num_batches_tracked``) are counters and keep their fast value. Default
            ``None``: buffers follow the fast weights, as in plain training.
        flatten: ignored, with a ``DeprecationWarning`` when ``True``: metaopt no longer packs
            the model's parameters into its own buffer (it re-pointed the user's tensors, which
            broke FSDP2, Accelerate's checkpoints and safetensors). Default ``False``.
        interpolation: ``"auto"``, ``"foreach"`` or ``"reference"`` (:mod:`metaopt.interpolation`).
        state_device: where the slow weights, the trajectory mean and an ``outer_optimizer``'s
            state live. ``None`` (default): beside each parameter (its shard under FSDP2).
            ``"cpu"``: host memory, pinned when the parameters are on CUDA, streamed through
            the parameters' device in chunks at each outer step, so that the device holds none
            of metaopt's state between outer steps (torchft's and PrimeIntellect's DiLoCo keep
            their outer state so); an ``outer_optimizer`` then steps on the host. Not with
            ``local_trajectories``.
        local_trajectories: under ``torch.distributed``, each rank runs its own trajectory of
            ``inner_steps`` steps without communicating, drawing its tasks from its own stream
            (seeded by :func:`metaopt._distributed.rank_seed` from ``seed`` and the rank, so
            every rank still mixes all tasks), and at the outer step the ranks average their
            fast weights with one all-reduce of the packed buffer: W ranks act as
            ``tasks_per_outer_step = W`` trajectories (times ``tasks_per_outer_step`` per rank).
            DiLoCo's structure (Douillard et al. 2023, arXiv 2311.08105) with plain outer SGD at
            lr η; η = 1 is local SGD with period K (torch's ``PostLocalSGDOptimizer``). The model
            must *not* be wrapped in ``DistributedDataParallel`` (or every inner step must run
            under ``ddp.no_sync()``): the first step checks it. Needs ``init_process_group``
            before the optimizer is built, and identical parameters on every rank (checked at
            the first step). Default ``False`` (under DDP: data-parallel, nothing communicated
            here). See docs/scaling.md.
        process_group: with ``local_trajectories``, the ranks whose trajectories are averaged
            (default: all). Without, ``"local"`` opts out of the first step's comparison of
            the ranks' options and schedules under ``torch.distributed`` (a run on some ranks
            only, such as an evaluation on rank 0); default ``None``.
        verify_ranks: with ``local_trajectories``, compare a digest of the slow weights' bits
            across the ranks before every outer step (one all-gather of four integers) and
            refuse the step, with nothing moved, if they differ. Default ``False`` (a
            debugging aid: the digest reads φ once on its device).
        bucket_elements: with ``local_trajectories``, all-reduce the accumulated mean in
            buckets of this many elements, all started before any is waited for. Default
            ``None``: one all-reduce per (device, dtype) buffer of metaopt's.
        timeout: with ``local_trajectories``, seconds to wait for the outer step's all-reduce
            before raising (default: the process group's timeout).

    Construction order: build the model, move or cast it, load pretrained weights into it,
    *then* build the optimizer, which takes φ from the parameters. A later change made outside
    the optimizer (``model.load_state_dict``, an in-place write) is detected at the next step
    through the parameters' version counters and raises; call :meth:`reset_slow_weights` to
    take the new values as φ, or :meth:`accept_parameter_changes` to keep φ. Writes through
    ``param.data`` bypass version counters and cannot be detected. To resume, load the model's
    state dict and the optimizer's, in either order (DCP's ``set_state_dict`` loads the
    optimizer's first): after an optimizer load, parameters written before the next step are
    taken as the resumed run's. A cast or move of the model (``model.double()``) is followed: φ
    is converted, keeping its values.
    """

    inner_steps = Option(positive_int)
    tasks_per_outer_step = Option(positive_int)
    outer_lr = Option(optional_fraction)
    outer_lr_final = Option(optional_fraction)
    anneal_steps = Option(optional_positive_int)
    reset_inner_state = Option(flag)
    timeout = Option(optional_positive)

    # whether the wrapped optimizer may be a metaopt one (whose steps want several tasks)
    _composable = True
    # the parameters' version counters at the last sync (None: since a load, none is checked)
    _versions: list[int] | None

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        tasks: Iterable[str] | None = None,
        inner_steps: int = 1000,
        outer_lr: float | None = None,
        tasks_per_outer_step: int = 1,
        outer_lr_final: float | None = None,
        anneal_steps: int | None = None,
        outer_optimizer: Callable[[list[Tensor]], Optimizer] | None = None,
        reset_inner_state: bool = False,
        schedule: ScheduleName | Sequence[str] = "uniform",
        task_sizes: Sequence[float] | Mapping[str, float] | None = None,
        temperature: float = 1.0,
        buffers: nn.Module | None = None,
        flatten: bool = False,
        interpolation: Method = "auto",
        state_device: torch.device | str | None = None,
        seed: int = 0,
        allow_unused: bool = False,
        nonfinite: str = "auto",
        local_trajectories: bool = False,
        process_group: Any = None,
        verify_ranks: bool = False,
        bucket_elements: int | None = None,
        timeout: float | None = None,
    ) -> None:
        name = type(self).__name__
        if isinstance(optimizer, MultiTaskOptimizer) and not self._composable:
            raise TypeError(
                f"{name}: wrap a torch optimizer; a metaopt optimizer wants several tasks per "
                "step, which contradicts one task per trajectory (use SequentialReptile)"
            )
        super().__init__(optimizer, tasks=tasks, seed=seed, allow_unused=allow_unused, nonfinite=nonfinite)
        self.inner_steps = inner_steps
        self.tasks_per_outer_step = tasks_per_outer_step
        if outer_optimizer is not None and outer_lr is not None:
            raise ValueError(
                f"{name}: pass either outer_lr or outer_optimizer (whose lr is the outer step size)"
            )
        self.outer_lr = 0.1 if outer_lr is None and outer_optimizer is None else outer_lr
        self.outer_lr_final = outer_lr_final
        self.anneal_steps = anneal_steps
        self.reset_inner_state = reset_inner_state
        if buffers is not None and not isinstance(buffers, nn.Module):
            raise TypeError(
                f"{name}: buffers must be the nn.Module whose buffers to interpolate, "
                f"got {type(buffers).__name__}"
            )
        self.buffers = buffers
        if isinstance(task_sizes, Mapping):
            unknown = sorted(set(task_sizes) - set(self.tasks))
            if unknown or len(task_sizes) != len(self.tasks):
                raise ValueError(
                    f"{name}: task_sizes must give a size for every task {list(self.tasks)}; "
                    f"unknown {unknown}"
                )
            task_sizes = [task_sizes[t] for t in self.tasks]
        if isinstance(schedule, str):
            plan = TaskSchedule(len(self.tasks), schedule, sizes=task_sizes, temperature=temperature)
        else:
            order = list(schedule)
            unknown = sorted({t for t in order if t not in self.tasks}, key=str)
            if unknown:
                raise ValueError(f"{name}: the schedule names unknown tasks {unknown}")
            plan = TaskSchedule(len(self.tasks), "order", order=[self.tasks.index(t) for t in order])
        self.stream.schedule = plan  # its round is part of the task stream
        if flag(flatten, "flatten", name):
            warnings.warn(
                f"{name}: flatten=True is ignored: metaopt no longer packs the model's parameters "
                "into its own buffer (it broke FSDP2, Accelerate checkpoints and safetensors); the "
                "outer step runs over the parameters as they are",
                DeprecationWarning,
                stacklevel=2,
            )
        # the parts: φ with the outer rule, and the parked trajectories' inner-optimizer states
        if state_device is not None and local_trajectories:
            raise ValueError(
                f"{name}: state_device={state_device!r} is not supported with "
                "local_trajectories=True (the outer step's all-reduce would run on host memory, "
                "which NCCL cannot reduce); keep the state beside the parameters (state_device=None)"
            )
        try:
            engine = Interpolator(self._fast_tensors(), method=interpolation, state_device=state_device)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        self.outer_step = OuterStep(engine, outer_optimizer, name)
        self.slots = TrajectorySlots(self.base_optimizer)
        self._check_outer_options()
        # fixed at construction: they decide which collectives run, which must match on all ranks
        self._verify_ranks = flag(verify_ranks, "verify_ranks", name)
        self._bucket_elements = optional_positive_int(bucket_elements, "bucket_elements", name)
        self.timeout = timeout
        self._local_group = self._local_setup(local_trajectories, process_group)
        self.trajectory_clock = TrajectoryClock()
        self._record_versions()

    def _local_setup(self, local: bool, group: Any) -> Any:
        """Validate the local-trajectory options; returns the group (``None`` when off) and
        seeds this rank's task stream."""
        name = type(self).__name__
        flag(local, "local_trajectories", name)
        self.process_group: Any = None
        if not local:
            if isinstance(group, str) and group == _distributed.LOCAL:
                self.process_group = group  # no collective at all (a run on some ranks only)
            elif group is not None:
                raise ValueError(
                    f"{name}: process_group is the group of local trajectories (pass "
                    "local_trajectories=True), or 'local' for a run on some ranks only (no "
                    "collective); under DistributedDataParallel nothing is communicated here: "
                    "DDP averages the gradients"
                )
            return None
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"{name}: local_trajectories=True needs torch.distributed: call "
                "torch.distributed.init_process_group(...) before building the optimizer"
            )
        if isinstance(group, str):
            raise ValueError(f"{name}: process_group must be a process group or None, got {group!r}")
        if sharded(self._param_list):
            check_replica_group(self._param_list, None if group is None else group, name)
        # the default group is looked up at each use, not held: a ProcessGroup kept alive past
        # destroy_process_group() is destroyed at interpreter exit, where gloo can abort
        group = _WORLD if group is None or group is dist.group.WORLD else group
        inner_group = getattr(self.inner, "process_group", _distributed.LOCAL)
        if self.inner is not None and not (
            isinstance(inner_group, str) and inner_group == _distributed.LOCAL
        ):
            raise ValueError(
                f"{name}: with local_trajectories=True the wrapped {type(self.inner).__name__} "
                "would average its per-task gradients over the ranks at every step; build it "
                "with process_group='local' so that each trajectory stays on its rank"
            )
        self.generator.manual_seed(
            _distributed.rank_seed(self.seed, dist.get_rank(None if isinstance(group, str) else group))
        )
        return group

    def _rank_config(self) -> tuple[Any, ...]:
        # local trajectories may give each rank its own schedule (tasks sharded over ranks)
        schedule = (
            () if self.local_trajectories else (self.schedule.kind, self.schedule.probabilities.tolist())
        )
        return (
            *super()._rank_config(),
            *schedule,
            self.buffers is not None,
            None if self.outer_optimizer is None else type(self.outer_optimizer).__name__,
            self.local_trajectories,
            self._verify_ranks,
            self._bucket_elements,
            self.engine.keys,
        )

    def _group(self) -> Any:
        """The process group of the local trajectories (``None`` when off)."""
        return torch.distributed.group.WORLD if isinstance(self._local_group, str) else self._local_group

    @property
    def local_trajectories(self) -> bool:
        """Whether each rank runs its own trajectory (set at construction)."""
        return self._local_group is not None

    @property
    def verify_ranks(self) -> bool:
        """Whether the slow weights are compared across ranks before every outer step."""
        return self._verify_ranks

    @property
    def bucket_elements(self) -> int | None:
        """Elements per all-reduce bucket of the outer step (``None``: one per buffer)."""
        return self._bucket_elements

    # ------------------------------------------------------------------ public read-outs
    @property
    def schedule(self) -> TaskSchedule:
        """The task schedule (part of the task stream, :attr:`stream`)."""
        schedule = self.stream.schedule
        assert schedule is not None
        return schedule

    @property
    def engine(self) -> Interpolator:
        """The slow weights φ over the fast tensors (:attr:`outer_step`'s)."""
        return self.outer_step.engine

    @property
    def outer_optimizer(self) -> Optimizer | None:
        """The outer optimizer built over φ, or ``None`` (interpolation at η)."""
        return self.outer_step.optimizer

    @property
    def _slots(self) -> dict[int, Any]:
        """The parked trajectories' inner-optimizer states, by trajectory."""
        return self.slots.parked

    @property
    def outer_step_count(self) -> int:
        return self.trajectory_clock.outer

    @property
    def _inner_count(self) -> int:
        """Inner steps into the current trajectory."""
        return self.trajectory_clock.inner

    @property
    def _trajectory(self) -> int:
        """Trajectories into the current outer step."""
        return self.trajectory_clock.index

    @property
    def _outer_count(self) -> int:
        return self.trajectory_clock.outer

    @property
    def slow_weights(self) -> list[Tensor]:
        """φ, shaped like the parameters (then the interpolated buffers, if any): views into the
        slow buffers, float32 for half types."""
        return self.engine.slow

    @contextmanager
    def use_slow_weights(self, module: nn.Module | None = None) -> Iterator[None]:
        """Inside the block the parameters (and interpolated buffers) hold the slow weights φ
        (as of the last outer step); on exit they get their fast values θ back. Evaluate a
        Reptile-family model here.

        After steps but before the first outer step φ is still the initial model: a warning
        says so (a run shorter than ``inner_steps`` takes no outer step).

        Under FSDP2 pass the model, ``use_slow_weights(model)``: FSDP2 keeps the root module's
        gathered parameters after a forward without backward, so a forward would not see the
        swap (or, after the block, would keep computing with φ); every FSDP module in
        ``module`` is resharded before and after it.

        Example:
            >>> import torch, metaopt
            >>> model = torch.nn.Linear(2, 1)
            >>> opt = metaopt.SequentialReptile(torch.optim.SGD(model.parameters(), lr=0.1),
            ...                                 tasks=["a"], inner_steps=2, outer_lr=0.5)
            >>> for _ in range(3):   # an outer step after 2 steps, then θ moves on from φ
            ...     _ = opt.step({"a": model(torch.ones(1, 2)).sum()})
            >>> with opt.use_slow_weights():
            ...     at_phi = model.weight.detach().clone()
            >>> torch.equal(at_phi, opt.slow_weights[0]), torch.equal(model.weight, at_phi)
            (True, False)
        """
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(
                f"{type(self).__name__}.use_slow_weights: module must be the model (an nn.Module), "
                f"got {type(module).__name__}"
            )
        if module is None and sharded(self._param_list):
            raise ValueError(
                f"{type(self).__name__}.use_slow_weights: the parameters are sharded (FSDP2); pass "
                "the model, use_slow_weights(model), so that FSDP2's gathered copies are dropped "
                "before and after the swap (the root module keeps them after a forward)"
            )
        if self.outer_step_count == 0 and self.step_count > 0:
            warnings.warn(
                f"{type(self).__name__}.use_slow_weights: no outer step yet ({self.step_count} "
                f"step(s) taken, inner_steps={self.inner_steps}), so the slow weights are still the "
                "initial model; evaluate after an outer step, or lower inner_steps for a run this "
                "short",
                UserWarning,
                stacklevel=3,  # the with statement (contextmanager's __enter__ is between)
            )
        # re-examined for casts and moves, the set of tensors kept: a parameter frozen for the
        # evaluation keeps its slow weights until the trajectory ends, as without it
        self.engine.refresh(keep_buffers=self.outer_step.keep_buffers)
        clean = not self._changed_params()
        fast = self.engine.fast
        with torch.no_grad():
            saved = [p.detach().clone() for p in fast]
            reshard_gathered(module)
            self.engine.sync_fast()
        try:
            yield
        finally:
            with torch.no_grad():
                reshard_gathered(module)
                torch._foreach_copy_(fast, saved)
            if clean:
                self._record_versions()

    def reset_slow_weights(self) -> None:
        """Take the parameters (and interpolated buffers) as they are now as the slow weights φ,
        and start a new trajectory. Call it after loading new weights into the model (e.g.
        pretrained ones) once the optimizer exists.

        Example:
            >>> import torch, metaopt
            >>> model = torch.nn.Linear(2, 1)
            >>> opt = metaopt.SequentialReptile(torch.optim.SGD(model.parameters(), lr=0.1),
            ...                                 tasks=["a"], inner_steps=5)
            >>> _ = model.load_state_dict({"weight": torch.ones(1, 2), "bias": torch.zeros(1)})
            >>> opt.reset_slow_weights()
            >>> opt.slow_weights[0]
            tensor([[1., 1.]])
        """
        self._refresh_engine()
        self.engine.reset_slow()
        self.trajectory_clock.restart()
        self.slots.use(0)
        self.schedule.restart()
        self._record_versions()
        self._ranks_checked = False  # local trajectories: the next step compares φ across ranks

    def accept_parameter_changes(self) -> None:
        """Keep φ and continue the trajectory from the parameters as they are now, after they
        were changed outside the optimizer on purpose (e.g. a weight constraint applied in place,
        or a model state dict loaded *after* the optimizer's while resuming)."""
        self._record_versions()

    def current_outer_lr(self) -> float:
        """η for the next outer step (after annealing)."""
        if self.outer_lr is None:
            raise RuntimeError(f"{type(self).__name__}: the outer optimizer's lr is the outer step size")
        if self.anneal_steps is None or self.outer_lr_final is None:
            return self.outer_lr
        frac = min(self._outer_count / self.anneal_steps, 1.0)
        return (1.0 - frac) * self.outer_lr + frac * self.outer_lr_final

    # ------------------------------------------------------------------ checks before a step
    def _check_outer_options(self, options: Mapping[str, Any] | None = None) -> None:
        """The outer-step options agree with each other (those given, else the current ones)."""
        name = type(self).__name__
        get = (lambda k: getattr(self, k)) if options is None else options.get
        outer_lr, final, anneal = get("outer_lr"), get("outer_lr_final"), get("anneal_steps")
        if (final is None) != (anneal is None):
            raise ValueError(f"{name}: outer_lr_final and anneal_steps go together")
        if self.outer_optimizer is not None:
            if outer_lr is not None or anneal is not None:
                raise ValueError(
                    f"{name}: with an outer_optimizer its lr is the outer step size: leave "
                    "outer_lr, outer_lr_final and anneal_steps unset (anneal with a "
                    "torch.optim.lr_scheduler on the outer optimizer)"
                )
        elif outer_lr is None:
            raise ValueError(f"{name}: outer_lr must be a number in [0, 1] without an outer_optimizer")

    def _fast_tensors(self) -> dict[str, Tensor]:
        """The fast weights by key: the trainable parameters by position (a frozen one has no
        slow weight: it is never copied or touched), the floating buffers by name."""
        fast = {f"p{i}": local_tensor(p) for i, p in enumerate(self._param_list) if p.requires_grad}
        if self.buffers is not None:
            fast.update((f"b:{n}", b) for n, b in self.buffers.named_buffers() if b.is_floating_point())
        return fast

    def _refresh_engine(self) -> None:
        self.engine.refresh(self._fast_tensors(), keep_buffers=self.outer_step.keep_buffers)

    def __getstate__(self) -> dict[str, Any]:
        # version counters restart in a copy: carry which parameters had changed, not the counts
        state = super().__getstate__()
        versions = self._versions
        state["_versions"] = (
            None if versions is None else [p._version != v for p, v in zip(self._param_list, versions)]
        )
        if state.get("_local_group") is not None:  # a process group does not pickle: a copy
            state["_local_group"] = _WORLD  # averages over the default group
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.outer_step.rebind(type(self).__name__)
        changed = state["_versions"]
        self._versions = (
            None if changed is None else [-1 if c else p._version for p, c in zip(self._param_list, changed)]
        )

    def _record_versions(self) -> None:
        if torch.compiler.is_compiling():
            # version counters are not traced: under torch.compile the check of writes behind
            # the optimizer's back pauses, and the next eager step takes the parameters as
            # they are (as after a load)
            self._versions = None
            return
        self._versions = [p._version for p in self._param_list]

    def _changed_params(self) -> list[Tensor]:
        """Parameters written in place since the optimizer last synced with them (none since a
        load, see :meth:`_after_load`, or a step compiled by ``torch.compile``)."""
        if self._versions is None or torch.compiler.is_compiling():
            return []
        return [p for p, v in zip(self._param_list, self._versions) if p._version != v]

    def _prepare(self) -> None:
        super()._prepare()
        name = type(self).__name__
        if isinstance(self._local_group, str) and not torch.distributed.is_initialized():
            raise RuntimeError(
                f"{name}.step: local_trajectories=True, but torch.distributed is not initialized "
                "(any more, or not yet where this copy was made); call init_process_group "
                "first. Nothing was updated"
            )
        changed = self._changed_params()
        if changed:
            raise ValueError(
                f"{name}.step: {len(changed)} parameter(s) were changed outside the optimizer "
                f"since its last step, e.g. {self._param_name(changed[0])} (model.load_state_dict "
                "or an in-place write after the optimizer was built?), so the slow weights no "
                "longer match them. Call opt.reset_slow_weights() to take the new values as the "
                "slow weights, or opt.accept_parameter_changes() to keep them; when resuming, "
                "load the optimizer's state dict too (after or before the model's). Nothing was "
                "updated"
            )
        self._check_outer_options()
        if self.trajectory_clock.ends_trajectory(self.inner_steps):
            self._refresh_engine()

    def _params_added(self, new: list[Tensor]) -> None:
        self._refresh_engine()
        if self._versions is not None:
            self._versions += [p._version for p in new]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.outer_optimizer is not None:
            raise ValueError(
                f"{type(self).__name__}.add_param_group: the outer optimizer is built over the "
                "slow weights; add every param group before building an optimizer with an "
                "outer_optimizer"
            )
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ mechanics
    def _after_step(self) -> dict[str, Any]:
        ended = self.trajectory_clock.advance(self.inner_steps)
        outer = self._end_trajectory() if ended else False
        self._record_versions()
        return {"outer_update": outer}

    def _after_skip(self) -> dict[str, Any]:
        # a skipped batch still counts in the trajectory: K batches per trajectory on every
        # rank, and the batches planned ahead (planned_tasks) stay aligned with the draws
        return self._after_step()

    def planned_tasks(self, steps: int) -> list[list[str]]:
        """The tasks of the next ``steps`` steps, as :meth:`next_tasks` will return them, drawn
        on a copy of the schedule's state (nothing here moves). The data side of a framework
        that drives the backward pass itself (the Hugging Face Trainer) builds its batches in
        this order: see :mod:`metaopt.data`.

        Example:
            >>> import torch, metaopt
            >>> model = torch.nn.Linear(2, 1)
            >>> opt = metaopt.SequentialReptile(torch.optim.SGD(model.parameters(), lr=0.1),
            ...                                 tasks=["a", "b"], inner_steps=2,
            ...                                 schedule="without_replacement", seed=0)
            >>> plan = opt.planned_tasks(4)
            >>> [sorted(plan[0] + plan[1]), sorted(plan[2] + plan[3])]
            [['a', 'b'], ['a', 'b']]
            >>> plan[0] == opt.next_tasks()
            True
        """
        # drawn on the real streams (this optimizer's and a wrapped one's), put back after
        records = [s.record() for s in self._streams()]
        clock = self.trajectory_clock
        counters = clock.record()
        out = []
        try:
            for _ in range(steps):
                out.append(self.next_tasks())
                self.stream.pending = None
                if clock.advance(self.inner_steps) and clock.index >= self.tasks_per_outer_step:
                    clock.index = 0
                    self.schedule.restart()
        finally:
            clock.restore(counters)
            for stream, record in zip(self._streams(), records):
                stream.restore(record)
        return out

    @torch.no_grad()
    def _end_trajectory(self) -> bool:
        """A trajectory ended: fold it into the mean and start the next one (batched), or end
        the outer step: φ moves by the outer rule, θ ← φ."""
        n = self.tasks_per_outer_step
        group = self._group()
        clock = self.trajectory_clock
        batched = clock.batched(n, across_ranks=group is not None)
        if batched:
            self.engine.accumulate(clock.index)  # θ folded into the mean; θ ← φ
            if clock.index < n:
                self.slots.use(clock.index)
                return False
        clock.index = 0
        self.slots.use(0)
        self.slots.drop_from(n)  # n was lowered: no such trajectory
        average = (
            None
            if group is None
            else _distributed.averaging(
                group, self.timeout, f"{type(self).__name__}: outer step {self._outer_count + 1}"
            )
        )
        lr = None if self.outer_optimizer is not None else self.current_outer_lr()
        self.outer_step.apply(lr, batched=batched, average=average, bucket=self.bucket_elements)
        if self.reset_inner_state:
            self.base_optimizer.state.clear()
            self.slots.parked.clear()
        self.schedule.restart()
        clock.outer += 1
        return True

    # ------------------------------------------------------------------ local trajectories
    def _check_ranks(self) -> None:
        group = self._group()
        if group is None:
            super()._check_ranks()
        elif not self._ranks_checked:
            self._compare_ranks(group, with_grads=True)
            self._ranks_checked = True
        elif self._verify_ranks and self._ends_outer_step():
            self._compare_ranks(group, with_grads=False)

    def _ends_outer_step(self) -> bool:
        """Whether the coming step ends an outer step (φ moves)."""
        return self.trajectory_clock.ends_outer_step(self.inner_steps, self.tasks_per_outer_step)

    def _compare_ranks(self, group: Any, *, with_grads: bool) -> None:
        """Local trajectories: the ranks agree (:func:`metaopt.parts.ranks.compare_local_ranks`)."""
        name = type(self).__name__
        where = (
            f"{name}.step"
            if with_grads
            else f"{name}.step (before outer step {self._outer_count + 1}, verify_ranks=True)"
        )
        config = (*self._rank_config(), self._outer_count, self._inner_count, self._trajectory)
        grads = [local_tensor(p.grad) for p in self._trainable() if p.grad is not None] if with_grads else []
        stream = _distributed.fingerprint(self.generator.get_state())
        compare_local_ranks(
            config, self.engine.slow_buffers, grads, stream, group, self.timeout, where, with_grads=with_grads
        )

    # ------------------------------------------------------------------ state
    # Per fast tensor (parameter "p<i>" or buffer "b:<name>"), beside the wrapped optimizer's
    # fields: the outer step's (φ, the trajectory mean, the outer optimizer's fields) and the
    # parked trajectories' inner-optimizer fields (metaopt/parts/outer.py, slots.py).
    def _param_state_fields(self) -> tuple[str, ...]:
        return (SLOW, ACC, OUTER, SLOT)

    def _fields_by_key(self, prefix: str) -> dict[str, dict[str, Any]]:
        """The saved per-key fields of the keys starting with ``prefix``."""
        out = self.outer_step.fields(prefix)
        if prefix == "p":
            for slot, states in self.slots.saved(self._param_list).items():
                for i, fields in states.items():
                    out.setdefault(f"p{i}", {}).update((slot_field(slot, f), v) for f, v in fields.items())
        return out

    def _param_state(self) -> dict[int, dict[str, Any]]:
        out = {int(k[1:]): v for k, v in self._fields_by_key("p").items()}
        # the outer step's fields of a sharded parameter are its local shards: saved placed as
        # the parameter (the parked slots hold the wrapped optimizer's own, placed already)
        params = self._param_list
        for i, fields in out.items():
            for f, v in fields.items():
                if f.startswith((SLOW, ACC, OUTER)) and isinstance(v, Tensor) and v.dim():
                    fields[f] = placed_like(v, params[i])
        return out

    def _extra_state(self) -> dict[str, Any]:
        return {
            **self.trajectory_clock.saved(),
            "schedule": self.schedule.state_dict(),
            "buffers": {k[2:]: v for k, v in self._fields_by_key("b:").items()},
            "outer_param_groups": self.outer_step.param_groups(),
        }

    def _saved_fields(
        self, fields: Mapping[int, Mapping[str, Any]], own: Mapping[str, Any]
    ) -> dict[str, dict[str, Any]]:
        """The saved per-key fields: the parameters' (by index) and the buffers'."""
        name = type(self).__name__
        out: dict[str, dict[str, Any]] = {}
        for i, f in fields.items():
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self._param_list):
                raise ValueError(
                    f"{name}.load_state_dict: saved slow-weight fields for {i!r}, which is not "
                    "a parameter index"
                )
            # the outer step's fields of a sharded parameter, loaded into its current placement
            out[f"p{i}"] = {
                k: local_tensor(v) if k.startswith((SLOW, ACC, OUTER)) else v for k, v in f.items()
            }
        buffers = own.get("buffers", {})
        if not isinstance(buffers, Mapping) or any(not isinstance(v, Mapping) for v in buffers.values()):
            raise ValueError(f"{name}.load_state_dict: saved buffers are not per-buffer fields")
        out.update((f"b:{n}", dict(v)) for n, v in buffers.items())
        return out

    def _parse_fields(
        self, fields: Mapping[int, Mapping[str, Any]], own: Mapping[str, Any]
    ) -> tuple[OuterRecord, dict[int, dict[int, dict[str, Any]]]]:
        """(the outer step's record, the parked slots) from the saved fields."""
        where = f"{type(self).__name__}.load_state_dict"
        by_key = self._saved_fields(fields, own)
        return parse_fields(by_key, self.engine.keys, own.get("outer_param_groups"), where)

    def _loaded_fast(self, slow: Mapping[str, Any]) -> dict[str, Tensor]:
        """The fast tensors after a load: those with saved slow weights (a parameter frozen
        since they were saved keeps them until its trajectory ends, as in the saved run) and
        every trainable one (one without saved slow weights takes them from θ, as at the end of
        a trajectory), in the engine's key order."""
        every = {f"p{i}": local_tensor(p) for i, p in enumerate(self._param_list)}
        if self.buffers is not None:
            every.update((f"b:{n}", b) for n, b in self.buffers.named_buffers() if b.is_floating_point())
        wanted = set(slow) | set(self._fast_tensors())
        return {k: t for k, t in every.items() if k in wanted}

    def _check_param_state(self, fields: Mapping[int, Mapping[str, Any]], own: Mapping[str, Any]) -> None:
        where = f"{type(self).__name__}.load_state_dict"
        record, slots = self._parse_fields(fields, own)
        every = {f"p{i}" for i in range(len(self._param_list))}
        if self.buffers is not None:
            every |= {f"b:{n}" for n, b in self.buffers.named_buffers() if b.is_floating_point()}
        stray = sorted(set(record.slow) - every)
        if stray:
            raise ValueError(
                f"{where}: saved slow weights for {stray[:5]}, which are not parameters (or "
                "interpolated buffers) of this optimizer"
            )
        self.outer_step.check_saved(self._loaded_fast(record.slow), record, where)
        self.slots.check_saved(slots, self._param_list, own.get("trajectory"), self._param_name, where)
        if record.acc is None and (own.get("trajectory") or 0) > 0:
            raise ValueError(
                f"{where}: saved mid outer step (trajectory {own.get('trajectory')}) without the "
                "accumulated mean of the finished trajectories"
            )

    def _load_param_state(self, fields: Mapping[int, Mapping[str, Any]], own: Mapping[str, Any]) -> None:
        record, slots = self._parse_fields(fields, own)
        self.outer_step.load_saved(self._loaded_fast(record.slow), record)
        self.slots.load(slots, self._param_list, int(own["trajectory"]))

    def _check_extra_state(self, state: Mapping[str, Any]) -> None:
        name = type(self).__name__
        TrajectoryClock.check_saved(state, f"{name}.load_state_dict")
        options = {**{k: getattr(self, k) for k in self._option_names()}, **state.get("options", {})}
        try:
            self._check_outer_options(options)
        except ValueError as err:
            raise ValueError(f"{name}.load_state_dict: saved options: {err}") from None
        # inner_count and trajectory may exceed inner_steps and tasks_per_outer_step (both can
        # be lowered mid-run): only their agreement with the saved mean and parked states counts
        self.schedule.check_state_dict(state.get("schedule", {}))

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self.trajectory_clock.load_saved(state)

    def _check_pending(self, pending: Sequence[str]) -> None:
        if self.inner is not None:
            self.inner._check_pending(pending)
        elif len(pending) != 1:
            raise ValueError("every step wants one task")

    def _trajectory_key(self) -> str | None:
        group = self._local_group
        if group is None or not torch.distributed.is_initialized():
            return None
        return f"rank{torch.distributed.get_rank(None if isinstance(group, str) else group)}"

    def _after_initialization(self) -> None:
        self._record_versions()  # DCP's initialization stepped the wrapped optimizer at lr 0

    def _owned_optimizers(self) -> dict[str, Optimizer]:
        return {} if self.outer_optimizer is None else {"outer": self.outer_optimizer}

    def _untracked_state(self) -> Any:
        return None if self._versions is None else list(self._versions)

    def _restore_untracked_state(self, state: Any) -> None:
        self._versions = state

    def _after_load(self) -> None:
        # The model's parameters may be loaded after the optimizer's state as well as before
        # (DCP's set_state_dict loads the optimizer first): until the next step, writes to
        # them are the resumed run's values, not a change behind the optimizer's back
        self._versions = None
        self._ranks_checked = False  # local trajectories: compare the loaded state across ranks


V1_MIGRATIONS["engine"] = migrate_v1  # metaopt 0.1 kept the slow weights under "engine"
