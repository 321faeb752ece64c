"""Functional-parameter utilities on :mod:`torch.func`.

Pure helpers over parameter dicts and flat buffers that the optimizer classes are built on, and
that work on their own for users who write functional code:

* :func:`pack_parameters` keeps a module's parameters in one contiguous buffer per
  (device, dtype), with every parameter a view into it, so that whole-model operations (the
  Reptile interpolation) run as one pass over one tensor.
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
    """One contiguous 1-D buffer and the parameters that are views into it, in order.

    ``params[i]`` occupies ``buffer[offsets[i] : offsets[i] + params[i].numel()]``.
    """

    buffer: Tensor
    params: tuple[Tensor, ...]
    offsets: tuple[int, ...]

    def views(self, other: Tensor) -> list[Tensor]:
        """Split a buffer laid out like this one into tensors shaped like ``params``."""
        return [
            other[o : o + p.numel()].view_as(p) for p, o in zip(self.params, self.offsets)
        ]

    def intact(self) -> bool:
        """Whether every parameter still is the view this buffer made (not re-allocated since)."""
        base = self.buffer.data_ptr()
        size = self.buffer.element_size()
        return all(
            p.data_ptr() == base + o * size and p.is_contiguous() and p.device == self.buffer.device
            for p, o in zip(self.params, self.offsets)
        )


def _group_key(t: Tensor) -> tuple[torch.device, torch.dtype]:
    return (t.device, t.dtype)


def is_packed(params: Sequence[Tensor]) -> FlatBuffer | None:
    """Return the :class:`FlatBuffer` that ``params`` tile exactly, in order, or ``None``.

    The parameters tile a buffer when they are contiguous, share one storage, and sit one after
    another from its start to its end.
    """
    if not params:
        return None
    first = params[0]
    storage = first.untyped_storage()
    dtype, device = first.dtype, first.device
    offsets: list[int] = []
    expected = int(first.storage_offset())
    if expected != 0:
        return None
    for p in params:
        if (
            p.dtype != dtype
            or p.device != device
            or not p.is_contiguous()
            or p.untyped_storage().data_ptr() != storage.data_ptr()
            or p.storage_offset() != expected
        ):
            return None
        offsets.append(expected)
        expected += int(p.numel())
    if expected * first.element_size() != storage.nbytes():
        return None
    buffer = torch.empty(0, dtype=dtype, device=device).set_(storage, 0, (expected,), (1,))
    return FlatBuffer(buffer=buffer, params=tuple(params), offsets=tuple(offsets))


@torch.no_grad()
def pack_parameters(params: Iterable[Tensor]) -> list[FlatBuffer]:
    """Move parameters into one contiguous buffer per (device, dtype); each becomes a view.

    The parameter objects stay the same (optimizers and modules keep working); only their
    ``.data`` now lives in a shared buffer. Already-packed groups are returned as they are.
    Call it *after* moving the model to its device: ``module.to()`` re-allocates parameters.

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
        total = sum(p.numel() for p in members)
        buffer = torch.empty(total, dtype=dtype, device=device)
        offsets = []
        offset = 0
        for p in members:
            n = p.numel()
            view = buffer[offset : offset + n].view_as(p)
            view.copy_(p)
            p.data = view
            offsets.append(offset)
            offset += n
        out.append(FlatBuffer(buffer=buffer, params=tuple(members), offsets=tuple(offsets)))
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
    total = sum(t.numel() for t in like.values())
    if vector.dim() != 1 or vector.numel() != total:
        raise ValueError(
            f"vector_to_parameters_dict: expected a 1-D vector of {total} elements, "
            f"got shape {tuple(vector.shape)}"
        )
    out = {}
    offset = 0
    for name, t in like.items():
        out[name] = vector[offset : offset + t.numel()].view_as(t)
        offset += t.numel()
    return out


def functional_forward(
    module: nn.Module, params: Mapping[str, Tensor], *args: Any, **kwargs: Any
) -> Any:
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
