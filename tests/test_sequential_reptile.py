"""Sequential Reptile and Reptile: the equalities and invariants DESIGN.md §6 lists."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TASKS, make_data, make_model, params_of, task_loss
from hypothesis import given
from hypothesis import strategies as st

import metaopt


def run(opt, model, data, steps):
    reports = []
    for _ in range(steps):
        wanted = opt.next_tasks()
        reports.append(opt.step({t: task_loss(model, data, t) for t in wanted}))
    return reports


@pytest.mark.parametrize("inner", ["adamw", "sgd_momentum"])
@given(seed=st.integers(0, 2**16), inner_steps=st.integers(1, 6), steps=st.integers(1, 14))
def test_eta_one_equals_plain_training_bit_for_bit(inner, seed, inner_steps, steps):
    data = make_data()

    def make_opt(model):
        if inner == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)

    model = make_model(seed)
    opt = metaopt.SequentialReptile(
        make_opt(model), tasks=TASKS, inner_steps=inner_steps, outer_lr=1.0, seed=seed
    )
    sequence = [r.tasks[0] for r in run(opt, model, data, steps)]

    plain = make_model(seed)
    popt = make_opt(plain)
    for t in sequence:
        popt.zero_grad()
        task_loss(plain, data, t).backward()
        popt.step()
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)


@given(seed=st.integers(0, 2**16), inner_steps=st.integers(1, 5))
def test_eta_zero_leaves_slow_weights_unchanged(seed, inner_steps):
    data = make_data()
    model = make_model(seed)
    start = params_of(model)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.05),
        tasks=TASKS,
        inner_steps=inner_steps,
        outer_lr=0.0,
        seed=seed,
    )
    reports = run(opt, model, data, 3 * inner_steps)
    assert [r.outer_update for r in reports].count(True) == 3
    for p, s, phi in zip(model.parameters(), start, opt.slow_weights):
        assert torch.equal(p, s)
        assert torch.equal(phi, s)


@given(seed=st.integers(0, 2**16), inner_steps=st.integers(1, 5), eta=st.floats(0.05, 0.95))
def test_outer_step_interpolates_toward_fast_weights(seed, inner_steps, eta):
    """φ_new = φ + η(θ_K − φ) against a float64 reference; θ re-synced to φ."""
    data = make_data()
    model = make_model(seed)
    phi0 = [p.detach().double().clone() for p in model.parameters()]
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.05),
        tasks=TASKS,
        inner_steps=inner_steps,
        outer_lr=eta,
        seed=seed,
    )
    run(opt, model, data, inner_steps - 1)
    wanted = opt.next_tasks()
    losses = {t: task_loss(model, data, t) for t in wanted}
    # the last inner step, reproduced by hand on a copy, gives θ_K
    shadow = make_model(seed)
    shadow.load_state_dict(model.state_dict())
    sopt = torch.optim.SGD(shadow.parameters(), lr=0.05)
    task_loss(shadow, data, wanted[0]).backward()
    sopt.step()
    theta = [p.detach().double() for p in shadow.parameters()]
    report = opt.step(losses)
    assert report.outer_update
    for p, phi, a, b in zip(model.parameters(), opt.slow_weights, phi0, theta):
        ref = a + eta * (b - a)
        torch.testing.assert_close(phi.double(), ref, rtol=1e-6, atol=1e-6)
        assert torch.equal(p, phi)


def test_eta_one_makes_slow_equal_fast():
    data = make_data()
    model = make_model(3)
    opt = metaopt.SequentialReptile(
        torch.optim.Adam(model.parameters(), lr=0.01), tasks=TASKS, inner_steps=4, outer_lr=1.0, seed=3
    )
    reports = run(opt, model, data, 4)
    assert reports[-1].outer_update
    for p, phi in zip(model.parameters(), opt.slow_weights):
        assert torch.equal(p, phi)


@given(seed=st.integers(0, 2**16), inner_steps=st.integers(1, 4), eta=st.floats(0.0, 1.0))
def test_one_task_sequential_reptile_equals_serial_reptile(seed, inner_steps, eta):
    data = make_data()
    results = []
    for cls in (metaopt.SequentialReptile, metaopt.Reptile):
        model = make_model(seed)
        opt = cls(
            torch.optim.Adam(model.parameters(), lr=0.01),
            tasks=["fi"],
            inner_steps=inner_steps,
            outer_lr=eta,
            seed=seed,
        )
        run(opt, model, data, 3 * inner_steps + 1)
        results.append(params_of(model) + [s.clone() for s in opt.slow_weights])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_sequential_reptile_mixes_tasks_within_a_trajectory_reptile_does_not():
    data = make_data()
    model = make_model(0)
    seq = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.01), tasks=TASKS, inner_steps=6, seed=0
    )
    tasks = [r.tasks[0] for r in run(seq, model, data, 6)]
    assert len(set(tasks)) > 1
    model = make_model(0)
    rep = metaopt.Reptile(torch.optim.SGD(model.parameters(), lr=0.01), tasks=TASKS, inner_steps=6, seed=0)
    reports = run(rep, model, data, 18)
    for k in range(3):
        assert len({r.tasks[0] for r in reports[6 * k : 6 * k + 6]}) == 1


def test_batched_reptile_moves_toward_mean_of_fast_weights():
    data = make_data()
    eta, k = 0.3, 3
    model = make_model(1)
    phi0 = params_of(model)
    opt = metaopt.Reptile(
        torch.optim.SGD(model.parameters(), lr=0.05),
        tasks=TASKS,
        inner_steps=k,
        outer_lr=eta,
        tasks_per_outer_step=2,
        seed=4,
    )
    reports = run(opt, model, data, 2 * k)
    assert [r.outer_update for r in reports] == [False] * (2 * k - 1) + [True]
    # reference: two trajectories from φ0 in float64
    ends = []
    for j in range(2):
        task = reports[j * k].tasks[0]
        ref = make_model(1).double()
        ropt = torch.optim.SGD(ref.parameters(), lr=0.05)
        for _ in range(k):
            ropt.zero_grad()
            x, y = data[task]
            torch.nn.functional.mse_loss(ref(x.double()), y.double()).backward()
            ropt.step()
        ends.append([p.detach() for p in ref.parameters()])
    for p, a, e1, e2 in zip(model.parameters(), phi0, ends[0], ends[1]):
        expected = a.double() + eta * ((e1 + e2) / 2 - a.double())
        torch.testing.assert_close(p.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "cls,kw",
    [
        (metaopt.SequentialReptile, {}),
        (metaopt.Reptile, {"tasks_per_outer_step": 2}),
        (metaopt.SequentialReptile, {"schedule": "round_robin"}),
        (
            metaopt.SequentialReptile,
            {
                "outer_lr": None,
                "outer_optimizer": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, nesterov=True),
            },
        ),
    ],
)
def test_state_dict_mid_trajectory_continues_identically(cls, kw):
    data = make_data()
    kw = {"outer_lr": 0.3, **kw}
    model = make_model(2)
    opt = cls(torch.optim.AdamW(model.parameters(), lr=0.01), tasks=TASKS, inner_steps=5, seed=7, **kw)
    run(opt, model, data, 13)  # 2 outer steps, then 3 of 5 inner steps
    opt.next_tasks()  # a pending draw is part of the state too
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(
        opt.state_dict()
    )  # as torch.save would: torch.optim's state_dict shares live tensors
    ref_reports = run(opt, model, data, 9)
    expected = params_of(model)

    fresh = make_model(99)
    fresh.load_state_dict(saved_model)
    fopt = cls(torch.optim.AdamW(fresh.parameters(), lr=0.01), tasks=TASKS, inner_steps=5, seed=123, **kw)
    fopt.load_state_dict(saved_opt)
    reports = run(fopt, fresh, data, 9)
    assert [r.tasks for r in reports] == [r.tasks for r in ref_reports]
    assert [r.outer_update for r in reports] == [r.outer_update for r in ref_reports]
    for a, b in zip(fresh.parameters(), expected):
        assert torch.equal(a, b)


def test_lr_scheduler_changes_inner_lr():
    data = make_data()
    model = make_model(0)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, inner_steps=3, outer_lr=0.5, seed=0
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        run(opt, model, data, 1)
        sched.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.0125)


def test_lr_scheduler_lr_is_the_one_used():
    """The scheduled lr is the one the inner step uses: a zero lr freezes θ."""
    data = make_data()
    model = make_model(0)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, inner_steps=100, seed=0
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 1 else 1.0)
    run(opt, model, data, 1)
    sched.step()
    before = params_of(model)
    run(opt, model, data, 3)
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def test_outer_lr_annealing_is_linear():
    model = make_model(0)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.1),
        tasks=TASKS,
        inner_steps=1,
        outer_lr=0.5,
        outer_lr_final=0.1,
        anneal_steps=4,
        seed=0,
    )
    data = make_data()
    seen = []
    for _ in range(6):
        seen.append(opt.current_outer_lr())
        run(opt, model, data, 1)
    assert seen == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1, 0.1])


def test_reset_inner_state_clears_adam_moments_at_outer_step():
    data = make_data()
    model = make_model(0)
    opt = metaopt.SequentialReptile(
        torch.optim.Adam(model.parameters(), lr=0.01),
        tasks=TASKS,
        inner_steps=2,
        reset_inner_state=True,
        seed=0,
    )
    run(opt, model, data, 1)
    assert len(opt.state) > 0
    run(opt, model, data, 1)
    assert len(opt.state) == 0


def test_outer_optimizer_gets_pseudo_gradient():
    """With SGD(lr=η) as outer optimizer the outer step equals plain interpolation by η."""
    data = make_data()
    out = []
    for kw in ({"outer_lr": 0.25}, {"outer_optimizer": lambda p: torch.optim.SGD(p, lr=0.25)}):
        model = make_model(5)
        opt = metaopt.SequentialReptile(
            torch.optim.SGD(model.parameters(), lr=0.05), tasks=TASKS, inner_steps=3, seed=1, **kw
        )
        run(opt, model, data, 9)
        out.append(params_of(model))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_the_users_parameters_stay_the_users():
    """The optimizer never re-points, repacks or copies the model's parameters into its own
    storage: every parameter keeps its storage, and the slow weights live apart from it."""
    data = make_data()
    model = make_model(0)
    ptrs = [p.untyped_storage().data_ptr() for p in model.parameters()]
    opt = metaopt.SequentialReptile(
        torch.optim.AdamW(model.parameters(), lr=0.05), tasks=TASKS, inner_steps=2, outer_lr=0.5, seed=0
    )
    run(opt, model, data, 5)  # two outer steps and a half
    assert [p.untyped_storage().data_ptr() for p in model.parameters()] == ptrs
    slow = {s.untyped_storage().data_ptr() for s in opt.slow_weights}
    assert not slow & set(ptrs)
    assert opt.outer_step_count == 2


def test_flatten_true_warns_and_packs_nothing():
    model = make_model(0)
    ptrs = [p.untyped_storage().data_ptr() for p in model.parameters()]
    with pytest.warns(DeprecationWarning, match="flatten=True is ignored"):
        metaopt.SequentialReptile(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, flatten=True)
    assert [p.untyped_storage().data_ptr() for p in model.parameters()] == ptrs
    with pytest.raises(TypeError, match="flatten must be True or False"):
        metaopt.SequentialReptile(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, flatten="no")
    with pytest.raises(ValueError, match="'flat' is gone"):
        metaopt.SequentialReptile(
            torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, interpolation="flat"
        )


def test_a_frozen_base_has_no_slow_weights_and_is_never_touched():
    """LoRA-style: only the trainable parameters get slow weights (a frozen base is never
    copied), and the frozen ones keep their values and storage through outer steps."""
    model = make_model(0)
    frozen = model[0].weight
    frozen.requires_grad_(False)
    before, ptr = frozen.detach().clone(), frozen.untyped_storage().data_ptr()
    opt = metaopt.SequentialReptile(
        torch.optim.AdamW(model.parameters(), lr=0.05), tasks=TASKS, inner_steps=2, outer_lr=0.5, seed=0
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [s.shape for s in opt.slow_weights] == [p.shape for p in trainable]
    assert sum(s.numel() for s in opt.slow_weights) == sum(p.numel() for p in trainable)
    run(opt, model, make_data(), 4)
    assert opt.outer_step_count == 2
    assert torch.equal(frozen, before) and frozen.untyped_storage().data_ptr() == ptr
    state = opt.state_dict()["state"]
    index = [i for i, p in enumerate(model.parameters()) if p is frozen][0]
    assert "metaopt_slow" not in state.get(index, {})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_master_does_not_drift_at_lr_zero(dtype):
    """θ starts each trajectory at φ rounded to θ's dtype; with an inner lr of 0 θ never moves,
    so the float32 master φ must not move either (it drifted onto the low-precision grid by η
    per outer step)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).to(dtype)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.0), tasks=["a"], inner_steps=2, outer_lr=0.3, seed=0
    )
    with torch.no_grad():  # a master that is off the low-precision grid
        for s in opt.slow_weights:
            s.add_(torch.rand(s.shape, generator=torch.Generator().manual_seed(1)) * 1e-3)
        opt.engine.sync_fast()
    opt.accept_parameter_changes()
    phi = [s.clone() for s in opt.slow_weights]
    x = torch.randn(8, 16).to(dtype)
    for _ in range(10):
        opt.step({"a": model(x).float().pow(2).mean()})
    assert opt.outer_step_count == 5
    for s, p in zip(opt.slow_weights, phi):
        assert torch.equal(s, p)


