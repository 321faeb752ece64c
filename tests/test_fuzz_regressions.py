"""Regression tests for bugs found by the stateful fuzzer (tests/test_fuzz.py); each failed
before its fix."""

from __future__ import annotations

import pytest
import torch
from conftest import TASKS, make_data, make_model, task_loss

import metaopt
from metaopt import functional as F


def run(opt, model, data, steps):
    for _ in range(steps):
        opt.step({t: task_loss(model, data, t) for t in opt.next_tasks()})


# ---------------------------------------------------------------- re-packing after a re-allocation
def test_repacking_after_a_reallocation_leaves_no_hole():
    """A parameter re-allocated out of a packed buffer (``p.data = p.data.clone()``) left its
    old slot in the buffer the next pack copied, so the new buffer had a hole: it was not
    recognised as packed, and never would be again."""
    model = make_model(0)
    params = list(model.parameters())
    F.pack_parameters(params)
    with torch.no_grad():
        params[1].data = params[1].data.clone()
    before = [p.detach().clone() for p in params]
    (flat,) = F.pack_parameters(params)
    assert flat.buffer.numel() == sum(p.numel() for p in params)
    assert F.is_packed(params) is not None and flat.intact()
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_repacking_keeps_overlapping_parameters_tied_and_drops_unused_storage():
    g = torch.Generator().manual_seed(0)
    storage = torch.randn(12, generator=g)
    a, b, c = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    a.data = storage[0:4]
    b.data = storage[2:6]  # overlaps a: the two stay tied
    c.data = storage[8:12]  # shares the storage, not elements; 6..8 unused by anyone
    params = [c, a, b]
    before = [p.detach().clone() for p in params]
    (flat,) = F.pack_parameters(params)
    assert flat.buffer.numel() == 4 + 6
    assert F.is_packed(params) is not None
    for p, v in zip(params, before):
        assert torch.equal(p, v)
    with torch.no_grad():
        a[3] = 7.0
    assert b[1] == 7.0


@pytest.mark.parametrize("interpolation", ["auto", "foreach", "reference"])
def test_slow_weights_follow_a_reallocated_parameter(interpolation):
    """A parameter re-allocated mid-trajectory (``p.data = p.data.clone()``) made the outer step
    raise RuntimeError *after* the inner step had moved θ (on the flat path, since removed), or
    silently changed path. The engine reads and writes the parameter where it now is: the run
    continues bit for bit as an untouched twin's, and the parameter stays where it was put."""
    data = make_data()

    def build():
        model = make_model(2)
        return model, metaopt.SequentialReptile(
            torch.optim.Adam(model.parameters(), lr=0.02),
            tasks=TASKS,
            inner_steps=3,
            outer_lr=0.5,
            interpolation=interpolation,
            seed=0,
        )

    model, opt = build()
    twin_model, twin = build()
    run(opt, model, data, 1)
    run(twin, twin_model, data, 1)
    with torch.no_grad():
        model[0].bias.data = model[0].bias.data.clone()
    moved = model[0].bias.data_ptr()
    run(opt, model, data, 5)  # two trajectory ends
    run(twin, twin_model, data, 5)
    assert opt.outer_step_count == 2
    assert opt.engine.path() == ["reference" if interpolation == "reference" else "foreach"]
    assert model[0].bias.data_ptr() == moved
    for a, b in zip([*model.parameters(), *opt.slow_weights], [*twin_model.parameters(), *twin.slow_weights]):
        assert torch.equal(a, b)


