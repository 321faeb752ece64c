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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .functional import FlatBuffer, is_packed, unique_tensors

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
    checked against the reference path by the test suite's helpers.
    """
    if kernel is None:
        _KERNELS.pop(device_type, None)
    else:
        _KERNELS[device_type] = kernel


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the slow copy kept for parameters of ``dtype``: float32 for half types."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _blocked(dst: Tensor, src: Tensor, weight: float, fast: Tensor | None, copy_from: Tensor,
             block: int | None) -> None:
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
    """Fast tensors of one (device, dtype) and their slow counterpart in one flat buffer."""

    fast: list[Tensor]
    packed: FlatBuffer | None
    slow: Tensor                     # flat, master dtype
    slow_views: list[Tensor]
    acc: Tensor | None = None        # flat accumulator (batched Reptile), allocated on demand
    acc_views: list[Tensor] | None = None

    def accumulator(self) -> tuple[Tensor, list[Tensor]]:
        if self.acc is None or self.acc_views is None:
            raise RuntimeError("Interpolator: nothing was accumulated")
        return self.acc, self.acc_views

    def fast_flat(self) -> Tensor | None:
        if self.packed is not None and self.packed.intact():
            return self.packed.buffer
        return None


class Interpolator:
    """Slow weights φ for a list of fast tensors θ, and the fused outer-step operations on them.

    Args:
        fast: the fast weights (usually the model's parameters). Repeats are dropped.
        method: ``"auto"`` (default), ``"flat"``, ``"foreach"`` or ``"reference"`` (module doc).
        block_size: elements per block on the flat path; default 262,144 on CPU, unblocked on
            other devices (where a device kernel or two full passes are faster).

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

    def __init__(self, fast: Sequence[Tensor], *, method: Method = "auto",
                 block_size: int | None = None) -> None:
        if method not in _METHODS:
            raise ValueError(f"Interpolator: method must be one of {_METHODS}, got {method!r}")
        fast = unique_tensors(fast)
        if not fast:
            raise ValueError("Interpolator: no tensors given")
        self.method: Method = method
        self.block_size = block_size
        by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for t in fast:
            if not t.is_floating_point():
                raise ValueError(f"Interpolator: tensors must be floating point, got {t.dtype}")
            by_key.setdefault((t.device, t.dtype), []).append(t)
        self._groups: list[_Group] = []
        with torch.no_grad():
            for (device, dtype), members in by_key.items():
                total = sum(t.numel() for t in members)
                slow = torch.empty(total, dtype=master_dtype(dtype), device=device)
                views = _split(slow, members)
                for v, t in zip(views, members):
                    v.copy_(t)
                self._groups.append(_Group(members, is_packed(members), slow, views))
        if method == "flat":
            bad = [g for g in self._groups if g.packed is None]
            if bad:
                raise ValueError(
                    "Interpolator: method='flat' needs the fast tensors packed into one buffer "
                    "per (device, dtype) (metaopt.functional.pack_parameters)"
                )

    # ----------------------------------------------------------------- introspection
    @property
    def fast(self) -> list[Tensor]:
        return [t for g in self._groups for t in g.fast]

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
                    "Interpolator: the packed parameters were re-allocated (module.to()? "
                    "load into .data?); re-create the optimizer after moving the model"
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
    def _apply(self, weight: float, sync: bool, *, into_acc: bool = False,
               from_acc: bool = False) -> None:
        """dst ← dst + weight·(src − dst) per group, then θ ← φ if ``sync``; dst is φ (or the
        accumulator), src is θ (or the accumulator)."""
        for g in self._groups:
            dst_flat, dst_views = g.accumulator() if into_acc else (g.slow, g.slow_views)
            src_flat, src_list = g.accumulator() if from_acc else (None, g.fast)
            path, fast_flat = self._choose(g)
            if path in ("flat", "kernel"):
                assert fast_flat is not None
                src = fast_flat if src_flat is None else src_flat
                fast_out = fast_flat if sync else None
                if path == "kernel":
                    _KERNELS[g.slow.device.type](dst_flat, src, weight, fast_out, g.slow)
                else:
                    _blocked(dst_flat, src, weight, fast_out, g.slow, self._block(g.slow.device))
            else:  # "foreach" or "reference": the functional form, tensor by tensor
                interpolate_(dst_views, src_list, weight, sync=sync and not into_acc,
                             method="reference" if path == "reference" else "foreach")
                if sync and into_acc:   # θ restarts from φ, not from the accumulator
                    torch._foreach_copy_(g.fast, g.slow_views)

    @torch.no_grad()
    def interpolate(self, weight: float, *, sync: bool = True) -> None:
        """φ ← φ + weight·(θ − φ); then, if ``sync``, θ ← φ."""
        _check_weight(weight)
        self._apply(weight, sync)

    @torch.no_grad()
    def accumulate(self, count: int) -> None:
        """Fold θ into the running mean of fast weights (``count`` trajectories so far, this one
        included), then reset θ ← φ. Used by batched Reptile."""
        if count < 1:
            raise ValueError(f"accumulate: count must be >= 1, got {count}")
        for g in self._groups:
            if g.acc is None:
                g.acc = torch.zeros_like(g.slow)
                g.acc_views = _split(g.acc, g.fast)
            elif count == 1:
                g.acc.zero_()   # lerp with weight 1 from a finite start gives θ exactly
        self._apply(1.0 / count, True, into_acc=True)

    @torch.no_grad()
    def interpolate_accumulated(self, weight: float) -> None:
        """φ ← φ + weight·(mean θ − φ) from :meth:`accumulate`, then θ ← φ."""
        _check_weight(weight)
        self._apply(weight, True, from_acc=True)

    @torch.no_grad()
    def sync_fast(self) -> None:
        """θ ← φ."""
        for g in self._groups:
            flat = g.fast_flat()
            if flat is not None:
                flat.copy_(g.slow)
            else:
                torch._foreach_copy_(g.fast, g.slow_views)

    @torch.no_grad()
    def reset_slow(self) -> None:
        """φ ← θ."""
        for g in self._groups:
            flat = g.fast_flat()
            if flat is not None:
                g.slow.copy_(flat)
            else:
                torch._foreach_copy_(g.slow_views, g.fast)

    @torch.no_grad()
    def pseudo_gradient(self, *, accumulated: bool = False) -> list[Tensor]:
        """φ − θ per slow buffer (fresh tensors), the Reptile 'meta-gradient'; with
        ``accumulated``, φ − mean θ from :meth:`accumulate`."""
        out = []
        for g in self._groups:
            if accumulated:
                theta = g.accumulator()[0]
            else:
                packed = g.fast_flat()
                theta = torch.cat([t.reshape(-1) for t in g.fast]) if packed is None else packed
            out.append(g.slow - theta.to(g.slow.dtype))
        return out

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, object]:
        return {
            "slow": [g.slow.clone() for g in self._groups],
            "acc": [None if g.acc is None else g.acc.clone() for g in self._groups],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, object]) -> None:
        slow = state["slow"]
        acc = state.get("acc", [None] * len(self._groups))
        assert isinstance(slow, list) and isinstance(acc, list)
        if len(slow) != len(self._groups):
            raise ValueError(
                f"load_state_dict: {len(slow)} slow buffers saved, this optimizer has "
                f"{len(self._groups)} (device, dtype) groups"
            )
        for g, s, a in zip(self._groups, slow, acc):
            if s.shape != g.slow.shape:
                raise ValueError(
                    f"load_state_dict: saved slow buffer has {s.numel()} elements, "
                    f"expected {g.slow.numel()}"
                )
            g.slow.copy_(s)
            if a is None:
                g.acc, g.acc_views = None, None
            else:
                if g.acc is None:
                    g.acc = torch.empty_like(g.slow)
                    g.acc_views = _split(g.acc, g.fast)
                g.acc.copy_(a)


def _split(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, offset = [], 0
    for t in like:
        out.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out


def _check_weight(weight: float) -> None:
    if not (0.0 <= float(weight) <= 1.0):
        raise ValueError(f"interpolation weight must be in [0, 1], got {weight}")


@torch.no_grad()
def interpolate_(slow: Sequence[Tensor], fast: Sequence[Tensor], weight: float, *,
                 sync: bool = True, method: Literal["foreach", "reference"] = "foreach") -> None:
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