@pytest.mark.parametrize("flatten,method", [(False, "auto"), (False, "reference"), (False, "foreach")])
def test_every_path_trains_the_same(flatten, method):
    data = make_data()
    model = make_model(4)
    opt = metaopt.SequentialReptile(
        torch.optim.Adam(model.parameters(), lr=0.01),
        tasks=TASKS,
        inner_steps=3,
        outer_lr=0.3,
        flatten=flatten,
        interpolation=method,
        seed=2,
    )
    run(opt, model, data, 10)
    ref_model = make_model(4)
    ref = metaopt.SequentialReptile(
        torch.optim.Adam(ref_model.parameters(), lr=0.01),
        tasks=TASKS,
        inner_steps=3,
        outer_lr=0.3,
        flatten=False,
        interpolation="reference",
        seed=2,
    )
    run(ref, ref_model, data, 10)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_report_contents():
    data = make_data()
    model = make_model(0)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, inner_steps=2, seed=0
    )
    r1, r2 = run(opt, model, data, 2)
    assert len(r1.tasks) == 1 and r1.tasks[0] in TASKS
    assert set(r1.losses) == set(r1.tasks)
    assert r1.losses[r1.tasks[0]].requires_grad is False
    assert (r1.outer_update, r2.outer_update) == (False, True)
    assert (r1.step, r2.step) == (1, 2)


