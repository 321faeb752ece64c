"""MAML on torch.func (metaopt.maml) against independent oracles, float64: second-order MAML with
SGD inner steps against ``higher`` (the test-only ``oracles`` extra); first-order MAML against a
hand-written loop; the functional Adam against ``torch.optim.Adam`` step by step; the
meta-gradient through Adam inner steps against central finite differences."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaopt import maml

mse = nn.functional.mse_loss


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).double()


def _tasks(n: int = 3, seed: int = 1):
    """Sinusoids of random amplitude and phase (the MAML paper's regression problem)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        amp, phase = 0.1 + 4.9 * torch.rand(1, generator=g), torch.pi * torch.rand(1, generator=g)
        x = (10 * torch.rand(20, 1, generator=g) - 5).double()
        y = (amp * torch.sin(x + phase)).double()
        out.append((x[:10], y[:10], x[10:], y[10:]))
    return out


def _meta_grads(model, **kw):
    model.zero_grad()
    maml.meta_loss(model, _tasks(), mse, **kw).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_second_order_sgd_maml_equals_higher():
    higher = pytest.importorskip("higher")
    model = _model()
    ours = _meta_grads(model, inner=maml.SGD(lr=0.05), steps=2)
    model.zero_grad()
    tasks = _tasks()
    for x, y, xt, yt in tasks:
        sgd = torch.optim.SGD(model.parameters(), lr=0.05)
        with higher.innerloop_ctx(model, sgd, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(mse(fmodel(x), y))
            (mse(fmodel(xt), yt) / len(tasks)).backward()
    theirs = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-12)
    assert max(float(a.abs().max()) for a in ours) > 1e-3


def test_highers_copy_initial_weights_trap():
    """With ``copy_initial_weights=True`` (higher's default) the inner loop starts from a copy,
    so no meta-gradient reaches the model: the trap metaopt.maml does not have (it always
    adapts from the given parameters)."""
    higher = pytest.importorskip("higher")
    model = _model()
    x, y, xt, yt = _tasks(1)[0]
    with higher.innerloop_ctx(
        model, torch.optim.SGD(model.parameters(), lr=0.05), copy_initial_weights=True
    ) as (fmodel, diffopt):
        diffopt.step(mse(fmodel(x), y))
        mse(fmodel(xt), yt).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert all(g.abs().sum() > 0 for g in _meta_grads(model, inner=maml.SGD(lr=0.05), steps=1))


def test_first_order_maml_is_the_gradient_at_the_adapted_parameters():
    model = _model()
    ours = _meta_grads(model, inner=maml.SGD(lr=0.05), steps=3, first_order=True)
    tasks = _tasks()
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for x, y, xt, yt in tasks:  # a plain loop: detached SGD steps, then the test gradient
        clone = _model()
        clone.load_state_dict(model.state_dict())
        for _ in range(3):
            grads = torch.autograd.grad(mse(clone(x), y), list(clone.parameters()))
            with torch.no_grad():
                for p, g in zip(clone.parameters(), grads):
                    p -= 0.05 * g
        for e, g in zip(expected, torch.autograd.grad(mse(clone(xt), yt), list(clone.parameters()))):
            e += g / len(tasks)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-13)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_functional_adam_is_torch_adam(weight_decay):
    torch.manual_seed(0)
    params = {"w": torch.randn(4, 3, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    ref = {k: v.clone().requires_grad_() for k, v in params.items()}
    torch_adam = torch.optim.Adam(
        ref.values(), lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay
    )
    ours = maml.Adam(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    state = ours.init(params)
    g = torch.Generator().manual_seed(3)
    for _ in range(7):
        grads = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
        for k, p in ref.items():
            p.grad = grads[k].clone()
        torch_adam.step()
        params, state = ours.step(params, grads, state)
    for k in params:
        torch.testing.assert_close(params[k], ref[k].detach(), rtol=0.0, atol=1e-14)


def test_meta_gradient_through_adam_matches_finite_differences():
    model = _model()
    inner = maml.Adam(lr=0.01)
    grads = _meta_grads(model, inner=inner, steps=3)
    g = torch.Generator().manual_seed(5)
    direction = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]
    analytic = sum(float((a * d).sum()) for a, d in zip(grads, direction))

    def value(shift: float) -> float:
        shifted = _model()
        with torch.no_grad():
            for p, q, d in zip(shifted.parameters(), model.parameters(), direction):
                p.copy_(q + shift * d)
        return maml.meta_loss(shifted, _tasks(), mse, inner=inner, steps=3).item()

    # central differences, Richardson-extrapolated (h and h/2: error O(h^4)); Adam's
    # normalised steps make the plain O(h^2) error about 3e-6 at h = 1e-5
    h = 1e-5
    numeric = (8 * (value(h / 2) - value(-h / 2)) - (value(h) - value(-h))) / (6 * h)
    assert abs(analytic - numeric) <= 1e-8 * max(1.0, abs(numeric)), (analytic, numeric)


def test_bad_arguments_are_refused():
    model = _model()
    params = dict(model.named_parameters())
    x, y, _, _ = _tasks(1)[0]
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        maml.adapt(model, params, lambda out: mse(out, y), x, inner=maml.SGD(0.1), steps=0)
    with pytest.raises(TypeError, match="InnerOptimizer"):
        maml.adapt(model, params, lambda out: mse(out, y), x, inner=torch.optim.SGD)
    stray = dict(params, extra=torch.zeros(2, dtype=torch.float64, requires_grad=True))
    with pytest.raises(ValueError, match="does not reach parameter"):
        maml.adapt(model, stray, lambda out: mse(out, y), x, inner=maml.SGD(0.1))
    with pytest.raises(ValueError, match="no tasks"):
        maml.meta_loss(model, [], mse, inner=maml.SGD(0.1))


def test_second_order_through_multihead_attention():
    """The fused attention kernels have no double backward (on CPU: "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"); adapt runs
    the inner forwards on the math backend, so second-order MAML works through attention and
    matches finite differences."""

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 1)

        def forward(self, x):
            return self.out(self.att(x, x, x, need_weights=False)[0]).mean(1)

    torch.manual_seed(0)
    model = Attend().double()
    g = torch.Generator().manual_seed(2)
    x, y = (
        torch.randn(4, 5, 8, generator=g, dtype=torch.float64),
        torch.randn(4, 1, generator=g, dtype=torch.float64),
    )
    tasks = [(x, y, x.flip(0), y.flip(0))]
    loss = maml.meta_loss(model, tasks, mse, inner=maml.SGD(lr=0.1), steps=2)
    loss.backward()
    w = model.att.in_proj_weight
    analytic = float(w.grad[0, 0])

    def value(shift: float) -> float:
        with torch.no_grad():
            w[0, 0] += shift
        v = maml.meta_loss(model, tasks, mse, inner=maml.SGD(lr=0.1), steps=2).item()
        with torch.no_grad():
            w[0, 0] -= shift
        return v

    h = 1e-5
    numeric = (8 * (value(h / 2) - value(-h / 2)) - (value(h) - value(-h))) / (6 * h)
    assert abs(analytic - numeric) <= 1e-7 * max(1.0, abs(numeric)), (analytic, numeric)
    assert abs(analytic) > 1e-6
