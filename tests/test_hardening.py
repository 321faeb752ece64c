"""Regression tests for the corruption bugs found by fuzzing (each failed before its fix).

Numbers in the docstrings are the items of the hardening issue. Where a fix closes a whole class
of bug, the test sweeps the class (every path, method and copy mode) rather than one example.
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle

import pytest
import torch
from conftest import TASKS, make_data, make_model, params_of, task_loss
from hypothesis import given, settings
from hypothesis import strategies as st

import metaopt
from metaopt.interpolation import register_kernel
from metaopt.parts.state_dict import record_of

from _snapshot import assert_unchanged, snapshot


def run(opt, model, data, steps, loss=task_loss):
    for _ in range(steps):
        opt.step({t: loss(model, data, t) for t in opt.next_tasks()})


def reload(obj, how):
    if how == "deepcopy":
        return copy.deepcopy(obj)
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ---------------------------------------------------------------- 1. every path, every method
METHODS = {
    "sr": lambda p, **kw: metaopt.SequentialReptile(
        torch.optim.Adam(p, lr=0.02), tasks=TASKS, inner_steps=2, outer_lr=0.4, seed=3, **kw
    ),
    "reptile": lambda p, **kw: metaopt.Reptile(
        torch.optim.SGD(p, lr=0.05, momentum=0.5), tasks=TASKS, inner_steps=2, outer_lr=0.5, seed=3, **kw
    ),
    "batched": lambda p, **kw: metaopt.Reptile(
        torch.optim.Adam(p, lr=0.02),
        tasks=TASKS,
        inner_steps=2,
        tasks_per_outer_step=3,
        outer_lr=0.6,
        seed=3,
        **kw,
    ),
    "batched_outer_opt": lambda p, **kw: metaopt.Reptile(
        torch.optim.SGD(p, lr=0.05),
        tasks=TASKS,
        inner_steps=2,
        tasks_per_outer_step=2,
        seed=3,
        outer_optimizer=lambda q: torch.optim.SGD(q, lr=0.5, momentum=0.9, nesterov=True),
        **kw,
    ),
    "annealed": lambda p, **kw: metaopt.SequentialReptile(
        torch.optim.SGD(p, lr=0.05),
        tasks=TASKS,
        inner_steps=3,
        outer_lr=0.9,
        outer_lr_final=0.1,
        anneal_steps=3,
        seed=3,
        **kw,
    ),
    "sr_gradvac": lambda p, **kw: metaopt.SequentialReptile(
        metaopt.GradVac(torch.optim.Adam(p, lr=0.02), tasks=TASKS, beta=0.3, seed=4),
        inner_steps=2,
        outer_lr=0.5,
        **kw,
    ),
}
PATHS = {
    "auto": {},
    "foreach": {"interpolation": "foreach"},
    "reference": {"interpolation": "reference"},
    "kernel": {},  # "auto" with a list kernel registered for the CPU (list_kernel below)
}


def list_kernel(dst, src, w, fast, copy_from):
    """A plain-torch kernel over lists of tensors, to the contract of ``register_kernel``."""
    for d, s in zip(dst, src):
        d.lerp_(s.to(d.dtype), w)
    if fast is not None:
        for f, c in zip(fast, copy_from):
            f.copy_(c)


@contextlib.contextmanager
def on_path(path):
    if path == "kernel":
        register_kernel("cpu", list_kernel)
    try:
        yield
    finally:
        if path == "kernel":
            register_kernel("cpu", None)


def trajectory(method, path, copy_at=None, how="deepcopy", steps=13):
    data = make_data()
    model = make_model(1)
    opt = METHODS[method](model.parameters(), **PATHS[path])
    with on_path(path):
        for k in range(steps):
            if k == copy_at:
                model, opt = reload((model, opt), how)
            run(opt, model, data, 1)
        assert opt.engine.path() == [
            "kernel" if path == "kernel" else PATHS[path].get("interpolation", "foreach")
        ]
    return params_of(model) + [s.detach().clone() for s in opt.slow_weights]


@settings(max_examples=12, deadline=None)
@given(
    method=st.sampled_from(sorted(METHODS)),
    path=st.sampled_from(sorted(PATHS)),
    copy_at=st.one_of(st.none(), st.integers(0, 12)),
    how=st.sampled_from(["deepcopy", "pickle"]),
)
def test_every_interpolation_path_gives_the_same_run(method, path, copy_at, how):
    """1. Batched Reptile off the (since removed) flat path wrote φ into the accumulator instead
    of θ. Every path (a registered list kernel included), for every method and option, with or
    without a deepcopy/pickle round trip mid-run, must give the reference run."""
    expected = trajectory(method, "reference")
    got = trajectory(method, path, copy_at, how)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_batched_reptile_resets_theta_on_every_path():
    for path in PATHS:
        data = make_data()
        model = make_model(1)
        opt = METHODS["batched"](model.parameters(), **PATHS[path])
        with on_path(path):
            run(opt, model, data, 6)  # one full outer step: 3 trajectories of 2
        assert opt.outer_step_count == 1
        for p, phi in zip(model.parameters(), opt.slow_weights):
            assert torch.equal(p, phi), path


def test_a_deepcopy_interpolates_its_own_parameters_in_place():
    """A deepcopy's engine holds the copy's parameters (not the original's) and its own slow
    buffers; the outer step writes the parameters in place, never re-pointing them."""
    data = make_data()
    model = make_model(1)
    opt = METHODS["sr"](model.parameters())
    run(opt, model, data, 1)
    model2, opt2 = copy.deepcopy((model, opt))
    ptrs = [p.data_ptr() for p in model2.parameters()]
    before = params_of(model)
    run(opt2, model2, data, 3)  # outer steps in the copy
    assert opt2.outer_step_count == 2 and opt2.engine.path() == ["foreach"]
    assert [p.data_ptr() for p in model2.parameters()] == ptrs
    assert sorted(map(id, opt2.engine.fast)) == sorted(map(id, model2.parameters()))
    mine = {b.untyped_storage().data_ptr() for b in opt2.engine.slow_buffers}
    assert not mine & {b.untyped_storage().data_ptr() for b in opt.engine.slow_buffers}
    assert all(s.untyped_storage().data_ptr() in mine for s in opt2.engine.slow)
    for p, b in zip(model.parameters(), before):  # the original did not move
        assert torch.equal(p, b)


# ---------------------------------------------------------------- 2. non-finite gradients
def nan_grad_loss(model, data, task):
    """A finite loss with a NaN gradient: d/dw sqrt(|w - w|²) at 0."""
    w = model[0].weight
    return task_loss(model, data, task) + torch.sqrt((w - w.detach()).pow(2).sum())


GRADIENT_CASES = {
    "sr": lambda m: metaopt.SequentialReptile(
        torch.optim.Adam(m.parameters(), lr=0.01), tasks=TASKS, inner_steps=2, seed=0
    ),
    "reptile": lambda m: metaopt.Reptile(
        torch.optim.Adam(m.parameters(), lr=0.01), tasks=TASKS, inner_steps=2, seed=0
    ),
    "mtl": lambda m: metaopt.MTL(torch.optim.Adam(m.parameters(), lr=0.01), tasks=TASKS),
    "gradnorm": lambda m: metaopt.GradNorm(
        metaopt.MTL(torch.optim.Adam(m.parameters(), lr=0.01), tasks=TASKS), layer=m[2].parameters()
    ),
    "pcgrad": lambda m: metaopt.PCGrad(torch.optim.Adam(m.parameters(), lr=0.01), tasks=TASKS),
}


@pytest.mark.parametrize("case", sorted(GRADIENT_CASES))
def test_finite_loss_with_non_finite_gradient_is_rejected(case):
    """2. The loss is finite but its gradient is NaN (outside GradNorm's layer): rejected with
    nothing moved, and the optimizer keeps working (before: parameters became NaN)."""
    data = make_data()
    model = make_model(0)
    opt = GRADIENT_CASES[case](model)
    run(opt, model, data, 1)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="non-finite gradient"):
        run(opt, model, data, 1, loss=nan_grad_loss)
    assert_unchanged(before, model, opt)
    run(opt, model, data, 1)
    assert all(bool(p.isfinite().all()) for p in model.parameters())


def test_huge_but_finite_gradients_are_not_mistaken_for_overflow():
    """The norm-based finite check re-checks exactly when a norm overflows."""
    model = make_model(0)
    opt = metaopt.MTL(torch.optim.SGD(model.parameters(), lr=1e-30), tasks=TASKS)
    data = make_data()
    opt.step({t: task_loss(model, data, t) * 1e30 for t in opt.next_tasks()})  # ‖g‖² > 3e38
    assert all(bool(p.isfinite().all()) for p in model.parameters())


# ---------------------------------------------------------------- 4. GradNorm's L(0)
def test_gradnorm_takes_initial_loss_at_first_positive_value():
    """4. A task whose first batch has no labelled example has loss 0: L/L(0) was NaN from then
    on. L(0) is now its first positive loss; until then its rate is the mean."""
    torch.manual_seed(0)
    enc, head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
    opt = metaopt.GradNorm(
        metaopt.MTL(torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-2), tasks=["a", "b"]),
        layer=enc.parameters(),
        alpha=1.5,
    )
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    seen = []
    for step in range(8):
        out = head(enc(x))
        scale_a = 0.0 if step == 0 else 1.0  # task a: no labels in the first batch
        opt.step({"a": scale_a * out[:, 0].pow(2).mean(), "b": 10 * (out[:, 1] - 1).pow(2).mean()})
        seen.append(record_of(opt.state_dict())["initial_losses"].clone())
    assert seen[0][0] == 0 and seen[0][1] > 0  # a: not yet known, b: known
    assert seen[1][0] > 0 and torch.equal(seen[1][1], seen[0][1])
    assert all(torch.equal(s, seen[1]) for s in seen[2:])
    w = opt.weights.detach()
    assert bool(w.isfinite().all()) and abs(float(w.sum()) - 2.0) < 1e-5
    assert not torch.allclose(w, torch.ones(2))  # still balancing


# ---------------------------------------------------------------- 5. outer optimizer + annealing
def test_outer_optimizer_with_annealing_is_refused():
    """5. Annealing was silently ignored when an outer optimizer was given."""
    model = make_model(0)
    with pytest.raises(ValueError, match="outer_optimizer.*lr_scheduler"):
        metaopt.SequentialReptile(
            torch.optim.SGD(model.parameters(), lr=0.1),
            tasks=TASKS,
            outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
            outer_lr_final=0.0,
            anneal_steps=4,
        )
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.1),
        tasks=TASKS,
        inner_steps=2,
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
    )
    opt.outer_lr_final, opt.anneal_steps = 0.0, 4
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="outer_optimizer"):
        run(opt, model, make_data(), 1)
    assert_unchanged(before, model, opt)


# ---------------------------------------------------------------- 6. param groups added later
@pytest.mark.parametrize("direct", [False, True])
def test_param_group_added_after_wrapping_is_interpolated(direct):
    """6. Sequential Reptile trained a later group but never interpolated it. A group added
    before the first step (through the wrapper, or to the torch optimizer directly) must give
    the run of an optimizer that had it from the start."""
    data = make_data()
    model = make_model(0)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model[0].parameters(), lr=0.1), tasks=TASKS, inner_steps=2, outer_lr=0.5, seed=0
    )
    group = {"params": list(model[2].parameters()), "lr": 0.05}
    (opt.base_optimizer if direct else opt).add_param_group(group)
    run(opt, model, data, 5)
    ref_model = make_model(0)
    ref = metaopt.SequentialReptile(
        torch.optim.SGD(
            [{"params": ref_model[0].parameters()}, {"params": ref_model[2].parameters(), "lr": 0.05}], lr=0.1
        ),
        tasks=TASKS,
        inner_steps=2,
        outer_lr=0.5,
        seed=0,
    )
    run(ref, ref_model, data, 5)
    assert len(opt.slow_weights) == 4
    for a, b in zip([*model.parameters(), *opt.slow_weights], [*ref_model.parameters(), *ref.slow_weights]):
        assert torch.equal(a, b)


def test_param_group_added_after_wrapping_gets_pcgrad_gradient():
    """6. PCGrad never gave a later group a gradient."""
    data = make_data()
    model = make_model(0)
    opt = metaopt.PCGrad(torch.optim.SGD(model[0].parameters(), lr=0.1), tasks=TASKS, seed=0)
    opt.base_optimizer.add_param_group({"params": list(model[2].parameters())})
    before = [p.detach().clone() for p in model[2].parameters()]
    run(opt, model, data, 1)
    for p, b in zip(model[2].parameters(), before):
        assert p.grad is not None and not torch.equal(p, b)


# ---------------------------------------------------------------- 7. weights loaded afterwards
def test_weights_loaded_after_building_are_detected_and_can_be_taken():
    """7. Pretrained weights loaded after the optimizer was built left φ stale: the first outer
    step pulled the model back toward the old weights."""
    data = make_data()
    model = make_model(0)
    pretrained = make_model(7).state_dict()
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.05), tasks=TASKS, inner_steps=2, outer_lr=0.5, seed=0
    )
    model.load_state_dict(pretrained)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"changed outside the optimizer.*reset_slow_weights"):
        run(opt, model, data, 1)
    assert_unchanged(before, model, opt)
    opt.reset_slow_weights()
    for phi, (name, t) in zip(opt.slow_weights, pretrained.items()):
        assert torch.equal(phi, t), name
    run(opt, model, data, 2)
    # the same run started from the pretrained weights
    ref_model = make_model(7)
    ref = metaopt.SequentialReptile(
        torch.optim.SGD(ref_model.parameters(), lr=0.05), tasks=TASKS, inner_steps=2, outer_lr=0.5, seed=0
    )
    run(ref, ref_model, data, 2)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_resume_in_either_order_equals_the_uninterrupted_run():
    """The model's state dict may be loaded before or after the optimizer's (DCP's
    set_state_dict loads the optimizer first); a change behind the optimizer's back once it has
    stepped after the load is still detected."""
    data = make_data()
    model = make_model(0)
    opt = metaopt.SequentialReptile(
        torch.optim.Adam(model.parameters(), lr=0.05), tasks=TASKS, inner_steps=3, outer_lr=0.5, seed=0
    )
    run(opt, model, data, 4)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run(opt, model, data, 4)
    expected = params_of(model)

    def fresh():
        m = make_model(5)
        return m, metaopt.SequentialReptile(
            torch.optim.Adam(m.parameters(), lr=0.05), tasks=TASKS, inner_steps=3, outer_lr=0.5, seed=9
        )

    m1, o1 = fresh()
    m1.load_state_dict(saved_model)
    o1.load_state_dict(saved_opt)
    run(o1, m1, data, 4)
    m2, o2 = fresh()
    o2.load_state_dict(saved_opt)
    m2.load_state_dict(saved_model)
    run(o2, m2, data, 4)
    for m in (m1, m2):
        for a, b in zip(m.parameters(), expected):
            assert torch.equal(a, b)
    m2.load_state_dict(saved_model)  # no optimizer load now: a change behind its back
    with pytest.raises(ValueError, match="accept_parameter_changes"):
        run(o2, m2, data, 1)


# ---------------------------------------------------------------- 8. buffers, casts
def bn_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 1)
    )


@pytest.mark.filterwarnings("ignore:.*no outer step yet")  # evaluated mid-trajectory on purpose
def test_buffers_are_interpolated_and_swapped_when_asked():
    """8. BatchNorm statistics were neither interpolated nor swapped by use_slow_weights()."""
    data = make_data()
    for with_buffers in (False, True):
        model = bn_model()
        opt = metaopt.SequentialReptile(
            torch.optim.SGD(model.parameters(), lr=0.05),
            tasks=TASKS,
            inner_steps=2,
            outer_lr=0.25,
            seed=0,
            buffers=model if with_buffers else None,
        )
        mean0 = model[1].running_mean.clone()
        run(opt, model, data, 1)
        theta = model[1].running_mean.clone()
        assert not torch.equal(theta, mean0)
        with opt.use_slow_weights():
            at_phi = model[1].running_mean.clone()
        assert torch.equal(at_phi, mean0 if with_buffers else theta)
        assert torch.equal(model[1].running_mean, theta)  # restored
        run(opt, model, data, 1)  # outer step
        assert opt.outer_step_count == 1
        n = len(list(model.parameters()))
        if with_buffers:
            assert len(opt.slow_weights) == n + 2  # params, running mean and var
            assert torch.equal(model[1].running_mean, opt.slow_weights[n])
        else:
            assert len(opt.slow_weights) == n
        assert model[1].num_batches_tracked.item() == 2  # counters keep their fast value


def test_buffers_follow_the_interpolation_formula():
    data = make_data()
    eta = 0.25
    model = bn_model()
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.0),
        tasks=TASKS,
        inner_steps=2,
        outer_lr=eta,
        seed=0,
        buffers=model,
    )
    mean0 = model[1].running_mean.clone()
    tasks = []
    for _ in range(2):
        (t,) = opt.next_tasks()
        tasks.append(t)
        opt.step({t: task_loss(model, data, t)})
    ref = bn_model()  # lr 0: only the statistics move
    for t in tasks:
        ref(data[t][0])
    expected = mean0 + eta * (ref[1].running_mean - mean0)
    torch.testing.assert_close(model[1].running_mean, expected, rtol=1e-6, atol=1e-7)


def test_model_cast_after_building_converts_slow_weights():
    """8. After model.to(torch.float64), φ stayed float32."""
    data = {t: (x.double(), y.double()) for t, (x, y) in make_data().items()}
    model = make_model(0)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.05), tasks=TASKS, inner_steps=2, outer_lr=0.5, seed=0
    )
    model.double()
    run(opt, model, data, 2)
    assert all(s.dtype == torch.float64 for s in opt.slow_weights)
    assert [b.dtype for b in opt.engine.slow_buffers] == [torch.float64]
    assert sorted(map(id, opt.engine.fast)) == sorted(map(id, model.parameters()))
    ref = make_model(0).double()
    ropt = metaopt.SequentialReptile(
        torch.optim.SGD(ref.parameters(), lr=0.05), tasks=TASKS, inner_steps=2, outer_lr=0.5, seed=0
    )
    run(ropt, ref, data, 2)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- 9. shared storage
@pytest.mark.parametrize("path", sorted(PATHS))
def test_parameters_sharing_storage_stay_tied_through_training(path):
    """9. Packing (since removed) broke storage sharing between distinct parameters."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    tied = torch.nn.Parameter(torch.zeros(4, 4))
    tied.data = lin.weight.data  # another Parameter, same storage
    head = torch.nn.Linear(4, 1)
    params = [*lin.parameters(), tied, *head.parameters()]
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(params, lr=0.05), tasks=["a"], inner_steps=2, outer_lr=0.5, seed=0, **PATHS[path]
    )
    with on_path(path):
        for _ in range(5):
            opt.step({"a": head(torch.tanh(x @ tied.T + lin(x))).pow(2).mean()})
            assert lin.weight.data_ptr() == tied.data_ptr()


# ---------------------------------------------------------------- 12. losses reaching nothing
@pytest.mark.parametrize(
    "make",
    [
        lambda m: metaopt.MTL(torch.optim.SGD(m.parameters(), lr=0.1), tasks=TASKS),
        lambda m: metaopt.PCGrad(
            torch.optim.SGD(m.parameters(), lr=0.1), tasks=TASKS, shared=m[0].parameters(), allow_unused=True
        ),
        lambda m: metaopt.GradVac(
            torch.optim.SGD(m.parameters(), lr=0.1), tasks=TASKS, shared=m[0].parameters(), allow_unused=True
        ),
    ],
)
def test_a_loss_reaching_no_parameter_is_rejected(make):
    """12. The loss of a module left out of the optimizer was accepted: nothing trained."""
    data = make_data()
    model = make_model(0)
    stranger = make_model(1)
    opt = make(model)
    before = snapshot(model, opt)
    losses = {t: task_loss(model, data, t) for t in opt.next_tasks()}
    losses["bn"] = task_loss(stranger, data, "bn")
    with pytest.raises(ValueError, match=r"\['bn'\] reaches none"):
        opt.step(losses)
    assert_unchanged(before, model, opt)


# ---------------------------------------------------------------- 13. checks before moving
@pytest.mark.parametrize("make", [METHODS["sr"], METHODS["batched"]], ids=["sr", "batched"])
def test_removed_flat_path_is_refused_and_flatten_packs_nothing(make):
    """13. The flat path failed only after the inner step had run (on re-allocated
    parameters). It is gone: asking for it is refused when the optimizer is built, and
    flatten=True warns and leaves the parameters where they are."""
    model = make_model(0)
    with pytest.raises(ValueError, match="'flat' is gone"):
        make(model.parameters(), interpolation="flat")
    ptrs = [p.data_ptr() for p in model.parameters()]
    with pytest.warns(DeprecationWarning, match="flatten=True is ignored"):
        opt = make(model.parameters(), flatten=True)
    run(opt, model, make_data(), 6)
    assert opt.outer_step_count >= 1
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert metaopt.functional.is_packed(list(model.parameters())) is None


def test_shape_change_raises_before_the_inner_step():
    model = make_model(0)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, inner_steps=1, seed=0
    )
    with torch.no_grad():
        model[2].bias.data = torch.zeros(())
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="changed shape"):
        opt.step({t: model(make_data()[t][0]).pow(2).mean() for t in opt.next_tasks()})
    assert_unchanged(before, model, opt)


