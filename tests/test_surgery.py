"""PCGrad, GradVac, GradNorm and MTL behind the one interface."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import metaopt
from metaopt.aggregation import gradvac_weights, gramian, pcgrad_weights, random_order
from metaopt.parts.state_dict import record_of

from _asserts import assert_matches_reference, mixed_jacobian, mixed_jacobians
from _reference import naive_gradvac, naive_pcgrad

TASKS = ["a", "b", "c"]


class MultiHead(torch.nn.Module):
    def __init__(self, tasks=TASKS, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh())
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(6, 1) for t in tasks})

    def forward(self, t, x):
        return self.heads[t](self.enc(x))


def batches(tasks=TASKS, seed=1, n=12):
    g = torch.Generator().manual_seed(seed)
    return {
        t: (torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g) * (i + 1))
        for i, t in enumerate(tasks)
    }


def losses_of(model, data, tasks):
    return {t: torch.nn.functional.mse_loss(model(t, data[t][0]), data[t][1]) for t in tasks}


def trained_params(make, steps, seed=0, data=None):
    """Parameters of a fresh MultiHead(seed) after ``steps`` steps of ``make(model)``."""
    data = data or batches()
    model = MultiHead(seed=seed)
    opt = make(model)
    for _ in range(steps):
        opt.step(losses_of(model, data, opt.next_tasks()))
    return [p.detach().clone() for p in model.parameters()]


def flat_grads(loss, params):
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, gs)])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_pcgrad_class_matches_pure_function_and_keeps_heads_separate(reduction):
    data = batches()
    model = MultiHead()
    ref = copy.deepcopy(model)
    shared = list(model.enc.parameters())
    opt = metaopt.PCGrad(
        torch.optim.SGD(model.parameters(), lr=1.0),
        tasks=TASKS,
        shared=model.enc.parameters(),
        reduction=reduction,
        seed=3,
    )
    report = opt.step(losses_of(model, data, opt.next_tasks()))

    rshared = list(ref.enc.parameters())
    J = torch.stack([flat_grads(loss, rshared) for loss in losses_of(ref, data, TASKS).values()])
    order = random_order(3, torch.Generator().manual_seed(3))
    # the class accumulates the Gramian in float64 and reports the float64 weights
    w = pcgrad_weights(gramian(J, dtype=torch.float64), order, reduction)
    update = (w @ J.double()).float()
    torch.testing.assert_close(report.weights, w)
    got = torch.cat([(p0.detach() - p.detach()).reshape(-1) for p, p0 in zip(shared, rshared)])
    torch.testing.assert_close(got, update, rtol=1e-5, atol=1e-6)
    # each head moved by its own task's gradient only
    for t in TASKS:
        loss = losses_of(ref, data, [t])[t]
        hp = list(ref.heads[t].parameters())
        g = torch.autograd.grad(loss, hp)
        for p, p0, gi in zip(model.heads[t].parameters(), hp, g):
            torch.testing.assert_close(p0.detach() - p.detach(), gi, rtol=1e-5, atol=1e-6)


def test_shared_detection_excludes_heads_from_projection():
    """Default shared=None must give the same result as naming the encoder explicitly."""
    out = [
        trained_params(
            lambda m, explicit=explicit: metaopt.PCGrad(
                torch.optim.SGD(m.parameters(), lr=0.1),
                tasks=TASKS,
                seed=1,
                **({"shared": m.enc.parameters()} if explicit else {}),
            ),
            3,
            seed=4,
        )
        for explicit in (False, True)
    ]
    for a, b in zip(*out):
        torch.testing.assert_close(a, b)


def test_head_leak_is_impossible():
    """Task b's head must not move when only task a's gradient conflicts with it."""
    data = batches()
    model = MultiHead(seed=2)
    opt = metaopt.PCGrad(torch.optim.SGD(model.parameters(), lr=0.5), tasks=TASKS, seed=0)
    losses = losses_of(model, data, TASKS)
    # task c's head: its update equals its own loss's gradient, whatever the projections did
    own = torch.autograd.grad(losses["c"], list(model.heads["c"].parameters()), retain_graph=True)
    before = [p.detach().clone() for p in model.heads["c"].parameters()]
    opt.step(losses)
    for p, b, g in zip(model.heads["c"].parameters(), before, own):
        torch.testing.assert_close(b - p.detach(), 0.5 * g)


@given(seed=st.integers(0, 1000))
def test_gradvac_beta_zero_equals_pcgrad(seed):
    data = batches(seed=seed)
    results = [
        trained_params(
            lambda m, cls=cls, kw=kw: cls(
                torch.optim.Adam(m.parameters(), lr=0.01), tasks=TASKS, seed=seed, **kw
            ),
            3,
            seed=seed,
            data=data,
        )
        for cls, kw in ((metaopt.PCGrad, {}), (metaopt.GradVac, {"beta": 0.0}))
    ]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_gradvac_class_tracks_targets_like_the_pure_function():
    data = batches()
    model = MultiHead()
    ref = copy.deepcopy(model)
    opt = metaopt.GradVac(
        torch.optim.SGD(model.parameters(), lr=0.0),
        tasks=TASKS,
        beta=0.3,
        shared=model.enc.parameters(),
        seed=5,
    )
    g = torch.Generator().manual_seed(5)
    targets = torch.zeros(3, 3, dtype=torch.float64)
    for _ in range(3):
        opt.step(losses_of(model, data, TASKS))
        J = torch.stack(
            [flat_grads(loss, list(ref.enc.parameters())) for loss in losses_of(ref, data, TASKS).values()]
        )
        _, targets = gradvac_weights(gramian(J, dtype=torch.float64), random_order(3, g), targets, 0.3)
    torch.testing.assert_close(opt.targets[0], targets.double())
    assert (opt.targets[0] != 0).any()


def test_gradvac_per_parameter_groups_keep_separate_targets():
    data = batches()
    model = MultiHead()
    opt = metaopt.GradVac(
        torch.optim.SGD(model.parameters(), lr=0.05),
        tasks=TASKS,
        beta=0.5,
        shared=model.enc.parameters(),
        groups="parameter",
        seed=0,
    )
    report = opt.step(losses_of(model, data, TASKS))
    assert opt.targets.shape == (2, 3, 3)
    assert report.weights.shape == (2, 3)
    assert not torch.equal(opt.targets[0], opt.targets[1])
    # explicit groups [[weight], [bias]] are the same grouping
    twin = MultiHead()
    w, b = list(twin.enc.parameters())
    explicit = metaopt.GradVac(
        torch.optim.SGD(twin.parameters(), lr=0.05),
        tasks=TASKS,
        beta=0.5,
        shared=[w, b],
        groups=[[w], [b]],
        seed=0,
    )
    explicit.step(losses_of(twin, data, TASKS))
    torch.testing.assert_close(explicit.targets, opt.targets)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("cls,kw", [(metaopt.GradVac, {"beta": 0.2}), (metaopt.PCGrad, {})])
def test_state_dict_round_trip_continues_identically(cls, kw):
    data = batches()
    model = MultiHead()
    opt = cls(torch.optim.Adam(model.parameters(), lr=0.01), tasks=TASKS, seed=1, **kw)
    for _ in range(2):
        opt.step(losses_of(model, data, TASKS))
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    for _ in range(3):
        opt.step(losses_of(model, data, TASKS))
    fresh = MultiHead(seed=9)
    fresh.load_state_dict(saved_model)
    fopt = cls(torch.optim.Adam(fresh.parameters(), lr=0.01), tasks=TASKS, seed=77, **kw)
    fopt.load_state_dict(saved)
    for _ in range(3):
        fopt.step(losses_of(fresh, data, TASKS))
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    if cls is metaopt.GradVac:
        assert torch.equal(opt.targets, fopt.targets)


def test_gradvac_state_for_other_tasks_is_refused():
    model = MultiHead(tasks=["a", "b", "d"])
    saved = metaopt.GradVac(torch.optim.SGD(model.parameters(), lr=0.1), tasks=["a", "b", "d"]).state_dict()
    record_of(saved)["tasks"] = TASKS  # even if the task list is forged, the targets know
    opt = metaopt.GradVac(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS)
    with pytest.raises(ValueError, match=r"unseen by that state: \['c'\]"):
        opt.load_state_dict(saved)


def test_batched_jacobian_path_equals_loop():
    out = [
        trained_params(
            lambda m, batched=batched: metaopt.GradVac(
                torch.optim.SGD(m.parameters(), lr=0.1), tasks=TASKS, beta=0.1, batched=batched, seed=0
            ),
            2,
            seed=3,
        )
        for batched in (False, True)
    ]
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_report_cosine_matches_diagnostics():
    data = batches()
    model = MultiHead()
    opt = metaopt.PCGrad(
        torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, shared=model.enc.parameters()
    )
    d = metaopt.gradient_diagnostics(losses_of(model, data, TASKS), model.enc.parameters())
    report = opt.step(losses_of(model, data, TASKS))
    # the report's statistics come from the float64 Gramian, the diagnostics' from a float32 one
    assert report.cosine.dtype == report.conflicts.dtype == torch.float64
    torch.testing.assert_close(report.cosine.float(), d.cosine)
    torch.testing.assert_close(report.conflicts.float(), d.conflicts)
    assert report.tasks == tuple(TASKS) and set(report.losses) == set(TASKS)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_mtl_is_sum_or_mean_of_losses(reduction):
    data = batches()
    model, ref = MultiHead(), MultiHead()
    opt = metaopt.MTL(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, reduction=reduction)
    opt.step(losses_of(model, data, opt.next_tasks()))
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1)
    total = sum(losses_of(ref, data, TASKS).values())
    (total / (3 if reduction == "mean" else 1)).backward()
    ropt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- GradNorm
@given(alpha=st.floats(0.0, 3.0), seed=st.integers(0, 100))
def test_gradnorm_weights_stay_positive_and_sum_to_T(alpha, seed):
    data = batches(seed=seed)
    model = MultiHead(seed=seed)
    opt = metaopt.GradNorm(
        metaopt.MTL(torch.optim.Adam(model.parameters(), lr=0.01), tasks=TASKS),
        layer=model.enc[0].parameters(),
        alpha=alpha,
        weight_optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
    )
    seen = []
    for _ in range(15):
        report = opt.step(losses_of(model, data, opt.next_tasks()))
        seen.append(report.weights)
        w = opt.weights.detach()
        assert (w > 0).all()
        torch.testing.assert_close(w.sum(), torch.tensor(3.0))
    assert not torch.allclose(seen[0], seen[-1])  # the weights do move


def test_gradnorm_model_update_uses_weighted_losses_and_never_its_own_loss():
    data = batches()
    model, ref = MultiHead(), MultiHead()
    opt = metaopt.GradNorm(
        torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, layer=model.enc[0].parameters()
    )
    with torch.no_grad():
        opt.weights.copy_(torch.tensor([0.5, 1.0, 1.5]))
    opt.step(losses_of(model, data, TASKS))
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ls = losses_of(ref, data, TASKS)
    (0.5 * ls["a"] + 1.0 * ls["b"] + 1.5 * ls["c"]).backward()
    ropt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
        torch.testing.assert_close(p.grad, q.grad)  # the GradNorm loss added nothing to .grad


def test_gradnorm_balances_gradient_norms():
    """Task c's loss is scaled up 100×: GradNorm must give it a much smaller weight."""
    data = batches()
    model = MultiHead()
    opt = metaopt.GradNorm(
        metaopt.MTL(torch.optim.SGD(model.parameters(), lr=1e-3), tasks=TASKS),
        layer=model.enc[0].parameters(),
        alpha=0.0,
        weight_optimizer=lambda p: torch.optim.Adam(p, lr=0.05),
    )
    scale = {"a": 1.0, "b": 1.0, "c": 100.0}
    for _ in range(100):
        ls = losses_of(model, data, TASKS)
        opt.step({t: scale[t] * v for t, v in ls.items()})
    w = opt.weights.detach()
    assert w[2] < 0.2 * w[0] and w[2] < 0.2 * w[1]


