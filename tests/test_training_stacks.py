"""metaopt inside the training stacks users already have: the torch way (``loss.backward()`` or
``opt.backward(losses)``, then ``opt.step()``), gradient accumulation, clipping, ``GradScaler``,
autocast and frozen parameters, for every method and composition. The oracle is always another
run: the one loop, the concatenated batch, no scaler, or the update computed by hand."""

from __future__ import annotations

import pytest
import torch

import metaopt

from _stacks import (
    METHODS,
    REPTILE_FAMILY,
    TASKS,
    Net,
    backward_the_torch_way,
    batch,
    loss_of,
    make_opt,
    method_state,
    one_loop_step,
    scaler_step,
    tensors_of,
    torch_style_step,
    torch_way_step,
)

STEPS = 7  # past the outer steps of both Reptile set-ups and of the composition


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor], **tol: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if tol:
            torch.testing.assert_close(x, y, **tol)
        else:
            assert torch.equal(x, y)


def _nan_gradient(model: Net) -> torch.Tensor:
    """Finite (zero) value, NaN gradient: d/dw sqrt(|w - w|^2) at 0."""
    w = model.enc.weight
    return torch.sqrt((w - w.detach()).pow(2).sum())


# ---------------------------------------------------------------- 1. the torch.optim contract
@pytest.mark.parametrize("name", METHODS)
def test_torch_way_equals_the_one_loop(name):
    a, b = Net(), Net()
    oa, ob = make_opt(name, a), make_opt(name, b)
    for s in range(STEPS):
        ra = one_loop_step(oa, a, s)
        rb = torch_style_step(name, ob, b, s)
        assert ra.tasks == rb.tasks and ra.outer_update == rb.outer_update
    _assert_same(_params(a), _params(b))
    _assert_same(method_state(oa), method_state(ob))
    assert oa.step_count == ob.step_count == STEPS


@pytest.mark.parametrize("name", sorted(REPTILE_FAMILY))
def test_reptile_family_also_takes_opt_backward(name):
    a, b = Net(), Net()
    oa, ob = make_opt(name, a), make_opt(name, b)
    for s in range(STEPS):
        torch_style_step(name, oa, a, s)
        ob.backward({t: loss_of(b, t, batch(s, t)) for t in ob.next_tasks()})
        ob.step()
        ob.zero_grad()
    _assert_same(_params(a), _params(b))


@pytest.mark.parametrize("name", [m for m in METHODS if m not in REPTILE_FAMILY])
def test_step_without_per_task_gradients_is_refused(name):
    model = Net()
    opt = make_opt(name, model)
    if name == "mtl":  # MTL steps on whatever .grad holds, as torch.optim does
        loss_of(model, "a", batch(0, "a")).backward()
        opt.step()
        return
    sum(loss_of(model, t, batch(0, t)) for t in opt.next_tasks()).backward()
    before, state = _params(model), method_state(opt)
    with pytest.raises(ValueError, match=r"opt\.backward\(losses\)"):
        opt.step()
    _assert_same(_params(model), before)
    _assert_same(method_state(opt), state)


def test_step_with_no_gradient_at_all_is_refused():
    model = Net()
    opt = make_opt("sequential_reptile", model)
    (task,) = opt.next_tasks()
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        opt.step()
    assert opt.step_count == 0 and opt.next_tasks() == [task]


def test_one_loop_refuses_while_a_backward_is_pending():
    model = Net()
    opt = make_opt("pcgrad", model)
    opt.backward({t: loss_of(model, t, batch(0, t)) for t in opt.next_tasks()})
    with pytest.raises(RuntimeError, match="backward.*pending"):
        opt.step({t: loss_of(model, t, batch(0, t)) for t in opt.next_tasks()})
    opt.step()  # the pending backward is still intact


# ---------------------------------------------------------------- 2. state commits at step()
@pytest.mark.parametrize("name", METHODS)
def test_backward_commits_nothing_and_a_dropped_one_leaves_no_trace(name):
    a, b = Net(), Net()
    oa, ob = make_opt(name, a), make_opt(name, b)
    for s in range(STEPS):
        if s in (1, 4):  # a backward that never reaches step(): zero_grad drops it
            wanted = oa.next_tasks()
            state = method_state(oa)
            oa.backward({t: loss_of(a, t, batch(99, t)) for t in wanted})
            _assert_same(method_state(oa), state)
            oa.zero_grad()
            assert oa.next_tasks() == wanted  # the pending draw stays
        oa.backward({t: loss_of(a, t, batch(s, t)) for t in oa.next_tasks()})
        oa.step()
        oa.zero_grad()
        one_loop_step(ob, b, s)
    _assert_same(_params(a), _params(b))
    _assert_same(method_state(oa), method_state(ob))


