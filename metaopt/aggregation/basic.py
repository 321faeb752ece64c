"""Plain sum / mean weights and the combination step ``update = wᵀJ`` shared by all aggregators.

>>> import torch
>>> J = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
>>> aggregate(J, mean_weights(gramian(J)))
tensor([2., 0.])
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validate import check_gramian_shape, check_matrix
from .gramian import gramian  # noqa: F401  (used by the module doctest)

__all__ = ["aggregate", "mean_weights", "sum_weights"]


def sum_weights(G: Tensor) -> Tensor:
    """Weights of the plain sum of task gradients: all ones.

    :param G: (..., T, T) Gramian (only its shape, dtype and device are used).
    :returns: (..., T) tensor of ones.

    >>> sum_weights(torch.eye(3))
    tensor([1., 1., 1.])
    """
    check_gramian_shape(G, "sum_weights")
    return torch.ones(G.shape[:-1], dtype=G.dtype, device=G.device)


def mean_weights(G: Tensor) -> Tensor:
    """Weights of the mean of task gradients: all ``1 / T``.

    :param G: (..., T, T) Gramian (only its shape, dtype and device are used).
    :returns: (..., T) tensor filled with ``1 / T``.

    >>> mean_weights(torch.eye(4))
    tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """
    T = check_gramian_shape(G, "mean_weights")
    return torch.full(G.shape[:-1], 1.0 / T, dtype=G.dtype, device=G.device)


def aggregate(jacobian: Tensor, weights: Tensor, out: Tensor | None = None) -> Tensor:
    """Combine the per-task gradients: ``update = wᵀJ`` (one pass over ``J``).

    ``weights`` are cast to ``J``'s dtype first (they are T numbers). When ``out`` is given the
    update is written into it and no P-sized tensor is allocated, so an optimizer can reuse one
    buffer (a fresh multi-megabyte allocation is page-faulted in on every call on CPU).

    :param jacobian: (..., T, P) per-task gradients.
    :param weights: (..., T) weights (same leading dims as ``jacobian``).
    :param out: optional (..., P) tensor of ``jacobian``'s dtype and device to write into.
    :returns: the (..., P) update (``out`` itself when given).

    >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> buf = torch.empty(2)
    >>> aggregate(J, torch.tensor([2.0, 3.0]), out=buf) is buf
    True
    >>> buf
    tensor([2., 3.])
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
        raise ValueError(
            f"{where}: weights are on {weights.device} but jacobian on {jacobian.device}"
        )
    w = weights.to(jacobian.dtype)
    out_shape = tuple(jacobian.shape[:-2]) + (jacobian.shape[-1],)
    if out is not None:
        if tuple(out.shape) != out_shape:
            raise ValueError(f"{where}: out must have shape {out_shape}, got {tuple(out.shape)}")
        if out.dtype != jacobian.dtype or out.device != jacobian.device:
            raise ValueError(
                f"{where}: out must match the jacobian's dtype and device "
                f"({jacobian.dtype}, {jacobian.device}), got ({out.dtype}, {out.device})"
            )
    if jacobian.ndim == 2:
        if out is None:
            return torch.mv(jacobian.mT, w)
        return torch.mv(jacobian.mT, w, out=out)
    if out is None:
        return torch.matmul(w.unsqueeze(-2), jacobian).squeeze(-2)
    torch.matmul(w.unsqueeze(-2), jacobian, out=out.unsqueeze(-2))
    return out
