"""Range of the combination step ``update = wᵀJ`` when the weights do not fit J's dtype.

The weight loops run in float64 on a float64 Gramian, so a weight can be far outside float32's
range while the update it produces is an ordinary float32 vector: with ``|g_a| ≈ 1e18`` and
``|g_b| ≈ 1e-21``, PCGrad gives ``g_b`` a weight of about 1e39. Casting such a weight to float32
gives ``inf``. Instead each weight is split exactly as ``w_k = ŵ_k · s_k``, with ``s_k`` a power
of two and ``ŵ_k`` in [0.5, 1): the update is ``Σ_k ŵ_k (s_k g_k)``, and scaling a row by a power
of two changes no bit of its mantissas. Every term ``ŵ_k s_k g_kp`` is the exact product
``w_k g_kp``, so the only float32 roundings are those of an ordinary ``wᵀJ``.

Whether the update fits at all is decided *before* it is written, from T numbers:
``B = Σ_k |w_k| |g_k|`` bounds the update's Euclidean norm, hence every entry and every partial
sum of the combination. A step with ``B <= finfo.max / 4`` is computed without overflow; a step
whose true update has an entry beyond ``finfo.max`` has ``B > finfo.max`` and is refused. (In
between, rarely, a representable update is refused: ``B`` can exceed the update's largest entry.)

>>> import torch
>>> w = torch.tensor([1.3e39, 3.0], dtype=torch.float64)
>>> w_hat, scale = split_weights(w, torch.float32)  # 3 = 0.75 * 2**2; 1.3e39 = 30.56 * 2**125
>>> w_hat, scale
(tensor([30.5629,  0.7500]), tensor([4.2535e+37, 4.0000e+00]))
>>> G = torch.tensor([[1e-42, 0.0], [0.0, 4.0]], dtype=torch.float64)  # |g_0| = 1e-21, |g_1| = 2
>>> update_bound(w, G)  # 1.3e39 * 1e-21 + 3 * 2
tensor(1.3000e+18, dtype=torch.float64)
>>> update_flags(w, G, torch.float32)  # fits float32; must be applied split
tensor([True, True])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _exponent_range(dtype: torch.dtype) -> tuple[int, int]:
    """Exponents ``e`` (as ``frexp`` counts them) for which ``2**e`` and ``2**-e`` are normal
    numbers of ``dtype``, with one binade of margin at the top."""
    fi = torch.finfo(dtype)
    lo = math.frexp(fi.tiny)[1]  # 2**(lo-1) is the smallest normal number
    hi = math.frexp(fi.max)[1]  # 2**hi overflows
    return max(lo, 2 - hi), min(hi - 2, -lo)


def split_weights(weights: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``weights = ŵ · s`` elementwise, with ``ŵ`` and the power of two ``s`` both of ``dtype``.

    ``s = 2**e`` with ``e`` the binary exponent of the weight (``ŵ`` in [0.5, 1)), clamped so
    that ``s`` and ``1/s`` are normal numbers of ``dtype``; a weight beyond that range keeps the
    rest of its size in ``ŵ`` (which may then be infinite: :func:`update_flags` refuses it).
    """
    lo, hi = _exponent_range(dtype)
    e = torch.frexp(weights).exponent.clamp_(lo, hi)
    scale = torch.ldexp(torch.ones(weights.shape, dtype=dtype, device=weights.device), e)
    return torch.ldexp(weights, -e).to(dtype), scale


def update_limit(dtype: torch.dtype) -> float:
    """Largest accepted bound ``Σ_k |w_k| |g_k|`` on the update, for a Jacobian of ``dtype``."""
    return torch.finfo(dtype).max / 4


def update_bound(weights: Tensor, G: Tensor) -> Tensor:
    """``Σ_k |w_k| |g_k|`` per group (shape ``G.shape[:-2]``): a bound on ``|wᵀJ|``.

    NaN or infinite when a weight or a norm is; computed in the weights' dtype.
    """
    norms = G.diagonal(dim1=-2, dim2=-1).to(weights.dtype).clamp(min=0.0).sqrt()
    return (weights.abs() * norms).sum(-1)


def update_flags(weights: Tensor, G: Tensor, dtype: torch.dtype) -> Tensor:
    """``[fits, split]``, a (2,) bool tensor, no host sync, for the update ``wᵀJ`` of a ``dtype``
    Jacobian with Gramian ``G``.

    ``fits``: every group's :func:`update_bound` is at most :func:`update_limit` and every split
    weight ``ŵ`` is finite, so :func:`~metaopt.aggregation.aggregate` computes a finite update
    (False for NaN or infinite weights or norms). ``split``: some weight is not a normal number
    of ``dtype`` (it would overflow or become subnormal), so it must be applied split
    (:func:`split_weights`) rather than cast; always False when ``dtype`` is at least as wide as
    the weights.
    """
    fits = (update_bound(weights, G) <= update_limit(dtype)).all()
    wider = torch.finfo(weights.dtype).max > torch.finfo(dtype).max
    if not wider:
        return torch.stack([fits, torch.zeros_like(fits)])
    fi = torch.finfo(dtype)
    a = weights.abs()
    # a split weight is |w| 2^-e with e at most _exponent_range's top: finite below this
    fits = fits & (a < fi.max * 2.0 ** _exponent_range(dtype)[1]).all()
    split = ((a > fi.max / 2) | ((a < fi.tiny) & (a != 0))).any()
    return torch.stack([fits, split])