def test_gradnorm_state_dict_keeps_weights_and_initial_losses():
    data = batches()
    model = MultiHead()

    def mk(m):
        return metaopt.GradNorm(
            metaopt.MTL(torch.optim.Adam(m.parameters(), lr=0.01), tasks=TASKS), layer=m.enc[0].parameters()
        )

    opt = mk(model)
    for _ in range(3):
        opt.step(losses_of(model, data, TASKS))
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for _ in range(2):
        opt.step(losses_of(model, data, TASKS))
    fresh = MultiHead(seed=5)
    fresh.load_state_dict(saved_model)
    fopt = mk(fresh)
    fopt.load_state_dict(saved)
    torch.testing.assert_close(fopt.initial_losses, record_of(saved)["initial_losses"])
    for _ in range(2):
        fopt.step(losses_of(fresh, data, TASKS))
    torch.testing.assert_close(fopt.weights, opt.weights)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- composition
def test_sequential_reptile_over_gradvac_asks_for_all_tasks_and_eta_one_is_gradvac():
    data = batches()
    results = []
    for wrap in (True, False):
        model = MultiHead(seed=6)
        inner = metaopt.GradVac(torch.optim.AdamW(model.parameters(), lr=0.01), tasks=TASKS, beta=0.1, seed=2)
        opt = metaopt.SequentialReptile(inner, inner_steps=3, outer_lr=1.0, seed=0) if wrap else inner
        reports = []
        for _ in range(6):
            assert opt.next_tasks() == TASKS
            reports.append(opt.step(losses_of(model, data, opt.next_tasks())))
        if wrap:
            assert [r.outer_update for r in reports] == [False, False, True] * 2
            assert reports[0].inner is not None and reports[0].inner.cosine is not None
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_sequential_reptile_over_gradvac_interpolates():
    data = batches()
    model = MultiHead(seed=6)
    start = [p.detach().clone() for p in model.parameters()]
    opt = metaopt.SequentialReptile(
        metaopt.GradVac(torch.optim.SGD(model.parameters(), lr=0.05), tasks=TASKS, seed=2),
        inner_steps=2,
        outer_lr=0.0,
        seed=0,
    )
    for _ in range(2):
        opt.step(losses_of(model, data, opt.next_tasks()))
    for p, s in zip(model.parameters(), start):
        assert torch.equal(p, s)


