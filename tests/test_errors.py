"""Bad input gets a clear error naming what is wrong, and changes nothing."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from conftest import TASKS, make_data, make_model, task_loss

import metaopt
from metaopt.parts.state_dict import record_of


def snapshot(model, opt):
    pending = opt.next_tasks()  # draw first: the pending draw is part of the state
    return (
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        copy.deepcopy(opt.state_dict()),
        pending,
    )


def assert_unchanged(before, model, opt):
    params, grads, state, pending = before
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    now = opt.state_dict()
    assert record_of(now)["step"] == record_of(state)["step"]
    assert record_of(now).get("inner_count") == record_of(state).get("inner_count")
    assert torch.equal(record_of(now)["generator"], record_of(state)["generator"])
    for k, v in state["state"].items():  # the inner optimizer's fields and metaopt's, per parameter
        for name, t in v.items():
            assert torch.equal(torch.as_tensor(now["state"][k][name]), torch.as_tensor(t))
    assert opt.next_tasks() == pending


def trained_opt(cls=metaopt.SequentialReptile, **kw):
    data = make_data()
    model = make_model(0)
    opt = cls(torch.optim.Adam(model.parameters(), lr=0.01), tasks=TASKS, inner_steps=3, seed=0, **kw)
    for _ in range(2):  # some optimizer state exists
        opt.step({t: task_loss(model, data, t) for t in opt.next_tasks()})
    return model, opt, data


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("cls", [metaopt.SequentialReptile, metaopt.Reptile])
def test_non_finite_loss_names_task_and_changes_nothing(bad, cls):
    model, opt, data = trained_opt(cls)
    before = snapshot(model, opt)
    (task,) = opt.next_tasks()
    loss = task_loss(model, data, task) * bad
    with pytest.raises(ValueError, match=rf"non-finite loss.*{task}"):
        opt.step({task: loss})
    assert_unchanged(before, model, opt)
    # and the optimizer still works afterwards
    opt.step({task: task_loss(model, data, task)})


def test_missing_and_unknown_task_keys():
    model, opt, data = trained_opt()
    before = snapshot(model, opt)
    (task,) = opt.next_tasks()
    other = next(t for t in TASKS if t != task)
    with pytest.raises(ValueError, match=rf"missing \['{task}'\]"):
        opt.step({other: task_loss(model, data, other)})
    with pytest.raises(ValueError, match=r"unexpected \['xx'\]"):
        opt.step({task: task_loss(model, data, task), "xx": task_loss(model, data, task)})
    with pytest.raises(TypeError, match="mapping"):
        opt.step([task_loss(model, data, task)])
    assert_unchanged(before, model, opt)


def test_non_scalar_and_detached_losses():
    model, opt, data = trained_opt()
    before = snapshot(model, opt)
    (task,) = opt.next_tasks()
    x, y = data[task]
    with pytest.raises(ValueError, match=rf"{task}.*scalar"):
        opt.step({task: (model(x) - y).pow(2)})
    with pytest.raises(ValueError, match=rf"{task}.*does not require grad"):
        opt.step({task: task_loss(model, data, task).detach()})
    with pytest.raises(TypeError, match="not a Tensor"):
        opt.step({task: 1.0})
    assert_unchanged(before, model, opt)


def test_parameter_not_reached_by_loss():
    torch.manual_seed(0)
    body, head_a, head_b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    params = [*body.parameters(), *head_a.parameters(), *head_b.parameters()]
    opt = metaopt.SequentialReptile(torch.optim.SGD(params, lr=0.1), tasks=["a", "b"], inner_steps=2, seed=0)
    heads = {"a": head_a, "b": head_b}
    x = torch.randn(8, 4)
    before = [p.detach().clone() for p in params]
    (task,) = opt.next_tasks()
    with pytest.raises(ValueError, match=r"get no gradient.*allow_unused=True"):
        opt.step({task: heads[task](body(x)).pow(2).mean()})
    for p, q in zip(params, before):
        assert torch.equal(p, q)
    assert opt.step_count == 0
    # task heads are fine with allow_unused=True: the other head keeps grad None and is untouched
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(params, lr=0.1), tasks=["a", "b"], inner_steps=5, seed=0, allow_unused=True
    )
    (task,) = opt.next_tasks()
    other = "b" if task == "a" else "a"
    other_before = [p.detach().clone() for p in heads[other].parameters()]
    opt.step({task: heads[task](body(x)).pow(2).mean()})
    for p, q in zip(heads[other].parameters(), other_before):
        assert torch.equal(p, q) and p.grad is None


def test_loss_reaching_no_parameter():
    model = make_model(0)
    stranger = torch.nn.Linear(4, 1)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.1), tasks=["a"], inner_steps=2, seed=0
    )
    with pytest.raises(ValueError, match="reach none"):
        opt.step({"a": stranger(torch.randn(3, 4)).sum()})
    assert opt.step_count == 0


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        ({"tasks": []}, ValueError, "empty"),
        ({"tasks": None}, ValueError, "tasks must be given"),
        ({"tasks": "ar"}, TypeError, "list of names"),
        ({"tasks": ["a", "a"]}, ValueError, "duplicate"),
        ({"tasks": ["a", 3]}, TypeError, "strings"),
        ({"inner_steps": 0}, ValueError, "inner_steps must be >= 1"),
        ({"inner_steps": 2.5}, TypeError, "inner_steps must be an int"),
        ({"outer_lr": 1.5}, ValueError, r"outer_lr must be in \[0, 1\]"),
        ({"outer_lr": -0.1}, ValueError, r"outer_lr must be in \[0, 1\]"),
        ({"outer_lr": float("nan")}, ValueError, r"outer_lr must be in \[0, 1\]"),
        ({"outer_lr_final": 0.0}, ValueError, "go together"),
        ({"outer_lr_final": 0.0, "anneal_steps": 0}, ValueError, "anneal_steps"),
        ({"outer_lr": 0.1, "outer_optimizer": lambda p: torch.optim.SGD(p, lr=0.1)}, ValueError, "either"),
        ({"schedule": "zipf"}, ValueError, "schedule must be one of"),
        ({"schedule": "proportional"}, ValueError, "task_sizes"),
        ({"schedule": "proportional", "task_sizes": {"ar": 1}}, ValueError, "every task"),
        ({"interpolation": "magic"}, ValueError, "method must be one of"),
        ({"seed": "x"}, TypeError, "seed"),
    ],
)
def test_constructor_validation(kw, exc, match):
    model = make_model(0)
    kw = {"tasks": TASKS, **kw}
    with pytest.raises(exc, match=match):
        metaopt.SequentialReptile(torch.optim.SGD(model.parameters(), lr=0.1), **kw)


def test_wrapping_something_else_and_reptile_composition():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        metaopt.SequentialReptile(object(), tasks=["a"])
    model = make_model(0)
    inner = metaopt.SequentialReptile(torch.optim.SGD(model.parameters(), lr=0.1), tasks=["a"], flatten=False)
    with pytest.raises(TypeError, match="Reptile: wrap a torch optimizer"):
        metaopt.Reptile(inner, tasks=["a"])
    with pytest.raises(ValueError, match="tasks_per_outer_step"):
        metaopt.Reptile(torch.optim.SGD(model.parameters(), lr=0.1), tasks=["a"], tasks_per_outer_step=0)


def test_load_state_dict_validation():
    model, opt, _ = trained_opt()
    other = metaopt.Reptile(torch.optim.Adam(model.parameters(), lr=0.01), tasks=TASKS, inner_steps=3)
    with pytest.raises(ValueError, match="saved by SequentialReptile"):
        other.load_state_dict(opt.state_dict())
    diff = metaopt.SequentialReptile(
        torch.optim.Adam(model.parameters(), lr=0.01), tasks=["x"], inner_steps=3
    )
    with pytest.raises(ValueError, match="saved tasks"):
        diff.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="not a metaopt state dict"):
        diff.load_state_dict({"state": {}})
    with pytest.raises(TypeError, match="closure"):
        opt.step({}, closure=lambda: 0.0)


@pytest.mark.parametrize("deepspeed_loaded", [False, True])
def test_replacing_the_param_groups_is_refused_naming_deepspeed(monkeypatch, deepspeed_loaded):
    """DeepSpeed's ZeRO stages replace an optimizer's param groups with flattened partitions;
    metaopt's state sits beside the model's parameters, so that is refused, saying why where
    DeepSpeed is loaded (tests/test_deepspeed.py runs the engine), and the groups stay as they
    were."""
    import types

    if deepspeed_loaded:
        monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    else:
        monkeypatch.delitem(sys.modules, "deepspeed", raising=False)
    model, opt, _ = trained_opt()
    groups = opt.param_groups
    with pytest.raises(TypeError, match="cannot be replaced") as raised:
        opt.param_groups = [{"params": [torch.zeros(3, requires_grad=True)]}]
    assert ("DeepSpeed's ZeRO" in str(raised.value)) == deepspeed_loaded
    assert opt.param_groups is groups and opt.param_groups is opt.base_optimizer.param_groups


@pytest.mark.parametrize("method", ["pcgrad", "gradnorm", "mtl_one_loop", "sr_one_loop"])
def test_fsdp1_parameters_are_refused_naming_fsdp1(method):
    """FSDP1 marks the parameters it manages ``_fsdp_flattened`` (torch's own attribute) and
    computes with flat parameters built from them: per-task gradients cannot reach them, so
    the per-task methods refuse when built, and a one-loop step (a backward with ``inputs=``)
    refuses before anything moves, each naming FSDP1 and FSDP2. (FSDP1 itself needs an
    accelerator, so the mark is set here by hand.)"""
    model = make_model(0)
    for p in model.parameters():
        p._fsdp_flattened = True
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    if method == "pcgrad":
        with pytest.raises(ValueError, match="FSDP1.*fully_shard"):
            metaopt.PCGrad(inner, tasks=TASKS)
        return
    if method == "gradnorm":
        with pytest.raises(ValueError, match="FSDP1.*fully_shard"):
            metaopt.GradNorm(metaopt.MTL(inner, tasks=TASKS), layer=list(model.parameters())[:1])
        return
    opt = (
        metaopt.MTL(inner, tasks=TASKS)
        if method == "mtl_one_loop"
        else metaopt.SequentialReptile(inner, tasks=TASKS, inner_steps=2, allow_unused=True)
    )
    before = [p.detach().clone() for p in model.parameters()]
    data = make_data()
    with pytest.raises(ValueError, match="FSDP1.*fully_shard"):
        opt.step({t: task_loss(model, data, t) for t in opt.next_tasks()})
    assert opt.step_count == 0 and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
