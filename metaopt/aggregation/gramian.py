"""The Gramian G = J Jᵀ of per-task gradients, and statistics read off it.

PCGrad and GradVac need the per-task gradients only through their inner products, so the
O(T²P) work of an aggregation step is this one Gramian; every weight loop afterwards is
O(T³) on a T×T matrix.

>>> import torch
>>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
>>> gramian(J)
tensor([[ 1., -1.],
        [-1.,  2.]])
>>> conflict_fraction(gramian(J))
tensor(1.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from ._validate import check_gramian_shape, check_matrix, prod

__all__ = ["conflict_fraction", "cosine_from_gramian", "gramian"]

# Elements of J per chunk when it is upcast piecewise: bounds the extra memory (2 MiB in float64)
# and keeps the chunk in cache between its copy and its product. On a quiet 2-core VM, T = 9 and
# 40, P = 1e6: 2^18 was fastest of 2^16..2^22 (2^22: page faults and cache misses, 2x slower).
# When other processes keep the cores busy each chunk's two parallel regions can cost
# milliseconds of thread hand-off, and fewer, larger chunks would win. Yet upcasting a J of
# 2^20 elements in one piece was slower (T = 40, P = 2e4, one thread, 2026-12-07: 2.9 ms against
# 2.6 ms): the copy then runs at memory bandwidth instead of in cache.
_CHUNK_ELEMENTS = 1 << 18


Float64Kernel = tuple[Callable[[Tensor], Tensor], Callable[[Tensor], bool]]
_FLOAT64_KERNELS: dict[str, Float64Kernel | None] = {}
"""By device type: a one-pass float64 Gramian and the test of which ``J`` it takes (Triton's,
:mod:`metaopt.triton_gramian`, for CUDA, looked up at the first use), or ``None``."""


def _float64_kernel(J: Tensor) -> Callable[[Tensor], Tensor] | None:
    kind = J.device.type
    if kind not in _FLOAT64_KERNELS:
        _FLOAT64_KERNELS[kind] = None
        if kind == "cuda":
            try:
                from ..triton_gramian import gramian_float64, supports
            except ImportError:
                pass
            else:
                _FLOAT64_KERNELS[kind] = (gramian_float64, supports)
    found = _FLOAT64_KERNELS[kind]
    return found[0] if found is not None and found[1](J) else None


@functools.lru_cache(maxsize=64)
def _upper(T: int, device: torch.device) -> Tensor:
    """(T, T) bool: the pairs i < j."""
    return torch.ones(T, T, dtype=torch.bool, device=device).triu(diagonal=1)


def gramian(jacobian: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """Gramian ``G = J Jᵀ`` of a (T, P) matrix of per-task gradients, or of a batch (..., T, P).

    ``G[i, j]`` is the inner product of the gradients of tasks ``i`` and ``j``. The result is
    made exactly symmetric.

    ``dtype`` is the dtype the products are accumulated and returned in. By default it is
    ``J``'s dtype (one matrix product), except that float16/bfloat16 inputs are accumulated in
    float32 so the Gramian neither overflows nor loses the cosines to 8-bit mantissas. A wider
    ``dtype`` upcasts ``J`` chunk by chunk (a temporary of at most 2^18 elements, never a copy
    of ``J``). ``dtype=torch.float64`` on a float32 ``J`` is what the library's aggregators use:
    a product of two float32 numbers is exact in float64 and its square range is too (float32's
    largest square, 1.2e77, and smallest, 2e-90, are normal float64 numbers), so the Gramian of
    *any* finite float32 gradients is finite, does not underflow, and is accurate to float64
    rounding: exactly antiparallel float32 rows cancel to about 1e-16 of their size, not 1e-7.
    On CUDA with Triton installed, a 2-d float32 or half ``J`` of at most 32 rows takes a
    one-pass kernel instead (:mod:`metaopt.triton_gramian`): the same range, each entry within
    about 5e-7 of the product of the two rows' norms, and exactly antiparallel rows still
    cancel exactly.

    Args:
        jacobian: (..., T, P) floating tensor, row ``t`` = flattened gradient of task ``t``.
        dtype: floating dtype to accumulate in (default: see above).

    Returns:
        (..., T, T) tensor of ``dtype``.

    Example:
        >>> gramian(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        tensor([[25.,  4.],
                [ 4.,  1.]])
        >>> gramian(torch.tensor([[1e20, 0.0], [-1e-25, 1e-25]]), dtype=torch.float64)
        tensor([[ 1.0000e+40, -1.0000e-05],
                [-1.0000e-05,  2.0000e-50]], dtype=torch.float64)
        >>> J = torch.randn(3, 500_000, generator=torch.Generator().manual_seed(0))  # in 6 chunks
        >>> exact = J.double() @ J.double().T
        >>> bool(((gramian(J, dtype=torch.float64) - exact).abs() <= 1e-12 * exact.abs().max()).all())
        True
    """
    check_matrix(jacobian, "jacobian", "gramian")
    J = jacobian
    if dtype is None:
        dtype = torch.float32 if J.dtype in (torch.float16, torch.bfloat16) else J.dtype
    elif not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"gramian: dtype must be a floating torch.dtype, got {dtype!r}")
    kernel = _float64_kernel(J) if dtype == torch.float64 and J.dtype != dtype else None
    if kernel is not None:
        G = kernel(J)
    elif dtype == J.dtype:
        G = J @ J.mT
    else:
        T, P = J.shape[-2], J.shape[-1]
        lead = tuple(J.shape[:-2])
        G = J.new_zeros(lead + (T, T), dtype=dtype)
        step = max(1, _CHUNK_ELEMENTS // max(1, prod(J.shape[:-1])))
        step = -(-P // -(-P // step))  # as many chunks, of equal sizes
        buf = J.new_empty(lead + (T, min(step, P)), dtype=dtype)
        for s in range(0, P, step):
            c = J[..., s : s + step]
            b = buf[..., : c.shape[-1]]
            b.copy_(c)
            if J.ndim == 2:
                G.addmm_(b, b.mT)
            else:
                G.add_(b @ b.mT)
    # BLAS may round G[i, j] and G[j, i] differently; lerp halfway without overflowing.
    return torch.lerp(G, G.mT, 0.5)


def cosine_from_gramian(G: Tensor, eps: float = 0.0) -> Tensor:
    """Matrix of cosine similarities between the task gradients, from their Gramian.

    ``C[i, j] = G[i, j] / (|g_i| |g_j|)`` clipped to [-1, 1]. A task whose gradient norm is
    ``<= eps`` (zero rows, with the default ``eps=0``) has cosine 0 with every task, itself
    included; every other task has ``C[i, i] = 1``. Divisions are done one norm at a time so
    neither tiny (1e-10) nor huge (1e15) gradients underflow or overflow the product of norms.

    Args:
        G: (..., T, T) Gramian.
        eps: norms at or below this value count as zero (absolute, in gradient units).

    Returns:
        (..., T, T) tensor of ``G``'s dtype.

    Example:
        >>> cosine_from_gramian(torch.tensor([[4.0, -2.0, 0.0], [-2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
        tensor([[ 1., -1.,  0.],
                [-1.,  1.,  0.],
                [ 0.,  0.,  0.]])
    """
    check_gramian_shape(G, "cosine_from_gramian")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"cosine_from_gramian: eps must be a float >= 0, got {eps!r}")
    norms = G.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    nonzero = norms > eps
    safe = torch.where(nonzero, norms, 1.0)
    cos = (G / safe.unsqueeze(-1) / safe.unsqueeze(-2)).clamp_(-1.0, 1.0)
    cos = torch.where(nonzero.unsqueeze(-1) & nonzero.unsqueeze(-2), cos, 0.0)
    cos.diagonal(dim1=-2, dim2=-1).copy_(nonzero)  # 1 for a task with a gradient, else 0
    return cos


def conflict_fraction(G: Tensor) -> Tensor:
    """Fraction of unordered task pairs ``i < j`` whose gradients conflict (``G[i, j] < 0``).

    Computed on ``G``'s device without a host synchronisation. With fewer than two tasks the
    fraction is 0.

    Args:
        G: (..., T, T) Gramian.

    Returns:
        tensor of shape ``G.shape[:-2]`` (0-dim for one Gramian), ``G``'s dtype.

    Example:
        >>> conflict_fraction(torch.tensor([[1.0, -1.0, 2.0], [-1.0, 1.0, 0.0], [2.0, 0.0, 1.0]]))
        tensor(0.3333)
    """
    T = check_gramian_shape(G, "conflict_fraction")
    count = ((G < 0) & _upper(T, G.device)).sum(dim=(-2, -1)).to(G.dtype)
    pairs = T * (T - 1) // 2
    return count / pairs if pairs else count * 0