def test_gradnorm_weighted_pcgrad_equals_pcgrad_on_weighted_losses():
    data = batches()
    model, ref = MultiHead(), MultiHead()
    opt = metaopt.GradNorm(
        metaopt.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, seed=4),
        layer=model.enc[0].parameters(),
    )
    with torch.no_grad():
        opt.weights.copy_(torch.tensor([2.0, 0.5, 0.5]))
    report = opt.step(losses_of(model, data, opt.next_tasks()))
    assert report.inner is not None and report.inner.weights is not None
    ropt = metaopt.PCGrad(torch.optim.SGD(ref.parameters(), lr=0.1), tasks=TASKS, seed=4)
    ls = losses_of(ref, data, TASKS)
    ropt.step({"a": 2.0 * ls["a"], "b": 0.5 * ls["b"], "c": 0.5 * ls["c"]})
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- bad input
def snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()))


def assert_unchanged(snap, model, opt):
    params, state = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    now = opt.state_dict()
    assert record_of(now)["step"] == record_of(state)["step"]
    assert torch.equal(record_of(now)["generator"], record_of(state)["generator"])
    for key in ("targets", "weights", "initial_losses"):
        if key in record_of(state) and record_of(state)[key] is not None:
            assert torch.equal(record_of(now)[key], record_of(state)[key])


