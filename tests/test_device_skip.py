"""Steps decided on the device (``nonfinite="skip"``, the default off the CPU): no host read of
a device value in a steady-state step, and a non-finite step skipped there with nothing moved.

The ``meta`` device holds no data: any host read of a value there raises, so a method that runs
several outer steps on it is sync-free. The skip's semantics are checked on CPU, where the
option can be forced, against a plain loop that leaves the bad steps out."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import metaopt
from metaopt.parts.guard import SkipCounter, defers, guarded_step

from _snapshot import assert_same, held_state, snapshot
from _stacks import METHODS, TASKS, Net, batch, loss_of, make_opt

META = torch.device("meta")
# TorchJD's weightings solve on the host (their own quadratic programs): not sync-free
DEVICE_METHODS = [m for m in METHODS if "weighted" not in m]


def _meta_variants() -> dict[str, Any]:
    """Compositions and options beyond _stacks' methods, each on AdamW over ``params``."""

    def adamw(p: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(p, lr=0.01)

    def nesterov(q: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(q, lr=0.5, momentum=0.9, nesterov=True)

    return {
        "sr_outer_nesterov": lambda p: metaopt.SequentialReptile(
            adamw(p), tasks=TASKS, inner_steps=2, outer_optimizer=nesterov, allow_unused=True
        ),
        "reptile_batched": lambda p: metaopt.Reptile(
            adamw(p), tasks=TASKS, inner_steps=2, tasks_per_outer_step=2, outer_lr=0.5, allow_unused=True
        ),
        "sr_over_mtl": lambda p: metaopt.SequentialReptile(
            metaopt.MTL(adamw(p), tasks=TASKS), inner_steps=2, outer_lr=0.5
        ),
        "sr_sgd_momentum": lambda p: metaopt.SequentialReptile(
            torch.optim.SGD(p, lr=0.1, momentum=0.9),
            tasks=TASKS,
            inner_steps=2,
            outer_lr=0.5,
            allow_unused=True,
        ),
        "sr_annealed": lambda p: metaopt.SequentialReptile(
            adamw(p),
            tasks=TASKS,
            inner_steps=2,
            outer_lr=0.5,
            outer_lr_final=0.1,
            anneal_steps=3,
            allow_unused=True,
        ),
    }


def _drive(opt: Any, model: Net, losses: dict[str, torch.Tensor], way: str) -> metaopt.StepReport:
    if way == "loop":
        return opt.step(losses)  # type: ignore[no-any-return]
    plain = isinstance(opt, metaopt.SlowFastOptimizer) and opt.inner is None
    if plain:
        (loss,) = losses.values()
        loss.backward()
    else:
        opt.backward(losses)
    return opt.step()  # type: ignore[no-any-return]


class BlockingUploads(TorchDispatchMode):
    """Records every copy from the host to the meta device that waits for it (not
    ``non_blocking``): on CUDA such a copy synchronises the host with the device too, which the
    meta device alone does not catch."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src, dst = (args[1], args[0]) if func is torch.ops.aten.copy_.default else (args[0], out)
            blocking = not kwargs.get("non_blocking", False) and not (len(args) > 2 and args[2])
            if isinstance(src, torch.Tensor) and src.device.type == "cpu" and dst.device == META and blocking:
                self.found.append(f"{func} of {tuple(src.shape)}")
        return out


def _meta_run(opt: Any, model: Net, way: str, steps: int = 9) -> list[metaopt.StepReport]:
    reports = []
    for _ in range(steps):
        x, y = torch.randn(8, 4, device=META), torch.randn(8, 1, device=META)
        losses = {t: (model(x, t) - y).pow(2).mean() for t in opt.next_tasks()}
        reports.append(_drive(opt, model, losses, way))
        opt.zero_grad()
    return reports


@pytest.mark.parametrize("way", ["torch", "loop"])
@pytest.mark.parametrize("name", DEVICE_METHODS + sorted(_meta_variants()))
def test_every_method_steps_on_the_meta_device(name: str, way: str) -> None:
    model = Net(dtype=torch.float32).to(META)
    variants = _meta_variants()
    opt = variants[name](list(model.parameters())) if name in variants else make_opt(name, model)
    assert opt.nonfinite == "auto"  # the default decides on the device off the CPU
    reports = _meta_run(opt, model, way, steps=3)  # the first steps create state
    with BlockingUploads() as uploads:
        reports += _meta_run(opt, model, way, steps=6)
    assert uploads.found == []
    assert all(r.finite is not None and r.finite.device == META for r in reports)
    if isinstance(opt, metaopt.SlowFastOptimizer):
        assert opt.outer_step_count >= 2  # several outer steps ran there too


def test_the_meta_device_catches_a_host_read() -> None:
    """The proof above can fail: with the host check forced, the first step reads its flag."""
    model = Net(dtype=torch.float32).to(META)
    opt = make_opt("sequential_reptile", model)
    opt.nonfinite = "raise"
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        _meta_run(opt, model, "loop", steps=1)
    with BlockingUploads() as uploads:  # and so can the watch on uploads
        torch.ones(2).to(META)
        torch.ones(2).to(META, non_blocking=True)
    assert len(uploads.found) == 1


# ---------------------------------------------------------------------------- semantics on CPU
def _losses(model: Net, opt: Any, step: int, poison: bool) -> dict[str, torch.Tensor]:
    losses = {t: loss_of(model, t, batch(step, t)) for t in opt.next_tasks()}
    if poison:
        first = next(iter(losses))
        losses[first] = losses[first] * float("nan")
    return losses


@pytest.mark.parametrize("way", ["torch", "loop"])
@pytest.mark.parametrize("name", DEVICE_METHODS)
def test_a_skipped_step_moves_nothing_but_the_stream(name: str, way: str) -> None:
    model = Net()
    opt = make_opt(name, model)
    opt.nonfinite = "skip"
    for step in range(4):  # SR's trajectories are 3 and 2 steps long: step 4 ends none
        _drive(opt, model, _losses(model, opt, step, poison=False), way)
        opt.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]
    before = snapshot(model, opt, draw=False)["state"]  # cloned: the step updates in place
    clock, count = opt.clock, opt.step_count
    report = _drive(opt, model, _losses(model, opt, 4, poison=True), way)
    opt.zero_grad()
    assert report.finite is not None and not bool(report.finite)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    with pytest.warns(RuntimeWarning, match=r"1 step\(s\) were skipped on the device"):
        after = snapshot(model, opt, draw=False)["state"]
    assert_same(held_state(before), held_state(after, fresh_from=before))
    assert (opt.clock, opt.step_count) == (clock + 1, count + 1)  # the batch used its draw
    assert opt.skipped_steps == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once
        opt.state_dict()
    # and it trains on
    report = _drive(opt, model, _losses(model, opt, 5, poison=False), way)
    assert bool(report.finite)
    assert all(p.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("name", DEVICE_METHODS)
def test_finite_steps_decided_on_the_device_equal_the_host_check(name: str) -> None:
    """The device path computes the same update (GradVac's, GradNorm's, the surgery's weights
    applied split) as the checked one, bit for bit."""
    runs = []
    for mode in ("raise", "skip"):
        model = Net()
        opt = make_opt(name, model)
        opt.nonfinite = mode
        for step in range(7):
            report = opt.step(_losses(model, opt, step, poison=False))
            assert (report.finite is None) == (mode == "raise")
        held = held_state(snapshot(model, opt, draw=False)["state"])
        runs.append(([p.detach().clone() for p in model.parameters()], held))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    assert_same(runs[0][1], runs[1][1])


def test_sequential_reptile_skips_against_a_plain_loop() -> None:
    """An independent oracle: plain SGD on the fast weights, a skipped step left out of the
    updates but counted in its trajectory, and φ ← φ + η(θ − φ) every K served steps."""
    model, twin = Net(), Net()
    K, eta, lr = 3, 0.5, 0.05
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=lr),
        tasks=TASKS,
        inner_steps=K,
        outer_lr=eta,
        seed=3,
        allow_unused=True,
        nonfinite="skip",
    )
    slow = [p.detach().clone() for p in twin.parameters()]
    bad = {2, 5, 6}
    for step in range(12):
        (task,) = opt.next_tasks()
        loss_of(model, task, batch(step, task)).mul(float("nan") if step in bad else 1.0).backward()
        opt.step()
        opt.zero_grad()
        if step not in bad:
            twin.zero_grad()
            loss_of(twin, task, batch(step, task)).backward()
            with torch.no_grad():
                for p in twin.parameters():
                    if p.grad is not None:
                        p.sub_(lr * p.grad)
        if (step + 1) % K == 0:
            with torch.no_grad():
                for s, p in zip(slow, twin.parameters()):
                    s.add_(eta * (p - s))
                    p.copy_(s)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert opt.skipped_steps == len(bad)


@pytest.mark.parametrize("bad", [(0,), (2,), (2, 3)])
@pytest.mark.parametrize("name", ["mtl", "sequential_reptile", "reptile", "gradnorm"])
def test_gradscaler_overflow_is_skipped_on_the_device_as_on_the_host(name, bad):
    """With a GradScaler, an overflowing step is skipped either way; on the device its
    found_inf is not read. Both runs end on the same parameters. (PCGrad and GradVac differ:
    on the device the skipped step's visiting-order draw is used up, as the host cannot know
    it was skipped; docs/performance.md.)"""
    ends = []
    for mode in ("raise", "skip"):
        model = Net(dtype=torch.float32)
        opt = make_opt(name, model)
        opt.nonfinite = mode
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for step in range(6):
            losses = {t: loss_of(model, t, batch(step, t, dtype=torch.float32)) for t in opt.next_tasks()}
            if step in bad:  # overflows once scaled
                first = next(iter(losses))
                losses[first] = losses[first] * 1e36
            opt.backward(losses, grad_scaler=scaler)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        ends.append([p.detach().clone() for p in model.parameters()])
        assert scaler.get_scale() == 2.0 ** (10 - len(bad))  # each overflow halved the scale
        assert opt.skipped_steps == (len(bad) if mode == "skip" else 0)
    assert all(torch.equal(a, b) for a, b in zip(*ends))


def test_the_outermost_option_governs_a_composition() -> None:
    model = Net()
    inner = metaopt.PCGrad(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, nonfinite="raise")
    opt = metaopt.SequentialReptile(inner, inner_steps=2, outer_lr=0.5, nonfinite="skip")
    report = opt.step(_losses(model, opt, 0, poison=True))
    assert report.inner is not None and report.inner.finite is not None and not bool(report.inner.finite)
    assert opt.skipped_steps == 1
    opt.nonfinite = "raise"
    with pytest.raises(ValueError, match="non-finite loss"):
        opt.step(_losses(model, opt, 1, poison=True))


def test_structure_is_still_refused_at_once() -> None:
    model = Net()
    opt = make_opt("mtl", model)
    opt.nonfinite = "skip"
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        opt.step()


def test_the_option_is_checked() -> None:
    model = Net()
    with pytest.raises(ValueError, match=r"nonfinite must be one of \['auto', 'raise', 'skip'\]"):
        metaopt.MTL(torch.optim.SGD(model.parameters(), lr=0.1), tasks=TASKS, nonfinite="ignore")
    opt = make_opt("mtl", model)
    with pytest.raises(ValueError, match="nonfinite"):
        opt.nonfinite = True
    assert opt.nonfinite == "auto"
    assert not defers("auto", list(model.parameters()))  # CPU: checked on the host
    assert defers("auto", [torch.zeros(1, device=META)])


# ---------------------------------------------------------------------------- the guard itself
def _optimizer(kind: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    makers = {
        "sgd": lambda: torch.optim.SGD(params, lr=0.1),
        "sgd_momentum": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01),
        "sgd_nesterov_fused": lambda: torch.optim.SGD(
            params, lr=0.1, momentum=0.9, nesterov=True, fused=True
        ),
        "adam": lambda: torch.optim.Adam(params, lr=0.01),
        "adamw_foreach": lambda: torch.optim.AdamW(params, lr=0.01, foreach=True),
        "adamw_fused": lambda: torch.optim.AdamW(params, lr=0.01, fused=True),
        "adagrad": lambda: torch.optim.Adagrad(params, lr=0.1),
        "rmsprop": lambda: torch.optim.RMSprop(params, lr=0.01, momentum=0.5),
        # fresh states that are not zeros: their first step reads the flag on the host
        "nadam": lambda: torch.optim.NAdam(params, lr=0.01),
        "rprop": lambda: torch.optim.Rprop(params, lr=0.01),
        "asgd": lambda: torch.optim.ASGD(params, lr=0.01),
        "sgd_dampened": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.5),
        "adagrad_initial": lambda: torch.optim.Adagrad(params, lr=0.1, initial_accumulator_value=0.5),
    }
    return makers[kind]()  # type: ignore[no-any-return]


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(
        [
            "sgd",
            "sgd_momentum",
            "sgd_nesterov_fused",
            "adam",
            "adamw_foreach",
            "adamw_fused",
            "adagrad",
            "rmsprop",
            "nadam",
            "rprop",
            "asgd",
            "sgd_dampened",
            "adagrad_initial",
        ]
    ),
    bad=st.lists(st.booleans(), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_guarded_step_equals_leaving_the_bad_steps_out(kind: str, bad: list[bool], seed: int) -> None:
    """Property: a sequence of guarded steps, some with a non-finite gradient, ends where the
    plain optimizer ends when those steps are never taken (their state included), for torch's
    optimizers with and without ``found_inf`` (on CPU every state tensor is on the device)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 2), (5,), (1,)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float32)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt, oracle = _optimizer(kind, ours), _optimizer(kind, theirs)
    counter = SkipCounter()
    for skip in bad:
        grads = [torch.randn(s, generator=g) for s in shapes]
        if skip:
            grads[seed % len(grads)].view(-1)[0] = float("nan") if seed % 2 else float("inf")
        for p, gr in zip(ours, grads):
            p.grad = gr.clone()
        ok = torch.stack([gr.isfinite().all() for gr in grads]).all()
        guarded_step(opt, ours, ok)
        counter.add(ok)
        if not skip:
            for p, gr in zip(theirs, grads):
                p.grad = gr.clone()
            oracle.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    for a, b in zip(ours, theirs):
        mine, ref = opt.state.get(a, {}), oracle.state.get(b, {})
        for key, value in ref.items():
            assert torch.equal(torch.as_tensor(mine[key]), torch.as_tensor(value)), key
        for key in set(mine) - set(ref):  # created by a skipped first step: as fresh state is
            assert not torch.as_tensor(mine[key]).any(), key
    assert counter.take() == sum(bad)


