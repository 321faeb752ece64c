"""Reusable property checks for aggregators.

An *aggregator* here is any callable ``J (T, P) -> (update (P,), weights (T,))`` that is
deterministic for a given input (seed its generator inside the callable). Each helper states one
property from DESIGN.md section 6; a test module opts into the properties a method satisfies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Aggregator = Callable[[Tensor], tuple[Tensor, Tensor]]

EXTREME_SCALES: tuple[float, ...] = (1e-10, 1e-5, 1.0, 1e5, 1e10, 1e15)


def assert_expected_structure(agg: Aggregator, J: Tensor) -> None:
    """Update of shape (P,) and weights of shape (T,), both finite, update in J's dtype."""
    update, weights = agg(J)
    T, P = J.shape
    assert update.shape == (P,), f"update shape {tuple(update.shape)} != ({P},)"
    assert weights.shape == (T,), f"weights shape {tuple(weights.shape)} != ({T},)"
    assert update.dtype == J.dtype
    assert torch.isfinite(update).all(), f"non-finite update {update}"
    assert torch.isfinite(weights).all(), f"non-finite weights {weights}"


def assert_combines_weights(agg: Aggregator, J: Tensor) -> None:
    """The update is exactly the weighted combination of the rows it reports: ``wᵀJ``."""
    update, weights = agg(J)
    expected = weights.to(torch.float64) @ J.to(torch.float64)
    torch.testing.assert_close(update.to(torch.float64), expected, rtol=1e-5, atol=1e-6 * _scale(J))


def _scale(J: Tensor) -> float:
    return float(J.abs().max().clamp(min=torch.finfo(J.dtype).tiny))


def assert_scale_equivariant(
    agg: Aggregator, J: Tensor, scales: Sequence[float] = EXTREME_SCALES, rtol: float = 1e-9
) -> None:
    """``A(cJ) = c A(J)`` for every ``c > 0``: the weights do not change, the update scales."""
    ref_update, ref_w = agg(J)
    ref_update = ref_update.to(torch.float64)
    # cancellation (an update that is 0 in exact arithmetic) leaves rounding noise of the order
    # of the gradients themselves, so the absolute tolerance is relative to |J|, not to A(J)
    atol_u = rtol * float(J.double().abs().sum(0).max()) + 1e-300
    for c in scales:
        update, w = agg(J * c)
        torch.testing.assert_close(w.double(), ref_w.double(), rtol=rtol, atol=rtol, msg=f"c={c}")
        torch.testing.assert_close(
            update.to(torch.float64) / c, ref_update, rtol=rtol, atol=atol_u, msg=f"c={c}"
        )


def assert_no_conflict_is_plain(agg: Aggregator, J: Tensor, reduction: str = "sum") -> None:
    """When no pair conflicts (all ``G_ij >= 0``) the aggregator is the plain sum (or mean)."""
    G = J.double() @ J.double().T
    assert (G >= 0).all(), "test input must be conflict-free"
    T = J.shape[0]
    update, w = agg(J)
    expected_w = torch.full((T,), 1.0 if reduction == "sum" else 1.0 / T, dtype=torch.float64)
    torch.testing.assert_close(w.double(), expected_w, rtol=1e-12, atol=1e-12)
    expected = J.double().sum(0) * (1.0 if reduction == "sum" else 1.0 / T)
    torch.testing.assert_close(update.double(), expected, rtol=1e-6, atol=1e-6 * _scale(J))


def assert_finite_at_extremes(
    agg: Aggregator, J: Tensor, scales: Sequence[float] = EXTREME_SCALES
) -> None:
    """Finite output for ``cJ`` with ``c`` from 1e-10 to 1e15 (J may contain zero rows)."""
    for c in scales:
        update, w = agg(J * c)
        assert torch.isfinite(update).all(), f"non-finite update at scale {c}: {update}"
        assert torch.isfinite(w).all(), f"non-finite weights at scale {c}: {w}"


def assert_non_conflicting(agg: Aggregator, J: Tensor, rtol: float = 1e-9) -> None:
    """``g_i · A(J) >= 0`` for every task ``i`` (up to rounding, relative to the norms)."""
    update, _ = agg(J)
    Jd, ud = J.double(), update.double()
    dots = Jd @ ud
    # relative to |g_i| and the size of the gradients (an exactly cancelling update is noise)
    tol = rtol * Jd.norm(dim=1) * Jd.norm(dim=1).sum()
    assert (dots >= -tol).all(), f"update conflicts with a task: dots {dots}, tol {tol}"


def assert_zero_rows_get_plain_weight(agg: Aggregator, J: Tensor, reduction: str = "sum") -> None:
    """A zero gradient is never projected on and never projected: its weight stays plain."""
    zero = (J == 0).all(dim=1)
    _, w = agg(J)
    plain = 1.0 if reduction == "sum" else 1.0 / J.shape[0]
    torch.testing.assert_close(
        w.double()[zero], torch.full((int(zero.sum()),), plain, dtype=torch.float64)
    )
