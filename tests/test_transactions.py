"""A refused step or load changes nothing, the torch way's half-kept steps are closed, and bad
state is refused naming the field: regression tests for what an adversarial pass found."""

from __future__ import annotations

import copy

import pytest
import torch

import metaopt
from metaopt.parts.state_dict import record_of, with_record

from _stacks import tensors_of

TASKS = ["a", "b"]


def net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()


def x(step: int, task: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + TASKS.index(task))
    return torch.randn(5, 3, generator=g, dtype=torch.float64)


def loss(model: torch.nn.Module, step: int, task: str) -> torch.Tensor:
    return model(x(step, task)).pow(2).mean() + 0.1


def snapshot(opt: metaopt.MultiTaskOptimizer, model: torch.nn.Module) -> list[torch.Tensor]:
    grads = [p.grad if p.grad is None else p.grad.clone() for p in model.parameters()]
    return tensors_of([opt.state_dict(), list(model.parameters()), grads])


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))


def sr(model: torch.nn.Module, **kw) -> metaopt.SequentialReptile:
    return metaopt.SequentialReptile(
        torch.optim.Adam(model.parameters(), lr=0.05), tasks=TASKS, inner_steps=3, seed=0, **kw
    )


# ---------------------------------------------------------------- the task draw
def test_a_refused_step_without_next_tasks_does_not_use_up_the_draw():
    model = net()
    opt = sr(model)
    before = snapshot(opt, model)
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        opt.step()  # nothing to step on; the draw step() made must be undone
    assert same(snapshot(opt, model), before)
    with pytest.raises(ValueError, match="expected losses"):
        opt.step({"zz": loss(model, 0, "a")})
    assert same(snapshot(opt, model), before)


# ---------------------------------------------------------------- losses that cannot be used
def test_a_reused_loss_is_a_value_error_naming_it_and_changes_nothing():
    model = net()
    opt = metaopt.MTL(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS)
    losses = {t: loss(model, 0, t) for t in TASKS}
    opt.step(losses)
    before = snapshot(opt, model)
    with pytest.raises(ValueError, match="already used by a backward pass"):
        opt.step(losses)
    assert same(snapshot(opt, model), before)


@pytest.mark.parametrize("cls", [metaopt.PCGrad, metaopt.GradVac])
def test_a_reused_loss_in_gradient_surgery_is_a_value_error_naming_it(cls):
    model = net()
    opt = cls(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS)
    losses = {t: loss(model, 0, t) for t in TASKS}
    opt.step(losses)
    before = snapshot(opt, model)
    with pytest.raises(ValueError, match="already freed: a loss reused"):
        opt.step(losses)
    assert same(snapshot(opt, model), before)


def test_a_stale_loss_is_a_value_error_naming_it():
    model = net()
    opt = metaopt.MTL(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS)
    stale = {t: loss(model, 0, t) for t in TASKS}
    opt.step({t: loss(model, 1, t) for t in TASKS})  # moves the parameters in place
    with pytest.raises(ValueError, match="changed in place"):
        opt.step(stale)


# ---------------------------------------------------------------- .grad around the step
def _heads_model() -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    torch.manual_seed(0)
    heads = {t: torch.nn.Linear(4, 1).double() for t in TASKS}
    body = torch.nn.Linear(3, 4).double()
    # the head of "b" comes first in the optimizer, so a step on "a" alone leaves it no gradient
    model = torch.nn.ModuleList([heads["b"], body, heads["a"]])
    return model, {"body": body, **heads}


@pytest.mark.parametrize("method", ["pcgrad", "gradvac"])
def test_a_refused_one_loop_step_restores_grad_exactly_when_the_first_parameter_has_none(method):
    model, part = _heads_model()
    cls = metaopt.PCGrad if method == "pcgrad" else metaopt.GradVac
    opt = cls(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, allow_unused=True, retain_graph=True)

    def losses(step: int, bad: bool = False) -> dict[str, torch.Tensor]:
        h = torch.tanh(part["body"](x(step, "a")))
        out = {"a": part["a"](h).pow(2).mean(), "b": h.pow(2).mean()}  # "b" skips its head
        if bad:
            out["b"] = out["b"] * float("nan")
        return out

    opt.step(losses(0))  # leaves .grad in place; the first parameter got none
    params = list(model.parameters())
    assert params[0].grad is None
    held = [p.grad for p in params]
    kept = [None if g is None else g.clone() for g in held]
    with pytest.raises(ValueError, match="non-finite"):
        opt.step(losses(1, bad=True))
    for p, h, k in zip(params, held, kept):
        assert p.grad is h
        assert (k is None and p.grad is None) or torch.equal(p.grad, k)


