"""PEFT LoRA: Sequential Reptile and PCGrad built over ``model.parameters()`` of a model with
LoRA adapters keep state for the adapters and heads only, never touch the frozen base, and
train exactly as the same optimizers built over the trainable parameters alone
(examples/lora.py, on a small random encoder: nothing is downloaded)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import lora  # noqa: E402

import metaopt  # noqa: E402


def test_the_example_runs_and_keeps_state_for_the_adapters_only():
    results = lora.main(steps=12)
    model = lora.lora_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n, size = len(trainable), sum(p.numel() * p.element_size() for p in trainable)
    # AdamW's two moments and step per trainable parameter; Sequential Reptile adds its slow
    # weights: nothing for the frozen base, which is several times larger
    assert results["PCGrad"]["state_bytes"] == 2 * size + 4 * n
    assert results["SequentialReptile"]["state_bytes"] == 3 * size + 4 * n
    assert results["PCGrad"]["frozen_bytes"] > 4 * size
    for r in results.values():
        assert r["last_loss"] < r["first_loss"]


@pytest.mark.parametrize("method", ["SequentialReptile", "PCGrad"])
def test_over_every_parameter_equals_over_the_trainable_ones(method):
    """The oracle: the same method built over the trainable parameters only (what a careful
    user would pass). Built over ``model.parameters()`` instead, it must train identically and
    leave every frozen weight bit for bit as it was."""
    runs = []
    for only_trainable in (False, True):
        model = lora.lora_model()
        frozen = [p.detach().clone() for p in model.parameters() if not p.requires_grad]
        params = [p for p in model.parameters() if p.requires_grad] if only_trainable else model.parameters()
        inner = torch.optim.AdamW(params, lr=1e-2)
        if method == "SequentialReptile":
            opt = metaopt.SequentialReptile(
                inner, tasks=lora.TASKS, inner_steps=4, outer_lr=0.5, seed=0, allow_unused=True
            )
        else:
            opt = metaopt.PCGrad(inner, tasks=lora.TASKS, seed=0)
        for s in range(10):
            opt.step(
                {
                    t: (model(lora.batch(s, t)[0], t) - lora.batch(s, t)[1]).pow(2).mean()
                    for t in opt.next_tasks()
                }
            )
        assert all(
            torch.equal(a, p) for a, p in zip(frozen, [p for p in model.parameters() if not p.requires_grad])
        )
        runs.append([p.detach().clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
