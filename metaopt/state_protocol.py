"""``state_dict`` and ``load_state_dict`` for every metaopt optimizer, from its parts' records.

A mixin of :class:`metaopt.MultiTaskOptimizer`: it writes the layout of
:mod:`metaopt.parts.state_dict` from the task stream's record, the options, the method's own
records (``_extra_state``) and per-parameter fields (``_param_state``), and a wrapped metaopt
optimizer's state dict; and it loads one back in two phases: every record is checked first
(the stream's, the options, the method's, the per-parameter fields, a pending draw against
what the method can draw; a wrapped metaopt optimizer checks its own), then everything is
assigned. Only the wrapped torch optimizer's own ``load_state_dict`` can still fail late (it
is not probed: that would copy its parameters); such a load is rolled back from a state dict
taken before, so a failed load changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch.optim import Optimizer

from ._options import Option
from .parts.state_dict import STATE_VERSION, load_optimizer_state, record_of, split_state, with_record
from .parts.stream import TaskStream

__all__ = ["StateDictProtocol"]


class StateDictProtocol:
    """The state-dict protocol of :class:`metaopt.MultiTaskOptimizer` (see the module)."""

    tasks: tuple[str, ...]
    stream: TaskStream
    inner: Any  # a wrapped MultiTaskOptimizer, or None
    optimizer: Optimizer
    _ranks_checked: bool
    _optimizer_state_dict_pre_hooks: Any
    _optimizer_state_dict_post_hooks: Any
    _optimizer_load_state_dict_pre_hooks: Any
    _optimizer_load_state_dict_post_hooks: Any

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _check_extra_state(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` if :meth:`_load_extra_state` would fail, or if ``state`` holds a
        value this method cannot have produced (nothing moves)."""

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    def _param_state(self) -> dict[int, dict[str, Any]]:
        """This method's per-parameter state, by parameter index (torch.optim's keys), with
        field names starting ``metaopt_`` (merged beside the wrapped optimizer's own)."""
        return {}

    def _param_state_fields(self) -> tuple[str, ...]:
        """The prefixes of the ``metaopt_`` fields that :meth:`_param_state` writes."""
        return ()

    def _check_param_state(self, state: Mapping[int, Mapping[str, Any]], own: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` if :meth:`_load_param_state` would fail (nothing moves)."""

    def _load_param_state(self, state: Mapping[int, Mapping[str, Any]], own: Mapping[str, Any]) -> None:
        pass

    def _check_pending(self, pending: Sequence[str]) -> None:
        """Raise ``ValueError`` if ``pending`` is not a draw this optimizer can make."""
        if self.inner is not None:
            self.inner._check_pending(pending)
        elif list(pending) != list(self.tasks):
            raise ValueError(f"every step wants {list(self.tasks)}, in that order")

    def _after_load(self) -> None:
        """Hook: the whole state dict was loaded."""

    def _untracked_state(self) -> Any:
        """What a load resets that the state dict does not hold (the Reptile family's record of
        the parameters' versions), for a failed load to put back."""
        return None

    def _restore_untracked_state(self, state: Any) -> None:
        """Put back :meth:`_untracked_state` after a failed load."""

    def _trajectory_key(self) -> str | None:
        """``"rank<r>"`` when this rank's state is its own trajectory's (local trajectories),
        so that the state dict keys it apart (:func:`metaopt.parts.state_dict.with_record`)."""
        return None

    _initialized: set[str]

    def _drop_initialized_state(self) -> None:
        """See :meth:`metaopt.MultiTaskOptimizer._drop_initialized_state`."""

    def _initialize_parts(self) -> None:
        """See :meth:`metaopt.MultiTaskOptimizer._initialize_parts`."""

    def _owned_optimizers(self) -> dict[str, Optimizer]:
        """See :meth:`metaopt.MultiTaskOptimizer._owned_optimizers`."""
        return {}

    def _report_skips(self) -> None:
        """See :meth:`metaopt.MultiTaskOptimizer._report_skips`."""

    @classmethod
    def _option_names(cls) -> dict[str, Option[Any]]:
        """The validated hyper-parameters of this class, by name."""
        out: dict[str, Option[Any]] = {}
        for klass in reversed(cls.__mro__):
            out.update((k, v) for k, v in vars(klass).items() if isinstance(v, Option))
        return out

    def _own_state_dict(self) -> dict[str, Any]:
        """torch.optim's layout (``state`` by parameter index, ``param_groups``), so that tools
        that read an optimizer's state per parameter (DCP, FSDP's optimizer state dicts,
        Accelerate, the Hugging Face Trainer) carry metaopt's too: each parameter's entry holds
        the wrapped optimizer's fields and this method's ``metaopt_*`` fields; the first param
        group's ``metaopt`` holds the rest (counters, the task stream, options, a wrapped metaopt
        optimizer's), where ``get_state_dict`` keeps it."""
        self._initialize_parts()  # every saved dict (and DCP template) has their fields
        inner = self.optimizer.state_dict()
        state: dict[Any, dict[str, Any]] = {i: dict(v) for i, v in inner["state"].items()}
        for i, fields in self._param_state().items():
            state.setdefault(i, {}).update(fields)
        own: dict[str, Any] = {
            "version": STATE_VERSION,
            "class": type(self).__name__,
            "tasks": list(self.tasks),
            **self.stream.saved(),
            "options": {name: getattr(self, name) for name in self._option_names()},
            "initialized": sorted(self._initialized),
            **self._extra_state(),
        }
        if self.inner is not None:
            own["inner"] = record_of(inner)
        return with_record(state, inner["param_groups"], own, self._trajectory_key())

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Everything needed to continue identically, in ``torch.optim``'s layout: ``state``
        (per parameter index: the wrapped optimizer's fields and this method's ``metaopt_*``
        fields, such as the slow weights) and ``param_groups`` (the wrapped optimizer's), the
        first of which holds ``metaopt``: step counters, the generator state, the pending task
        draw, each method's own state and its hyper-parameters (``outer_lr``, ``beta``, ...:
        restored on load, as torch.optim restores the hyper-parameters of its param groups).
        Loads under ``torch.load(..., weights_only=True)``. Registered state-dict hooks run as
        in ``torch.optim``. State dicts of earlier layouts load too (migrated)."""
        self._report_skips()
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self._own_state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    def _split_state(
        self, state_dict: Mapping[str, Any]
    ) -> tuple[Mapping[str, Any], dict[str, Any], dict[int, dict[str, Any]]]:
        return split_state(
            state_dict, self._param_state_fields(), self.inner is not None, type(self).__name__
        )

    def _check_state(
        self, state_dict: Mapping[str, Any]
    ) -> tuple[Mapping[str, Any], Any, dict[int, dict[str, Any]]]:
        name = type(self).__name__
        own, inner, fields = self._split_state(state_dict)
        if own.get("class") != name:
            raise ValueError(f"{name}.load_state_dict: state was saved by {own.get('class')}")
        if list(own.get("tasks", [])) != list(self.tasks):
            raise ValueError(
                f"{name}.load_state_dict: saved tasks {own.get('tasks')} differ from {list(self.tasks)}"
            )
        self.stream.check_saved(own, f"{name}.load_state_dict")
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
        initialized = own.get("initialized", [])
        allowed = {"optimizer", *self._owned_optimizers()}
        if (
            not isinstance(initialized, (list, tuple))
            or not all(isinstance(part, str) for part in initialized)
            or not set(initialized) <= allowed
        ):
            raise ValueError(
                f"{name}.load_state_dict: saved initialized states {initialized!r} are not among "
                f"this optimizer's {sorted(allowed)}"
            )
        self._check_extra_state(own)
        self._check_param_state(fields, own)
        pending = own.get("pending")
        if pending is not None:
            try:
                self._check_pending_saved(list(pending), own)
            except ValueError as err:
                raise ValueError(
                    f"{name}.load_state_dict: saved pending draw {list(pending)} cannot be drawn here: {err}"
                ) from None
        return own, inner, fields

    def _check_pending_saved(self, pending: list[str], own: Mapping[str, Any]) -> None:
        """:meth:`_check_pending` for a draw saved with ``own`` (subclasses whose draws depend
        on saved state override it)."""
        if self.inner is not None:  # the wrapped optimizer's draw, which it checks itself
            inner = own.get("inner")
            if not isinstance(inner, Mapping) or list(inner.get("pending") or []) != pending:
                raise ValueError("it is not the wrapped optimizer's pending draw")
            return
        self._check_pending(pending)

    def _load_checked(
        self, own: Mapping[str, Any], inner: Any, fields: Mapping[int, Mapping[str, Any]]
    ) -> None:
        for key, value in own.get("options", {}).items():
            setattr(self, key, value)  # like torch.optim's saved param-group hyper-parameters
        self._load_extra_state(own)
        self._load_param_state(fields, own)
        if self.inner is None:
            load_optimizer_state(self.optimizer, inner)
        self.stream.load_saved(own)
        # state the saving run had from an initialization, not from steps: dropped at the next
        # step here as it would have been there
        self._initialized = set(own.get("initialized", []))
        self._ranks_checked = False  # under torch.distributed the next step compares the ranks
        self._after_load()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Load a :meth:`state_dict` (or one of an earlier layout, migrated). Everything is
        validated first (this optimizer's part, then a wrapped metaopt optimizer's, through its
        own ``load_state_dict``); a load that still fails part-way (in the wrapped torch
        optimizer) is rolled back, so a failed load changes nothing. Registered
        load-state-dict hooks run as in ``torch.optim``."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        own, inner, fields = self._check_state(state_dict)
        self._drop_initialized_state()  # the load replaces it: the next step must not clear that
        backup = self._own_state_dict()
        untracked = self._untracked_state()
        if self.inner is not None:  # composed: the wrapped optimizer validates (and rolls back) its part
            self.inner.load_state_dict(inner)
        try:
            self._load_checked(own, inner, fields)
        except BaseException:
            restored = self._check_state(backup)
            if self.inner is not None:
                self.inner.load_state_dict(restored[1])
            self._load_checked(*restored)
            self._restore_untracked_state(untracked)  # a failed load changes nothing at all
            raise
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
