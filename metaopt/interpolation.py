"""The interpolation engine: the Reptile outer step ``φ ← φ + η(θ − φ)`` and the re-sync ``θ ← φ``.

The outer step touches every parameter: read φ, read θ, write φ, write θ. Four passes over the
parameters at memory bandwidth is the floor. Three paths are kept:

``"flat"``
    The fast weights θ (the model's parameters) tile one contiguous buffer per (device, dtype)
    (see :func:`metaopt.functional.pack_parameters`) and the slow weights φ are one buffer laid out
    the same way. The update runs as ``lerp_`` then ``copy_`` over cache-sized blocks, so the
    ``copy_`` re-reads φ from cache rather than memory: close to the four-pass floor.
``"foreach"``
    Multi-tensor ``torch._foreach_lerp_`` and ``torch._foreach_copy_`` over the parameter lists,
    for parameters that are not packed.
``"reference"``
    A plain per-tensor loop, kept as the readable reference for tests.

``"auto"`` picks a registered device kernel (see :func:`register_kernel`; the seam for a fused
CUDA kernel), else ``"flat"`` where the parameters are packed, else ``"foreach"``.

Low-precision parameters (float16, bfloat16) keep a float32 master copy of φ: the interpolation
is computed in float32 and only θ is rounded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ._distributed import Reduce
from .functional import FlatBuffer, is_packed, pack_parameters, unique_tensors
from .layout import Layout

__all__ = [
    "Interpolator",
    "Kernel",
    "Method",
    "interpolate_",
    "register_kernel",
]

Method = Literal["auto", "flat", "foreach", "reference"]
_METHODS = ("auto", "flat", "foreach", "reference")

# A device kernel computes, in one launch over flat buffers of equal length:
#   dst ← dst + w (src − dst);  then, if fast is not None, fast ← copy_from
# with ``dst``/``copy_from`` in the master dtype and ``src``/``fast`` possibly lower precision.
Kernel = Callable[[Tensor, Tensor, float, "Tensor | None", Tensor], None]
_KERNELS: dict[str, Kernel] = {}

# Elements per block on the flat path for CPU tensors: 2**18 float32 elements is 1 MiB per
# operand, so a block's φ, θ (and master cast) stay in a core's L2 between ``lerp_`` and ``copy_``
# (measured in benchmarks/interpolation.py).
DEFAULT_CPU_BLOCK = 1 << 18

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def register_kernel(device_type: str, kernel: Kernel | None) -> None:
    """Register (or with ``None`` remove) a fused flat-buffer kernel for a device type.

    ``"auto"`` uses it for packed parameters on that device. The kernel must compute exactly
    ``dst ← dst + w·(src − dst)`` then ``fast ← copy_from`` (when ``fast`` is given), and is
    checked against the reference path by the test suite's helpers. With local trajectories
    and ``bucket_elements``, it is called on slices of the flat buffers, at any offset.
    """
    if kernel is None:
        _KERNELS.pop(device_type, None)
    else:
        _KERNELS[device_type] = kernel


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the slow copy kept for parameters of ``dtype``: float32 for half types."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _blocked(
    dst: Tensor, src: Tensor, weight: float, fast: Tensor | None, copy_from: Tensor, block: int | None
) -> None:
    n = dst.numel()
    step = n if block is None or block <= 0 else block
    cast = src.dtype != dst.dtype
    for start in range(0, n, step):
        end = min(n, start + step)
        s = src[start:end]
        dst[start:end].lerp_(s.to(dst.dtype) if cast else s, weight)
        if fast is not None:
            fast[start:end].copy_(copy_from[start:end])


@dataclass
class _Group:
    """Fast tensors of one (device, dtype) and their slow counterpart in one flat buffer.

    The slow buffer is laid out like the packed fast buffer when the fast tensors are packed
    (views at the same offsets and strides, sharing included), else as their concatenation.
    """

    keys: list[str]
    fast: list[Tensor]
    dtype: torch.dtype  # of the fast tensors when laid out
    packed: FlatBuffer | None
    slow: Tensor  # flat, master dtype
    slow_views: list[Tensor]
    acc: Tensor | None = None  # flat accumulator (batched Reptile), allocated on demand
    acc_views: list[Tensor] | None = None

    def views(self, flat: Tensor) -> list[Tensor]:
        """Tensors shaped like ``fast`` into a flat buffer laid out like ``slow``."""
        return self.packed.views(flat) if self.packed is not None else _split(flat, self.fast)

    def accumulator(self) -> tuple[Tensor, list[Tensor]]:
        if self.acc is None or self.acc_views is None:
            raise RuntimeError("Interpolator: nothing was accumulated")
        return self.acc, self.acc_views

    def __getstate__(self) -> dict[str, object]:
        # pickle writes every tensor with its own storage, so views would come back as copies
        # of the buffers they view: keep the buffers and rebuild the views from them
        state = dict(self.__dict__)
        state["slow_views"] = state["acc_views"] = None
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.slow_views = self.views(self.slow)
        self.acc_views = None if self.acc is None else self.views(self.acc)

    def fast_flat(self) -> Tensor | None:
        if self.packed is not None and self.packed.intact():
            return self.packed.buffer
        return None

    def signature(self) -> tuple[object, ...]:
        """Everything that decides where each element of φ lives in the slow buffer."""
        if self.packed is not None:
            places = list(zip(self.packed.offsets, self.packed.shapes, self.packed.strides))
        else:
            layout = Layout.of(self.fast)
            places = list(zip(layout.offsets, layout.shapes, layout.strides))
        return (tuple(self.keys), tuple(places), self.slow.numel(), self.slow.dtype, self.slow.device)


class Interpolator:
    """Slow weights φ for a set of fast tensors θ, and the fused outer-step operations on them.

    Every operation that moves φ (or the accumulator) ends with the re-sync ``θ ← φ``, on every
    path: the path only decides how the buffers are traversed, never which buffer is written.

    Args:
        fast: the fast weights (the model's parameters, and optionally its floating-point
            buffers), as a sequence (keys ``"0"``, ``"1"``, ...) or a mapping ``{key: tensor}``.
            Repeats are dropped. Keys identify each tensor's φ across :meth:`refresh` and in
            :meth:`state_dict`.
        method: ``"auto"`` (default), ``"flat"``, ``"foreach"`` or ``"reference"`` (module doc).
        block_size: elements per block on the flat path; default 262,144 on CPU, unblocked on
            other devices (where a device kernel or two full passes are faster).
        pack: keep the fast tensors packed (:func:`metaopt.functional.pack_parameters`): pack them
            now, and again in :meth:`refresh` when they were re-allocated since (a deepcopy, a
            ``.data`` assignment, a cast), so the flat path stays available.

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
        block_size: int | None = None,
        pack: bool = False,
    ) -> None:
        if method not in _METHODS:
            raise ValueError(f"Interpolator: method must be one of {_METHODS}, got {method!r}")
        self.method: Method = method
        self.block_size = block_size
        self.pack = bool(pack)
        self._groups: list[_Group] = self._layout(_keyed(fast), previous=None)

    # ----------------------------------------------------------------- layout
    def _layout(
        self, fast: dict[str, Tensor], previous: list[_Group] | None, keep_buffers: bool = False
    ) -> list[_Group]:
        """Groups for ``fast``, φ taken from ``previous`` by key (cast and moved as needed) or,
        for keys new to it, from θ. Only packing (which keeps every value) happens before the
        last check; ``previous`` is not modified."""
        if not fast:
            raise ValueError("Interpolator: no tensors given")
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
        if self.method == "flat" and not self.pack:
            if any(is_packed(list(m.values())) is None for m in by_key.values()):
                raise ValueError(
                    "Interpolator: method='flat' needs the fast tensors packed into one buffer "
                    "per (device, dtype) (metaopt.functional.pack_parameters, or pack=True)"
                )
        if self.pack:
            pack_parameters(list(fast.values()))  # values unchanged; only storage moves
        groups: list[_Group] = []
        with torch.no_grad():
            for (device, dtype), members in by_key.items():
                keys, tensors = list(members), list(members.values())
                packed = is_packed(tensors)
                size = packed.buffer.numel() if packed is not None else sum(t.numel() for t in tensors)
                slow = torch.empty(size, dtype=master_dtype(dtype), device=device)
                g = _Group(keys, tensors, dtype, packed, slow, [])
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
                        "Interpolator: the fast tensors were cast, moved, reshaped or replaced "
                        "since the slow weights were taken, and an outer optimizer holds the slow "
                        "buffers; build the optimizer after the model is final (moved, cast, loaded)"
                    )
                else:
                    for k, v, t in zip(keys, g.slow_views, tensors):
                        v.copy_(old_phi.get(k, t))
                    if any(k in old_acc for k in keys):
                        g.acc = torch.zeros_like(slow)
                        g.acc_views = g.views(g.acc)
                        for k, v, t in zip(keys, g.acc_views, tensors):
                            v.copy_(old_acc.get(k, t))
                groups.append(g)
        return groups

    def stale(self, fast: Sequence[Tensor] | Mapping[str, Tensor] | None = None) -> bool:
        """Whether :meth:`refresh` would change the layout: the fast tensors differ (by key or
        object), or were re-allocated, cast, moved or reshaped since the slow weights were laid out."""
        current = self._current() if fast is None else _keyed(fast)
        known = {k: t for g in self._groups for k, t in zip(g.keys, g.fast)}
        if list(current) != list(known) or any(current[k] is not known[k] for k in current):
            return True
        for g in self._groups:
            if g.packed is not None and not g.packed.intact():
                return True
            if any(t.dtype != g.dtype or t.device != g.slow.device for t in g.fast):
                return True
            if g.packed is None and (
                self.pack or any(t.shape != v.shape for t, v in zip(g.fast, g.slow_views))
            ):
                return True
        return False

    def refresh(
        self, fast: Sequence[Tensor] | Mapping[str, Tensor] | None = None, *, keep_buffers: bool = False
    ) -> bool:
        """Lay the slow weights out again if the fast tensors changed; returns whether it did.

        ``fast`` replaces the tensors (by key: a kept key keeps its φ, a new key takes φ from
        θ, a dropped key is forgotten); by default the current ones are re-examined. A tensor
        that was re-allocated (re-packed when ``pack``), cast or moved keeps its φ, converted;
        one whose shape changed raises ``ValueError``. With ``keep_buffers`` (an outer optimizer
        holds :attr:`slow_buffers`), a change that needs new slow buffers raises instead. Nothing
        moves before every check has passed.
        """
        if not self.stale(fast):
            return False
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
        return [v for g in self._groups for v in g.slow_views]

    @property
    def slow_buffers(self) -> list[Tensor]:
        return [g.slow for g in self._groups]

    def path(self) -> list[str]:
        """The path each (device, dtype) group takes now, in group order."""
        return [self._choose(g)[0] for g in self._groups]

    def _choose(self, g: _Group) -> tuple[str, Tensor | None]:
        flat = g.fast_flat()
        if self.method == "flat":
            if flat is None:
                raise RuntimeError(
                    "Interpolator: the packed tensors were re-allocated (module.to()? a deepcopy? "
                    "load into .data?); call refresh() first"
                )
            return "flat", flat
        if self.method == "auto":
            if flat is not None and g.slow.device.type in _KERNELS:
                return "kernel", flat
            if flat is not None:
                return "flat", flat
            return "foreach", None
        return self.method, None

    def _block(self, device: torch.device) -> int | None:
        if self.block_size is not None:
            return self.block_size
        return DEFAULT_CPU_BLOCK if device.type == "cpu" else None

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
        the fast weights (``"fast"``) or the accumulator. The re-sync always writes θ from φ.
        ``pending`` (from :meth:`_start_reduce`): per group, the accumulator's buckets still
        being reduced; on the flat paths each bucket is interpolated as soon as its reduction
        completes, while the later ones are still in flight.
        """
        for gi, g in enumerate(self._groups):
            dst_flat, dst_views = g.accumulator() if into == "acc" else (g.slow, g.slow_views)
            path, fast_flat = self._choose(g)
            buckets = pending[gi] if pending is not None else [(0, g.slow.numel(), _done)]
            if path in ("flat", "kernel"):
                assert fast_flat is not None
                src = g.accumulator()[0] if source == "acc" else fast_flat
                for a, b, finish in buckets:
                    finish()
                    if path == "kernel":
                        _KERNELS[g.slow.device.type](
                            dst_flat[a:b], src[a:b], weight, fast_flat[a:b], g.slow[a:b]
                        )
                    else:
                        _blocked(
                            dst_flat[a:b],
                            src[a:b],
                            weight,
                            fast_flat[a:b],
                            g.slow[a:b],
                            self._block(g.slow.device),
                        )
            else:  # "foreach" or "reference": the functional form, tensor by tensor
                for _, _, finish in buckets:
                    finish()
                src_views = g.accumulator()[1] if source == "acc" else g.fast
                fn: Literal["foreach", "reference"] = "reference" if path == "reference" else "foreach"
                interpolate_(dst_views, src_views, weight, sync=False, method=fn)
                _copy(g.fast, g.slow_views, fn)

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
                g.acc = torch.zeros_like(g.slow)
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
        buffer); each bucket is interpolated as soon as it arrives, overlapping the rest of the
        communication."""
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
            flat = g.fast_flat()
            if flat is not None:
                flat.copy_(g.slow)
            else:
                _copy(g.fast, g.slow_views, "foreach")

    @torch.no_grad()
    def reset_slow(self) -> None:
        """φ ← θ (and the accumulator is dropped)."""
        for g in self._groups:
            flat = g.fast_flat()
            if flat is not None:
                g.slow.copy_(flat)
            else:
                _copy(g.slow_views, g.fast, "foreach")
            g.acc, g.acc_views = None, None

    @torch.no_grad()
    def pseudo_gradient(self) -> list[Tensor]:
        """φ − θ per slow buffer (fresh tensors laid out like it), the Reptile 'meta-gradient'."""
        out = []
        for g in self._groups:
            flat = g.fast_flat()
            if flat is None:
                flat = torch.empty_like(g.slow)
                _copy(g.views(flat), g.fast, "foreach")
            out.append(g.slow - flat.to(g.slow.dtype))
        return out

    @torch.no_grad()
    def accumulated_pseudo_gradient(self) -> list[Tensor]:
        """φ − mean θ per slow buffer, the mean from :meth:`accumulate` (batched Reptile)."""
        return [g.slow - g.accumulator()[0].to(g.slow.dtype) for g in self._groups]

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, object]:
        """φ (and the accumulator, if any) per key, shaped like each fast tensor: independent
        of the layout, so a state saved with one path or packing loads into any other."""
        acc = {
            k: v.clone() for g in self._groups if g.acc_views is not None for k, v in zip(g.keys, g.acc_views)
        }
        return {
            "slow": {k: v.clone() for g in self._groups for k, v in zip(g.keys, g.slow_views)},
            "acc": acc or None,
        }

    def check_state_dict(self, state: Mapping[str, object]) -> None:
        """Raise ``ValueError`` if :meth:`load_state_dict` would fail on ``state`` (nothing moves)."""
        slow, acc = state.get("slow"), state.get("acc")
        if not isinstance(slow, Mapping):
            raise ValueError(
                "load_state_dict: no per-tensor slow weights in the saved state (saved by an older metaopt?)"
            )
        mine = {k: v for g in self._groups for k, v in zip(g.keys, g.slow_views)}
        for name, saved in (("slow weights", slow), ("accumulator", acc)):
            if saved is None:
                continue
            if not isinstance(saved, Mapping) or set(saved) != set(mine):
                missing = sorted(set(mine) - set(saved)) if isinstance(saved, Mapping) else list(mine)
                extra = sorted(set(saved) - set(mine)) if isinstance(saved, Mapping) else []
                raise ValueError(
                    f"load_state_dict: saved {name} are for other tensors (missing {missing[:5]}, "
                    f"unexpected {extra[:5]}): same parameters and buffers= setting needed"
                )
            for k, v in mine.items():
                t = saved[k]
                if not isinstance(t, Tensor) or t.shape != v.shape or not t.is_floating_point():
                    raise ValueError(
                        f"load_state_dict: saved {name} for {k!r} have shape "
                        f"{tuple(getattr(t, 'shape', ()))}, expected {tuple(v.shape)}"
                    )

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.check_state_dict(state)
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
                    g.acc = torch.zeros_like(g.slow)
                    g.acc_views = g.views(g.acc)
                assert g.acc_views is not None
                for k, v in zip(g.keys, g.acc_views):
                    v.copy_(acc[k])


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


def _split(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    return Layout.of(like).views(flat)


def _done() -> None:
    """Nothing to wait for."""


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