@pytest.mark.parametrize("method", ["pcgrad", "gradvac", "weighted"])
def test_step_rechecks_grad_written_after_backward(method):
    model = net()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    if method == "weighted":
        opt = metaopt.Weighted(sgd, weighting=lambda G: torch.ones(G.shape[0], dtype=G.dtype), tasks=TASKS)
    else:
        opt = (metaopt.PCGrad if method == "pcgrad" else metaopt.GradVac)(sgd, tasks=TASKS)
    opt.backward({t: loss(model, 0, t) for t in TASKS})
    params = list(model.parameters())
    with torch.no_grad():
        params[0].grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="non-finite gradient"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    model.zero_grad()  # what the HF Trainer calls: the backward is gone
    with pytest.raises(ValueError, match="no per-task gradients"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_a_parameter_frozen_between_backward_and_step_is_not_stepped():
    model = net()
    opt = sr(model)
    opt.next_tasks()
    sum(loss(model, 0, t) for t in TASKS).backward()
    first = next(iter(model.parameters()))
    with torch.no_grad():
        first.grad.fill_(float("nan"))
    first.requires_grad_(False)
    before = first.detach().clone()
    opt.step()
    assert torch.equal(first, before)
    assert all(bool(p.isfinite().all()) for p in model.parameters())


def test_add_param_group_between_two_backwards_is_refused_with_nothing_changed():
    model = net()
    extra = torch.nn.Linear(2, 2).double()
    opt = metaopt.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS)
    opt.backward({t: loss(model, 0, t) for t in TASKS})
    groups = len(opt.param_groups)
    with pytest.raises(ValueError, match="backward.*pending"):
        opt.add_param_group({"params": extra.parameters()})
    assert len(opt.param_groups) == groups
    opt.step()


# ---------------------------------------------------------------- corrupt state dicts
def _sr_mid_run(**kw) -> tuple[metaopt.SlowFastOptimizer, torch.nn.Module]:
    model = net()
    opt = metaopt.Reptile(
        torch.optim.Adam(model.parameters(), lr=0.05), tasks=TASKS, inner_steps=2, seed=0, **kw
    )
    for s in range(3):
        opt.step({t: loss(model, s, t) for t in opt.next_tasks()})
    return opt, model


def _set(path: tuple, value):
    def edit(state):
        node = state
        for k in path[:-1]:
            node = record_of(node) if k == "metaopt" else node[k]  # the record, wherever it is
        node[path[-1]] = value
        return state

    return edit


def _drop_acc(state):
    for entry in state["state"].values():
        entry.pop("metaopt_acc", None)
    return state


def _first_param(field, value):
    def edit(state):
        state["state"][0][field] = value
        return state

    return edit