def stepped_once(make):
    """A fresh model and optimizer after one step, a snapshot of both, and fresh losses."""
    data = batches()
    model = MultiHead()
    opt = make(model)
    opt.step(losses_of(model, data, TASKS))
    return model, opt, snapshot(model, opt), losses_of(model, data, TASKS)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: metaopt.PCGrad(torch.optim.Adam(m.parameters(), lr=0.01), tasks=TASKS),
        lambda m: metaopt.GradVac(torch.optim.Adam(m.parameters(), lr=0.01), tasks=TASKS, beta=0.5),
        lambda m: metaopt.GradNorm(
            metaopt.MTL(torch.optim.Adam(m.parameters(), lr=0.01), tasks=TASKS), layer=m.enc[0].parameters()
        ),
        lambda m: metaopt.MTL(torch.optim.Adam(m.parameters(), lr=0.01), tasks=TASKS),
    ],
)
def test_bad_losses_change_nothing(make):
    model, opt, snap, ls = stepped_once(make)
    with pytest.raises(ValueError, match=r"missing \['c'\]"):
        opt.step({"a": ls["a"], "b": ls["b"]})
    with pytest.raises(ValueError, match=r"non-finite loss.*'b'"):
        opt.step({**ls, "b": ls["b"] * float("nan")})
    assert_unchanged(snap, model, opt)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: metaopt.PCGrad(torch.optim.Adam(m.parameters(), lr=0.01), tasks=TASKS),
        lambda m: metaopt.GradVac(torch.optim.Adam(m.parameters(), lr=0.01), tasks=TASKS, beta=0.5),
        lambda m: metaopt.GradNorm(
            metaopt.PCGrad(torch.optim.Adam(m.parameters(), lr=0.01), tasks=TASKS),
            layer=m.enc[0].parameters(),
        ),
    ],
)
def test_non_finite_task_gradient_names_the_task_and_changes_nothing(make):
    model, opt, snap, ls = stepped_once(make)
    # sqrt at 0 has an infinite derivative: a finite loss with a non-finite gradient
    bad = ls["b"] + torch.sqrt(model.enc[0].weight[0, 0] * 0.0).sum()
    with pytest.raises(ValueError, match=r"non-finite gradient.*'b'"):
        opt.step({"a": ls["a"], "b": bad, "c": ls["c"]})
    assert_unchanged(snap, model, opt)


