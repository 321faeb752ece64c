"""The array library the T×T weight loops of PCGrad and GradVac run with.

Those loops are T-1 sequential rounds of a few elementwise operations on T-sized vectors: at
T = 40 each operation is well under a microsecond of arithmetic and a few microseconds of call
overhead. On CPU they run in NumPy, whose per-call overhead on such vectors is about a quarter of
torch's (0.5-1 µs against 2.5-3.5 µs per operation on the 2-core benchmark VM) and which never
hands work to a thread pool (a torch ``sqrt`` over more than 2048 elements does, and that hand-off
can cost milliseconds on a busy machine). On any other device (and on ``meta``) they run in
torch, without host synchronisation. Both run the same code, written against the few functions
below, so on CPU the two give the same numbers: bit for bit for PCGrad (IEEE products, sums and
comparisons), to the last bits for GradVac, whose square roots torch takes with MKL's vector
routine (within an ulp, not always correctly rounded as NumPy's are).

>>> import torch
>>> from metaopt.aggregation import _backend, gradvac_weights, gramian, pcgrad_weights, random_order
>>> g = torch.Generator().manual_seed(0)
>>> G = gramian(torch.randn(6, 50, generator=g, dtype=torch.float64))
>>> order, targets = random_order(6, g), torch.rand(6, 6, generator=g, dtype=torch.float64) * 2 - 1
>>> w_np, (v_np, t_np) = pcgrad_weights(G, order), gradvac_weights(G, order, targets, 0.5)
>>> with _backend.torch_on_cpu():  # the loops as any accelerator runs them
...     w_t, (v_t, t_t) = pcgrad_weights(G, order), gradvac_weights(G, order, targets, 0.5)
>>> torch.equal(w_np, w_t)
True
>>> torch.allclose(v_np, v_t, rtol=1e-13, atol=0), torch.allclose(t_np, t_t, rtol=0, atol=1e-15)
(True, True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

# Off: the torch loops run on CPU too (the path every accelerator takes); see torch_on_cpu.
NUMPY_ON_CPU = True


@contextlib.contextmanager
def torch_on_cpu() -> Iterator[None]:
    """Within this block the loops run in torch on CPU as well (for tests of the accelerator
    path)."""
    global NUMPY_ON_CPU
    saved, NUMPY_ON_CPU = NUMPY_ON_CPU, False
    try:
        yield
    finally:
        NUMPY_ON_CPU = saved


class _NumpyOps:
    """The loops' operations in NumPy (CPU tensors, shared memory both ways)."""

    name = "numpy"

    @staticmethod
    def asarray(t: Tensor) -> Any:
        return t.detach().numpy()

    @staticmethod
    def to_tensor(a: Any) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    sqrt = staticmethod(np.sqrt)
    abs = staticmethod(np.abs)
    where = staticmethod(np.where)
    take = staticmethod(np.take)
    stack = staticmethod(np.stack)

    @staticmethod
    def clamp_min(x: Any, lo: float) -> Any:
        return np.maximum(x, lo)

    @staticmethod
    def clamp_max(x: Any, hi: float) -> Any:
        return np.minimum(x, hi)

    @staticmethod
    def clamp(x: Any, lo: float, hi: float) -> Any:
        return np.minimum(np.maximum(x, lo), hi)

    @staticmethod
    def ones(n: int, like: Any) -> Any:
        return np.ones(n, dtype=like.dtype)

    @staticmethod
    def index_add(w: Any, index: Any, values: Any) -> None:
        """``w[index[k]] += values[k]`` for k in order (as torch's CPU ``index_add_``)."""
        np.add.at(w, index, values)

    @staticmethod
    def quiet() -> Any:
        # the loops replace what a division by zero, or by a clamped norm, gives (torch computes
        # it silently too)
        return np.errstate(divide="ignore", invalid="ignore", over="ignore")


class _TorchOps:
    """The loops' operations in torch (any device, no host synchronisation)."""

    name = "torch"

    @staticmethod
    def asarray(t: Tensor) -> Tensor:
        return t.detach()

    @staticmethod
    def to_tensor(a: Tensor) -> Tensor:
        return a

    sqrt = staticmethod(torch.sqrt)
    abs = staticmethod(torch.abs)
    where = staticmethod(torch.where)
    take = staticmethod(torch.take)

    @staticmethod
    def stack(xs: Sequence[Tensor]) -> Tensor:
        return torch.stack(list(xs))

    @staticmethod
    def clamp_min(x: Tensor, lo: float) -> Tensor:
        return x.clamp(min=lo)

    @staticmethod
    def clamp_max(x: Tensor, hi: float) -> Tensor:
        return x.clamp(max=hi)

    @staticmethod
    def clamp(x: Tensor, lo: float, hi: float) -> Tensor:
        return x.clamp(lo, hi)

    @staticmethod
    def ones(n: int, like: Tensor) -> Tensor:
        return torch.ones(n, dtype=like.dtype, device=like.device)

    @staticmethod
    def index_add(w: Tensor, index: Tensor, values: Tensor) -> None:
        w.index_add_(0, index, values)

    @staticmethod
    def quiet() -> Any:
        return _NoContext()


class _NoContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def backend(device: torch.device) -> Any:
    """NumPy for CPU tensors (unless :data:`NUMPY_ON_CPU` is off), torch everywhere else."""
    return _NumpyOps if device.type == "cpu" and NUMPY_ON_CPU else _TorchOps