CORRUPT = {
    "unknown task": (_set(("metaopt", "task"), "zz"), "saved task 'zz'"),
    "pending of two tasks": (_set(("metaopt", "pending"), ["a", "b"]), "pending draw"),
    "pending other than the trajectory's task": (None, "trajectory's task"),
    "negative inner_count": (_set(("metaopt", "inner_count"), -1), "inner_count -1"),
    "trajectory that is not an int": (_set(("metaopt", "trajectory"), 1.0), "trajectory 1.0"),
    "mid trajectory without the trajectory's task": (_set(("metaopt", "task"), None), "trajectory's task"),
    "NaN slow weights": (_first_param("metaopt_slow", torch.full((4, 3), float("nan"))), "not all finite"),
    "slow weights of another shape": (_first_param("metaopt_slow", torch.zeros(3)), "shape"),
    "an injected accumulator": (
        lambda st: _first_param("metaopt_acc", torch.ones(4, 3))(_drop_acc(st)),
        "accumulator are for other tensors",
    ),
    "an unknown metaopt field": (_first_param("metaopt_bogus", torch.ones(1)), "metaopt_bogus"),
    "a wrong-shaped parked state": (_first_param("metaopt_slot0_exp_avg", torch.ones(7)), "has shape"),
    "a parked state for the live trajectory": (
        _first_param("metaopt_slot1_exp_avg", torch.ones(4, 3)),
        "not a parked trajectory",
    ),
    "mid outer step without the mean": (_drop_acc, "accumulated mean"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_every_corrupt_owned_field_is_refused_with_nothing_changed(case):
    opt, model = _sr_mid_run(tasks_per_outer_step=2)
    edit, message = CORRUPT[case]
    state = copy.deepcopy(opt.state_dict())
    assert record_of(state)["inner_count"] == 1 and record_of(state)["trajectory"] == 1
    if edit is None:  # mid-trajectory: the pending draw must be the trajectory's task
        opt.next_tasks()
        state = copy.deepcopy(opt.state_dict())
        other = [t for t in TASKS if t != record_of(state)["task"]]
        edit = _set(("metaopt", "pending"), other)
    bad = edit(copy.deepcopy(state))
    before = snapshot(opt, model)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)
    assert same(snapshot(opt, model), before)
    opt.load_state_dict(state)  # the saved state itself loads
    opt.step({t: loss(model, 9, t) for t in opt.next_tasks()})


def test_a_state_saved_by_another_composition_is_refused():
    model = net()
    plain = sr(model)
    composed = metaopt.SequentialReptile(
        metaopt.PCGrad(torch.optim.Adam(model.parameters(), lr=0.05), tasks=TASKS), inner_steps=3
    )
    with pytest.raises(ValueError, match="saved without a wrapped metaopt optimizer"):
        composed.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="saved with a wrapped metaopt optimizer"):
        plain.load_state_dict(composed.state_dict())
    state = plain.state_dict()
    pcgrad = metaopt.PCGrad(torch.optim.Adam(model.parameters(), lr=0.05), tasks=TASKS)
    inner_view = with_record(state["state"], state["param_groups"], {**record_of(state), "class": "PCGrad"})
    with pytest.raises(ValueError, match="not this optimizer's"):
        pcgrad.load_state_dict(inner_view)


# ---------------------------------------------------------------- options across ranks
def test_process_group_local_is_accepted_by_every_method():
    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=0.1)

    makers = [
        lambda m: metaopt.SequentialReptile(sgd(m), tasks=TASKS, process_group="local"),
        lambda m: metaopt.Reptile(sgd(m), tasks=TASKS, process_group="local"),
        lambda m: metaopt.MTL(sgd(m), tasks=TASKS, process_group="local"),
        lambda m: metaopt.PCGrad(sgd(m), tasks=TASKS, process_group="local"),
        lambda m: metaopt.GradVac(sgd(m), tasks=TASKS, process_group="local"),
        lambda m: metaopt.GradNorm(
            metaopt.MTL(sgd(m), tasks=TASKS), layer=[m[0].weight], process_group="local"
        ),
    ]
    for make in makers:
        model = net()
        opt = make(model)
        opt.step({t: loss(model, 0, t) for t in opt.next_tasks()})
        assert copy.deepcopy(opt).process_group == "local"
    with pytest.raises(ValueError, match="process group"):
        metaopt.MTL(sgd(net()), tasks=TASKS, process_group="everyone")


# ---------------------------------------------------------------- found by review
def _batched(model):
    return metaopt.Reptile(
        torch.optim.Adam(model.parameters(), lr=0.1), tasks=TASKS, inner_steps=1, tasks_per_outer_step=2
    )


@pytest.mark.parametrize("value", ["garbage", None, torch.tensor(1.0), torch.ones(7)])
def test_a_parked_trajectory_state_of_the_wrong_kind_is_refused(value):
    model = net()
    opt = _batched(model)
    opt.step({t: loss(model, 0, t) for t in opt.next_tasks()})
    state = opt.state_dict()
    assert "metaopt_slot0_exp_avg" in state["state"][0]
    state["state"][0]["metaopt_slot0_exp_avg"] = value
    fresh = _batched(model)
    before = snapshot(fresh, model)
    with pytest.raises(ValueError, match="parked state"):
        fresh.load_state_dict(state)
    assert same(snapshot(fresh, model), before)


def _nesterov(model):
    return metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.1),
        tasks=["a"],
        inner_steps=1,
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
    )


