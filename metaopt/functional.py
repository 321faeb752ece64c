"""Functional-parameter utilities on :mod:`torch.func`.

Pure helpers over parameter dicts and flat buffers that the optimizer classes are built on, and
that work on their own for users who write functional code:

* :func:`pack_parameters` keeps a module's parameters in one contiguous buffer per
  (device, dtype), with every parameter a view into it, so that whole-model operations run as
  one pass over one tensor. A standalone helper: metaopt's optimizers never pack the model's
  parameters (re-pointing them breaks FSDP2 and checkpointing tools).
* :func:`parameters_to_vector_dict` / :func:`vector_to_parameters_dict` convert between a
  parameter dict and a flat vector.
* :func:`functional_forward` evaluates a module at given parameters
  (:func:`torch.func.functional_call`).
* :func:`clone_parameters` / :func:`detach_parameters` copy or detach a parameter dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .layout import Layout

__all__ = [
    "FlatBuffer",
    "clone_parameters",
    "detach_parameters",
    "functional_forward",
    "is_packed",
    "pack_parameters",
    "parameters_to_vector_dict",
    "unique_tensors",
    "vector_to_parameters_dict",
]


def unique_tensors(tensors: Iterable[Tensor]) -> list[Tensor]:
    """Return ``tensors`` without repeats (by identity), first occurrence first.

    Tied weights appear once in ``module.parameters()`` but can appear several times in hand-built
    parameter lists; every whole-model operation must touch them once.
    """
    seen: set[int] = set()
    out: list[Tensor] = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


@dataclass(frozen=True)
class FlatBuffer:
    """One contiguous 1-D buffer and the tensors that are views into it.

    ``params[i]`` is ``buffer.as_strided(shapes[i], strides[i], offsets[i])``. The views may
    overlap (distinct parameters that share storage keep sharing it) and may be strided (a
    transposed or channels-last parameter keeps its layout); together they cover every element
    of the buffer, so a whole-buffer operation touches each parameter element exactly once.
    """

    buffer: Tensor
    params: tuple[Tensor, ...]
    offsets: tuple[int, ...]
    shapes: tuple[torch.Size, ...]
    strides: tuple[tuple[int, ...], ...]

    def views(self, other: Tensor) -> list[Tensor]:
        """Views of ``other`` (a buffer laid out like this one) shaped like ``params``."""
        return [other.as_strided(sh, st, o) for sh, st, o in zip(self.shapes, self.strides, self.offsets)]

    def intact(self) -> bool:
        """Whether every parameter still is the view this buffer made (not re-allocated,
        reshaped or cast since)."""
        ptr = self.buffer.untyped_storage().data_ptr()
        return all(
            p.dtype == self.buffer.dtype
            and p.device == self.buffer.device
            and p.untyped_storage().data_ptr() == ptr
            and p.storage_offset() == o
            and p.shape == sh
            and p.stride() == st
            for p, o, sh, st in zip(self.params, self.offsets, self.shapes, self.strides)
        )


def _group_key(t: Tensor) -> tuple[torch.device, torch.dtype]:
    return (t.device, t.dtype)


def _extent(t: Tensor) -> int:
    """Number of storage elements from ``t``'s first element to its last, inclusive."""
    if t.numel() == 0:
        return 0
    return 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))


def _covers(spans: list[tuple[int, int]], total: int) -> bool:
    """Whether the half-open ``spans`` together cover ``[0, total)`` with no gap."""
    reach = 0
    for lo, hi in sorted(spans):
        if lo > reach:
            return False
        reach = max(reach, hi)
    return reach == total


def _flat_of(params: Sequence[Tensor], buffer: Tensor) -> FlatBuffer:
    return FlatBuffer(
        buffer=buffer,
        params=tuple(params),
        offsets=tuple(int(p.storage_offset()) for p in params),
        shapes=tuple(p.shape for p in params),
        strides=tuple(tuple(p.stride()) for p in params),
    )


def is_packed(params: Sequence[Tensor]) -> FlatBuffer | None:
    """Return the :class:`FlatBuffer` that ``params`` cover exactly, or ``None``.

    The parameters cover a buffer when they share one storage, one dtype and one device, and
    their element ranges together span that whole storage with no gap (they may overlap).
    """
    if not params:
        return None
    first = params[0]
    storage = first.untyped_storage()
    dtype, device = first.dtype, first.device
    if any(
        p.dtype != dtype or p.device != device or p.untyped_storage().data_ptr() != storage.data_ptr()
        for p in params
    ):
        return None
    if storage.nbytes() % first.element_size():
        return None
    total = storage.nbytes() // first.element_size()
    spans = [(int(p.storage_offset()), int(p.storage_offset()) + _extent(p)) for p in params]
    if not _covers(spans, total):
        return None
    buffer = torch.empty(0, dtype=dtype, device=device).set_(storage, 0, (total,), (1,))
    return _flat_of(params, buffer)


