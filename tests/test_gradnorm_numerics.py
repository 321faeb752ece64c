"""GradNorm at the edges of float32: finite gradients whose norm overflows float32 arithmetic,
norms that do not fit float32 at all, extreme reference losses L(0), and corrupt saved state."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import metaopt
from metaopt.parts.state_dict import record_of

TASKS = ["a", "b"]
P = 10  # entries of the shared layer W


def make(lr: float = 0.0, weight_optimizer=None):
    """GradNorm over MTL on one shared parameter W; task t's loss is ``c_t · Σ W``, so task t's
    gradient at W has every entry equal to c_t (exact in float32 for the values used here)."""
    w = torch.nn.Parameter(torch.full((P,), 1e-3))
    opt = metaopt.GradNorm(
        metaopt.MTL(torch.optim.SGD([w], lr=lr), tasks=TASKS),
        layer=[w],
        alpha=1.5,
        weight_optimizer=weight_optimizer,
    )
    return w, opt


def losses(w: torch.Tensor, ca: float, cb: float) -> dict[str, torch.Tensor]:
    return {"a": (ca * w).sum(), "b": (cb * w).sum()}


def snapshot(opt: metaopt.GradNorm):
    return (
        opt.weights.detach().clone(),
        opt.initial_losses.clone(),
        copy.deepcopy(opt.weight_optimizer.state_dict()),
    )


def assert_same(a, b) -> None:
    (wa, ia, sa), (wb, ib, sb) = a, b
    assert torch.equal(wa, wb) and wa.dtype == wb.dtype
    assert torch.equal(ia, ib) and ia.dtype == ib.dtype
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for name, v in sa["state"][k].items():
            other = sb["state"][k][name]
            assert torch.equal(v, other) if isinstance(v, torch.Tensor) else v == other


# ---------------------------------------------------------------- 1. norms in float32
def test_finite_gradients_whose_float32_sum_of_squares_overflows_take_a_step():
    """Entries of 1e30 are finite in float32 and so is their norm (√10·1e30), but the sum of
    their squares (1e61) is not: the norm was taken in float32 and the step refused as a
    "non-finite gradient". (SGD on the weights: float32 Adam squares its gradient, ±the norm,
    and would overflow its own second moment, as it does on any gradient above ~5e20.)"""
    w, opt = make(weight_optimizer=lambda p: torch.optim.SGD(p, lr=1e-31))
    report = opt.step(losses(w, 1e30, 1e29))
    expected = torch.tensor([1e30, 1e29], dtype=torch.float64) * math.sqrt(P)
    norms = report.extra["grad_norms"]
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms.double(), expected, rtol=1e-6, atol=0.0)
    weights = opt.weights.detach()
    assert bool(weights.isfinite().all()) and bool((weights > 0).all())
    assert abs(float(weights.sum()) - 2.0) < 1e-5
    assert weights[0] < weights[1]  # the task with the larger norm loses weight
    assert bool(report.extra["gradnorm_loss"].isfinite())


def test_a_norm_that_does_not_fit_float32_is_refused_as_an_overflow_and_nothing_moves():
    """Every entry (2e38) is finite, the norm (√10·2e38 ≈ 6.3e38) is not representable in
    float32, the dtype of the task weights and of their gradient: refused, and said so."""
    w, opt = make(lr=1e-4)
    opt.step(losses(w, 1.0, 2.0))  # the weight optimizer has state now
    before, w_before = snapshot(opt), w.detach().clone()
    with pytest.raises(ValueError, match=r"overflows float32") as info:
        opt.step(losses(w, 2e38, 1.0))
    assert "non-finite" not in str(info.value)
    assert "'a'" in str(info.value) and "'b'" not in str(info.value)
    assert_same(snapshot(opt), before)
    assert torch.equal(w.detach(), w_before)
    opt.zero_grad()
    opt.step(losses(w, 1.0, 2.0))  # and it goes on
    assert bool(opt.weights.isfinite().all())


def test_a_genuinely_non_finite_gradient_is_still_called_non_finite():
    w, opt = make()
    loss_b = (w - w.detach()).sqrt().sum()  # value 0, gradient +inf at every entry
    with pytest.raises(ValueError, match=r"non-finite gradient.*\['b'\]"):
        opt.step({"a": (2e38 * w).sum(), "b": loss_b})


# ---------------------------------------------------------------- training rates L / L(0)
def test_a_tiny_reference_loss_does_not_turn_the_weights_into_nan():
    """L(0) = 1e-30 (the task's first positive loss) and later L = 1e10: the ratio 1e40
    overflowed float32, r became inf/inf = NaN and so did the weights."""
    w, opt = make()
    opt.step(losses(w, 1e-30 / (P * 1e-3), 1.0))
    assert float(opt.initial_losses[0]) == pytest.approx(1e-30, rel=1e-5)
    report = opt.step(losses(w, 1e10 / (P * 1e-3), 1.0))
    weights = opt.weights.detach()
    assert bool(weights.isfinite().all()), weights
    assert abs(float(weights.sum()) - 2.0) < 1e-5
    assert bool(report.extra["gradnorm_loss"].isfinite())


# ---------------------------------------------------------------- 2. loading saved state
def trained():
    w, opt = make(lr=0.1)
    for ca, cb in ((1.0, 3.0), (0.5, 2.0), (0.25, 1.5)):
        opt.step(losses(w, ca, cb))
    return w, opt


def corrupt(field, value):
    def apply(state):
        record_of(state)[field] = value
        return state

    return apply


BAD_STATES = {
    "weights_nan": (corrupt("weights", torch.tensor([float("nan"), 1.0])), "weights"),
    "weights_inf": (corrupt("weights", torch.tensor([float("inf"), 1.0])), "weights"),
    "weights_zero": (corrupt("weights", torch.tensor([0.0, 2.0])), "weights"),
    "weights_negative": (corrupt("weights", torch.tensor([-1.0, 3.0])), "weights"),
    "weights_sum_not_T": (corrupt("weights", torch.tensor([1.0, 2.0])), r"weights.*sum"),
    "weights_sum_not_T_small": (corrupt("weights", torch.tensor([0.5, 0.5])), r"weights.*sum"),
    "weights_overflow_float32": (
        corrupt("weights", torch.tensor([1e300, 1.0], dtype=torch.float64)),
        "weights",
    ),
    "weights_shape": (corrupt("weights", torch.ones(3)), "weights"),
    "weights_int": (corrupt("weights", torch.ones(2, dtype=torch.int64)), "weights"),
    "weights_list": (corrupt("weights", [1.0, 1.0]), "weights"),
    "initial_nan": (corrupt("initial_losses", torch.tensor([float("nan"), 1.0])), "initial_losses"),
    "initial_inf": (corrupt("initial_losses", torch.tensor([float("inf"), 1.0])), "initial_losses"),
    "initial_negative": (corrupt("initial_losses", torch.tensor([-1.0, 1.0])), "initial_losses"),
    "initial_shape": (corrupt("initial_losses", torch.ones(2, 1)), "initial_losses"),
    "initial_bool": (corrupt("initial_losses", torch.ones(2, dtype=torch.bool)), "initial_losses"),
    "weight_optimizer_missing": (corrupt("weight_optimizer", None), "weight optimizer"),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_a_corrupt_saved_state_is_refused_and_changes_nothing(case):
    edit, match = BAD_STATES[case]
    _, opt = trained()
    state = edit(copy.deepcopy(opt.state_dict()))
    before = snapshot(opt)
    inner_before = copy.deepcopy(opt.inner.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    assert_same(snapshot(opt), before)
    after_inner = opt.inner.state_dict()
    assert record_of(after_inner)["step"] == record_of(inner_before)["step"]


@pytest.mark.parametrize("first_loss", [1e30, 1e-40, 3e38])
def test_any_reference_loss_gradnorm_can_record_round_trips_and_trains_on(first_loss):
    """L(0) is a task's first positive loss: any finite float32 value can be one (1e30, a
    subnormal 1e-40, 3e38), so a state_dict holding it must load, and the rates it gives must
    keep the weights finite. Refusing it would make load_state_dict refuse state_dict()."""
    w, opt = make()
    opt.step({"a": (w - w.detach()).sum() + first_loss, "b": (2.0 * w).sum()})
    assert float(opt.initial_losses[0]) == pytest.approx(first_loss, rel=1e-5, abs=2e-45)
    saved = copy.deepcopy(opt.state_dict())
    w2, twin = make()
    twin.load_state_dict(saved)
    assert torch.equal(twin.initial_losses, opt.initial_losses)
    for ca in (1.0, 1e-30, 1e15):
        for o, v in ((opt, w), (twin, w2)):
            report = o.step(losses(v, ca, 2.0))
            assert bool(report.extra["gradnorm_loss"].isfinite()), (ca, report.extra)
    assert torch.equal(opt.weights, twin.weights)
    weights = opt.weights.detach()
    assert bool(weights.isfinite().all()) and abs(float(weights.sum()) - 2.0) < 1e-5


def test_weights_renormalised_by_a_step_load_and_near_T_within_rounding_loads():
    _, opt = trained()
    state = copy.deepcopy(opt.state_dict())
    record_of(state)["weights"] = torch.tensor([0.7, 1.3 + 2e-6])  # sum off by rounding only
    _, fresh = make(lr=0.1)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.weights.detach(), record_of(state)["weights"])
    record_of(state)["weights"] = torch.tensor([0.7, 1.3], dtype=torch.float64)  # cast to float32
    fresh.load_state_dict(state)
    assert fresh.weights.dtype == torch.float32
