"""Independent float64 references for PCGrad and GradVac: the papers' loops written out.

Explicit float64 vectors, one task and one visited task at a time, nothing shared with the
library's Gramian path. Besides the update they keep the coefficient matrix ``C`` (row ``i``:
``g_i' = Σ_k C[i, k] g_k``, bookkeeping of the same loop), so tests can compare the weights
``w = Σ_i C[i, :]`` and bound rounding errors by ``Σ_i |C[i, k]|``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

F64 = torch.float64


class Reference(NamedTuple):
    update: Tensor  # (P,) float64
    weights: Tensor  # (T,) float64: w = Σ_i C[i, :] (divided by T for "mean")
    coefficients: Tensor  # (T, T) float64 C (divided by T for "mean")
    targets: Tensor | None = None  # GradVac's new EMA targets


def naive_pcgrad(J: Tensor, order: Tensor, reduction: str = "sum") -> Reference:
    """Yu et al. 2020, Algorithm 1: project g_i' on the normal plane of each conflicting g_j."""
    J = J.to(F64)
    T = J.shape[0]
    rows, coefs = [], []
    for i in range(T):
        g = J[i].clone()
        c = torch.zeros(T, dtype=F64)
        c[i] = 1.0
        for j in order[i].tolist():
            gj = J[j]
            d = g @ gj
            if d < 0 and gj @ gj > 0:
                k = d / (gj @ gj)
                g = g - k * gj
                c[j] -= k
        rows.append(g)
        coefs.append(c)
    return _finish(torch.stack(rows), torch.stack(coefs), reduction)


def naive_gradvac(
    J: Tensor, order: Tensor, targets: Tensor, beta: float, reduction: str = "sum"
) -> Reference:
    """Wang et al. 2021: compare with the EMA target first, correct, then update the EMA."""
    J = J.to(F64)
    T = J.shape[0]
    t = targets.to(F64).clone()
    rows, coefs = [], []
    for i in range(T):
        g = J[i].clone()
        c = torch.zeros(T, dtype=F64)
        c[i] = 1.0
        for j in order[i].tolist():
            gj = J[j]
            ni, nj = g.norm(), gj.norm()
            if ni == 0 or nj == 0:  # no cosine: no correction, target unchanged
                continue
            cos = ((g @ gj) / (ni * nj)).clamp(-1, 1)
            tij = t[i, j].clone()
            if cos < tij:
                sin_t = (1 - tij**2).clamp(min=0).sqrt().clamp(min=1e-8)
                k = ni * (tij * (1 - cos**2).sqrt() - cos * sin_t) / (nj * sin_t)
                terms = ni**2 + 2 * (k * (g @ gj)).abs() + k**2 * nj**2
                g = g + k * gj
                c[j] += k
                if g @ g <= 1e-10 * terms:  # cancelled to rounding noise: the zero vector
                    g = torch.zeros_like(g)  # (C keeps the noise-sized combination)
            t[i, j] = (1 - beta) * tij + beta * cos
        rows.append(g)
        coefs.append(c)
    return _finish(torch.stack(rows), torch.stack(coefs), reduction)._replace(targets=t)


def _finish(rows: Tensor, coefs: Tensor, reduction: str) -> Reference:
    div = rows.shape[0] if reduction == "mean" else 1
    return Reference(update=rows.sum(0) / div, weights=coefs.sum(0) / div, coefficients=coefs / div)