def test_next_tasks_is_stable_until_step():
    model = make_model(0)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS * 1, inner_steps=2, seed=0
    )
    first = opt.next_tasks()
    assert all(opt.next_tasks() == first for _ in range(5))


def test_bfloat16_model_keeps_float32_slow_weights():
    data = {t: (x.bfloat16(), y.bfloat16()) for t, (x, y) in make_data().items()}
    model = make_model(0).bfloat16()
    start = [p.detach().float().clone() for p in model.parameters()]
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.05), tasks=TASKS, inner_steps=2, outer_lr=0.5, seed=0
    )
    assert all(s.dtype == torch.float32 for s in opt.slow_weights)
    run(opt, model, data, 4)
    assert opt.outer_step_count == 2
    for p, phi, s in zip(model.parameters(), opt.slow_weights, start):
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, phi.to(torch.bfloat16))  # θ is φ rounded once
        assert not torch.equal(phi, s)  # and training moved φ


def test_use_slow_weights_swaps_in_phi_and_restores_theta():
    data = make_data()
    model = make_model(0)
    opt = metaopt.Reptile(
        torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, inner_steps=4, outer_lr=0.5, seed=0
    )
    run(opt, model, data, 6)  # mid-trajectory: θ ≠ φ
    theta = params_of(model)
    with opt.use_slow_weights():
        for p, phi in zip(model.parameters(), opt.slow_weights):
            assert torch.equal(p, phi)
    for p, t in zip(model.parameters(), theta):
        assert torch.equal(p, t)
    assert not all(torch.equal(t, phi) for t, phi in zip(theta, opt.slow_weights))
    # the restored θ trains on exactly as before
    run(opt, model, data, 2)
    assert opt.outer_step_count == 2