def test_outer_optimizer_keeps_its_slow_weights_after_a_reallocation():
    """With an outer optimizer (which holds the slow weights, so they must not be replaced) a
    re-allocated parameter sent every later outer step off the fast path; the outer optimizer
    must keep stepping the very φ the engine interpolates, with the run of an untouched twin."""
    data = make_data()

    def build():
        model = make_model(2)
        return model, metaopt.Reptile(
            torch.optim.SGD(model.parameters(), lr=0.05),
            tasks=TASKS,
            inner_steps=2,
            tasks_per_outer_step=2,
            seed=0,
            outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
        )

    model, opt = build()
    twin_model, twin = build()
    with torch.no_grad():
        model[2].weight.data = model[2].weight.data.clone()
    run(opt, model, data, 8)  # two outer steps
    run(twin, twin_model, data, 8)
    assert opt.outer_step_count == 2 and opt.engine.path() == ["foreach"]
    held = opt.outer_optimizer.param_groups[0]["params"]
    assert len(held) == len(opt.engine.slow) and all(a is b for a, b in zip(held, opt.engine.slow))
    (buffer,) = opt.engine.slow_buffers
    assert all(s.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() for s in held)
    for a, b in zip([*model.parameters(), *opt.slow_weights], [*twin_model.parameters(), *twin.slow_weights]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- state loaded in memory
def _gradnorm(model, seed):
    return metaopt.GradNorm(
        metaopt.MTL(torch.optim.SGD(model.parameters(), lr=0.05), tasks=TASKS, seed=seed),
        layer=model[0].parameters(),
        seed=seed,
    )


def _outer_optimizer(model, seed):
    return metaopt.Reptile(
        torch.optim.SGD(model.parameters(), lr=0.05),
        tasks=TASKS,
        inner_steps=1,
        seed=seed,
        outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
    )


@pytest.mark.parametrize("build", [_gradnorm, _outer_optimizer], ids=["gradnorm_weights", "outer_optimizer"])
def test_state_loaded_in_memory_does_not_alias_the_source(build):
    """GradNorm's weight optimizer and the Reptile outer optimizer were loaded with torch's
    load_state_dict as is, which keeps the tensors it is given: an optimizer loaded from
    another's state_dict() in memory shared its Adam moments / momentum buffers, so the two
    stepped each other's state and diverged from a run that never copied."""
    data = make_data()
    model = make_model(0)
    opt = build(model, 0)
    run(opt, model, data, 2)  # the inner torch optimizers have state now
    copy_model = make_model(1)
    copy_opt = build(copy_model, 1)
    copy_model.load_state_dict(model.state_dict())
    copy_opt.load_state_dict(opt.state_dict())
    run(opt, model, data, 3)
    run(copy_opt, copy_model, data, 3)
    for a, b in zip(model.parameters(), copy_model.parameters()):
        assert torch.equal(a, b)
    mine, theirs = (
        o.weight_optimizer if hasattr(o, "weight_optimizer") else o.outer_optimizer for o in (opt, copy_opt)
    )
    compared = 0
    for p, q in zip(mine.param_groups[0]["params"], theirs.param_groups[0]["params"]):
        for name, t in mine.state[p].items():
            if isinstance(t, torch.Tensor) and t.numel() > 1:
                assert torch.equal(t, theirs.state[q][name])
                assert t.data_ptr() != theirs.state[q][name].data_ptr()
                compared += 1
    assert compared


def test_plain_pickle_keeps_the_slow_weights_views_of_their_buffer():
    """Plain pickle (unlike torch.save and deepcopy) writes every tensor with its own storage,
    so the engine's views of φ (into metaopt's own slow buffer) came back as copies of it: the
    outer step then moved the buffer while ``slow_weights`` and ``state_dict()`` kept reporting
    the old φ."""
    import pickle

    data = make_data()
    model = make_model(0)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.05), tasks=TASKS, inner_steps=2, outer_lr=0.5, seed=0
    )
    run(opt, model, data, 1)
    copy_model, copy_opt = pickle.loads(pickle.dumps((model, opt)))
    (buffer,) = copy_opt.engine.slow_buffers
    for phi in copy_opt.engine.slow:
        assert phi.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    run(copy_opt, copy_model, data, 3)  # outer steps in the copy
    assert copy_opt.outer_step_count == 2
    # what the outer step moved (the buffer) is what the views, and so slow_weights, report
    assert torch.equal(buffer, torch.cat([phi.reshape(-1) for phi in copy_opt.slow_weights]))
    for p, phi in zip(copy_model.parameters(), copy_opt.slow_weights):
        assert torch.equal(p, phi)  # θ ← φ just happened
    saved = copy_opt.state_dict()["state"]
    assert all(torch.equal(saved[i]["metaopt_slow"], phi) for i, phi in enumerate(copy_opt.slow_weights))


def test_a_load_that_fails_late_keeps_detecting_writes_behind_the_optimizer():
    """A load refused late (in the wrapped torch optimizer's own load: a meta tensor among Adam's
    moments) is rolled back, but the rollback went through the after-load hook, which accepts
    parameter writes until the next step (DCP loads the model after the optimizer): a write
    behind the optimizer's back was then no longer refused."""
    model = make_model(0)
    data = make_data()
    opt = metaopt.Reptile(
        torch.optim.Adam(model.parameters(), lr=0.05), tasks=TASKS, inner_steps=2, tasks_per_outer_step=2
    )
    run(opt, model, data, 1)
    state = opt.state_dict()
    field = next(k for k, v in state["state"][0].items() if torch.is_tensor(v) and v.dim())
    state["state"][0][field] = torch.empty_like(state["state"][0][field], device="meta")
    with pytest.raises((NotImplementedError, RuntimeError, ValueError)):
        opt.load_state_dict(state)
    with torch.no_grad():
        next(model.parameters()).mul_(0.5)
    with pytest.raises(ValueError, match="changed outside the optimizer"):
        run(opt, model, data, 1)
