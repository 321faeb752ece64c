"""DeepSpeed (``deepspeed.initialize`` with a metaopt optimizer) on 2 CPU ranks (gloo), against
one process on the whole batches. ZeRO stage 0 equals one process: Sequential Reptile through
the engine, PCGrad with its per-task losses computed through ``engine.module`` (the engine
refuses any backward pass but ``engine.backward``). ZeRO stages 1 to 3 replace the optimizer's
parameters with flattened fp32 partitions, which metaopt's state cannot follow: the first step
is refused, naming DeepSpeed's ZeRO and the reason, with no metaopt step taken. The ranks run in
spawned processes with a deadline."""

from __future__ import annotations

import os

import pytest
import torch

from _spawn import file_store, spawn
from _stacks import Net, batch, loss_of, make_opt

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

NAMES = ["sequential_reptile", "pcgrad"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import _deepspeed_worker

    out = str(tmp_path_factory.mktemp("deepspeed"))
    spawn(_deepspeed_worker.run, 2, (file_store(out), out))
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(2)]


def _single_process(name: str) -> list[torch.Tensor]:
    from _ddp_worker import STEPS

    model = Net(dtype=torch.float32)
    opt = make_opt(name, model)
    for s in range(STEPS):
        xy = {t: tuple(v.float() for v in batch(s, t)) for t in opt.next_tasks()}
        losses = {t: loss_of(model, t, v, reduction="mean") for t, v in xy.items()}
        if name == "sequential_reptile":
            (loss,) = losses.values()
            loss.backward()
            # DeepSpeed's engine gives every parameter a gradient, zeros where no loss reached
            # it (the idle heads), which Adam then moves on its momentum: the oracle does too
            for p in model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        else:
            opt.backward(losses)
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", NAMES)
def test_zero_stage_0_equals_one_process(results, name):
    ranks = [res[(0, name)] for res in results]
    for a, b in zip(*ranks):
        assert torch.equal(a, b)
    for a, b in zip(ranks[0], _single_process(name)):  # float32: the halves' mean rounds apart
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0], Net(dtype=torch.float32).parameters()))


def test_a_backward_through_the_engine_is_deepspeeds_own_refusal(results):
    for res in results:
        assert "engine.backward(loss)" in res["through_engine"]


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_zero_stages_1_to_3_are_refused_at_the_first_step_naming_zero(results, name, stage):
    for res in results:
        kind, message, step_count, clock = res[(stage, name)]
        assert "DeepSpeed's ZeRO stages 1-3" in message and "ZeRO stage 0" in message
        assert (step_count, clock) == (0, 0)
