"""MAML on torch.func (metaopt.maml) against independent oracles, float64: second-order MAML with
SGD inner steps against ``higher`` (the test-only ``oracles`` extra); first-order MAML against a
hand-written loop; the functional Adam against ``torch.optim.Adam`` step by step; the
meta-gradient through Adam inner steps against central finite differences, and, where inner
gradients are exactly zero, against ``higher``; BatchNorm's buffers left bit-identical."""

from __future__ import annotations

import copy

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


def _relu_model_and_tasks(seed: int = 0):
    """A ReLU MLP whose hidden unit 0 is dead on every input (bias -50, |x| <= 1), with input
    feature 2 all zero on the train splits: those parameters' inner gradients are exactly 0."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)).double()
    with torch.no_grad():
        model[0].bias[0] = -50.0
    g = torch.Generator().manual_seed(seed + 1)
    tasks = []
    for _ in range(2):
        x = 2 * torch.rand(20, 3, generator=g, dtype=torch.float64) - 1
        y = torch.randn(20, 1, generator=g, dtype=torch.float64)
        x_train = x[:10].clone()
        x_train[:, 2] = 0.0
        tasks.append((x_train, y[:10], x[10:], y[10:]))
    return model, tasks


@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_adam_with_exactly_zero_inner_gradients_equals_higher(steps):
    """Where an inner gradient entry is exactly 0 (a dead ReLU unit, an all-zero input feature)
    the second moment is 0, and the derivative of its square root is infinite: 0 · inf gave NaN
    meta-gradients. higher masks the gradient there; ours must be finite and equal. higher's
    Adam adds eps to sqrt(v) instead of sqrt(v̂), so it runs with eps · sqrt(1 − β2^t) at step t,
    which is torch.optim.Adam's formula exactly."""
    higher = pytest.importorskip("higher")
    lr, betas, eps = 0.01, (0.9, 0.999), 1e-8
    model, tasks = _relu_model_and_tasks()
    loss = maml.meta_loss(model, tasks, mse, inner=maml.Adam(lr=lr, betas=betas, eps=eps), steps=steps)
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    nonfinite = {k: int((~p.grad.isfinite()).sum()) for k, p in model.named_parameters()}
    assert not any(nonfinite.values()), f"non-finite meta-gradient entries: {nonfinite}"
    model.zero_grad()
    for x, y, xt, yt in tasks:
        adam = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps)
        with higher.innerloop_ctx(model, adam, copy_initial_weights=False) as (fmodel, diffopt):
            for t in range(1, steps + 1):
                diffopt.step(mse(fmodel(x), y), override={"eps": [eps * (1 - betas[1] ** t) ** 0.5]})
            (mse(fmodel(xt), yt) / len(tasks)).backward()
    theirs = [p.grad.clone() for p in model.parameters()]
    assert all(bool(b.isfinite().all()) for b in theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-12)
    # feature 2's weights into the live units get no inner update but reach the test loss
    live = torch.cat([x for task in tasks for x in (task[0], task[2])]).matmul(model[0].weight.T)
    live = (live + model[0].bias > 0).any(0)
    assert not live[0] and live.sum() >= 4
    assert float(ours[0][live, 2].abs().min()) > 1e-6
    assert max(float(a.abs().max()) for a in ours) > 1e-3


def test_functional_adam_is_torch_adam_with_zero_gradient_entries():
    """The NaN fix changes no value: with exact zeros in the gradients (a whole row of them for
    every step) the update is still torch.optim.Adam's, bit for bit up to 1e-14."""
    torch.manual_seed(0)
    params = {"w": torch.randn(4, 3, dtype=torch.float64)}
    ref = {k: v.clone().requires_grad_() for k, v in params.items()}
    torch_adam = torch.optim.Adam(ref.values(), lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    ours = maml.Adam(lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    state = ours.init(params)
    g = torch.Generator().manual_seed(3)
    for step in range(5):
        grad = torch.randn(4, 3, generator=g, dtype=torch.float64)
        grad[0] = 0.0
        grad[1, step % 3] = 0.0
        ref["w"].grad = grad.clone()
        torch_adam.step()
        params, state = ours.step(params, {"w": grad}, state)
    torch.testing.assert_close(params["w"], ref["w"].detach(), rtol=0.0, atol=1e-14)


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_loss_and_adapt_leave_batchnorm_buffers_untouched(first_order):
    """The model is never modified: BatchNorm in train mode normalises with the batch statistics,
    as usual, but its running statistics and num_batches_tracked stay bit-identical, as do the
    parameters; the meta-loss still reaches every parameter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()
    with torch.no_grad():  # running statistics away from their (0, 1) start
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    model.train()
    reference = copy.deepcopy(model)  # a plain loop on a copy, whose buffers may change
    before = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    tasks = _tasks()
    loss = maml.meta_loss(model, tasks, mse, inner=maml.SGD(lr=0.05), steps=2, first_order=first_order)
    x, y, _, _ = tasks[0]
    maml.adapt(model, dict(model.named_parameters()), lambda out: mse(out, y), x, inner=maml.SGD(lr=0.05))
    loss.backward()
    after = model.state_dict(keep_vars=True)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"meta_loss/adapt modified {changed}"
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())

    expected = 0.0
    for x, y, xt, yt in tasks:  # train mode: each forward normalises with its batch's statistics
        params = dict(reference.named_parameters())
        for _ in range(2):
            out = torch.func.functional_call(reference, params, (x,))
            grads = torch.autograd.grad(mse(out, y), list(params.values()), create_graph=not first_order)
            params = {k: p - 0.05 * g for (k, p), g in zip(params.items(), grads)}
        expected = expected + mse(torch.func.functional_call(reference, params, (xt,)), yt) / len(tasks)
    torch.testing.assert_close(loss, expected, rtol=0.0, atol=1e-12)
    model.eval()  # the running statistics, the module's own, give another value
    in_eval_mode = maml.meta_loss(model, tasks, mse, inner=maml.SGD(lr=0.05), steps=2)
    assert abs(in_eval_mode.item() - loss.item()) > 1e-3
