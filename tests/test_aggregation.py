"""Tests of metaopt.aggregation: Gramian statistics, sum/mean, PCGrad, GradVac.

The reference implementations (``naive_pcgrad``, ``naive_gradvac`` in tests/_reference.py)
follow the papers literally: explicit float64 vectors, one task and one visited task at a time.
The library's Gramian path must match them.
"""

from __future__ import annotations

import doctest
import importlib
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from metaopt.aggregation import (
    aggregate,
    conflict_fraction,
    cosine_from_gramian,
    gradvac,
    gradvac_weights,
    gramian,
    mean_weights,
    pcgrad,
    pcgrad_weights,
    random_order,
    sum_weights,
)

from _asserts import (  # tests/ is not a package: pytest puts it on sys.path
    assert_combines_weights,
    assert_expected_structure,
    assert_finite_at_extremes,
    assert_matches_reference,
    assert_no_conflict_is_plain,
    assert_non_conflicting,
    assert_scale_equivariant,
    assert_zero_rows_get_plain_weight,
    mixed_jacobians,
)
from _reference import naive_gradvac, naive_pcgrad

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# Inputs


def _jacobian(seed: int, T: int, P: int, zero_rows: int = 0, nonneg: bool = False) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(T, P, generator=g, dtype=F64)
    if nonneg:
        J = J.abs()
    if zero_rows:
        idx = torch.randperm(T, generator=g)[: min(zero_rows, T - 1)]  # never all rows zero
        J[idx] = 0.0
    return J


jacobians = st.builds(
    _jacobian,
    seed=st.integers(0, 2**31 - 1),
    T=st.integers(1, 6),
    P=st.integers(1, 9),
    zero_rows=st.sampled_from([0, 0, 1, 2]),
)
nonneg_jacobians = st.builds(
    _jacobian,
    seed=st.integers(0, 2**31 - 1),
    T=st.integers(1, 6),
    P=st.integers(1, 9),
    zero_rows=st.sampled_from([0, 1]),
    nonneg=st.just(True),
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Aggregators with the (J) -> (update, weights) shape used by tests/_asserts.py. Each call
# re-seeds its generator, so calls on scaled inputs visit the tasks in the same order.
def _sum(J: Tensor) -> tuple[Tensor, Tensor]:
    w = sum_weights(gramian(J))
    return aggregate(J, w), w


def _mean(J: Tensor) -> tuple[Tensor, Tensor]:
    w = mean_weights(gramian(J))
    return aggregate(J, w), w


def _pcgrad(reduction: str) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    return lambda J: pcgrad(J, generator=_gen(1), reduction=reduction)


def _gradvac(reduction: str, fresh: bool) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    def agg(J: Tensor) -> tuple[Tensor, Tensor]:
        T = J.shape[0]
        if fresh:
            targets = torch.zeros(T, T, dtype=F64)
        else:  # a later step: targets anywhere in [-1, 1], including positive ones
            targets = torch.rand(T, T, generator=_gen(7), dtype=F64) * 2 - 1
        u, w, _ = gradvac(J, targets=targets, beta=0.3, generator=_gen(2), reduction=reduction)
        return u, w

    return agg


AGGREGATORS = {
    "sum": (_sum, "sum", True),
    "mean": (_mean, "mean", True),
    "pcgrad": (_pcgrad("sum"), "sum", True),
    "pcgrad-mean": (_pcgrad("mean"), "mean", True),
    "gradvac": (_gradvac("sum", fresh=True), "sum", True),
    "gradvac-mean": (_gradvac("mean", fresh=True), "mean", True),
    "gradvac-later-step": (_gradvac("sum", fresh=False), "sum", False),
}
ALL = list(AGGREGATORS)
PLAIN_WHEN_NO_CONFLICT = [k for k, v in AGGREGATORS.items() if v[2]]


# ----------------------------------------------------------------------------------------------
# Properties shared by every aggregator


@pytest.mark.parametrize("name", ALL)
@given(J=jacobians)
def test_structure_and_combination(name: str, J: Tensor) -> None:
    agg = AGGREGATORS[name][0]
    assert_expected_structure(agg, J)
    assert_combines_weights(agg, J)
    assert_expected_structure(agg, J.float())


@pytest.mark.parametrize("name", ALL)
@given(J=jacobians)
def test_scale_equivariance(name: str, J: Tensor) -> None:
    assert_scale_equivariant(AGGREGATORS[name][0], J)


@pytest.mark.parametrize("name", PLAIN_WHEN_NO_CONFLICT)
@given(J=nonneg_jacobians)
def test_plain_sum_or_mean_without_conflict(name: str, J: Tensor) -> None:
    agg, reduction, _ = AGGREGATORS[name]
    assert_no_conflict_is_plain(agg, J, reduction)


@pytest.mark.parametrize("name", ALL)
@given(J=jacobians)
def test_finite_with_zero_rows_and_extreme_scales(name: str, J: Tensor) -> None:
    agg, reduction, _ = AGGREGATORS[name]
    assert_finite_at_extremes(agg, J)
    assert_finite_at_extremes(agg, J.float())  # float32: squares over- and underflow
    if name != "gradvac-later-step":  # positive targets may pull a zero row's weight up
        assert_zero_rows_get_plain_weight(agg, J, reduction)


def test_all_rows_zero_is_zero_update() -> None:
    J = torch.zeros(3, 5, dtype=F64)
    for name in ALL:
        update, w = AGGREGATORS[name][0](J)
        assert torch.equal(update, torch.zeros(5, dtype=F64)), name
        assert torch.isfinite(w).all(), name


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@given(seed=st.integers(0, 2**31 - 1), P=st.integers(1, 9))
def test_pcgrad_two_tasks_never_conflicts(reduction: str, seed: int, P: int) -> None:
    J = _jacobian(seed, 2, P)
    assert_non_conflicting(_pcgrad(reduction), J)
    assert_non_conflicting(_gradvac(reduction, fresh=True), J)


def test_pcgrad_two_opposite_tasks() -> None:
    J = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=F64)
    update, w = pcgrad(J, generator=_gen())
    assert torch.equal(update, torch.zeros(2, dtype=F64))
    assert torch.equal(w, torch.tensor([2.0, 2.0], dtype=F64))