def test_constructor_errors():
    model = MultiHead()

    def sgd():
        return torch.optim.SGD(model.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="shared is empty"):
        metaopt.PCGrad(sgd(), tasks=TASKS, shared=[])
    with pytest.raises(ValueError, match="not parameters of the wrapped"):
        metaopt.PCGrad(sgd(), tasks=TASKS, shared=[torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="reduction"):
        metaopt.PCGrad(sgd(), tasks=TASKS, reduction="max")
    for beta in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match=r"beta must be"):
            metaopt.GradVac(sgd(), tasks=TASKS, beta=beta)
    with pytest.raises(ValueError, match="groups='parameter' needs shared"):
        metaopt.GradVac(sgd(), tasks=TASKS, groups="parameter")
    w, b = model.enc[0].parameters()
    with pytest.raises(ValueError, match="exactly one group"):
        metaopt.GradVac(sgd(), tasks=TASKS, shared=[w, b], groups=[[w]])
    with pytest.raises(ValueError, match="layer is empty"):
        metaopt.GradNorm(sgd(), tasks=TASKS, layer=[])
    for alpha in (-1.0, float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            metaopt.GradNorm(sgd(), tasks=TASKS, layer=[w], alpha=alpha)
    with pytest.raises(TypeError, match="wrap a torch optimizer"):
        metaopt.PCGrad(metaopt.MTL(sgd(), tasks=TASKS), tasks=TASKS)


def test_gradnorm_layer_not_reached_by_a_task():
    data = batches()
    model = MultiHead()
    opt = metaopt.GradNorm(
        metaopt.MTL(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS),
        layer=model.heads["a"].parameters(),
    )
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"task 'b' does not reach the GradNorm layer"):
        opt.step(losses_of(model, data, TASKS))
    assert_unchanged(snap, model, opt)


def test_no_parameter_shared_by_every_task():
    model = MultiHead()
    x = torch.randn(4, 4)
    opt = metaopt.PCGrad(
        torch.optim.SGD(model.heads.parameters(), lr=0.1), tasks=["a", "b"], allow_unused=True
    )
    with pytest.raises(ValueError, match="reached by every task"):
        opt.step({t: model.heads[t](x[:, :1].expand(4, 6)).sum() for t in ["a", "b"]})


# ---------------------------------------------------------------- extreme and mixed row scales
def row_losses(p, J, tasks):
    """Losses whose gradients with respect to ``p`` are exactly the rows of ``J``."""
    return {t: (p * J[i]).sum() for i, t in enumerate(tasks)}


def surgery(method, params, tasks, seed=0, lr=1.0, **kw):
    cls = {"pcgrad": metaopt.PCGrad, "gradvac": metaopt.GradVac}[method]
    if method == "gradvac":
        kw.setdefault("beta", 0.5)
    return cls(torch.optim.SGD(params, lr=lr), tasks=tasks, seed=seed, **kw)


