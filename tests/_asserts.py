"""Reusable property checks for aggregators.

An *aggregator* here is any callable ``J (T, P) -> (update (P,), weights (T,))`` that is
deterministic for a given input (seed its generator inside the callable). Each helper states one
property from DESIGN.md section 6; a test module opts into the properties a method satisfies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from hypothesis import strategies as st
from torch import Tensor

from _reference import Reference

Aggregator = Callable[[Tensor], tuple[Tensor, Tensor]]

# Uniform scales of a whole Jacobian. float32 J: 1e-30 rows are normal float32 numbers whose
# squares underflow float32 (1e-60), 1e25 rows have squares that overflow it (1e50).
EXTREME_SCALES: tuple[float, ...] = (1e-30, 1e-20, 1e-10, 1e-5, 1.0, 1e5, 1e10, 1e15, 1e20, 1e25)
# Exponents of per-row scales for mixed-scale Jacobians (one row 1e25, another 1e-30, ...).
ROW_SCALE_EXPONENTS: tuple[int, int] = (-30, 25)


def mixed_jacobian(
    seed: int, exponents: list[int], extra: int = 0, zero_rows: int = 0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """T = len(exponents) Gaussian rows in P = T + extra dimensions, row k scaled by
    10**exponents[k] (then ``zero_rows`` rows, never all, set to 0). P >= T keeps the rows
    independent, so no projection hangs on the sign of a dot product that is 0 up to rounding."""
    T = len(exponents)
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(T, T + extra, generator=g, dtype=torch.float64)
    J *= torch.tensor([10.0**e for e in exponents], dtype=torch.float64).unsqueeze(1)
    if zero_rows:
        J[torch.randperm(T, generator=g)[: min(zero_rows, T - 1)]] = 0.0
    return J.to(dtype)


_exponents = st.one_of(st.sampled_from(ROW_SCALE_EXPONENTS), st.integers(*ROW_SCALE_EXPONENTS))


def mixed_jacobians(
    max_tasks: int = 6, dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64)
) -> st.SearchStrategy[Tensor]:
    """Hypothesis strategy for :func:`mixed_jacobian`: each row's scale 1e-30 .. 1e25 (the two
    ends drawn often), 2 to ``max_tasks`` rows, sometimes a zero row."""
    return st.builds(
        mixed_jacobian,
        seed=st.integers(0, 2**31 - 1),
        exponents=st.lists(_exponents, min_size=2, max_size=max_tasks),
        extra=st.integers(0, 3),
        zero_rows=st.sampled_from([0, 0, 1]),
        dtype=st.sampled_from(list(dtypes)),
    )


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


def assert_finite_at_extremes(agg: Aggregator, J: Tensor, scales: Sequence[float] = EXTREME_SCALES) -> None:
    """Finite output for ``cJ`` with ``c`` from 1e-30 to 1e25 (J may contain zero rows)."""
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
    torch.testing.assert_close(w.double()[zero], torch.full((int(zero.sum()),), plain, dtype=torch.float64))


def assert_matches_reference(
    update: Tensor, weights: Tensor, ref: Reference, J: Tensor, rtol: float = 1e-9
) -> None:
    """One aggregation of ``J`` agrees with an independent float64 reference run on the same
    numbers (``J.double()``; see tests/_reference.py), to the rounding of ``J``'s dtype.

    With ``a_k = Σ_i |C[i, k]|`` (the reference's coefficients: the size of every term
    ``C[i, k] g_k`` the update is made of), entry ``p`` of the update may differ by
    ``(rtol + 4 (T+1) u) Σ_k a_k |J[k, p]|``, ``u`` the unit roundoff of ``J``'s dtype (a float32
    ``wᵀJ`` over T rows rounds by at most ``(T+1) u Σ_k |w_k J[k, p]|``); weight ``k`` may
    differ by ``rtol a_k`` (the weights are computed in float64). Both tolerances are relative
    to the terms themselves, so they stay tight when the rows' scales differ by 1e55.
    """
    T = J.shape[0]
    assert update.dtype == J.dtype, f"update dtype {update.dtype} != {J.dtype}"
    assert torch.isfinite(update).all(), f"non-finite update {update}"
    assert torch.isfinite(weights).all(), f"non-finite weights {weights}"
    a = ref.coefficients.abs().sum(0)
    u = torch.finfo(J.dtype).eps / 2
    tol_u = (rtol + 4 * (T + 1) * u) * (a @ J.double().abs())
    err_u = (update.double() - ref.update).abs()
    assert (err_u <= tol_u).all(), (
        f"update differs from the float64 reference by {err_u} (allowed {tol_u}):\n{update}\n{ref.update}"
    )
    err_w = (weights.double() - ref.weights).abs()
    assert (err_w <= rtol * a).all(), (
        f"weights differ from the float64 reference by {err_w} (allowed {rtol * a}):\n"
        f"{weights}\n{ref.weights}"
    )