def _segments(members: Sequence[Tensor]) -> list[tuple[list[Tensor], int, int]]:
    """The storage spans ``[lo, hi)`` a new buffer must hold, with the members in each.

    Members of one source storage whose element ranges overlap form one segment and keep their
    relative offsets (tied parameters stay tied); members that do not overlap get segments of
    their own. Storage no member uses (the slot of a parameter re-allocated out of an earlier
    pack) is left out, so the new buffer is covered without gaps (:func:`is_packed`). Segments
    come in the order of their first member in ``members``.
    """
    by_storage: dict[int, list[int]] = {}
    for i, p in enumerate(members):
        by_storage.setdefault(p.untyped_storage().data_ptr(), []).append(i)
    segments: list[tuple[int, list[Tensor], int, int]] = []  # (first index, members, lo, hi)
    for indices in by_storage.values():
        spans = sorted(
            (int(members[i].storage_offset()), int(members[i].storage_offset()) + _extent(members[i]), i)
            for i in indices
        )
        current: list[int] = []
        lo = hi = 0
        for a, b, i in spans:
            if current and a < hi:
                current.append(i)
                hi = max(hi, b)
                continue
            if current:
                segments.append((min(current), [members[j] for j in current], lo, hi))
            current, lo, hi = [i], a, b
        segments.append((min(current), [members[j] for j in current], lo, hi))
    return [(ps, lo, hi) for _, ps, lo, hi in sorted(segments, key=lambda s: s[0])]


@torch.no_grad()
def pack_parameters(params: Iterable[Tensor]) -> list[FlatBuffer]:
    """Move parameters into one contiguous buffer per (device, dtype); each becomes a view.

    The parameter objects stay the same (optimizers and modules keep working); only their
    ``.data`` now lives in a shared buffer. Parameters whose elements overlap (tied, or one a
    window of another) keep their relative positions and strides, so they stay tied; a
    parameter keeps its strides (memory format). The buffer holds only elements some parameter
    uses: re-packing after one parameter was re-allocated out of an earlier pack leaves no
    hole, so the result is packed again (:func:`is_packed`). Already-packed groups are returned
    as they are. Sharing with tensors that are *not* in ``params`` (a buffer viewing a parameter)
    is not preserved. Call it *after* moving the model to its device: ``module.to()``
    re-allocates parameters.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 2)
        >>> (flat,) = pack_parameters(net.parameters())
        >>> flat.buffer.numel()
        8
        >>> net.weight.data_ptr() == flat.buffer.data_ptr()
        True
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in unique_tensors(params):
        groups.setdefault(_group_key(p), []).append(p)
    out = []
    for (device, dtype), members in groups.items():
        packed = is_packed(members)
        if packed is not None:
            out.append(packed)
            continue
        layout = []
        total = 0
        for ps, lo, hi in _segments(members):
            layout.append((ps, lo, hi, total))
            total += hi - lo
        buffer = torch.empty(total, dtype=dtype, device=device)
        for ps, lo, hi, base in layout:
            source = torch.empty(0, dtype=dtype, device=device).set_(
                ps[0].untyped_storage(), lo, (hi - lo,), (1,)
            )
            buffer[base : base + hi - lo].copy_(source)
        for ps, lo, _hi, base in layout:
            for p in ps:
                p.data = buffer.as_strided(p.shape, p.stride(), base + int(p.storage_offset()) - lo)
        out.append(_flat_of(members, buffer))
    return out


def parameters_to_vector_dict(params: Mapping[str, Tensor]) -> Tensor:
    """Concatenate a parameter dict (in its order) into one flat vector (a copy).

    Example:
        >>> import torch
        >>> parameters_to_vector_dict({"a": torch.ones(2, 2), "b": torch.zeros(1)}).shape
        torch.Size([5])
    """
    if not params:
        raise ValueError("parameters_to_vector_dict: the parameter dict is empty")
    return torch.cat([t.reshape(-1) for t in params.values()])


def vector_to_parameters_dict(vector: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Split a flat vector into a dict shaped like ``like`` (views into ``vector``).

    Example:
        >>> import torch
        >>> d = vector_to_parameters_dict(torch.arange(5.0), {"a": torch.ones(2, 2), "b": torch.zeros(1)})
        >>> d["b"]
        tensor([4.])
    """
    layout = Layout.of(like.values())
    if vector.dim() != 1 or vector.numel() != layout.numel:
        raise ValueError(
            f"vector_to_parameters_dict: expected a 1-D vector of {layout.numel} elements, "
            f"got shape {tuple(vector.shape)}"
        )
    return dict(zip(like, layout.views(vector)))


def functional_forward(module: nn.Module, params: Mapping[str, Tensor], *args: Any, **kwargs: Any) -> Any:
    """Evaluate ``module(*args, **kwargs)`` with its parameters (and buffers) taken from ``params``.

    Names missing from ``params`` fall back to the module's own tensors. A thin wrapper over
    :func:`torch.func.functional_call` that makes ``args`` optional.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1, bias=False)
        >>> functional_forward(net, {"weight": torch.ones(1, 2)}, torch.tensor([[1.0, 2.0]]))
        tensor([[3.]])
    """
    return torch.func.functional_call(module, dict(params), args, kwargs)


def clone_parameters(params: Mapping[str, Tensor], *, requires_grad: bool = False) -> dict[str, Tensor]:
    """Deep-copy a parameter dict (detached clones, optionally requiring grad)."""
    return {k: v.detach().clone().requires_grad_(requires_grad) for k, v in params.items()}


def detach_parameters(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detach every tensor of a parameter dict (no copy: storage is shared)."""
    return {k: v.detach() for k, v in params.items()}