@settings(max_examples=40)
@given(
    J=mixed_jacobians(max_tasks=5),
    seed=st.integers(0, 2**31 - 1),
    method=st.sampled_from(["pcgrad", "gradvac"]),
    reduction=st.sampled_from(["sum", "mean"]),
)
def test_surgery_steps_match_the_reference_at_mixed_row_scales(J, seed, method, reduction):
    """Rows from 1e-30 to 1e25 in one Jacobian (float32 or float64 parameters): every step's
    .grad, reported weights and GradVac targets equal the float64 loop's, and SGD applies it."""
    T = J.shape[0]
    tasks = [f"t{i}" for i in range(T)]
    p = torch.nn.Parameter(torch.full((J.shape[1],), 1e-3, dtype=J.dtype))
    opt = surgery(method, [p], tasks, seed=seed, reduction=reduction)
    g = torch.Generator().manual_seed(seed)  # the optimizer's generator, replayed
    targets = torch.zeros(T, T, dtype=torch.float64)
    for _ in range(2):  # the second GradVac step starts from non-zero targets
        before = p.detach().clone()
        report = opt.step(row_losses(p, J, tasks))
        order = random_order(T, g)
        if method == "pcgrad":
            ref = naive_pcgrad(J.double(), order, reduction)
        else:
            ref = naive_gradvac(J.double(), order, targets, 0.5, reduction)
            targets = ref.targets
            torch.testing.assert_close(opt.targets[0], targets, rtol=0, atol=1e-9)
        assert_matches_reference(p.grad, report.weights, ref, J)
        assert torch.equal(p.detach(), before - p.grad)
        with torch.no_grad():  # back, so the next losses stay finite and have the same rows
            p.copy_(before)


@pytest.mark.parametrize("method", ["pcgrad", "gradvac"])
def test_weight_beyond_float32_range_gives_a_finite_step(method):
    # Found by fuzzing: |g_a| = 2.2e18 conflicts with |g_b| = 1.4e-21, g_b's weight is 1.5e39
    # (beyond float32). The step used to be accepted with an infinite weight: p became inf.
    J = torch.tensor([[1e18, 2e18, 0.0], [-1e-21, -1e-21, 0.0]])
    p = torch.nn.Parameter(torch.full((3,), 1e-3))
    opt = surgery(method, [p], ["a", "b"], lr=1e-18)
    report = opt.step(row_losses(p, J, ["a", "b"]))
    ref = naive_pcgrad(J.double(), torch.tensor([[1], [0]]))  # fresh targets: PCGrad's step
    assert report.weights[1] > 1e39
    assert_matches_reference(p.grad, report.weights, ref, J)
    assert torch.isfinite(p).all()


def refused_step_changes_nothing(method, losses_of_p, make_losses_ok, match):
    """Take an accepted step, then a refused one: the error matches ``match`` and nothing moved
    (parameters, .grad, step count, generator, GradVac targets); the optimizer then goes on
    exactly like a twin that never saw the refused step."""
    runs = []
    for refuse in (True, False):
        p = torch.nn.Parameter(torch.full((4,), 1e-3))
        q = torch.nn.Parameter(torch.full((2,), 1e-3))
        opt = surgery(method, [p, q], TASKS, seed=3, lr=0.1, allow_unused=True)
        opt.step(make_losses_ok(p, q, 0))
        if refuse:
            snap = (
                [t.detach().clone() for t in (p, q)],
                [t.grad.clone() for t in (p, q)],
                copy.deepcopy(opt.state_dict()),
            )
            with pytest.raises(ValueError, match=match):
                opt.step(losses_of_p(p, q))
            for t, before, grad in zip((p, q), snap[0], snap[1]):
                assert torch.equal(t.detach(), before) and torch.equal(t.grad, grad)
            now, then = record_of(opt.state_dict()), record_of(snap[2])
            assert now["step"] == then["step"]
            assert torch.equal(now["generator"], then["generator"])
            if method == "gradvac":
                assert torch.equal(now["targets"], then["targets"])
        opt.step(make_losses_ok(p, q, 1))
        runs.append(([t.detach().clone() for t in (p, q)], getattr(opt, "targets", None)))
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b)
    if method == "gradvac":
        assert torch.equal(runs[0][1], runs[1][1])


def _ok_losses(p, q, k):
    J = torch.randn(3, 4, generator=torch.Generator().manual_seed(k))
    ls = row_losses(p, J, TASKS)
    ls["a"] = ls["a"] + (q * 0.5).sum()  # q: a "head" reached by tasks a and b only
    ls["b"] = ls["b"] - (q * 0.25).sum()
    return ls


