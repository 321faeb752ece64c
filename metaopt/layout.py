"""Where each tensor of a list lives in their concatenation: the one parameter layout.

The flattened rows of the per-task Jacobian, a parameter dict as one vector, and the slow
weights of unpacked parameters all lay tensors end to end in order. :class:`Layout` is that
arrangement, computed once: the offsets, the column slices and the views back into a flat
buffer. (Parameters packed with :func:`metaopt.functional.pack_parameters` keep their own
storage's arrangement, sharing included: :class:`metaopt.functional.FlatBuffer`.)

>>> import torch
>>> layout = Layout.of([torch.zeros(2, 3), torch.zeros(4)])
>>> layout.slices
[slice(0, 6, None), slice(6, 10, None)]
>>> [v.shape for v in layout.views(torch.arange(10.0))]
[torch.Size([2, 3]), torch.Size([4])]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Layout"]


@dataclass(frozen=True)
class Layout:
    """Shapes and offsets of tensors laid end to end (each contiguous, in order)."""

    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    numel: int

    @classmethod
    def of(cls, tensors: Iterable[Tensor]) -> Layout:
        shapes, offsets, start = [], [], 0
        for t in tensors:
            shapes.append(t.shape)
            offsets.append(start)
            start += t.numel()
        return cls(tuple(shapes), tuple(offsets), start)

    @property
    def slices(self) -> list[slice]:
        """Each tensor's range in the concatenation (the Jacobian's columns)."""
        return [slice(o, o + _size(s)) for o, s in zip(self.offsets, self.shapes)]

    @property
    def strides(self) -> tuple[tuple[int, ...], ...]:
        """Each view's strides (contiguous)."""
        return tuple(_contiguous_strides(s) for s in self.shapes)

    def views(self, flat: Tensor) -> list[Tensor]:
        """Views of a flat buffer of ``numel`` elements, shaped like the tensors."""
        return [flat[sl].view(s) for sl, s in zip(self.slices, self.shapes)]


def _size(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= max(n, 1)
    return tuple(reversed(out))