# ---------------------------------------------------------------------------- review findings
def test_reading_the_count_does_not_swallow_the_warning():
    model = Net()
    opt = make_opt("mtl", model)
    opt.nonfinite = "skip"
    opt.step(_losses(model, opt, 0, poison=True))
    assert opt.skipped_steps == 1  # a logger reads it (the Trainer's logs do)
    with pytest.warns(RuntimeWarning, match=r"1 step\(s\) were skipped"):
        opt.state_dict()


@pytest.mark.parametrize("way", ["torch", "loop"])
def test_gradnorm_with_a_grad_scaler_on_the_meta_device(way):
    """The loss scale stays on the device: no ``get_scale()`` read per backward."""
    model = Net(dtype=torch.float32).to(META)
    opt = make_opt("gradnorm", model)
    scaler = torch.amp.GradScaler("meta")
    for _ in range(4):
        x, y = torch.randn(8, 4, device=META), torch.randn(8, 1, device=META)
        opt.backward({t: (model(x, t) - y).pow(2).mean() for t in opt.next_tasks()}, grad_scaler=scaler)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert opt.last_report is not None and opt.last_report.finite is not None


def test_gradnorm_half_norms_beyond_half_range_are_not_skipped():
    """Finite half-precision gradients whose norm overflows float16 take the norm in float64
    on the device too (the host path's second look), as on the host: same parameters."""
    ends = []
    for mode in ("raise", "skip"):
        model = Net(dtype=torch.float16)
        opt = metaopt.GradNorm(
            metaopt.MTL(torch.optim.SGD(model.parameters(), lr=1e-9), tasks=TASKS),
            layer=list(model.enc.parameters()),
        )
        opt.nonfinite = mode
        for step in range(3):
            losses = {
                t: loss_of(model, t, batch(step, t, dtype=torch.float16)) + (model.enc.weight * 15000).sum()
                for t in opt.next_tasks()
            }
            report = opt.step(losses)
        assert opt.skipped_steps == 0 and report.extra["grad_norms"].isfinite().all()
        ends.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*ends))


def test_a_surgery_backward_refused_on_the_host_is_skipped_if_the_option_changes():
    model = Net()
    opt = make_opt("pcgrad", model)
    opt.nonfinite = "raise"
    opt.backward(_losses(model, opt, 0, poison=True))  # refusal recorded, read on the host
    opt.nonfinite = "skip"
    before = [p.detach().clone() for p in model.parameters()]
    report = opt.step()
    assert report.finite is not None and not bool(report.finite)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.skipped_steps == 1


def test_a_stateless_optimizer_gains_no_state_entries():
    """torch.optim's state is a defaultdict: a guarded step over plain SGD must not leave empty
    entries (they would change its state dict, and a reload would drop them)."""
    w = torch.nn.Parameter(torch.ones(3))
    sgd = torch.optim.SGD([w], lr=0.1)
    for ok in (True, False):
        w.grad = torch.full((3,), 2.0)
        guarded_step(sgd, [w], torch.tensor(ok))
    assert len(sgd.state) == 0 and sgd.state_dict()["state"] == {}
    assert torch.equal(w.detach(), torch.full((3,), 0.8))
