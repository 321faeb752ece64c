"""The interpolation engine: the Reptile outer step ``φ ← φ + η(θ − φ)`` and the re-sync ``θ ← φ``.

The outer step touches every parameter: read φ, read θ, write φ, write θ. Four passes over the
parameters at memory bandwidth is the floor. The fast weights θ are the model's own tensors,
never re-pointed, repacked or copied into metaopt's storage (packing them into one buffer broke
FSDP2, Accelerate's checkpoints and safetensors, and the outer step runs once per K inner
steps, so its last fraction of speed is worth less than compatibility). The slow weights φ are
metaopt's own state, one tensor per fast tensor (views into one buffer per device and master
dtype, which costs nothing and gives collectives one buffer to reduce). The paths:

``"foreach"``
    Multi-tensor ``torch._foreach_lerp_`` and ``torch._foreach_copy_`` over the tensor lists.
``"reference"``
    A plain per-tensor loop, kept as the readable reference for tests.
a registered kernel
    ``"auto"`` picks a kernel registered for the device type (:func:`register_kernel`: a fused
    kernel over lists of tensors), else ``"foreach"``. On CUDA, with Triton installed, that is
    :mod:`metaopt.triton_kernel`'s, registered at the first outer step.

**Host placement** (``state_device="cpu"``): φ and the trajectory mean live in host memory
(pinned when the fast tensors are on CUDA), and each operation streams them through the fast
tensors' device in chunks of at most :data:`STREAM_ELEMENTS` elements (a chunk of φ copied in,
interpolated and written to θ there, copied back), so that the device holds no slow weights
between outer steps, as torchft's and PrimeIntellect's DiLoCo keep their outer state. Copies are
non-blocking and ordered on the device's stream; reading φ on the host (:meth:`Interpolator.state_dict`)
waits for them first.

Low-precision parameters (float16, bfloat16) keep a float32 master copy of φ. θ starts each
trajectory at φ rounded to θ's dtype, so the rounding error ``φ − round(φ)`` is not part of the
trajectory's displacement: the interpolation uses the master fast weights ``θ + (φ − round(φ))``
(θ as a float32 master copy would hold it), and φ does not drift onto the low-precision grid
when θ does not move.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ._distributed import Reduce
from .functional import unique_tensors
from .layout import Layout
from .precision import master_dtype, master_form

__all__ = [
    "STREAM_ELEMENTS",
    "Interpolator",
    "Kernel",
    "Method",
    "interpolate_",
    "register_kernel",
]

Method = Literal["auto", "foreach", "reference"]
_METHODS = ("auto", "foreach", "reference")

# A device kernel computes, over lists of tensors of equal shapes, pairwise:
#   dst ← dst + w (src − dst);  then, if fast is not None, fast ← copy_from (rounded to fast's dtype)
# with ``dst``/``copy_from`` in the master dtype and ``src``/``fast`` possibly lower precision.
Kernel = Callable[[list[Tensor], list[Tensor], float, "list[Tensor] | None", list[Tensor]], None]
_KERNELS: dict[str, Kernel] = {}


STREAM_ELEMENTS = 1 << 23
"""Most elements of φ (and of the trajectory mean) on the device at once under host placement:
32 MiB in float32. Tensors larger than that are streamed in flat slices where contiguous."""


def register_kernel(device_type: str, kernel: Kernel | None) -> None:
    """Register (or with ``None`` remove) a fused kernel over lists of tensors for a device type.

    ``"auto"`` uses it for tensors on that device. The kernel must compute, for each index,
    exactly ``dst ← dst + w·(src − dst)`` then ``fast ← copy_from`` (when ``fast`` is given), and
    is checked against the reference path by the test suite's helpers. ``src`` is θ's master
    form (module doc), unless the kernel has an attribute ``forms_master = True``: then ``src``
    is θ as it is, and where it is of lower precision than ``dst`` the kernel forms
    ``src + (φ − round(φ))`` itself, φ being ``copy_from`` before the update.
    """
    if kernel is None:
        _KERNELS.pop(device_type, None)
    else:
        _KERNELS[device_type] = kernel


_TRITON_TRIED = False


def _kernel_for(device_type: str) -> bool:
    """Whether a kernel is registered for ``device_type``; on CUDA, Triton's
    (:mod:`metaopt.triton_kernel`) is registered at the first look when Triton is installed."""
    global _TRITON_TRIED
    if device_type == "cuda" and device_type not in _KERNELS and not _TRITON_TRIED:
        _TRITON_TRIED = True
        try:
            from .triton_kernel import outer_step
        except ImportError:
            return False
        register_kernel("cuda", outer_step)
    return device_type in _KERNELS


@dataclass
class _Group:
    """Fast tensors of one (device, dtype) and their slow counterparts, views into one buffer."""

    keys: list[str]
    fast: list[Tensor]
    dtype: torch.dtype  # of the fast tensors when laid out
    device: torch.device  # of the fast tensors when laid out
    slow: Tensor  # flat, master dtype; on the host under host placement
    slow_views: list[Tensor]
    offloaded: bool = False  # host placement: φ and the mean streamed through ``device``
    acc: Tensor | None = None  # flat accumulator (batched Reptile), allocated on demand
    acc_views: list[Tensor] | None = None

    def views(self, flat: Tensor) -> list[Tensor]:
        """Tensors shaped like ``fast`` into a flat buffer laid out like ``slow``."""
        return Layout.of(self.fast).views(flat)

    def accumulator(self) -> tuple[Tensor, list[Tensor]]:
        if self.acc is None or self.acc_views is None:
            raise RuntimeError("Interpolator: nothing was accumulated")
        return self.acc, self.acc_views

    def settle(self) -> None:
        """Wait for this group's copies of φ back to the host (host placement on an
        accelerator: on every stream of the device, ``torch.accelerator.synchronize``)."""
        if self.offloaded and self.device.type != "cpu":
            torch.accelerator.synchronize(self.device)

    def __getstate__(self) -> dict[str, object]:
        # pickle writes every tensor with its own storage, so views would come back as copies
        # of the buffers they view: keep the buffers and rebuild the views from them
        self.settle()
        state = dict(self.__dict__)
        state["slow_views"] = state["acc_views"] = None
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.slow_views = self.views(self.slow)
        self.acc_views = None if self.acc is None else self.views(self.acc)

    @property
    def low_precision(self) -> bool:
        return self.slow.dtype != self.dtype

    def master_fast(self) -> list[Tensor]:
        """θ as a master copy would hold it (:func:`_master`), on φ's device."""
        fast = self.fast if not self.offloaded else [f.to(self.slow.device) for f in self.fast]
        return master_form(fast, self.slow_views)

    def signature(self) -> tuple[object, ...]:
        """Everything that decides where each element of φ lives in the slow buffer."""
        layout = Layout.of(self.fast)
        places = list(zip(layout.offsets, layout.shapes, layout.strides))
        return (
            tuple(self.keys),
            tuple(places),
            self.slow.numel(),
            self.slow.dtype,
            self.slow.device,
            self.device,
        )


