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