@pytest.mark.parametrize("value", [float("nan"), "garbage", (2,)])
def test_outer_optimizer_fields_are_validated(value):
    model = net()
    opt = _nesterov(model)
    opt.step({"a": loss(model, 0, "a")})
    state = opt.state_dict()
    bad = torch.zeros(value) if isinstance(value, tuple) else value
    if isinstance(value, float):
        bad = torch.full_like(state["state"][0]["metaopt_outer_momentum_buffer"], value)
    state["state"][0]["metaopt_outer_momentum_buffer"] = bad
    fresh = _nesterov(model)
    before = snapshot(fresh, model)
    with pytest.raises(ValueError, match="outer-optimizer state"):
        fresh.load_state_dict(state)
    assert same(snapshot(fresh, model), before)
    state = opt.state_dict()
    del record_of(state)["outer_param_groups"][0]["params"]
    with pytest.raises(ValueError, match="outer_param_groups"):
        fresh.load_state_dict(state)


def test_a_state_saved_after_lowering_tasks_per_outer_step_loads():
    """A trajectory parked while tasks_per_outer_step was higher stays parked until the outer
    step ends: such a state is legitimate and continues identically (found by the long fuzz)."""
    model = net()
    opt = _batched(model)
    for s in range(2):  # one outer step of two trajectories: trajectory 1's state is parked
        opt.step({t: loss(model, s, t) for t in opt.next_tasks()})
    opt.tasks_per_outer_step = 1
    state = copy.deepcopy(opt.state_dict())
    assert record_of(state)["trajectory"] == 0 and "metaopt_slot1_exp_avg" in state["state"][0]
    twin_model = net(seed=3)
    twin_model.load_state_dict(model.state_dict())
    twin = _batched(twin_model)
    twin.tasks_per_outer_step = 1
    twin.load_state_dict(state)
    for s in range(2, 5):
        for o, m in ((opt, model), (twin, twin_model)):
            o.step({t: loss(m, s, t) for t in o.next_tasks()})
    assert same(list(model.parameters()), list(twin_model.parameters()))


def test_a_state_saved_after_lowering_inner_steps_mid_trajectory_loads():
    """inner_count may exceed inner_steps once inner_steps was lowered mid-trajectory (the
    trajectory then ends at the next step): such a state is legitimate and continues
    identically."""
    model = net()
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, inner_steps=4, outer_lr=0.5, seed=0
    )
    for s in range(2):
        opt.step({t: loss(model, s, t) for t in opt.next_tasks()})
    opt.inner_steps = 1
    state = copy.deepcopy(opt.state_dict())
    twin_model = net(seed=3)
    twin_model.load_state_dict(model.state_dict())
    twin = metaopt.SequentialReptile(torch.optim.SGD(twin_model.parameters(), lr=0.1), tasks=TASKS)
    twin.load_state_dict(state)
    for o, m in ((opt, model), (twin, twin_model)):
        assert o.step({t: loss(m, 5, t) for t in o.next_tasks()}).outer_update
    assert same(list(model.parameters()), list(twin_model.parameters()))


def test_saved_options_that_contradict_each_other_are_refused():
    model = net()
    opt = sr(model)
    state = opt.state_dict()
    record_of(state)["options"]["outer_lr"] = None
    with pytest.raises(ValueError, match="outer_lr must be a number"):
        opt.load_state_dict(state)
    state = opt.state_dict()
    record_of(state)["options"]["anneal_steps"] = 5
    with pytest.raises(ValueError, match="go together"):
        opt.load_state_dict(state)


def test_a_run_that_froze_a_parameter_resumes_identically():
    def run(resume_at: int | None) -> list[torch.Tensor]:
        model = net()
        opt = metaopt.SequentialReptile(
            torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, inner_steps=2, outer_lr=0.5, seed=0
        )
        for s in range(8):
            if s == 1:
                model[0].weight.requires_grad_(False)
            if s == resume_at:
                saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
                model = net(seed=5)
                model[0].weight.requires_grad_(False)
                opt = metaopt.SequentialReptile(
                    torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, inner_steps=2, outer_lr=0.5
                )
                model.load_state_dict(saved[0])
                opt.load_state_dict(saved[1])
            opt.step({t: loss(model, s, t) for t in opt.next_tasks()})
        return [p.detach().clone() for p in model.parameters()]

    whole = run(None)
    for at in (2, 3, 4):  # after an outer step, and mid-trajectory right after the freeze
        assert same(run(at), whole)