# ---------------------------------------------------------------- 14. half-applied loads
def test_load_state_dict_is_validated_then_applied_or_rolled_back():
    """14. A load that failed part-way left a half-loaded optimizer."""
    data = make_data()
    model = make_model(0)
    opt = metaopt.SequentialReptile(
        torch.optim.Adam(model.parameters(), lr=0.05), tasks=TASKS, inner_steps=3, outer_lr=0.5, seed=0
    )
    run(opt, model, data, 4)
    other = make_model(1)
    donor = metaopt.SequentialReptile(
        torch.optim.Adam(other.parameters(), lr=0.05), tasks=TASKS, inner_steps=3, outer_lr=0.5, seed=5
    )
    run(donor, other, data, 5)
    good = copy.deepcopy(donor.state_dict())
    before = snapshot(model, opt)
    # caught by validation: a slow-weight shape
    bad = copy.deepcopy(good)
    first = next(iter(bad["state"]))
    bad["state"][first]["metaopt_slow"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(bad)
    assert_unchanged(before, model, opt)
    # found only inside torch's own load, after ours was applied: rolled back
    bad = copy.deepcopy(good)
    bad["state"][first]["exp_avg"] = torch.empty(8, 4, device="meta")
    with pytest.raises((NotImplementedError, RuntimeError)):
        opt.load_state_dict(bad)
    assert_unchanged(before, model, opt)
    opt.load_state_dict(good)
    assert opt.step_count == 5


def test_loaded_state_does_not_alias_the_source():
    data = make_data()
    model = make_model(0)
    opt = metaopt.SequentialReptile(
        torch.optim.Adam(model.parameters(), lr=0.05), tasks=TASKS, inner_steps=3, seed=0
    )
    run(opt, model, data, 2)
    state = opt.state_dict()
    kept = copy.deepcopy(state)
    model2 = make_model(0)
    model2.load_state_dict(model.state_dict())
    opt2 = metaopt.SequentialReptile(
        torch.optim.Adam(model2.parameters(), lr=0.05), tasks=TASKS, inner_steps=3, seed=0
    )
    opt2.load_state_dict(state)
    run(opt2, model2, data, 3)
    from _snapshot import _same

    assert _same(opt.state_dict()["state"], kept["state"], "source") is None


# ---------------------------------------------------------------- 15. shared= by identity
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_explicit_shared_survives_copies(how):
    """15. shared= was remembered by id(): a copy rejected every step."""
    data = make_data()
    model = make_model(0)
    opt = metaopt.GradVac(
        torch.optim.SGD(model.parameters(), lr=0.1),
        tasks=TASKS,
        shared=model[0].parameters(),
        groups="parameter",
        beta=0.2,
        seed=0,
    )
    run(opt, model, data, 2)
    model2, opt2 = reload((model, opt), how)
    run(opt, model, data, 3)
    run(opt2, model2, data, 3)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- 16. pickling with a scheduler
def test_pickle_and_deepcopy_with_an_lr_scheduler():
    """16. torch.save(opt) raised PicklingError with a scheduler attached, and a deepcopy's
    step ran the original's."""
    data = make_data()
    model = make_model(0)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, inner_steps=2, seed=0
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    run(opt, model, data, 1)
    sched.step()
    pickle.dumps(opt)  # no PicklingError
    torch.save((model, opt), io.BytesIO())
    model2, opt2 = copy.deepcopy((model, opt))
    count = opt.step_count
    run(opt2, model2, data, 1)
    assert opt.step_count == count and opt2.step_count == count + 1


# ---------------------------------------------------------------- 17. validated setters
@pytest.mark.parametrize(
    "make,attr,bad",
    [
        (
            lambda m: metaopt.SequentialReptile(torch.optim.SGD(m.parameters(), lr=0.1), tasks=TASKS),
            "outer_lr",
            2.0,
        ),
        (
            lambda m: metaopt.SequentialReptile(torch.optim.SGD(m.parameters(), lr=0.1), tasks=TASKS),
            "inner_steps",
            0,
        ),
        (
            lambda m: metaopt.SequentialReptile(torch.optim.SGD(m.parameters(), lr=0.1), tasks=TASKS),
            "anneal_steps",
            0,
        ),
        (
            lambda m: metaopt.Reptile(torch.optim.SGD(m.parameters(), lr=0.1), tasks=TASKS),
            "tasks_per_outer_step",
            0,
        ),
        (lambda m: metaopt.GradVac(torch.optim.SGD(m.parameters(), lr=0.1), tasks=TASKS), "beta", 1.5),
        (lambda m: metaopt.PCGrad(torch.optim.SGD(m.parameters(), lr=0.1), tasks=TASKS), "reduction", "max"),
        (lambda m: metaopt.MTL(torch.optim.SGD(m.parameters(), lr=0.1), tasks=TASKS), "allow_unused", "yes"),
        (
            lambda m: metaopt.GradNorm(
                metaopt.MTL(torch.optim.SGD(m.parameters(), lr=0.1), tasks=TASKS), layer=m[0].parameters()
            ),
            "alpha",
            -1.0,
        ),
    ],
)
def test_hyper_parameters_are_validated_when_set(make, attr, bad):
    """17. opt.outer_lr = 2.0 raised only after θ had moved; inner_steps = 0 silently disabled
    outer steps."""
    opt = make(make_model(0))
    kept = getattr(opt, attr)
    with pytest.raises((ValueError, TypeError), match=attr):
        setattr(opt, attr, bad)
    assert getattr(opt, attr) == kept


def test_lowering_inner_steps_mid_trajectory_ends_it_at_the_next_step():
    data = make_data()
    model = make_model(0)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, inner_steps=5, seed=0
    )
    run(opt, model, data, 3)
    opt.inner_steps = 2
    run(opt, model, data, 1)
    assert opt.outer_step_count == 1