class Interpolator:
    """Slow weights φ for a set of fast tensors θ, and the outer-step operations on them.

    Every operation that moves φ (or the accumulator) ends with the re-sync ``θ ← φ``, on every
    path: the path only decides how the tensors are traversed, never which tensor is written.
    The fast tensors are only ever read and written in place: never re-pointed or repacked.

    Args:
        fast: the fast weights (the model's trainable parameters, and optionally its
            floating-point buffers), as a sequence (keys ``"0"``, ``"1"``, ...) or a mapping
            ``{key: tensor}``. Repeats are dropped. Keys identify each tensor's φ across
            :meth:`refresh` and in :meth:`state_dict`.
        method: ``"auto"`` (default), ``"foreach"`` or ``"reference"`` (module doc).
        state_device: where φ and the trajectory mean live: ``None`` (default) beside each
            fast tensor, or ``"cpu"``, host memory streamed through the fast tensors' device
            at each operation (module doc).

    Example:
        >>> import torch
        >>> theta = [torch.zeros(3), torch.zeros(2)]
        >>> engine = Interpolator(theta)          # φ ← copy of θ
        >>> for t in theta:
        ...     _ = t.add_(1.0)                    # the inner loop moves θ
        >>> engine.interpolate(0.25)               # φ ← φ + 0.25 (θ − φ);  θ ← φ
        >>> theta[0]
        tensor([0.2500, 0.2500, 0.2500])
    """

    def __init__(
        self,
        fast: Sequence[Tensor] | Mapping[str, Tensor],
        *,
        method: Method = "auto",
        state_device: torch.device | str | None = None,
    ) -> None:
        self.method: Method = _check_method(method)
        self.state_device = _check_state_device(state_device)
        self._groups: list[_Group] = self._layout(_keyed(fast), previous=None)

    # ----------------------------------------------------------------- layout
    def _layout(
        self, fast: dict[str, Tensor], previous: list[_Group] | None, keep_buffers: bool = False
    ) -> list[_Group]:
        """Groups for ``fast``, φ taken from ``previous`` by key (cast and moved as needed) or,
        for keys new to it, from θ. Nothing moves before the last check; ``previous`` is not
        modified."""
        old_phi: dict[str, Tensor] = {}
        old_acc: dict[str, Tensor] = {}
        for g in previous or []:
            for k, v in zip(g.keys, g.slow_views):
                if k in fast and fast[k].shape != v.shape:
                    raise ValueError(
                        f"Interpolator: tensor {k!r} changed shape from {tuple(v.shape)} to "
                        f"{tuple(fast[k].shape)} since the slow weights were taken; re-create the "
                        "optimizer (or call reset_slow_weights()) after reshaping the model"
                    )
                old_phi[k] = v
            if g.acc_views is not None:
                old_acc.update(zip(g.keys, g.acc_views))
        by_key: dict[tuple[torch.device, torch.dtype], dict[str, Tensor]] = {}
        for k, t in fast.items():
            if not t.is_floating_point():
                raise ValueError(f"Interpolator: tensors must be floating point, got {t.dtype} for {k!r}")
            by_key.setdefault((t.device, t.dtype), {})[k] = t
        groups: list[_Group] = []
        with torch.no_grad():
            for (device, dtype), members in by_key.items():
                keys, tensors = list(members), list(members.values())
                size = sum(t.numel() for t in tensors)
                where = device if self.state_device is None else self.state_device
                pin = where != device and device.type == "cuda" and torch.cuda.is_available()
                slow = torch.empty(size, dtype=master_dtype(dtype), device=where, pin_memory=pin)
                g = _Group(keys, tensors, dtype, device, slow, [], offloaded=self.state_device is not None)
                g.slow_views = g.views(slow)
                kept = next((o for o in previous or [] if o.signature() == g.signature()), None)
                if kept is not None:  # same layout: keep the buffers (an outer optimizer holds them)
                    g.slow, g.slow_views, g.acc, g.acc_views = (
                        kept.slow,
                        kept.slow_views,
                        kept.acc,
                        kept.acc_views,
                    )
                elif keep_buffers:
                    raise ValueError(
                        "Interpolator: the fast tensors were cast, moved, reshaped, replaced, "
                        "frozen or unfrozen since the slow weights were taken, and an outer "
                        "optimizer holds the slow weights; build the optimizer after the model "
                        "is final (moved, cast, loaded, frozen)"
                    )
                else:
                    for k, v, t in zip(keys, g.slow_views, tensors):
                        v.copy_(old_phi.get(k, t))
                    if any(k in old_acc for k in keys):
                        g.acc = _zeros_like(slow)
                        g.acc_views = g.views(g.acc)
                        for k, v, t in zip(keys, g.acc_views, tensors):
                            v.copy_(old_acc.get(k, t))
                groups.append(g)
        return groups

    def stale(self, fast: Sequence[Tensor] | Mapping[str, Tensor] | None = None) -> bool:
        """Whether :meth:`refresh` would change the layout: the fast tensors differ (by key or
        object), or were cast, moved or reshaped since the slow weights were laid out."""
        current = self._current() if fast is None else _keyed(fast)
        known = {k: t for g in self._groups for k, t in zip(g.keys, g.fast)}
        if list(current) != list(known) or any(current[k] is not known[k] for k in current):
            return True
        for g in self._groups:
            if any(t.dtype != g.dtype or t.device != g.device for t in g.fast):
                return True
            if any(t.shape != v.shape for t, v in zip(g.fast, g.slow_views)):
                return True
        return False

    def refresh(
        self, fast: Sequence[Tensor] | Mapping[str, Tensor] | None = None, *, keep_buffers: bool = False
    ) -> bool:
        """Lay the slow weights out again if the fast tensors changed; returns whether it did.

        ``fast`` replaces the tensors (by key: a kept key keeps its φ, a new key takes φ from
        θ, a dropped key is forgotten); by default the current ones are re-examined. A tensor
        that was cast or moved keeps its φ, converted; one whose shape changed raises
        ``ValueError``. With ``keep_buffers`` (an outer optimizer holds :attr:`slow`), a change
        that needs new slow weights raises instead. Nothing moves before every check has passed.
        """
        if not self.stale(fast):
            return False
        self.settle()
        current = self._current() if fast is None else _keyed(fast)
        self._groups = self._layout(current, previous=self._groups, keep_buffers=keep_buffers)
        return True

    def _current(self) -> dict[str, Tensor]:
        return {k: t for g in self._groups for k, t in zip(g.keys, g.fast)}

    # ----------------------------------------------------------------- introspection
    @property
    def fast(self) -> list[Tensor]:
        return [t for g in self._groups for t in g.fast]

    @property
    def keys(self) -> list[str]:
        return [k for g in self._groups for k in g.keys]

    @property
    def slow(self) -> list[Tensor]:
        """φ as tensors shaped like the fast tensors (views into the slow buffers)."""
        self.settle()
        return [v for g in self._groups for v in g.slow_views]

    @property
    def slow_buffers(self) -> list[Tensor]:
        """The flat buffers the slow weights are views of, one per (device, dtype)."""
        self.settle()
        return [g.slow for g in self._groups]

    def path(self) -> list[str]:
        """The path each (device, dtype) group takes now, in group order."""
        return [self._choose(g) for g in self._groups]

    def _choose(self, g: _Group) -> str:
        if self.method == "auto":
            return "kernel" if _kernel_for(g.device.type) else "foreach"
        return self.method

    def settle(self) -> None:
        """Wait for the copies of φ back to the host (host placement on an accelerator), before
        φ is read or written there; nothing otherwise. Every read of φ through this class
        (:attr:`slow`, :attr:`slow_buffers`, :meth:`state_dict`, a re-layout, a pickle) settles
        first."""
        for g in self._groups:
            g.settle()

    # ----------------------------------------------------------------- operations
    def _lerp_then_restart(
        self,
        into: str,
        source: str,
        weight: float,
        pending: list[list[tuple[int, int, Callable[[], None]]]] | None = None,
    ) -> None:
        """``into ← into + weight·(source − into)`` per group, then ``θ ← φ``.

        ``into`` names the slow weights (``"slow"``) or the accumulator (``"acc"``); ``source``
        the fast weights (``"fast"``, as master weights) or the accumulator. The re-sync always
        writes θ from φ. ``pending`` (from :meth:`_start_reduce`): per group, the accumulator's
        buckets still being reduced, all waited for before the group is interpolated.
        """
        for gi, g in enumerate(self._groups):
            for _, _, finish in pending[gi] if pending is not None else []:
                finish()
            path = self._choose(g)
            acc = g.accumulator()[1] if "acc" in (into, source) else None
            columns = [g.fast, g.slow_views] if acc is None else [g.fast, g.slow_views, acc]
            # host placement: chunk by chunk, φ (and the mean) copied to θ's device and back
            chunks = _chunks(columns, STREAM_ELEMENTS) if g.offloaded else [columns]
            for fast, host_slow, *host_acc in chunks:
                slow = [_onto(v, g.device) for v in host_slow] if g.offloaded else host_slow
                mean = None
                if host_acc:
                    mean = [_onto(v, g.device) for v in host_acc[0]] if g.offloaded else host_acc[0]
                dst = mean if into == "acc" else slow
                kernel = _KERNELS.get(g.device.type) if path == "kernel" else None
                if source == "acc":
                    src = mean
                elif getattr(kernel, "forms_master", False):
                    src = list(fast)  # the kernel forms θ's master form itself (in one pass)
                else:
                    src = master_form(fast, slow)
                assert dst is not None and src is not None
                if kernel is not None:
                    kernel(list(dst), list(src), weight, fast, slow)
                else:
                    fn: Literal["foreach", "reference"] = "reference" if path == "reference" else "foreach"
                    interpolate_(dst, src, weight, sync=False, method=fn)
                    _copy(fast, slow, fn)
                if g.offloaded:
                    for h, d in zip(host_acc[0] if into == "acc" else host_slow, dst):
                        h.copy_(d, non_blocking=True)

    def _start_reduce(
        self, reduce: Reduce, bucket: int | None
    ) -> list[list[tuple[int, int, Callable[[], None]]]]:
        """Start ``reduce`` on the accumulator of every group, in buckets of at most ``bucket``
        elements (``None``: one per group), all before waiting for any."""
        out = []
        for g in self._groups:
            acc = g.accumulator()[0]
            n = acc.numel()
            step = n if bucket is None else max(1, int(bucket))
            out.append([(a, min(n, a + step), reduce(acc[a : min(n, a + step)])) for a in range(0, n, step)])
        return out

    @torch.no_grad()
    def interpolate(self, weight: float) -> None:
        """φ ← φ + weight·(θ − φ); then θ ← φ."""
        _check_weight(weight)
        self._lerp_then_restart("slow", "fast", weight)

    @torch.no_grad()
    def accumulate(self, count: int) -> None:
        """Fold θ into the running mean of fast weights (``count`` trajectories so far, this one
        included), then reset θ ← φ. Used by batched Reptile."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"accumulate: count must be an int >= 1, got {count!r}")
        for g in self._groups:
            if g.acc is None:
                g.acc = _zeros_like(g.slow)
                g.acc_views = g.views(g.acc)
            elif count == 1:
                g.acc.zero_()  # lerp with weight 1 from a finite start gives θ exactly
        self._lerp_then_restart("acc", "fast", 1.0 / count)

    @torch.no_grad()
    def interpolate_accumulated(
        self, weight: float, *, reduce: Reduce | None = None, bucket: int | None = None
    ) -> None:
        """φ ← φ + weight·(mean θ − φ) from :meth:`accumulate`, then θ ← φ.

        With ``reduce`` (local trajectories: :func:`metaopt._distributed.averaging`), the mean
        is first reduced over the ranks, in buckets of ``bucket`` elements (default one per
        buffer), every bucket started before any is waited for."""
        _check_weight(weight)
        pending = None if reduce is None else self._start_reduce(reduce, bucket)
        self._lerp_then_restart("slow", "acc", weight, pending)

    @torch.no_grad()
    def reduce_accumulated(self, reduce: Reduce, bucket: int | None = None) -> None:
        """Apply ``reduce`` to the accumulated mean (every bucket started before any is waited
        for), e.g. average it over the ranks before :meth:`accumulated_pseudo_gradient`."""
        for buckets in self._start_reduce(reduce, bucket):
            for _, _, finish in buckets:
                finish()

    @torch.no_grad()
    def sync_fast(self) -> None:
        """θ ← φ."""
        for g in self._groups:
            if g.offloaded:  # a host-to-device copy per tensor, no device buffer
                for f, v in zip(g.fast, g.slow_views):
                    f.copy_(v, non_blocking=True)
            else:
                _copy(g.fast, g.slow_views, "foreach")

    @torch.no_grad()
    def reset_slow(self) -> None:
        """φ ← θ (and the accumulator is dropped)."""
        for g in self._groups:
            if g.offloaded:
                for v, f in zip(g.slow_views, g.fast):
                    v.copy_(f)
            else:
                _copy(g.slow_views, g.fast, "foreach")
            g.acc, g.acc_views = None, None

    @torch.no_grad()
    def pseudo_gradient(self) -> list[Tensor]:
        """φ − θ per slow weight (θ as master weights: see the module doc), the Reptile
        'meta-gradient', as fresh tensors shaped like :attr:`slow`, where φ is."""
        self.settle()  # one multi-tensor launch per group
        return [d for g in self._groups for d in torch._foreach_sub(g.slow_views, g.master_fast())]

    @torch.no_grad()
    def accumulated_pseudo_gradient(self) -> list[Tensor]:
        """φ − mean θ per slow weight, the mean from :meth:`accumulate` (batched Reptile)."""
        self.settle()
        return [d for g in self._groups for d in torch._foreach_sub(g.slow_views, g.accumulator()[1])]

    # ----------------------------------------------------------------- state
    def state_dict(self, prefix: str = "") -> dict[str, object]:
        """φ (and the accumulator, if any) per key (those starting with ``prefix``), shaped like
        each fast tensor: independent of the layout, so a state saved on one path loads into
        any other."""
        self.settle()
        acc = {
            k: v.clone()
            for g in self._groups
            if g.acc_views is not None
            for k, v in zip(g.keys, g.acc_views)
            if k.startswith(prefix)
        }
        return {
            "slow": {
                k: v.clone()
                for g in self._groups
                for k, v in zip(g.keys, g.slow_views)
                if k.startswith(prefix)
            },
            "acc": acc or None,
        }

    def check_state_dict(self, state: Mapping[str, object]) -> None:
        """Raise ``ValueError`` if :meth:`load_state_dict` would fail on ``state``, or if it
        holds values no run can produce (non-finite slow weights): nothing moves."""
        Interpolator.check_state(dict(zip(self.keys, self.slow)), state)

    @staticmethod
    def check_state(mine: Mapping[str, Tensor], state: Mapping[str, object]) -> None:
        """:meth:`check_state_dict` against tensors ``{key: tensor}`` (their keys and shapes)."""
        if not isinstance(state, Mapping):
            raise ValueError("load_state_dict: the saved slow weights are not a mapping")
        slow, acc = state.get("slow"), state.get("acc")
        if not isinstance(slow, Mapping):
            raise ValueError(
                "load_state_dict: no per-tensor slow weights in the saved state (saved by an older metaopt?)"
            )
        unknown = sorted(set(state) - {"slow", "acc"})
        if unknown:
            raise ValueError(f"load_state_dict: unexpected fields {unknown} beside the slow weights")
        for name, saved in (("slow weights", slow), ("accumulator", acc)):
            if saved is None:
                continue
            if not isinstance(saved, Mapping) or set(saved) != set(mine):
                missing = sorted(set(mine) - set(saved)) if isinstance(saved, Mapping) else list(mine)
                extra = sorted(set(saved) - set(mine)) if isinstance(saved, Mapping) else []
                raise ValueError(
                    f"load_state_dict: saved {name} are for other tensors (missing {missing[:5]}, "
                    f"unexpected {extra[:5]}): the same trainable parameters and buffers= setting "
                    "are needed"
                )
            for k, v in mine.items():
                t = saved[k]
                if not isinstance(t, Tensor) or t.shape != v.shape or not t.is_floating_point():
                    raise ValueError(
                        f"load_state_dict: saved {name} for {k!r} have shape "
                        f"{tuple(getattr(t, 'shape', ()))}, expected {tuple(v.shape)}"
                    )
                if not bool(t.isfinite().all()):
                    raise ValueError(f"load_state_dict: saved {name} for {k!r} are not all finite")

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.check_state_dict(state)
        self.settle()
        slow = state["slow"]
        acc = state.get("acc")
        assert isinstance(slow, Mapping)
        for g in self._groups:
            for k, v in zip(g.keys, g.slow_views):
                v.copy_(slow[k])
            if acc is None:
                g.acc, g.acc_views = None, None
            else:
                assert isinstance(acc, Mapping)
                if g.acc is None:
                    g.acc = _zeros_like(g.slow)
                    g.acc_views = g.views(g.acc)
                assert g.acc_views is not None
                for k, v in zip(g.keys, g.acc_views):
                    v.copy_(acc[k])


def _check_method(method: object) -> Method:
    if method == "flat":
        raise ValueError(
            "Interpolator: method 'flat' is gone: metaopt no longer packs the model's parameters "
            "into one buffer (it broke FSDP2 and Accelerate checkpoints); use 'auto' or 'foreach'"
        )
    if method not in _METHODS:
        raise ValueError(f"Interpolator: method must be one of {_METHODS}, got {method!r}")
    return method  # type: ignore[return-value]


def _check_state_device(device: object) -> torch.device | None:
    if device is None:
        return None
    try:
        out = torch.device(device)  # type: ignore[call-overload]
    except (TypeError, RuntimeError) as err:
        raise ValueError(f"Interpolator: state_device must be None or 'cpu', got {device!r}") from err
    if out.type != "cpu":
        raise ValueError(
            f"Interpolator: state_device must be None (beside the parameters) or 'cpu' (host "
            f"memory), got {device!r}"
        )
    return out


def _zeros_like(t: Tensor) -> Tensor:
    """Zeros shaped like ``t``, pinned where ``t`` is."""
    return torch.zeros(t.shape, dtype=t.dtype, device=t.device, pin_memory=t.is_pinned())


def _onto(t: Tensor, device: torch.device) -> Tensor:
    """A copy of ``t`` on ``device`` (always a new buffer, also on ``t``'s own device), made
    without waiting where ``t`` is pinned."""
    return torch.empty(t.shape, dtype=t.dtype, device=device).copy_(t, non_blocking=True)


def _chunks(columns: list[list[Tensor]], limit: int) -> list[list[list[Tensor]]]:
    """Aligned tensor lists (index by index of one shape) cut into chunks of at most ``limit``
    elements each: consecutive tensors together, and a contiguous tensor larger than
    ``limit`` in flat slices (one that is not stays whole)."""
    out: list[list[list[Tensor]]] = []
    chunk: list[list[Tensor]] = [[] for _ in columns]
    size = 0
    for row in zip(*columns):
        n = row[0].numel()
        if size and size + n > limit:
            out.append(chunk)
            chunk, size = [[] for _ in columns], 0
        if n > limit and all(t.is_contiguous() for t in row):
            flat = [t.view(-1) for t in row]
            out += [[[f[a : a + limit]] for f in flat] for a in range(0, n, limit)]
            continue
        for c, t in zip(chunk, row):
            c.append(t)
        size += n
    if chunk[0]:
        out.append(chunk)
    return out


def _keyed(fast: Sequence[Tensor] | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(fast, Mapping):
        items = list(fast.items())
    else:
        items = [(str(i), t) for i, t in enumerate(unique_tensors(fast))]
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, t in items:
        if not isinstance(t, Tensor):
            raise TypeError(f"Interpolator: {k!r} is a {type(t).__name__}, not a tensor")
        if id(t) not in seen:
            seen.add(id(t))
            out[str(k)] = t
    return out


def _copy(dst: Sequence[Tensor], src: Sequence[Tensor], method: str) -> None:
    if method == "reference":
        for d, s in zip(dst, src):
            d.copy_(s)
    else:
        torch._foreach_copy_(list(dst), list(src))


def _check_weight(weight: float) -> None:
    if not (0.0 <= float(weight) <= 1.0):
        raise ValueError(f"interpolation weight must be in [0, 1], got {weight}")


@torch.no_grad()
def interpolate_(
    slow: Sequence[Tensor],
    fast: Sequence[Tensor],
    weight: float,
    *,
    sync: bool = True,
    method: Literal["foreach", "reference"] = "foreach",
) -> None:
    """Functional form: ``slow ← slow + weight·(fast − slow)`` tensor by tensor, then, if
    ``sync``, ``fast ← slow``. Pass flat buffers as one-element lists to get the flat path.

    Example:
        >>> import torch
        >>> phi, theta = [torch.zeros(2)], [torch.ones(2)]
        >>> interpolate_(phi, theta, 0.1)
        >>> phi[0], theta[0]
        (tensor([0.1000, 0.1000]), tensor([0.1000, 0.1000]))
    """
    _check_weight(weight)
    if len(slow) != len(fast):
        raise ValueError(f"interpolate_: {len(slow)} slow tensors but {len(fast)} fast tensors")
    for s, f in zip(slow, fast):
        if s.shape != f.shape:
            raise ValueError(f"interpolate_: shape mismatch {tuple(s.shape)} vs {tuple(f.shape)}")
    if method == "foreach":
        cast = [f.to(s.dtype) if f.dtype != s.dtype else f for s, f in zip(slow, fast)]
        torch._foreach_lerp_(list(slow), cast, weight)
        if sync:
            torch._foreach_copy_(list(fast), list(slow))
    elif method == "reference":
        for s, f in zip(slow, fast):
            s.lerp_(f.to(s.dtype), weight)
            if sync:
                f.copy_(s)
    else:
        raise ValueError(f"interpolate_: method must be 'foreach' or 'reference', got {method!r}")