@pytest.mark.parametrize("method", ["pcgrad", "gradvac"])
def test_update_beyond_float32_is_refused_and_changes_nothing(method):
    # Three equal rows of 2e38: no conflict, the true update is their sum, 6e38, beyond float32
    # (it used to be refused for the wrong reason: a float32 Gramian called the rows non-finite)
    def huge(p, q):
        ls = row_losses(p, torch.full((3, 4), 2e38), TASKS)
        return {**ls, "a": ls["a"] + q.sum(), "b": ls["b"] + q.sum()}

    refused_step_changes_nothing(
        method, huge, _ok_losses, r"combined update does not fit torch.float32.*nothing was updated"
    )


@pytest.mark.parametrize("method", ["pcgrad", "gradvac"])
def test_head_sum_beyond_float32_is_refused_and_changes_nothing(method):
    # q is reached by tasks a and b with gradients 2e38 each: its .grad would be 4e38 (inf)
    def huge_head(p, q):
        ls = _ok_losses(p, q, 5)
        return {**ls, "a": ls["a"] + (q * 2e38).sum(), "b": ls["b"] + (q * 2e38).sum()}

    refused_step_changes_nothing(
        method, huge_head, _ok_losses, r"combined update does not fit torch.float32.*nothing was updated"
    )


@pytest.mark.parametrize("method", ["pcgrad", "gradvac"])
def test_non_finite_row_is_refused_and_changes_nothing(method):
    def nan_row(p, q):
        ls = _ok_losses(p, q, 6)
        return {**ls, "c": ls["c"] + torch.sqrt(p[0] * 0.0)}  # finite loss, infinite gradient

    refused_step_changes_nothing(method, nan_row, _ok_losses, r"non-finite gradient.*\['c'\]")


def test_huge_and_tiny_gradients_are_not_called_non_finite():
    # |g|² of 1e20 rows overflows float32 (the old Gramian's dtype); 1e-25 rows underflow it
    J = mixed_jacobian(7, [20, -25, 0], extra=2)
    for method in ("pcgrad", "gradvac"):
        p = torch.nn.Parameter(torch.full((5,), 1e-3))
        opt = surgery(method, [p], TASKS, seed=1)
        report = opt.step(row_losses(p, J, TASKS))
        order = random_order(3, torch.Generator().manual_seed(1))
        ref = (
            naive_pcgrad(J.double(), order)
            if method == "pcgrad"
            else naive_gradvac(J.double(), order, torch.zeros(3, 3), 0.5)
        )
        assert_matches_reference(p.grad, report.weights, ref, J)


# ---------------------------------------------------------------- deterministic algorithms
@pytest.mark.parametrize("groups", ["all", "parameter"])
def test_gradvac_class_under_deterministic_algorithms(deterministic, groups):
    assert torch.are_deterministic_algorithms_enabled()
    runs = []
    for _ in range(2):
        data = batches()
        model = MultiHead()
        opt = metaopt.GradVac(
            torch.optim.SGD(model.parameters(), lr=0.05),
            tasks=TASKS,
            beta=0.3,
            shared=model.enc.parameters(),
            groups=groups,
            seed=4,
        )
        ref = copy.deepcopy(model)
        g = torch.Generator().manual_seed(4)
        targets = torch.zeros(opt.targets.shape, dtype=torch.float64)
        for _ in range(3):
            shared = list(ref.enc.parameters())
            J = torch.stack([flat_grads(loss, shared) for loss in losses_of(ref, data, TASKS).values()])
            if groups == "parameter":
                cols = torch.split(J, [p.numel() for p in shared], dim=1)
            else:
                cols = (J,)
            G = torch.stack([gramian(c, dtype=torch.float64) for c in cols])
            _, targets = gradvac_weights(G, random_order(3, g), targets, 0.3)
            opt.step(losses_of(model, data, TASKS))
            ref.load_state_dict(model.state_dict())
        torch.testing.assert_close(opt.targets, targets, rtol=0, atol=1e-12)
        runs.append(([p.detach().clone() for p in model.parameters()], opt.targets.clone()))
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b)
    assert torch.equal(runs[0][1], runs[1][1])