@pytest.mark.parametrize(
    "make",
    [
        lambda m: metaopt.SequentialReptile(
            torch.optim.Adam(m.parameters(), lr=0.01), tasks=TASKS, inner_steps=3, outer_lr=0.3, seed=1
        ),
        lambda m: metaopt.SequentialReptile(
            metaopt.GradVac(torch.optim.Adam(m.parameters(), lr=0.01), tasks=TASKS, beta=0.2, seed=2),
            inner_steps=2,
            outer_lr=0.5,
        ),
        lambda m: metaopt.GradNorm(
            metaopt.MTL(torch.optim.Adam(m.parameters(), lr=0.01), tasks=TASKS), layer=m[0].parameters()
        ),
    ],
)
def test_deepcopy_and_pickle_keep_the_whole_optimizer(make):
    """copy.deepcopy((model, opt)) and torch.save/load continue exactly like the original."""
    import io

    data = make_data()
    model = make_model(0)
    opt = make(model)
    run(opt, model, data, 4)
    copied_model, copied_opt = copy.deepcopy((model, opt))
    buf = io.BytesIO()
    torch.save((model, opt), buf)
    buf.seek(0)
    loaded_model, loaded_opt = torch.load(buf, weights_only=False)
    run(opt, model, data, 5)
    for m, o in ((copied_model, copied_opt), (loaded_model, loaded_opt)):
        run(o, m, data, 5)
        for a, b in zip(m.parameters(), model.parameters()):
            assert torch.equal(a, b)