@pytest.mark.filterwarnings("ignore:.*no outer step yet")  # evaluated mid-trajectory on purpose
def test_use_slow_weights_with_a_parameter_frozen_for_a_while_changes_nothing():
    def run(evaluate: bool) -> torch.Tensor:
        model = net()
        opt = metaopt.SequentialReptile(
            torch.optim.SGD(model.parameters(), lr=0.1), tasks=["a"], inner_steps=4, outer_lr=0.5
        )
        opt.step({"a": loss(model, 0, "a")})
        model[0].weight.requires_grad_(False)
        opt.step({"a": loss(model, 1, "a")})
        if evaluate:
            with opt.use_slow_weights():
                pass
        model[0].weight.requires_grad_(True)
        for s in range(2, 4):
            opt.step({"a": loss(model, s, "a")})
        return model[0].weight.detach().clone()

    assert torch.equal(run(True), run(False))


@pytest.mark.parametrize("composed", [False, True])
def test_a_refused_scaled_step_leaves_grad_scaled(composed):
    model = net()
    opt = metaopt.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS)
    if composed:
        opt = metaopt.SequentialReptile(opt, inner_steps=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt.backward({t: loss(model, 0, t) for t in opt.next_tasks()}, grad_scaler=scaler)
    held = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():  # a write outside the optimizer between backward and step
        first = next(iter(model.parameters()))
        first.grad[0, 0] = first.grad[0, 0]  # same value, so GradScaler finds nothing
    inner = opt.inner if composed else opt
    inner.base_optimizer.register_step_pre_hook(_refuse)
    with pytest.raises(ValueError, match="refused by a hook"):
        scaler.step(opt)
    for p, g in zip(model.parameters(), held):
        assert torch.equal(p.grad, g)


def _refuse(optimizer, args, kwargs):
    raise ValueError("refused by a hook")


def test_a_refused_skipped_step_keeps_the_stream():
    model = net()
    opt = metaopt.Reptile(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, inner_steps=3)
    before = record_of(opt.state_dict())
    with torch.no_grad():
        next(iter(model.parameters())).add_(1.0)  # makes the next step refuse
    opt.found_inf = torch.ones(())
    try:
        with pytest.raises(ValueError, match="changed outside the optimizer"):
            opt.step()
    finally:
        opt.__dict__.pop("found_inf", None)
    after = record_of(opt.state_dict())
    assert after["pending"] is None and torch.equal(after["generator"], before["generator"])


@pytest.mark.parametrize(
    "edit",
    [
        lambda own: own["engine"].__setitem__("acc", "x"),
        lambda own: own.__setitem__("inner_slots", "x"),
        lambda own: own.__setitem__("outer_optimizer", "x"),
        lambda own: own.__setitem__("version", torch.tensor([2, 2])),
    ],
)
def test_a_corrupt_0_1_state_dict_is_a_value_error(edit):
    from test_state_migration import SAVED, v1

    run = SAVED["runs"]["outer_nesterov"]
    state = copy.deepcopy(run["optimizer"])
    edit(record_of(state))
    model = v1.model()
    opt = v1.build("outer_nesterov", model)
    with pytest.raises(ValueError):
        opt.load_state_dict(state)


def test_planned_tasks_moves_nothing_in_a_composition():
    model = net()
    opt = metaopt.SequentialReptile(
        metaopt.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS), inner_steps=2
    )
    before = snapshot(opt, model)  # draws first: the pending draw is part of the state
    opt.zero_grad()
    fresh = metaopt.SequentialReptile(
        metaopt.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS), inner_steps=2
    )
    state = copy.deepcopy(fresh.state_dict())
    assert fresh.planned_tasks(3) == [TASKS] * 3
    assert same(tensors_of(fresh.state_dict()), tensors_of(state))
    assert record_of(fresh.state_dict())["inner"]["pending"] is None
    assert same(snapshot(opt, model), before)


@pytest.mark.parametrize("field, value", [("exp_avg", "garbage"), ("exp_avg", torch.ones(5)), ("step", None)])
def test_a_gradnorm_weight_optimizer_state_it_cannot_step_from_is_refused(field, value):
    model = net()

    def make():
        return metaopt.GradNorm(
            metaopt.MTL(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS), layer=[model[0].weight]
        )

    opt = make()
    opt.step({t: loss(model, 0, t) for t in TASKS})
    state = opt.state_dict()
    record_of(state)["weight_optimizer"]["state"][0][field] = value
    fresh = make()
    before = snapshot(fresh, model)
    with pytest.raises(ValueError, match="weight optimizer's state"):
        fresh.load_state_dict(state)
    assert same(snapshot(fresh, model), before)


