"""Plain sum / mean weights and the combination step ``update = wᵀJ`` shared by all aggregators.

>>> import torch
>>> J = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
>>> aggregate(J, mean_weights(gramian(J)))
tensor([2., 0.])
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._scaling import split_weights
from ._validate import check_gramian_shape, check_matrix, prod
from .gramian import gramian  # noqa: F401  (used by the module doctest)

__all__ = ["aggregate", "mean_weights", "sum_weights"]

# Elements of J per chunk when wider weights are applied split (bounds the temporary).
_CHUNK_ELEMENTS = 1 << 18


def sum_weights(G: Tensor) -> Tensor:
    """Weights of the plain sum of task gradients: all ones.

    Args:
        G: (..., T, T) Gramian (only its shape, dtype and device are used).

    Returns:
        (..., T) tensor of ones.

    Example:
        >>> sum_weights(torch.eye(3))
        tensor([1., 1., 1.])
    """
    check_gramian_shape(G, "sum_weights")
    return torch.ones(G.shape[:-1], dtype=G.dtype, device=G.device)


def mean_weights(G: Tensor) -> Tensor:
    """Weights of the mean of task gradients: all ``1 / T``.

    Args:
        G: (..., T, T) Gramian (only its shape, dtype and device are used).

    Returns:
        (..., T) tensor filled with ``1 / T``.

    Example:
        >>> mean_weights(torch.eye(4))
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """
    T = check_gramian_shape(G, "mean_weights")
    return torch.full(G.shape[:-1], 1.0 / T, dtype=G.dtype, device=G.device)


def aggregate(jacobian: Tensor, weights: Tensor, out: Tensor | None = None) -> Tensor:
    """Combine the per-task gradients: ``update = wᵀJ`` (one pass over ``J``).

    Weights of ``J``'s dtype or a narrower one are cast to it. Weights of a *wider* dtype (the
    float64 weights of :func:`~metaopt.aggregation.pcgrad` on a float32 ``J``) keep their range:
    each is split exactly as ``w_k = ŵ_k 2^e_k`` and the update is ``Σ_k ŵ_k (2^e_k g_k)``, so a
    weight of 1e39 on a gradient of norm 1e-21 contributes its 1e18 instead of ``inf`` (see
    :mod:`metaopt.aggregation._scaling`). The scaled rows are formed chunk by chunk, in a
    temporary of at most 2^18 elements. Cast the weights to ``J``'s dtype first to skip that when
    they are known to fit.

    When ``out`` is given the update is written into it and no P-sized tensor is allocated, so an
    optimizer can reuse one buffer (a fresh multi-megabyte allocation is page-faulted in on every
    call on CPU).

    Args:
        jacobian: (..., T, P) per-task gradients.
        weights: (..., T) weights (same leading dims as ``jacobian``).
        out: optional (..., P) tensor of ``jacobian``'s dtype and device to write into.

    Returns:
        the (..., P) update (``out`` itself when given).

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> buf = torch.empty(2)
        >>> aggregate(J, torch.tensor([2.0, 3.0]), out=buf) is buf
        True
        >>> buf
        tensor([2., 3.])
        >>> aggregate(torch.tensor([[1e-21, 0.0], [0.0, 2.0]]),
        ...           torch.tensor([1.3e39, 1.0], dtype=torch.float64))
        tensor([1.3000e+18, 2.0000e+00])
    """
    where = "aggregate"
    check_matrix(jacobian, "jacobian", where)
    if not isinstance(weights, Tensor):
        raise TypeError(f"{where}: weights must be a torch.Tensor, got {type(weights).__name__}")
    if tuple(weights.shape) != tuple(jacobian.shape[:-1]):
        raise ValueError(
            f"{where}: weights must have shape {tuple(jacobian.shape[:-1])} (one per task row of "
            f"the jacobian), got {tuple(weights.shape)}"
        )
    if weights.device != jacobian.device:
        raise ValueError(f"{where}: weights are on {weights.device} but jacobian on {jacobian.device}")
    out_shape = tuple(jacobian.shape[:-2]) + (jacobian.shape[-1],)
    if out is not None:
        if tuple(out.shape) != out_shape:
            raise ValueError(f"{where}: out must have shape {out_shape}, got {tuple(out.shape)}")
        if out.dtype != jacobian.dtype or out.device != jacobian.device:
            raise ValueError(
                f"{where}: out must match the jacobian's dtype and device "
                f"({jacobian.dtype}, {jacobian.device}), got ({out.dtype}, {out.device})"
            )
    if weights.is_floating_point() and (torch.finfo(weights.dtype).max > torch.finfo(jacobian.dtype).max):
        if out is None:
            out = jacobian.new_empty(out_shape)
        _combine_split(jacobian, weights, out)
        return out
    w = weights.to(jacobian.dtype)
    if jacobian.ndim == 2:
        if out is None:
            return torch.mv(jacobian.mT, w)
        return torch.mv(jacobian.mT, w, out=out)
    if out is None:
        return torch.matmul(w.unsqueeze(-2), jacobian).squeeze(-2)
    torch.matmul(w.unsqueeze(-2), jacobian, out=out.unsqueeze(-2))
    return out


def _combine_split(jacobian: Tensor, weights: Tensor, out: Tensor) -> None:
    """``out = Σ_k ŵ_k (s_k g_k)`` with ``w = ŵ s`` split exactly (``s`` powers of two)."""
    w_hat, scale = split_weights(weights, jacobian.dtype)
    lead, P = tuple(jacobian.shape[:-1]), jacobian.shape[-1]
    step = max(1, _CHUNK_ELEMENTS // max(1, prod(lead)))
    buf = jacobian.new_empty(lead + (min(step, P),))
    col_scale = scale.unsqueeze(-1)
    for s in range(0, P, step):
        chunk = jacobian[..., s : s + step]
        scaled = torch.mul(chunk, col_scale, out=buf[..., : chunk.shape[-1]])
        if jacobian.ndim == 2:
            torch.mv(scaled.mT, w_hat, out=out[s : s + step])
        else:
            out[..., s : s + step] = torch.matmul(w_hat.unsqueeze(-2), scaled).squeeze(-2)