# ---------------------------------------------------------------- 18. hooks
def test_torch_optimizer_hooks_and_profiler_label_are_honoured():
    """18. Global step hooks, the profiler label and the state-dict hooks were skipped."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    data = make_data()
    model = make_model(0)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, inner_steps=2, seed=0
    )
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global-pre", type(o).__name__))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global-post", type(o).__name__))),
        opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre")),
        opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1}),
        opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items() if k != "extra"}),
        opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post")),
    ]
    try:
        with torch.profiler.profile() as prof:
            run(opt, model, data, 1)
        names = {e.name for e in prof.events()}
        assert "Optimizer.step#SequentialReptile.step" in names
        assert ("global-pre", "SequentialReptile") in calls and ("global-post", "SequentialReptile") in calls
        state = opt.state_dict()
        assert state["extra"] == 1 and "sd-pre" in calls
        opt.load_state_dict(state)
        assert calls[-1] == "load-post"
    finally:
        for h in handles:
            h.remove()


def test_hyper_parameters_travel_with_the_state_dict():
    """An option changed by assignment mid-run is saved and restored (as torch.optim restores its
    param groups' hyper-parameters); a bad saved value is refused with nothing changed."""
    data = make_data()
    model = make_model(0)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, inner_steps=3, seed=0
    )
    run(opt, model, data, 2)
    opt.outer_lr, opt.inner_steps = 0.05, 4
    state = copy.deepcopy(opt.state_dict())
    fresh_model = make_model(0)
    fresh = metaopt.SequentialReptile(torch.optim.SGD(fresh_model.parameters(), lr=0.1), tasks=TASKS, seed=1)
    before = snapshot(fresh_model, fresh)
    bad = copy.deepcopy(state)
    record_of(bad)["options"]["outer_lr"] = 3.0
    with pytest.raises(ValueError, match="outer_lr"):
        fresh.load_state_dict(bad)
    assert_unchanged(before, fresh_model, fresh)
    fresh.load_state_dict(state)
    assert (fresh.outer_lr, fresh.inner_steps) == (0.05, 4)