# ---------------------------------------------------------------- found reviewing the parts rework
def test_gradnorm_floors_the_weights_at_the_class_s_min_weight():
    """The floor of the weights is ``GradNorm.MIN_WEIGHT`` as the class (or a subclass) sets it.
    Oracle: the first GradNorm update written out in float64 (every L(0) is the first loss,
    so every r_i = 1 and the target is the mean norm; SGD at lr 1 on the weights)."""

    class Floored(metaopt.GradNorm):
        MIN_WEIGHT = 0.4

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    data = torch.randn(8, 3, dtype=torch.float64)

    def losses() -> dict[str, torch.Tensor]:
        out = model(data)
        return {"a": out[:, 0].pow(2).mean(), "b": 50 * out[:, 1].pow(2).mean()}

    norms = torch.stack(
        [torch.autograd.grad(v, model.weight, retain_graph=True)[0].norm() for v in losses().values()]
    ).double()
    mean = norms.mean()
    w = torch.ones(2, dtype=torch.float64) - torch.sign(norms - mean) * norms  # SGD, lr 1
    w = w.clamp(min=0.4)
    expected = w * 2 / w.sum()
    assert expected.min() < 1.0 and (w == 0.4).any()  # the floor is what decides this step
    opt = Floored(
        torch.optim.SGD(model.parameters(), lr=0.0),
        tasks=["a", "b"],
        layer=[model.weight],
        weight_optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
    )
    opt.step(losses())
    torch.testing.assert_close(opt.weights.detach().double(), expected, rtol=1e-6, atol=1e-6)


def test_a_surgery_backward_that_fails_part_way_is_named_at_the_step():
    """A second micro-batch's backward that raises after its rows were accumulated (here in the
    weighting): step() refuses, naming the fix, and nothing moves."""
    calls = []

    def weighting(G: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return torch.ones(2, dtype=G.dtype) if len(calls) == 1 else torch.ones(3, dtype=G.dtype)

    model = net()
    opt = metaopt.Weighted(torch.optim.SGD(model.parameters(), lr=0.1), weighting=weighting, tasks=TASKS)
    opt.backward({t: loss(model, 0, t) for t in opt.next_tasks()})
    with pytest.raises(ValueError, match="weighting returned"):
        opt.backward({t: loss(model, 1, t) for t in opt.next_tasks()})
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="failed part-way.*zero_grad"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.step_count == 0
    opt.zero_grad()
    calls.clear()
    opt.step({t: loss(model, 2, t) for t in opt.next_tasks()})
    assert opt.step_count == 1


def test_a_refused_summed_backward_leaves_the_grad_scaler_alone():
    """The checks of a summed backward come before the losses are scaled, for one task as for
    several: a refused backward does not start the GradScaler (its scale tensor is made
    lazily, at the first scale())."""
    model, stranger = net(), net(1)
    for tasks in (["a"], TASKS):
        opt = metaopt.MTL(torch.optim.SGD(model.parameters(), lr=0.1), tasks=tasks)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        with pytest.raises(ValueError, match="reach(es)? none"):
            opt.backward({t: loss(stranger, 0, t) for t in tasks}, grad_scaler=scaler)
        assert scaler._scale is None


def test_a_refused_first_surgery_backward_leaves_no_rows_behind():
    """A first backward of a step that fails after its gradient rows were stored (here in the
    weighting) leaves nothing pending: the next backward and step equal those of a twin that
    never saw it."""
    fail = [True]

    def weighting(G: torch.Tensor) -> torch.Tensor:
        if fail[0]:
            fail[0] = False
            raise ValueError("weighting refused")
        return torch.ones(G.shape[-1], dtype=G.dtype)

    def build() -> tuple[torch.nn.Module, metaopt.Weighted]:
        model = net()
        return model, metaopt.Weighted(
            torch.optim.SGD(model.parameters(), lr=0.1), weighting=weighting, tasks=TASKS
        )

    model, opt = build()
    with pytest.raises(ValueError, match="weighting refused"):
        opt.backward({t: loss(model, 0, t) for t in opt.next_tasks()})
    assert all(p.grad is None for p in model.parameters())
    opt.backward({t: loss(model, 1, t) for t in opt.next_tasks()})
    opt.step()
    twin_model, twin = build()
    twin.step({t: loss(twin_model, 1, t) for t in twin.next_tasks()})
    assert same(snapshot(opt, model), snapshot(twin, twin_model))