# ----------------------------------------------------------------------------------------------
# Gramian path == naive loop


@settings(max_examples=150)
@given(J=jacobians, seed=st.integers(0, 2**31 - 1), reduction=st.sampled_from(["sum", "mean"]))
def test_pcgrad_matches_naive_loop(J: Tensor, seed: int, reduction: str) -> None:
    order = random_order(J.shape[0], _gen(seed))
    w = pcgrad_weights(gramian(J), order, reduction)
    torch.testing.assert_close(
        aggregate(J, w), naive_pcgrad(J, order, reduction).update, rtol=1e-9, atol=1e-9
    )


@settings(max_examples=150)
@given(
    J=jacobians,
    seed=st.integers(0, 2**31 - 1),
    beta=st.sampled_from([0.0, 0.01, 0.5, 1.0]),
    reduction=st.sampled_from(["sum", "mean"]),
)
def test_gradvac_matches_naive_loop_over_steps(J: Tensor, seed: int, beta: float, reduction: str) -> None:
    T = J.shape[0]
    g = _gen(seed)
    targets = torch.zeros(T, T, dtype=F64)
    ref_targets = targets.clone()
    for _ in range(4):  # the EMA carries over: later steps see non-zero targets
        J_step = J + 0.5 * torch.randn(J.shape, generator=g, dtype=F64) * (J != 0)
        order = random_order(T, g)
        w, targets = gradvac_weights(gramian(J_step), order, targets, beta, reduction)
        ref_update, _, _, ref_targets = naive_gradvac(J_step, order, ref_targets, beta, reduction)
        torch.testing.assert_close(aggregate(J_step, w), ref_update, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(targets, ref_targets, rtol=1e-9, atol=1e-9)


@settings(max_examples=150)
@given(J=jacobians, seed=st.integers(0, 2**31 - 1), reduction=st.sampled_from(["sum", "mean"]))
def test_gradvac_beta_zero_is_pcgrad(J: Tensor, seed: int, reduction: str) -> None:
    T = J.shape[0]
    order = random_order(T, _gen(seed))
    G = gramian(J)
    # beta = 0 keeps fresh (zero) targets at zero forever: every step is PCGrad
    targets = torch.zeros(T, T, dtype=F64)
    for _ in range(3):
        w, targets = gradvac_weights(G, order, targets, 0.0, reduction)
        assert torch.equal(targets, torch.zeros(T, T, dtype=F64))
        torch.testing.assert_close(w, pcgrad_weights(G, order, reduction), rtol=1e-12, atol=1e-12)
    u_pc, w_pc = pcgrad(J, generator=_gen(seed + 1), reduction=reduction)
    u_gv, w_gv, _ = gradvac(
        J,
        targets=torch.zeros(T, T, dtype=F64),
        beta=0.0,
        generator=_gen(seed + 1),
        reduction=reduction,
    )
    torch.testing.assert_close(u_gv, u_pc, rtol=1e-12, atol=1e-12)


def test_gradvac_correction_reaches_the_target() -> None:
    # Two tasks: row 0 gets g0' = g0 + c g1 with c = w[1] - 1; cos(g0', g1) must equal t01.
    g = _gen(3)
    for _ in range(20):
        J = torch.randn(2, 6, generator=g, dtype=F64)
        cos0 = float(cosine_from_gramian(gramian(J))[0, 1])
        t01 = min(0.95, cos0 + 0.1 + 0.5 * float(torch.rand((), generator=g, dtype=F64)))
        if t01 <= cos0:
            continue
        targets = torch.tensor([[0.0, t01], [0.0, 0.0]], dtype=F64)  # row 1 only moves w[0]
        w, _ = gradvac_weights(gramian(J), torch.tensor([[1], [0]]), targets, 0.0)
        g0 = J[0] + (w[1] - 1) * J[1]
        cos_after = g0 @ J[1] / (g0.norm() * J[1].norm())
        torch.testing.assert_close(cos_after, torch.tensor(t01, dtype=F64), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Golden values


# Tiny fixed Jacobian: g0 = (1, -2, 0, 3), g1 = (-2, 1, 1, 0), g2 = (0, 1, -3, -1); every pair
# conflicts (G01 = -4, G02 = -5, G12 = -2). Visiting order: task 0 -> 1, 2; task 1 -> 2, 0;
# task 2 -> 0, 1.
GOLDEN_J = torch.tensor([[1, -2, 0, 3], [-2, 1, 1, 0], [0, 1, -3, -1]], dtype=F64)
GOLDEN_ORDER = torch.tensor([[1, 2], [2, 0], [0, 1]])

# PCGrad, derived by hand in exact rational arithmetic (checked with fractions.Fraction):
#   row 0: g0·g1 = -4, coef 4/|g1|² = 4/6 = 2/3;  then g0'·g2 = -5 + (2/3)(-2) = -19/3,
#          coef (19/3)/11 = 19/33
#   row 1: g1·g2 = -2, coef 2/11;                  then g1'·g0 = -4 + (2/11)(-5) = -54/11,
#          coef (54/11)/14 = 27/77
#   row 2: g2·g0 = -5, coef 5/14;                  then g2'·g1 = -2 + (5/14)(-4) = -24/7,
#          coef (24/7)/6 = 4/7
#   w0 = 1 + 27/77 + 5/14 = 263/154,  w1 = 1 + 2/3 + 4/7 = 47/21,  w2 = 1 + 19/33 + 2/11 = 58/33
#   update = wᵀJ = (-1279/462, 134/231, -701/231, 1555/462)
GOLDEN_PCGRAD_W = torch.tensor([263 / 154, 47 / 21, 58 / 33], dtype=F64)
GOLDEN_PCGRAD_UPDATE = torch.tensor([-1279 / 462, 134 / 231, -701 / 231, 1555 / 462], dtype=F64)

# GradVac with beta = 0.5 and targets t01 = 0.1, t02 = -0.5, t10 = 0, t12 = 0.3, t20 = -0.2,
# t21 = 0.25, derived with the naive loop above run in 50-digit decimal arithmetic
# (decimal.Decimal.sqrt). Per pair (cosine before correction -> coefficient on g_j):
#   row 0: cos(g0, g1) = -0.436436 < 0.1 -> 0.804795902335125;
#          cos(g0', g2) = -0.589002 < -0.5 -> 0.124894744490463
#   row 1: cos(g1, g2) = -0.246183 < 0.3 -> 0.406932810687879;
#          cos(g1', g0) = -0.648053 < 0 -> 0.431047432388528
#   row 2: cos(g2, g0) = -0.402911 < -0.2 -> 0.191542526866148;
#          cos(g2', g1) = -0.364509 < 0.25 -> 0.765128689981335
# The new targets are 0.5 t + 0.5 cos for each visited pair.
GOLDEN_GV_TARGETS_IN = torch.tensor([[0.0, 0.1, -0.5], [0.0, 0.0, 0.3], [-0.2, 0.25, 0.0]], dtype=F64)
GOLDEN_GV_W = torch.tensor(
    [
        1 + 0.431047432388528 + 0.191542526866148,
        1 + 0.804795902335125 + 0.765128689981335,
        1 + 0.124894744490463 + 0.406932810687879,
    ],
    dtype=F64,
)
GOLDEN_GV_UPDATE = torch.tensor(
    [-3.517259225378243, 0.856572228985449, -2.025558073218567, 3.335942322585687], dtype=F64
)
GOLDEN_GV_TARGETS_OUT = torch.tensor(
    [
        [0.0, -0.168217890235992, -0.544501198846285],
        [-0.324026312651679, 0.0, 0.026908509020667],
        [-0.301455741006345, -0.057254408513607, 0.0],
    ],
    dtype=F64,
)


def test_golden_pcgrad() -> None:
    w = pcgrad_weights(gramian(GOLDEN_J), GOLDEN_ORDER)
    torch.testing.assert_close(w, GOLDEN_PCGRAD_W, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(aggregate(GOLDEN_J, w), GOLDEN_PCGRAD_UPDATE, rtol=1e-14, atol=1e-14)
    w_mean = pcgrad_weights(gramian(GOLDEN_J), GOLDEN_ORDER, "mean")
    torch.testing.assert_close(w_mean, GOLDEN_PCGRAD_W / 3, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(naive_pcgrad(GOLDEN_J, GOLDEN_ORDER).update, GOLDEN_PCGRAD_UPDATE)


def test_golden_gradvac() -> None:
    w, targets = gradvac_weights(gramian(GOLDEN_J), GOLDEN_ORDER, GOLDEN_GV_TARGETS_IN, 0.5)
    torch.testing.assert_close(w, GOLDEN_GV_W, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(aggregate(GOLDEN_J, w), GOLDEN_GV_UPDATE, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(targets, GOLDEN_GV_TARGETS_OUT, rtol=1e-13, atol=1e-13)
    # float32 inputs: same numbers to float32 precision
    w32, t32 = gradvac_weights(gramian(GOLDEN_J.float()), GOLDEN_ORDER, GOLDEN_GV_TARGETS_IN.float(), 0.5)
    assert w32.dtype == torch.float32 and t32.dtype == torch.float32
    torch.testing.assert_close(w32.double(), GOLDEN_GV_W, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# EMA targets


def test_gradvac_ema_update_exactly_as_specified() -> None:
    # T = 2: each row visits the other task first, with the unmodified gradient, so the
    # measured cosine is cos(g0, g1) for both ordered pairs.
    J = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 0.5, 3.0]], dtype=F64)
    cos = float((J[0] @ J[1]) / (J[0].norm() * J[1].norm()))
    targets = torch.tensor([[0.7, 0.2], [-0.4, -0.9]], dtype=F64)
    before = targets.clone()
    beta = 0.25
    _, new = gradvac_weights(gramian(J), torch.tensor([[1], [0]]), targets, beta)
    assert torch.equal(targets, before), "targets must not be modified in place"
    expected = torch.tensor(
        [[0.7, (1 - beta) * 0.2 + beta * cos], [(1 - beta) * -0.4 + beta * cos, -0.9]], dtype=F64
    )
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-15)  # diagonal untouched


def test_gradvac_compares_before_updating_the_target() -> None:
    # cos(g0, g1) = 0.6 and target 0.5: no correction even though beta = 1 moves the target
    # to 0.6 (updating first and comparing after would still not correct, so also check the
    # reverse: target 0.7 > cos corrects, and the new target is the pre-correction cosine 0.6).
    J = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=F64)
    order = torch.tensor([[1], [0]])
    w, t = gradvac_weights(gramian(J), order, torch.tensor([[0.0, 0.5], [0.0, 0.0]], dtype=F64), 1.0)
    torch.testing.assert_close(w, torch.ones(2, dtype=F64))
    torch.testing.assert_close(t[0, 1], torch.tensor(0.6, dtype=F64))
    w, t = gradvac_weights(gramian(J), order, torch.tensor([[0.0, 0.7], [0.0, 0.0]], dtype=F64), 1.0)
    assert w[1] > 1  # row 0 added a positive multiple of g1
    torch.testing.assert_close(t[0, 1], torch.tensor(0.6, dtype=F64))


def test_gradvac_zero_gradient_pairs_keep_their_targets() -> None:
    J = torch.tensor([[1.0, 2.0], [0.0, 0.0], [-1.0, 1.0]], dtype=F64)
    targets = torch.full((3, 3), 0.3, dtype=F64)
    w, new = gradvac_weights(gramian(J), random_order(3, _gen()), targets, 0.5)
    assert torch.equal(new[1], targets[1]) and torch.equal(new[:, 1], targets[:, 1])
    assert not torch.equal(new[0, 2], targets[0, 2])
    assert w[1] == 1.0


# ----------------------------------------------------------------------------------------------
# Parameter groups (leading dims)


@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 5), groups=st.integers(1, 4))
def test_gradvac_groups_equal_separate_runs(seed: int, T: int, groups: int) -> None:
    g = _gen(seed)
    Js = [
        torch.randn(T, int(torch.randint(1, 7, (), generator=g)), generator=g, dtype=F64)
        for _ in range(groups)
    ]
    G = torch.stack([gramian(J) for J in Js])  # (groups, T, T)
    targets = torch.rand(groups, T, T, generator=g, dtype=F64) * 2 - 1
    shared = random_order(T, g)
    per_group = torch.stack([random_order(T, g) for _ in range(groups)])
    for order in (shared, per_group):
        w, new = gradvac_weights(G, order, targets, 0.3)
        assert w.shape == (groups, T) and new.shape == (groups, T, T)
        for b in range(groups):
            ob = order if order.ndim == 2 else order[b]
            wb, nb = gradvac_weights(G[b], ob, targets[b], 0.3)
            torch.testing.assert_close(w[b], wb, rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(new[b], nb, rtol=1e-13, atol=1e-13)
        wp = pcgrad_weights(G, order)
        for b in range(groups):
            ob = order if order.ndim == 2 else order[b]
            torch.testing.assert_close(wp[b], pcgrad_weights(G[b], ob), rtol=1e-13, atol=1e-13)


def test_batched_jacobian_convenience() -> None:
    J = torch.randn(3, 4, 7, generator=_gen(), dtype=F64)  # 3 groups of the same width
    targets = torch.zeros(3, 4, 4, dtype=F64)
    u, w, t = gradvac(J, targets=targets, beta=0.5, generator=_gen(5))
    order = random_order(4, _gen(5))
    for b in range(3):
        ref, _, _, ref_t = naive_gradvac(J[b], order, targets[b], 0.5)
        torch.testing.assert_close(u[b], ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(t[b], ref_t, rtol=1e-12, atol=1e-12)
    u, w = pcgrad(J, generator=_gen(5))
    for b in range(3):
        torch.testing.assert_close(u[b], naive_pcgrad(J[b], order).update, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Extreme and mixed row scales: float64 Gramian, exact split combination, refused overflow


@settings(max_examples=80)
@given(J=mixed_jacobians(), seed=st.integers(0, 2**31 - 1), reduction=st.sampled_from(["sum", "mean"]))
def test_pcgrad_matches_reference_at_mixed_row_scales(J: Tensor, seed: int, reduction: str) -> None:
    order = random_order(J.shape[0], _gen(seed))
    update, w = pcgrad(J, generator=_gen(seed), reduction=reduction)
    assert_matches_reference(update, w, naive_pcgrad(J.double(), order, reduction), J)


@settings(max_examples=80)
@given(
    J=mixed_jacobians(),
    seed=st.integers(0, 2**31 - 1),
    beta=st.sampled_from([0.0, 0.01, 0.5, 1.0]),
    reduction=st.sampled_from(["sum", "mean"]),
    fresh=st.booleans(),
)
def test_gradvac_matches_reference_at_mixed_row_scales(
    J: Tensor, seed: int, beta: float, reduction: str, fresh: bool
) -> None:
    T = J.shape[0]
    targets = torch.zeros(T, T, dtype=F64)
    if not fresh:
        targets = torch.rand(T, T, generator=_gen(seed + 1), dtype=F64) * 1.8 - 0.9
    order = random_order(T, _gen(seed))
    update, w, new_targets = gradvac(J, targets=targets, beta=beta, generator=_gen(seed), reduction=reduction)
    ref = naive_gradvac(J.double(), order, targets, beta, reduction)
    assert_matches_reference(update, w, ref, J)
    torch.testing.assert_close(new_targets, ref.targets, rtol=0, atol=1e-9)


def test_pcgrad_weight_beyond_float32_range() -> None:
    # Found by fuzzing: |g_a| = 2.2e18 conflicts with |g_b| = 1.4e-21, so g_b's weight is
    # 1 + 1.5e39 (beyond float32's 3.4e38) while the update, about (-5e17, 5e17, 0), is
    # ordinary. A float32 weight of inf made the update inf / NaN.
    J = torch.tensor([[1e18, 2e18, 0.0], [-1e-21, -1e-21, 0.0]])
    order = torch.tensor([[1], [0]])
    ref = naive_pcgrad(J.double(), order)
    assert ref.weights[1] > 1e39
    for agg in (lambda J: pcgrad(J, generator=_gen()), _gradvac("sum", fresh=True)):
        update, w = agg(J)
        assert_matches_reference(update, w, ref, J)
    # the weights alone, applied to the float32 J: exact split, no inf
    w = pcgrad_weights(gramian(J, dtype=F64), order)
    assert_matches_reference(aggregate(J, w), w, ref, J)


def test_gramian_in_float64_of_float32_rows_at_any_scale() -> None:
    # float32 squares overflow above |g| = 1.8e19 and underflow (lose digits) below 1e-19
    J = torch.randn(4, 50, generator=_gen(4), dtype=F64)
    J *= torch.tensor([3e37, 1e19, 1e-25, 1e-44 / 4]).double().unsqueeze(1) / J.abs().amax(1, True)
    J32 = J.float()
    assert J32.isfinite().all() and (J32 != 0).any(1).all()
    G = gramian(J32, dtype=F64)
    assert G.dtype == F64 and G.isfinite().all()
    exact = J32.double() @ J32.double().T  # products of float32 numbers are exact in float64
    torch.testing.assert_close(G, exact, rtol=1e-14, atol=0)
    assert not gramian(J32).isfinite().all()  # the float32 Gramian overflows
    # batched and half inputs take the same chunked path
    Jb = torch.randn(2, 3, 3000, generator=_gen(5)).to(torch.bfloat16)
    torch.testing.assert_close(gramian(Jb, dtype=F64), Jb.double() @ Jb.double().mT, rtol=1e-14, atol=1e-12)
    with pytest.raises(ValueError, match="dtype"):
        gramian(J32, dtype=torch.int64)


def test_update_that_does_not_fit_float32_is_refused() -> None:
    # three equal rows, no conflict: the update is their sum, 6e38 per entry, beyond float32
    J = torch.full((3, 4), 2e38)
    targets = torch.zeros(3, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"pcgrad: the update does not fit torch.float32"):
        pcgrad(J, generator=_gen())
    with pytest.raises(ValueError, match=r"gradvac: the update does not fit torch.float32"):
        gradvac(J, targets=targets, beta=0.5, generator=_gen())
    # the same rows at 1e37 fit (bound 3 * 2e37 = 6e37 <= 2**126): computed, not refused
    small = torch.full((3, 4), 1e37)
    update, w = pcgrad(small, generator=_gen())
    assert torch.equal(update, torch.full((4,), 3e37)) and torch.equal(w, torch.ones(3, dtype=F64))


def test_split_combination_is_exact() -> None:
    # float64 weights beyond float32's range on a float32 J: every term w_k J[k, p] is formed
    # exactly, so the float32 result is the correctly rounded sum of exact terms
    g = _gen(6)
    J = (torch.randn(3, 2000, generator=g, dtype=F64) * torch.tensor([[1e-30], [1.0], [1e30]])).float()
    w = torch.tensor([3e40, -2.0, 1e-40], dtype=F64)
    exact = w @ J.double()
    got = aggregate(J, w)
    assert got.dtype == torch.float32
    tol = 4 * 4 * 2**-24 * (w.abs() @ J.double().abs())
    assert ((got.double() - exact).abs() <= tol).all()
    # weights that fit float32 give what casting them gives
    w_fit = torch.tensor([0.5, -2.0, 7.0], dtype=F64)
    torch.testing.assert_close(aggregate(J, w_fit), aggregate(J, w_fit.float()), rtol=1e-6, atol=0)
    Jb = torch.stack([J, -J])
    torch.testing.assert_close(aggregate(Jb, torch.stack([w, w])), torch.stack([got, -got]))


@pytest.mark.parametrize("nearly", [False, True])
def test_gradvac_float32_antiparallel_rows_give_the_float64_answer(nearly: bool) -> None:
    # Rows a and -1.7a (antiparallel up to float32 rounding of 1.7a; or plus a 1e-3
    # perturbation) in float32. In a float32 Gramian the cancellation left |g_0'|² at rounding
    # noise above the 1e-10 threshold: the next cosines were noise (targets off by up to
    # ±0.25 * beta) and the update off by ~1e-4 * max|J|.
    g = _gen(12)
    a = torch.randn(40, generator=g)
    b_row = torch.randn(40, generator=g)
    minus_a = -1.7 * a + (1e-3 * torch.randn(40, generator=g) if nearly else 0.0)
    J = torch.stack([a, minus_a, b_row, 0.5 * a])
    T = J.shape[0]
    cancelled = 0
    for step in range(6):
        targets = torch.rand(T, T, generator=g, dtype=F64) * 1.6 - 0.8
        order = random_order(T, _gen(step))
        ref = naive_gradvac(J.double(), order, targets, 0.5)
        update, w, new_targets = gradvac(J, targets=targets, beta=0.5, generator=_gen(step))
        for i, partner in ((0, 1), (1, 0)):
            if not nearly and order[i, 0] == partner:  # g_i' = 0 after its first correction:
                later = order[i, 1:]  # no cosine with the tasks visited after it
                assert torch.equal(new_targets[i, later], targets[i, later])
                cancelled += 1
        # at a cosine of -1, sqrt(1 - cos²) turns float64 rounding (1e-16) into 1e-8: in the
        # reference as in the library
        assert_matches_reference(update, w, ref, J, rtol=1e-7)
        # float64 rounding, amplified up to 1e6 times by the near-cancellation
        torch.testing.assert_close(new_targets, ref.targets, rtol=0, atol=1e-9)
        # the same numbers in float64
        u64, _, t64 = gradvac(J.double(), targets=targets, beta=0.5, generator=_gen(step))
        torch.testing.assert_close(new_targets, t64, rtol=0, atol=1e-9)
        torch.testing.assert_close(update.double(), u64, rtol=0, atol=1e-6 * float(J.abs().max()))
    assert nearly or cancelled > 0


def test_gradvac_weights_on_a_float32_gramian_cancel_at_float32_precision() -> None:
    # A float32 Gramian given directly: the cancellation test follows its precision, so an
    # exactly antiparallel pair is recognised and the later cosines are not noise.
    g = _gen(13)
    a, b_row = torch.randn(40, generator=g), torch.randn(40, generator=g)
    J = torch.stack([a, -1.7 * a, b_row])  # antiparallel up to the float32 rounding of 1.7a
    targets = torch.tensor([[0.0, 0.3, 0.2], [0.1, 0.0, -0.2], [0.4, 0.0, 0.0]], dtype=F64)
    order = torch.tensor([[1, 2], [0, 2], [0, 1]])
    ref = naive_gradvac(J.double(), order, targets, 0.5)
    w, new_targets = gradvac_weights(gramian(J), order, targets.float(), 0.5)
    assert new_targets.dtype == torch.float32
    # rows 0 and 1 cancel to zero on their first visit: their targets towards task 2 stay put
    assert new_targets[0, 2] == targets[0, 2].float() and new_targets[1, 2] == targets[1, 2].float()
    torch.testing.assert_close(new_targets.double(), ref.targets, rtol=0, atol=1e-6)
    # the coefficient of a cosine at -1 is only as good as sqrt(float32 rounding of G)
    torch.testing.assert_close(aggregate(J, w).double(), ref.update, rtol=0, atol=1e-3 * float(J.abs().max()))


# ----------------------------------------------------------------------------------------------
# Deterministic algorithms (torch.use_deterministic_algorithms(True))


def test_gradvac_runs_under_deterministic_algorithms(deterministic: None) -> None:
    assert torch.are_deterministic_algorithms_enabled()
    J = torch.randn(2, 4, 9, generator=_gen(21))  # two groups with their own targets
    targets = torch.rand(2, 4, 4, generator=_gen(22), dtype=F64) * 2 - 1
    order = random_order(4, _gen(23))
    update, w, new_targets = gradvac(J, targets=targets, beta=0.3, generator=_gen(23))
    for b in range(2):
        ref = naive_gradvac(J[b].double(), order, targets[b], 0.3)
        assert_matches_reference(update[b], w[b], ref, J[b])
        torch.testing.assert_close(new_targets[b], ref.targets, rtol=0, atol=1e-12)
    again = gradvac(J, targets=targets, beta=0.3, generator=_gen(23))
    assert all(torch.equal(x, y) for x, y in zip((update, w, new_targets), again))
    w2, t2 = gradvac_weights(gramian(J, dtype=F64), order, targets, 0.3)
    assert torch.equal(w2, w) and torch.equal(t2, new_targets)


# ----------------------------------------------------------------------------------------------
# Randomness: the order comes from the passed generator only


def test_order_from_generator_only() -> None:
    J = torch.randn(6, 10, generator=_gen(9), dtype=F64)
    state = torch.get_rng_state()
    u1, w1 = pcgrad(J, generator=_gen(123))
    u2, w2, _ = gradvac(J, targets=torch.zeros(6, 6, dtype=F64), beta=0.1, generator=_gen(123))
    pcgrad(J)  # generator=None: private OS-seeded generator, global RNG untouched too
    random_order(6, _gen(1))
    assert torch.equal(torch.get_rng_state(), state), "the global RNG was used"
    # same seed -> same output, whatever the global RNG does in between
    torch.manual_seed(0)
    u1b, w1b = pcgrad(J, generator=_gen(123))
    torch.manual_seed(1)
    u2b, w2b, _ = gradvac(J, targets=torch.zeros(6, 6, dtype=F64), beta=0.1, generator=_gen(123))
    assert torch.equal(u1, u1b) and torch.equal(w1, w1b)
    assert torch.equal(u2, u2b) and torch.equal(w2, w2b)
    # the generator advances: two consecutive draws differ
    g = _gen(0)
    assert not torch.equal(random_order(6, g), random_order(6, g))


@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 12))
def test_random_order_rows_are_permutations_of_the_others(seed: int, T: int) -> None:
    order = random_order(T, _gen(seed))
    assert order.shape == (T, T - 1) and order.dtype == torch.int64
    for i in range(T):
        assert sorted(order[i].tolist()) == [k for k in range(T) if k != i]


def test_random_order_is_uniform() -> None:
    g = _gen(0)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(1200):
        row = tuple(random_order(4, g)[0].tolist())
        counts[row] = counts.get(row, 0) + 1
    assert len(counts) == 6  # 3! orders of the other tasks
    assert min(counts.values()) > 140 and max(counts.values()) < 260  # expected 200 each


# ----------------------------------------------------------------------------------------------
# Gramian statistics


@given(J=jacobians)
def test_gramian_and_cosines(J: Tensor) -> None:
    G = gramian(J)
    torch.testing.assert_close(G, J @ J.T)
    assert torch.equal(G, G.T)
    C = cosine_from_gramian(G)
    norms = J.norm(dim=1)
    for i in range(J.shape[0]):
        for j in range(J.shape[0]):
            if norms[i] > 0 and norms[j] > 0:
                expected = float(J[i] @ J[j] / (norms[i] * norms[j]))
                assert abs(float(C[i, j]) - max(-1.0, min(1.0, expected))) < 1e-12
            else:
                assert C[i, j] == 0
    assert (C.diagonal() == (norms > 0).to(F64)).all()
    for c in (1e-10, 1e15):
        Cc = cosine_from_gramian(gramian(J * c))
        assert torch.isfinite(Cc).all()
        torch.testing.assert_close(Cc, C, rtol=1e-9, atol=1e-9)
    Cf = cosine_from_gramian(gramian(J.float() * 1e-10))  # float32 norms products would underflow
    torch.testing.assert_close(Cf.double(), C, rtol=1e-4, atol=1e-4)


def test_gramian_batched_half_and_errors() -> None:
    J = torch.randn(2, 3, 5, generator=_gen(), dtype=F64)
    G = gramian(J)
    assert G.shape == (2, 3, 3)
    torch.testing.assert_close(G[1], gramian(J[1]))
    Jh = J[0].to(torch.bfloat16)
    Gh = gramian(Jh)
    assert Gh.dtype == torch.float32
    torch.testing.assert_close(Gh, Jh.float() @ Jh.float().T, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        gramian(torch.ones(3))
    with pytest.raises(ValueError, match="floating"):
        gramian(torch.ones(2, 3, dtype=torch.int64))


def test_conflict_fraction() -> None:
    G = torch.tensor([[1.0, -1.0, 2.0], [-1.0, 1.0, -0.5], [2.0, -0.5, 1.0]])
    cf = conflict_fraction(G)
    assert cf.shape == () and cf.device == G.device
    torch.testing.assert_close(cf, torch.tensor(2 / 3))
    assert conflict_fraction(torch.ones(1, 1)) == 0
    batched = conflict_fraction(torch.stack([G, torch.eye(3)]))
    torch.testing.assert_close(batched, torch.tensor([2 / 3, 0.0]))


# ----------------------------------------------------------------------------------------------
# aggregate / sum / mean


def test_aggregate_writes_into_out() -> None:
    J = torch.randn(4, 1000, generator=_gen())
    w = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)  # float64 weights on a float32 J
    out = torch.empty(1000)
    ptr = out.data_ptr()
    res = aggregate(J, w, out=out)
    assert res is out and out.data_ptr() == ptr
    torch.testing.assert_close(out, w.float() @ J)
    Jb = torch.randn(2, 4, 50, generator=_gen(), dtype=F64)
    wb = torch.randn(2, 4, generator=_gen(), dtype=F64)
    outb = torch.empty(2, 50, dtype=F64)
    assert aggregate(Jb, wb, out=outb) is outb
    torch.testing.assert_close(outb, torch.einsum("bt,btp->bp", wb, Jb))
    torch.testing.assert_close(aggregate(Jb, wb), outb)
    with pytest.raises(ValueError, match="out must have shape"):
        aggregate(J, w, out=torch.empty(999))
    with pytest.raises(ValueError, match="dtype"):
        aggregate(J, w, out=torch.empty(1000, dtype=F64))
    with pytest.raises(ValueError, match="weights must have shape"):
        aggregate(J, w[:3])


def test_sum_and_mean_weights() -> None:
    G = torch.eye(3, dtype=F64)
    assert torch.equal(sum_weights(G), torch.ones(3, dtype=F64))
    assert torch.equal(mean_weights(G), torch.full((3,), 1 / 3, dtype=F64))
    assert sum_weights(torch.zeros(2, 4, 4)).shape == (2, 4)


# ----------------------------------------------------------------------------------------------
# Validation


def _G(T: int = 3) -> Tensor:
    J = torch.randn(T, 5, generator=_gen(), dtype=F64)
    return gramian(J)


BAD_CALLS = [
    (
        "pcgrad_weights G not square",
        lambda: pcgrad_weights(torch.ones(3, 4), torch.zeros(3, 2, dtype=torch.long)),
        "square",
    ),
    (
        "pcgrad_weights G 1-D",
        lambda: pcgrad_weights(torch.ones(3), torch.zeros(3, 2, dtype=torch.long)),
        "shape",
    ),
    (
        "pcgrad_weights order shape",
        lambda: pcgrad_weights(_G(), torch.zeros(3, 3, dtype=torch.long)),
        r"\(T, T-1\)",
    ),
    ("pcgrad_weights order dtype", lambda: pcgrad_weights(_G(), torch.zeros(3, 2)), "integer"),
    (
        "pcgrad_weights order repeats",
        lambda: pcgrad_weights(_G(), torch.tensor([[1, 1], [0, 2], [0, 1]])),
        "permutation",
    ),
    (
        "pcgrad_weights order has self",
        lambda: pcgrad_weights(_G(), torch.tensor([[0, 1], [0, 2], [0, 1]])),
        "permutation",
    ),
    (
        "pcgrad_weights order out of range",
        lambda: pcgrad_weights(_G(), torch.tensor([[1, 5], [0, 2], [0, 1]])),
        "permutation",
    ),
    (
        "pcgrad_weights reduction",
        lambda: pcgrad_weights(_G(), random_order(3, _gen()), "avg"),
        "reduction",
    ),
    (
        "pcgrad_weights NaN",
        lambda: pcgrad_weights(_G() * float("nan"), random_order(3, _gen())),
        "non-finite",
    ),
    (
        "pcgrad_weights inf",
        lambda: pcgrad_weights(_G() * float("inf"), random_order(3, _gen())),
        "non-finite",
    ),
    ("pcgrad reduction", lambda: pcgrad(torch.ones(2, 3), reduction="Sum"), "reduction"),
    ("pcgrad NaN jacobian", lambda: pcgrad(torch.full((2, 3), float("nan"))), "non-finite"),
    (
        "gradvac_weights beta>1",
        lambda: gradvac_weights(_G(), random_order(3, _gen()), torch.zeros(3, 3), 1.5),
        "beta",
    ),
    (
        "gradvac_weights beta<0",
        lambda: gradvac_weights(_G(), random_order(3, _gen()), torch.zeros(3, 3), -0.1),
        "beta",
    ),
    (
        "gradvac_weights beta nan",
        lambda: gradvac_weights(_G(), random_order(3, _gen()), torch.zeros(3, 3), float("nan")),
        "beta",
    ),
    (
        "gradvac_weights targets shape",
        lambda: gradvac_weights(_G(), random_order(3, _gen()), torch.zeros(2, 2), 0.5),
        "targets",
    ),
    (
        "gradvac_weights targets range",
        lambda: gradvac_weights(_G(), random_order(3, _gen()), torch.full((3, 3), 1.5, dtype=F64), 0.5),
        "targets",
    ),
    (
        "gradvac_weights targets nan",
        lambda: gradvac_weights(
            _G(), random_order(3, _gen()), torch.full((3, 3), float("nan"), dtype=F64), 0.5
        ),
        "targets",
    ),
    (
        "gradvac_weights reduction",
        lambda: gradvac_weights(_G(), random_order(3, _gen()), torch.zeros(3, 3, dtype=F64), 0.5, "max"),
        "reduction",
    ),
    (
        "gradvac targets shape",
        lambda: gradvac(torch.ones(2, 3), targets=torch.zeros(3, 3), beta=0.1),
        "targets",
    ),
    (
        "batched order mismatch",
        lambda: pcgrad_weights(torch.stack([_G(), _G()]), torch.zeros(3, 3, 2, dtype=torch.long)),
        "batched order",
    ),
    ("random_order zero tasks", lambda: random_order(0, _gen()), "num_tasks"),
    ("cosine eps", lambda: cosine_from_gramian(_G(), eps=-1.0), "eps"),
]


@pytest.mark.parametrize("call,match", [(c, m) for _, c, m in BAD_CALLS], ids=[n for n, _, _ in BAD_CALLS])
def test_invalid_inputs_raise_clear_value_errors(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_type_errors() -> None:
    with pytest.raises(TypeError, match="generator"):
        random_order(3, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="beta"):
        gradvac_weights(_G(), random_order(3, _gen()), torch.zeros(3, 3, dtype=F64), True)  # type: ignore[arg-type]


def test_single_task_and_validate_off() -> None:
    G = torch.tensor([[4.0]])
    order = torch.zeros(1, 0, dtype=torch.long)
    assert torch.equal(pcgrad_weights(G, order), torch.ones(1))
    w, t = gradvac_weights(G, order, torch.zeros(1, 1), 0.5)
    assert torch.equal(w, torch.ones(1)) and torch.equal(t, torch.zeros(1, 1))
    G3, o3 = _G(), random_order(3, _gen())
    assert torch.equal(pcgrad_weights(G3, o3, validate=False), pcgrad_weights(G3, o3))


# ----------------------------------------------------------------------------------------------
# Docstring examples run


@pytest.mark.parametrize(
    "module",
    [
        "metaopt.aggregation",
        "metaopt.aggregation.gramian",
        "metaopt.aggregation.basic",
        "metaopt.aggregation.pcgrad",
        "metaopt.aggregation.gradvac",
    ],
)
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_the_weight_loops_agree_on_both_backends():
    """The T−1 rounds run in NumPy on CPU and in torch elsewhere: forced into torch on CPU
    (the accelerator path), PCGrad's weights are bit-identical and GradVac's equal to 1e-13."""
    from metaopt.aggregation import _backend, gradvac_weights, pcgrad_weights
    from metaopt.aggregation.pcgrad import random_order

    g = torch.Generator().manual_seed(3)
    for T in (2, 5, 17):
        J = torch.randn(T, 31, generator=g, dtype=torch.float64)
        J[1] = -0.9 * J[0] + 0.01 * J[1]  # a conflicting pair
        G = J @ J.T
        order = random_order(T, torch.Generator().manual_seed(T))
        targets = torch.rand(T, T, generator=g, dtype=torch.float64) * 0.5
        numpy_w = pcgrad_weights(G, order)
        numpy_v, numpy_t = gradvac_weights(G[None], order, targets[None], 0.3, "sum")
        with _backend.torch_on_cpu():
            torch_w = pcgrad_weights(G, order)
            torch_v, torch_t = gradvac_weights(G[None], order, targets[None], 0.3, "sum")
        assert torch.equal(numpy_w, torch_w)
        torch.testing.assert_close(numpy_v, torch_v, rtol=1e-13, atol=0)
        torch.testing.assert_close(numpy_t, torch_t, rtol=1e-13, atol=1e-15)