def test_step_hooks_run_around_each_step():
    data = make_data()
    model = make_model(0)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, inner_steps=2, seed=0
    )
    calls = []

    def scale_losses(o, args, kwargs):  # a pre-hook may rewrite the losses
        calls.append(("pre", o.step_count))  # args are (optimizer, losses), as in torch.optim
        return (args[0], {t: 0.0 * v for t, v in args[1].items()}), kwargs

    pre = opt.register_step_pre_hook(scale_losses)
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o.step_count)))
    before = params_of(model)
    run(opt, model, data, 1)
    assert calls == [("pre", 0), ("post", 1)]
    for p, b in zip(model.parameters(), before):  # zeroed losses: SGD did not move
        assert torch.equal(p, b)
    pre.remove()
    post.remove()
    run(opt, model, data, 1)
    assert len(calls) == 2


def test_slow_weights_read_before_any_outer_step_warn():
    """A run shorter than K takes no outer step: evaluating at φ then evaluates the initial
    model, which a warning says (not before any step, nor after an outer step)."""
    import warnings

    model = torch.nn.Linear(2, 1)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.1), tasks=["a"], inner_steps=3, outer_lr=0.5
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with opt.use_slow_weights():  # before any step: the initial model is what φ is
            pass
    for step in range(3):
        opt.step({"a": model(torch.ones(1, 2)).sum()})
        if step < 2:
            with pytest.warns(UserWarning, match=r"no outer step yet \(\d step\(s\) taken, inner_steps=3\)"):
                with opt.use_slow_weights():
                    pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with opt.use_slow_weights():
            pass


def test_a_stream_shorter_than_one_trajectory_warns():
    """Where the run's length is known (a ScheduledTaskDataset of ``steps`` steps), K above it
    means no outer step at all: a warning at construction."""
    model = torch.nn.Linear(1, 1)
    data = {t: [{"v": torch.tensor(float(i) + 1)} for i in range(4)] for t in "ab"}
    opt = metaopt.Reptile(torch.optim.SGD(model.parameters(), lr=0.1), tasks=["a", "b"], inner_steps=10)
    with pytest.warns(
        UserWarning, match=r"stream of 9 step\(s\) is shorter than one trajectory \(inner_steps=10\)"
    ):
        metaopt.data.ScheduledTaskDataset(opt, data, batch_size=2, steps=9)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metaopt.data.ScheduledTaskDataset(opt, data, batch_size=2, steps=10)