@pytest.mark.parametrize("name", METHODS)
def test_non_finite_gradients_stay_in_grad_and_a_plain_step_refuses(name):
    model = Net()
    opt = make_opt(name, model)
    one_loop_step(opt, model, 0)
    wanted = opt.next_tasks()
    before, state = _params(model), method_state(opt)
    losses = {t: loss_of(model, t, batch(1, t), extra=_nan_gradient) for t in wanted}
    opt.backward(losses)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert not all(bool(g.isfinite().all()) for g in grads)
    with pytest.raises(ValueError, match="non-finite gradient"):
        opt.step()
    _assert_same(_params(model), before)
    _assert_same(method_state(opt), state)
    assert opt.next_tasks() == wanted


# ---------------------------------------------------------------- 3. gradient accumulation
@pytest.mark.parametrize("name", METHODS)
def test_accumulated_micro_batches_equal_the_concatenated_batch(name):
    a, b = Net(), Net()
    oa, ob = make_opt(name, a), make_opt(name, b)
    for s in range(STEPS):
        torch_style_step(name, oa, a, s, micro=4)
        torch_style_step(name, ob, b, s, micro=1)
    _assert_same(_params(a), _params(b), rtol=0.0, atol=1e-10)
    _assert_same(method_state(oa), method_state(ob), rtol=0.0, atol=1e-10)


def test_pcgrad_of_accumulated_gradients_is_not_a_sum_of_pcgrads():
    """PCGrad applies to the accumulated per-task gradients. Micro-batch 1 gives g_a = (1, 0),
    g_b = (-1, 1) (a conflict), micro-batch 2 g_a = (1, 0), g_b = (1, 1): accumulated,
    g_a = (2, 0) and g_b = (0, 2) do not conflict, so the update is their sum (2, 2); the sum
    of the two micro-batches' PCGrads would be (0.5, 1.5) + (2, 1) = (2.5, 2.5)."""
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = metaopt.PCGrad(torch.optim.SGD([w], lr=1.0), tasks=["a", "b"])
    c = {"a": [(1.0, 0.0), (1.0, 0.0)], "b": [(-1.0, 1.0), (1.0, 1.0)]}
    for m in range(2):
        opt.backward({t: w @ torch.tensor(c[t][m], dtype=torch.float64) for t in ("a", "b")})
        if m == 0:
            assert torch.equal(w.grad, torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert torch.equal(w.grad, torch.tensor([2.0, 2.0], dtype=torch.float64))
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([-2.0, -2.0], dtype=torch.float64))


# ---------------------------------------------------------------- 4. clipping
def _sgd_opt(name: str, model: Net) -> metaopt.MultiTaskOptimizer:
    p = list(model.parameters())
    sgd = torch.optim.SGD(p, lr=1.0)
    if name == "sequential_reptile":
        return metaopt.SequentialReptile(sgd, tasks=TASKS, inner_steps=100, allow_unused=True)
    if name == "mtl":
        return metaopt.MTL(sgd, tasks=TASKS)
    if name == "pcgrad":
        return metaopt.PCGrad(sgd, tasks=TASKS)
    if name == "gradvac":
        return metaopt.GradVac(sgd, tasks=TASKS, beta=0.5)
    return metaopt.GradNorm(metaopt.MTL(sgd, tasks=TASKS), layer=list(model.enc.parameters()))


