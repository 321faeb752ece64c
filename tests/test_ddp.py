"""DistributedDataParallel on 2 CPU ranks (gloo): for every method, through the one loop and the
torch way, the ranks stay identical and equal one process on the concatenated batches (float64,
1e-9). The Reptile family gets its all-reduce from DDP's own backward; PCGrad, GradVac and
GradNorm average their per-task rows themselves. The ranks run in spawned processes with a
deadline, so that a hang can never stall CI."""

from __future__ import annotations

import os
import socket

import _ddp_worker
import pytest
import torch

from _spawn import spawn
from _stacks import METHODS, Net, batch, loss_of, make_opt

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

DEADLINE_S = 240
RECIPES = ["one_loop", "torch"]
RUNS = [(m, r, 0, 0) for m in METHODS for r in RECIPES] + [
    ("sequential_reptile", "torch", 0, 1),
    ("pcgrad", "one_loop", 0, 1),
]
# rank 1 built with another option than rank 0: (method, recipe, 0, 0, *attribute path, value)
OTHER_OPTIONS = [
    ("sequential_reptile", "torch", 0, 0, "inner_steps", 4),
    ("sequential_reptile", "one_loop", 0, 0, "outer_lr", 0.3),
    ("pcgrad", "torch", 0, 0, "reduction", "mean"),
    ("gradvac", "one_loop", 0, 0, "beta", 0.25),
    ("sequential_reptile_gradvac", "one_loop", 0, 0, "inner", "beta", 0.25),
    ("mtl", "torch", 0, 0, "allow_unused", True),
]
RUNS += OTHER_OPTIONS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    spawn(_ddp_worker.run, 2, (RUNS, _free_port(), out), deadline_s=DEADLINE_S)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(2)]


def _single_process(name: str) -> dict:
    model = Net()
    opt = make_opt(name, model, seed=0)
    for s in range(_ddp_worker.STEPS):
        opt.step({t: loss_of(model, t, batch(s, t), reduction="mean") for t in opt.next_tasks()})
    return {"params": [p.detach().clone() for p in model.parameters()], "state": opt.state_dict()}


def _tensors(v):
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, dict):
        for k in sorted(v, key=str):
            yield from _tensors(v[k])
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _tensors(x)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", METHODS)
def test_ranks_stay_identical_and_equal_one_process(results, name, recipe):
    r0, r1 = (res[(name, recipe, 0, 0)] for res in results)
    assert "error" not in r0, r0.get("error")
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    ref = _single_process(name)
    for a, b in zip(r0["params"], ref["params"]):
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-9)
    sa, sr = list(_tensors(r0["state"])), list(_tensors(ref["state"]))
    assert len(sa) == len(sr)
    for a, b in zip(sa, sr):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=0.0, atol=1e-9)
        else:
            assert torch.equal(a, b)
    moved = [not torch.equal(a, b) for a, b in zip(r0["params"], Net().parameters())]
    assert any(moved)


@pytest.mark.parametrize("key", [("sequential_reptile", "torch", 0, 1), ("pcgrad", "one_loop", 0, 1)])
def test_ranks_with_different_schedules_are_refused_at_the_first_step(results, key):
    for res in results:
        assert "task schedule differs between ranks" in res[key]["error"]


@pytest.mark.parametrize("name", METHODS)
def test_per_task_rows_cross_the_ranks_in_one_collective_per_backward(results, name):
    """PCGrad/GradVac average their T rows with one all_reduce per backward, not one per task;
    GradNorm adds one for its layer rows; the Reptile family and MTL leave it to DDP."""
    expected = {
        "sequential_reptile": 0,
        "reptile": 0,
        "mtl": 0,
        "pcgrad": 1,
        "gradvac": 1,
        "gradnorm": 1,
        "sequential_reptile_gradvac": 1,
        "gradnorm_pcgrad": 2,
        "weighted_upgrad": 1,
        "sequential_reptile_weighted": 1,
    }[name]
    for recipe in RECIPES:
        calls = results[0][(name, recipe, 0, 0)]["all_reduce_calls"]
        assert calls == expected * _ddp_worker.STEPS


@pytest.mark.parametrize("key", OTHER_OPTIONS, ids=lambda k: f"{k[0]}-{k[-2]}")
def test_ranks_built_with_other_options_are_refused_on_every_rank(results, key):
    """Rank 1 built with another ``inner_steps``, ``outer_lr``, ``reduction``, ``beta`` (of a
    wrapped GradVac too): every rank refuses the first step, naming the options."""
    for res in results:
        assert "other options than rank 0" in res[key]["error"]


def test_process_group_local_runs_on_one_rank_without_a_collective(results):
    assert results[0]["local"] == {"steps": 4}
