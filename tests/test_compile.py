"""``torch.compile(model)`` with per-task heads computed in one forward pass. A compiled region
is one autograd node, so autograd reports every head as reached by every loss and gives the
heads a loss does not use zero gradients instead of none. Without care, PCGrad/GradVac then
project the heads and Sequential Reptile lets AdamW's weight decay move undrawn heads. metaopt
counts exactly-zero gradients from a compiled region as unreached: the updates equal eager's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metaopt

from _stacks import TASKS, batch

STEPS = 6


class AllHeads(nn.Module):
    """Every head on every forward: ``forward(x)`` returns ``{task: output}``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(4, 6)
        self.heads = nn.ModuleDict({t: nn.Linear(6, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.enc(x))
        return {t: head(h) for t, head in self.heads.items()}


def _opt(name: str, model: AllHeads) -> metaopt.MultiTaskOptimizer:
    adamw = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    if name == "sequential_reptile":
        return metaopt.SequentialReptile(adamw, tasks=TASKS, inner_steps=3, outer_lr=0.5, allow_unused=True)
    if name == "pcgrad":
        return metaopt.PCGrad(adamw, tasks=TASKS)
    return metaopt.GradVac(adamw, tasks=TASKS, beta=0.5)


def _run(name: str, backend: str | None, recipe: str) -> list[torch.Tensor]:
    model = AllHeads()
    forward = model if backend is None else torch.compile(model, backend=backend)
    opt = _opt(name, model)
    for s in range(STEPS):
        wanted = opt.next_tasks()
        losses = {}
        for t in wanted:
            x, y = batch(s, t, dtype=torch.float32)
            losses[t] = (forward(x)[t] - y).pow(2).mean()
        if recipe == "one_loop":
            opt.step(losses)
        else:
            opt.backward(losses)
            opt.step()
            opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_a_compiled_region_looks_like_it_reaches_every_head():
    model = AllHeads()
    x, _ = batch(0, "a", dtype=torch.float32)
    eager = model(x)["a"].sum()
    compiled = torch.compile(model, backend="aot_eager")(x)["a"].sum()
    assert not metaopt.jacobian.compiled_graph(eager)
    assert metaopt.jacobian.compiled_graph(compiled)
    params = list(model.parameters())
    g_eager = torch.autograd.grad(eager, params, allow_unused=True)
    g_compiled = torch.autograd.grad(compiled, params, allow_unused=True)
    head_b = [i for i, (n, _) in enumerate(model.named_parameters()) if n.startswith("heads.b")]
    assert all(g_eager[i] is None for i in head_b)
    assert all(g_compiled[i] is not None and not g_compiled[i].any() for i in head_b)


@pytest.mark.parametrize("recipe", ["one_loop", "torch"])
@pytest.mark.parametrize("name", ["sequential_reptile", "pcgrad", "gradvac"])
def test_compiled_model_gives_the_eager_updates(name, recipe):
    eager = _run(name, None, recipe)
    compiled = _run(name, "aot_eager", recipe)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiled_model_gives_the_eager_updates_with_inductor():
    """The default backend too (it generates and compiles C++ on CPU: one case only)."""
    eager = _run("pcgrad", None, "torch")
    compiled = _run("pcgrad", "inductor", "torch")
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- the compiled step
def _step_opt(name: str, model: nn.Module) -> metaopt.MultiTaskOptimizer:
    """On the device path (nonfinite="skip", as on a GPU): the host check would read a flag."""
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if name == "sequential_reptile":
        return metaopt.SequentialReptile(
            sgd, tasks=TASKS, inner_steps=3, outer_lr=0.5, allow_unused=True, nonfinite="skip"
        )
    if name == "reptile":
        return metaopt.Reptile(
            sgd, tasks=TASKS, inner_steps=3, outer_lr=0.5, allow_unused=True, nonfinite="skip"
        )
    return metaopt.MTL(sgd, tasks=TASKS, nonfinite="skip")


def _backward(opt: metaopt.MultiTaskOptimizer, model: AllHeads, s: int) -> None:
    wanted = opt.next_tasks()
    losses = {}
    for t in wanted:
        x, y = batch(s, t, dtype=torch.float32)
        losses[t] = (model(x)[t] - y).pow(2).mean()
    if isinstance(opt, metaopt.SlowFastOptimizer):
        (loss,) = losses.values()
        loss.backward()
    else:
        opt.backward(losses)


def _torch_optim_break(reason: object) -> bool:
    """A break torch.optim makes on purpose: its step wrapper calls ``torch._dynamo.graph_break()``
    around every step (pytorch/pytorch#104053), so that ``torch.compile(torch.optim.SGD(...).step,
    fullgraph=True)`` fails too."""
    stack = getattr(reason, "user_stack", [])
    return bool(stack) and stack[-1].filename.replace("\\", "/").endswith("torch/optim/optimizer.py")


@pytest.mark.parametrize("name", ["sequential_reptile", "reptile", "mtl"])
def test_the_inner_step_breaks_the_graph_only_where_torch_optim_does(name):
    torch._dynamo.reset()
    model = AllHeads()
    opt = _step_opt(name, model)
    _backward(opt, model, 0)
    opt.step()  # the first step creates state
    opt.zero_grad()
    _backward(opt, model, 1)
    explained = torch._dynamo.explain(opt.step)()
    assert explained.break_reasons, "torch.optim's own breaks are expected"
    assert all(_torch_optim_break(r) for r in explained.break_reasons), [
        str(r.reason)[:120] for r in explained.break_reasons if not _torch_optim_break(r)
    ]


@pytest.mark.parametrize("name", ["sequential_reptile", "reptile", "mtl"])
def test_the_compiled_step_gives_the_eager_updates(name):
    """``torch.compile(opt.step)`` over two trajectories (outer steps included) ends where the
    eager steps end, bit for bit (the eager backend runs the traced ops as they are)."""
    ends = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = AllHeads()
        opt = _step_opt(name, model)
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        for s in range(STEPS):
            _backward(opt, model, s)
            step()
            opt.zero_grad()
        ends.append([p.detach().clone() for p in model.parameters()])
        if isinstance(opt, metaopt.SlowFastOptimizer):
            assert opt.outer_step_count == 2
    for a, b in zip(*ends):
        assert torch.equal(a, b)


def _surgery_breaks(cls: type, T: int) -> tuple[int, int]:
    """Graph breaks of one surgery backward and one step, traced at T tasks (the weight
    loops in torch, as on an accelerator)."""
    from metaopt.aggregation import _backend

    torch._dynamo.reset()
    tasks = [f"t{i}" for i in range(T)]
    torch.manual_seed(0)
    enc, heads = nn.Linear(4, 6), nn.ModuleList(nn.Linear(6, 1) for _ in tasks)
    opt = cls(
        torch.optim.SGD([*enc.parameters(), *heads.parameters()], lr=0.1), tasks=tasks, nonfinite="skip"
    )

    def losses(s: int) -> dict[str, torch.Tensor]:
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(s))
        return {t: heads[k](torch.tanh(enc(x))).pow(2).mean() for k, t in enumerate(tasks)}

    with _backend.torch_on_cpu():
        opt.step(losses(0))
        pending = losses(1)
        backward = torch._dynamo.explain(lambda: opt.backward(pending))()
        step = torch._dynamo.explain(opt.step)()
    return backward.graph_break_count, step.graph_break_count


@pytest.mark.parametrize("cls", [metaopt.PCGrad, metaopt.GradVac])
def test_surgery_breaks_the_graph_no_more_with_more_tasks(cls):
    """No graph break per task or per pair: the T - 1 rounds of the weight loop and the T rows
    trace into the same graphs at T = 2 and at T = 4."""
    assert _surgery_breaks(cls, 2) == _surgery_breaks(cls, 4)


def test_steps_skipped_under_compilation_equal_the_eager_ones():
    """``nonfinite="skip"`` under ``torch.compile(opt.step)``: non-finite steps after a head's
    optimizer state appeared are skipped as eagerly, parameters and state bit for bit."""
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = AllHeads()
        opt = _step_opt("sequential_reptile", model)
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        for s in range(9):
            (task,) = opt.next_tasks()
            x, y = batch(s, task, dtype=torch.float32)
            loss = (model(x)[task] - y).pow(2).mean()
            (loss * float("nan") if s in (3, 5, 7) else loss).backward()
            step()
            opt.zero_grad()
        state = [v.clone() for p in model.parameters() for v in opt.state[p].values()]
        runs.append(([p.detach().clone() for p in model.parameters()], state, opt.skipped_steps))
    (params_a, state_a, skipped_a), (params_b, state_b, skipped_b) = runs
    assert skipped_a == skipped_b == 3
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    assert len(state_a) == len(state_b) and all(torch.equal(a, b) for a, b in zip(state_a, state_b))