@pytest.mark.parametrize("name", ["sequential_reptile", "mtl", "pcgrad", "gradvac", "gradnorm"])
def test_clip_grad_norm_between_backward_and_step_clips_this_steps_update(name):
    model = Net()
    opt = _sgd_opt(name, model)
    for s in range(3):
        wanted = opt.next_tasks()
        losses = {t: loss_of(model, t, batch(s, t)) for t in wanted}
        backward_the_torch_way(name, opt, losses)
        update = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        norm = torch.linalg.vector_norm(torch.cat([u.reshape(-1) for u in update]))
        assert norm > 0.5  # the clip acts
        before = _params(model)
        returned = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
        torch.testing.assert_close(returned, norm)
        opt.step()
        opt.zero_grad()
        # SGD with lr 1: the parameters moved by exactly the clipped update of this step
        ratio = 0.5 / (norm + 1e-6)
        for p, b, u in zip(model.parameters(), before, update):
            torch.testing.assert_close(b - p.detach(), u * ratio, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- 5. GradScaler
def _scaler_step(name, opt, model, step, scaler, extra=None, dtype=torch.float32):
    losses = {t: loss_of(model, t, batch(step, t, dtype=dtype), extra=extra) for t in opt.next_tasks()}
    scaler_step(name, opt, model, losses, scaler, max_norm=1e6)


@pytest.mark.parametrize("name", METHODS)
def test_grad_scaler_with_a_power_of_two_scale_gives_the_run_without_one(name):
    a, b = Net(dtype=torch.float32), Net(dtype=torch.float32)
    oa, ob = make_opt(name, a), make_opt(name, b)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    for s in range(STEPS):
        _scaler_step(name, oa, a, s, scaler)
        wanted = ob.next_tasks()
        losses = {t: loss_of(b, t, batch(s, t, dtype=torch.float32)) for t in wanted}
        ob.step(losses)
    assert scaler.get_scale() > 2.0**12  # it grew: several scales were used
    _assert_same(_params(a), _params(b))
    _assert_same(method_state(oa), method_state(ob))


@pytest.mark.parametrize("name", METHODS)
def test_grad_scaler_skips_an_overflowed_step_and_only_the_draw_moves(name):
    """A skipped step moves no parameter, no method state and no step counter; it uses up its
    task draw, as it used up its batch, so that a data side planned ahead stays aligned. The
    reference takes the same skip through torch.amp's contract (``found_inf`` set on the
    optimizer, then ``step()``), without a GradScaler."""
    a, b = Net(dtype=torch.float32), Net(dtype=torch.float32)
    oa, ob = make_opt(name, a), make_opt(name, b)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for s in range(STEPS):
        if s == 3:
            plan = oa.planned_tasks(2)
            before, state = _params(a), _moving_state(oa)
            count, clock = oa.step_count, oa.clock
            losses = {
                t: loss_of(a, t, batch(s, t, dtype=torch.float32), extra=_nan_gradient)
                for t in oa.next_tasks()
            }
            backward_the_torch_way(name, oa, losses, grad_scaler=scaler)
            skipped = scaler.step(oa)
            scaler.update()
            oa.zero_grad()
            assert skipped.skipped and scaler.get_scale() == 2.0**9  # skipped and backed off
            if not skipped.outer_update:  # a skipped batch may end a trajectory (then φ moves)
                _assert_same(_params(a), before)
                _assert_same(_moving_state(oa), state)
            assert name != "reptile" or skipped.outer_update  # both cases are met
            assert (oa.step_count, oa.clock) == (count, clock + 1)
            assert oa.next_tasks() == plan[1]  # the skipped step's draw is used up
            assert all(p.grad is None for p in a.parameters())
            ob.next_tasks()
            ob.found_inf = torch.ones(())
            report = ob.step()
            del ob.found_inf
            assert report.skipped
        _scaler_step(name, oa, a, s, scaler)
        ob.step({t: loss_of(b, t, batch(s, t, dtype=torch.float32)) for t in ob.next_tasks()})
    _assert_same(_params(a), _params(b))
    _assert_same(method_state(oa), method_state(ob))


def _moving_state(opt: metaopt.MultiTaskOptimizer) -> list[torch.Tensor]:
    """What a step moves besides the task stream: the inner optimizer's state, the slow
    weights, GradVac's targets, GradNorm's weights."""
    inner = opt
    while isinstance(inner, metaopt.MultiTaskOptimizer):
        inner = inner.optimizer
    parts = [inner.state_dict(), list(getattr(opt, "slow_weights", []))]
    for o in (opt, getattr(opt, "inner", None)):
        parts += [getattr(o, "targets", None), getattr(o, "weights", None)]
    return tensors_of(parts)


def test_model_zero_grad_after_a_backward_drops_it():
    """``model.zero_grad()`` (what the Hugging Face Trainer calls), not the optimizer's, after a
    backward that was never stepped: the next backward starts a new step instead of adding to
    the dropped one."""
    a, b = Net(dtype=torch.float64), Net(dtype=torch.float64)
    oa, ob = make_opt("pcgrad", a), make_opt("pcgrad", b)
    oa.backward({t: loss_of(a, t, batch(9, t)) for t in oa.next_tasks()})
    a.zero_grad()
    for s in range(3):
        oa.backward({t: loss_of(a, t, batch(s, t)) for t in oa.next_tasks()})
        oa.step()
        a.zero_grad()
        ob.step({t: loss_of(b, t, batch(s, t)) for t in ob.next_tasks()})
    _assert_same(_params(a), _params(b))


@pytest.mark.parametrize("inner", ["mtl", "pcgrad"])
def test_gradnorm_weight_update_does_not_depend_on_the_loss_scale(inner):
    """With an SGD weight optimizer the weight step is proportional to the norms: unscaled
    norms are what makes the scaled run equal the unscaled one."""
    runs = []
    for scale in (None, 2.0**16):
        model = Net(dtype=torch.float32)
        base = torch.optim.SGD(model.parameters(), lr=0.01)
        wrapped = metaopt.MTL(base, tasks=TASKS) if inner == "mtl" else metaopt.PCGrad(base, tasks=TASKS)
        opt = metaopt.GradNorm(
            wrapped,
            layer=list(model.enc.parameters()),
            weight_optimizer=lambda w: torch.optim.SGD(w, lr=0.05),
        )
        scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
        for s in range(5):
            _scaler_step("gradnorm", opt, model, s, scaler)
        runs.append((opt.weights.detach().clone(), _params(model)))
    assert not torch.equal(runs[0][0], torch.ones(3))  # the weights moved
    assert torch.equal(runs[0][0], runs[1][0])
    _assert_same(runs[0][1], runs[1][1])


@pytest.mark.parametrize("name", ["sequential_reptile", "pcgrad", "gradvac", "gradnorm_pcgrad"])
def test_fp16_autocast_with_grad_scaler_trains(name):
    """The full fp16 recipe on CPU: autocast, scale, backward, unscale_, clip, step, update."""
    model = Net(dtype=torch.float32)
    opt = make_opt(name, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    first = None
    for _ in range(12):
        with torch.autocast("cpu", dtype=torch.float16):
            wanted = opt.next_tasks()
            losses = {t: loss_of(model, t, batch(0, t, dtype=torch.float32)) for t in wanted}
        if first is None:
            first = float(sum(v.detach() for v in losses.values()))
        scaler_step(name, opt, model, losses, scaler, max_norm=10.0)
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    assert opt.step_count >= 10
    with torch.no_grad():
        last = sum(float(loss_of(model, t, batch(0, t, dtype=torch.float32))) for t in TASKS)
    if name not in REPTILE_FAMILY:
        assert last < first


# ---------------------------------------------------------------- 6. bf16 autocast
@pytest.mark.parametrize("name", METHODS)
def test_bf16_autocast_both_recipes_agree(name):
    a, b, ref = Net(dtype=torch.float32), Net(dtype=torch.float32), Net(dtype=torch.float32)
    oa, ob, oref = make_opt(name, a), make_opt(name, b), make_opt(name, ref)
    for s in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            la = {t: loss_of(a, t, batch(s, t, dtype=torch.float32)) for t in oa.next_tasks()}
        oa.step(la)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            wanted = ob.next_tasks()
            losses = {t: loss_of(b, t, batch(s, t, dtype=torch.float32)) for t in wanted}
        torch_way_step(name, ob, losses)
        oref.step({t: loss_of(ref, t, batch(s, t, dtype=torch.float32)) for t in oref.next_tasks()})
    _assert_same(_params(a), _params(b))
    assert any(not torch.equal(x, y) for x, y in zip(_params(a), _params(ref)))  # bf16 did run
    _assert_same(_params(a), _params(ref), rtol=0.0, atol=0.1)


# ---------------------------------------------------------------- 7. frozen parameters
@pytest.mark.parametrize("name", METHODS)
def test_frozen_parameters_are_skipped_and_can_be_unfrozen(name):
    model = Net()
    frozen = [model.enc.bias, *model.heads["c"].parameters()]
    for p in frozen:
        p.requires_grad_(False)
    opt = make_opt(name, model)  # AdamW over model.parameters(), frozen ones included
    start = [p.detach().clone() for p in frozen]
    moving = model.enc.weight.detach().clone()
    for s in range(STEPS):
        if s % 2:
            one_loop_step(opt, model, s)
        else:
            torch_style_step(name, opt, model, s)
        for p, p0 in zip(frozen, start):
            assert torch.equal(p, p0) and p.grad is None
    assert not torch.equal(model.enc.weight, moving)
    # mid-run: unfreeze the others, freeze the encoder's weight (the bias stays shared)
    for p in frozen:
        p.requires_grad_(True)
    model.enc.weight.requires_grad_(False)
    w = model.enc.weight.detach().clone()
    report = one_loop_step(opt, model, STEPS)
    if not report.outer_update:  # an outer step moves it to its slow value, as any parameter
        assert torch.equal(model.enc.weight, w) and model.enc.weight.grad is None
    for p in model.parameters():
        p.requires_grad_(True)
    for s in range(STEPS + 1, STEPS + 4):
        one_loop_step(opt, model, s)
    assert not torch.equal(model.enc.bias, start[0])  # unfrozen: it trains again
    assert all(bool(p.isfinite().all()) for p in model.parameters())
