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


@pytest.mark.parametrize("interpolation", ["flat", "auto"])
def test_slow_weights_after_a_reallocation_continue_on_the_flat_path(interpolation):
    """With flatten=True, a parameter re-allocated mid-trajectory made the outer step raise
    RuntimeError *after* the inner step had moved θ (interpolation="flat": a half-applied step
    that could never succeed again), or silently left the flat path for good ("auto"). Now the
    trajectory's end re-packs without a hole: the flat path again, and bit for bit the run of
    an untouched twin."""
    data = make_data()

    def build():
        model = make_model(2)
        return model, metaopt.SequentialReptile(
            torch.optim.Adam(model.parameters(), lr=0.02),
            tasks=TASKS,
            inner_steps=3,
            outer_lr=0.5,
            flatten=True,
            interpolation=interpolation,
            seed=0,
        )

    model, opt = build()
    twin_model, twin = build()
    run(opt, model, data, 1)
    run(twin, twin_model, data, 1)
    with torch.no_grad():
        model[0].bias.data = model[0].bias.data.clone()
    run(opt, model, data, 5)  # two trajectory ends
    run(twin, twin_model, data, 5)
    assert opt.outer_step_count == 2 and opt.engine.path() == ["flat"]
    for a, b in zip([*model.parameters(), *opt.slow_weights], [*twin_model.parameters(), *twin.slow_weights]):
        assert torch.equal(a, b)


def test_outer_optimizer_keeps_its_slow_buffers_after_a_reallocation():
    """With an outer optimizer (which holds the slow buffers, so their layout must not change)
    the same hole also sent every later outer step off the flat path."""
    data = make_data()

    def build():
        model = make_model(2)
        return model, metaopt.Reptile(
            torch.optim.SGD(model.parameters(), lr=0.05),
            tasks=TASKS,
            inner_steps=2,
            tasks_per_outer_step=2,
            flatten=True,
            seed=0,
            outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
        )

    model, opt = build()
    twin_model, twin = build()
    with torch.no_grad():
        model[2].weight.data = model[2].weight.data.clone()
    run(opt, model, data, 8)  # two outer steps
    run(twin, twin_model, data, 8)
    assert opt.outer_step_count == 2 and opt.engine.path() == ["flat"]
    assert opt.outer_optimizer.param_groups[0]["params"][0] is opt.engine.slow_buffers[0]
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
    mine, theirs = opt.state_dict(), copy_opt.state_dict()
    key = "weight_optimizer" if "weight_optimizer" in mine["metaopt"] else "outer_optimizer"
    for k, v in mine["metaopt"][key]["state"].items():
        for name, t in v.items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(t, theirs["metaopt"][key]["state"][k][name])
                assert t.data_ptr() != theirs["metaopt"][key]["state"][k][name].data_ptr()


def test_plain_pickle_keeps_the_slow_weights_views_of_their_buffer():
    """Plain pickle (unlike torch.save and deepcopy) writes every tensor with its own storage,
    so the engine's views of φ came back as copies of the slow buffer: the outer step then moved
    the buffer while ``slow_weights`` and ``state_dict()`` kept reporting the old φ."""
    import pickle

    data = make_data()
    model = make_model(0)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.05), tasks=TASKS, inner_steps=2, outer_lr=0.5, seed=0
    )
    run(opt, model, data, 1)
    copy_model, copy_opt = pickle.loads(pickle.dumps((model, opt)))
    run(copy_opt, copy_model, data, 3)  # one outer step in the copy
    for p, phi in zip(copy_model.parameters(), copy_opt.slow_weights):
        assert torch.equal(p, phi)  # θ ← φ just happened
    saved = copy_opt.state_dict()["metaopt"]["engine"]["slow"]
    assert all(torch.equal(saved[f"p{i}"], phi) for i, phi in enumerate(copy_opt.slow_weights))
