"""``torch.distributed.checkpoint`` with PyTorch's own recipe (an ``AppState`` ``Stateful`` over
``get_state_dict`` / ``set_state_dict``, ``dcp.save`` / ``dcp.load``) on 2 CPU ranks (gloo):
a run resumed from the checkpoint into a freshly built model and optimizer equals the
uninterrupted run bit for bit, under FSDP2 and DDP, and with local trajectories (each rank
gets its own trajectory's state back: its stream and its inner optimizer's moments, keyed by
the trajectory so that DCP does not keep one copy for all), and building the load template
takes no hidden metaopt step. Single-process checks of the same mechanics (DCP's initialization of a
fresh optimizer's state, names as state keys) run without spawning."""

from __future__ import annotations

import os

import _dcp_worker
import pytest
import torch

import metaopt

from _spawn import file_store, spawn

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

CASES = [
    ("fsdp2", "sequential_reptile"),
    ("fsdp2", "pcgrad"),
    ("fsdp2", "sequential_reptile_nesterov"),
    ("fsdp2", "sequential_reptile_host"),
    ("ddp", "sequential_reptile"),
    ("ddp", "gradvac"),
    ("local", "sequential_reptile"),
]


RESHARDED = ["sequential_reptile", "pcgrad", "sequential_reptile_nesterov", "sequential_reptile_host"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dcp"))
    spawn(_dcp_worker.run, 2, (CASES, file_store(out), out))
    return out


@pytest.fixture(scope="module")
def results(saved):
    return [torch.load(os.path.join(saved, f"rank{r}.pt"), weights_only=True) for r in range(2)]


def test_a_2_rank_fsdp2_checkpoint_loads_on_4_ranks(saved, results):
    """DCP re-cuts every sharded field (the slow weights, the outer optimizer's momentum, Adam's
    moments) for 4 ranks; metaopt's record is the same on every rank. Continued on quarter
    batches, the run equals the 2-rank one's uninterrupted continuation (float64, 1e-9: the
    mean over 4 quarters rounds differently from the mean over 2 halves)."""
    spawn(_dcp_worker.reshard, 4, (RESHARDED, file_store(saved), saved))
    ranks = [torch.load(os.path.join(saved, f"reshard{r}.pt"), weights_only=True) for r in range(4)]
    for name in RESHARDED:
        uninterrupted = results[0][("fsdp2", name)]["uninterrupted"]
        for r in ranks:
            assert r[name]["loaded"] == _dcp_worker.SAVED_AT
            for a, b in zip(r[name]["resumed"], uninterrupted):
                torch.testing.assert_close(a, b, rtol=0.0, atol=1e-9)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_dcp_resume_equals_the_uninterrupted_run(results, case):
    for res in results:
        r = res[case]
        assert r["every_state"]
        assert r["hidden"] == (0, 0, True)  # the fresh template took no step and made no draw
        assert r["counts"] == (_dcp_worker.SAVED_AT, _dcp_worker.SAVED_AT)
        for a, b in zip(r["uninterrupted"], r["resumed"]):
            assert torch.equal(a, b)
    if case[0] != "local":  # local trajectories: each rank is its own trajectory (ends mid-one)
        for a, b in zip(results[0][case]["resumed"], results[1][case]["resumed"]):
            assert torch.equal(a, b)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2).double()


def _losses(model: torch.nn.Module, opt: metaopt.MultiTaskOptimizer, s: int) -> dict[str, torch.Tensor]:
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
    return {t: (model(x) * (1 + i)).pow(2).mean() for i, t in enumerate(opt.next_tasks())}


@pytest.mark.parametrize("stateful", [True, False], ids=["adam", "sgd"])
def test_get_state_dict_takes_no_hidden_step(stateful):
    """DCP initializes an optimizer whose ``state`` is empty by stepping it at lr 0 from zero
    gradients: a fresh metaopt optimizer, and at every call one over a stateless optimizer
    (plain SGD), mid-run too. The run equals a twin's that never met DCP: no counter, draw or
    parameter moves."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    def pair():
        model = _model()
        params = model.parameters()
        inner = torch.optim.Adam(params, lr=0.1) if stateful else torch.optim.SGD(params, lr=0.1)
        return model, metaopt.SequentialReptile(inner, tasks=["a", "b"], inner_steps=2, seed=0)

    (model, opt), (twin_model, twin) = pair(), pair()
    for s in range(5):
        get_state_dict(model, opt)
        assert (opt.step_count, opt.clock) == (s, s)
        assert all(p.grad is None for p in model.parameters())
        assert opt.next_tasks() == twin.next_tasks()
        opt.step(_losses(model, opt, s))
        twin.step(_losses(twin_model, twin, s))
        opt.zero_grad()  # DCP initializes an optimizer with empty state only without gradients
        twin.zero_grad()
        for a, b in zip(model.parameters(), twin_model.parameters()):
            assert torch.equal(a, b)


def test_state_keyed_by_parameter_names_loads_as_by_index():
    """``set_state_dict`` hands ``load_state_dict`` the state keyed by parameter names, the param
    groups listing them in order (torch.optim maps them by position): metaopt does the same."""
    model = _model()
    opt = metaopt.PCGrad(torch.optim.Adam(model.parameters(), lr=0.1), tasks=["a", "b"], seed=0)
    for s in range(3):
        opt.step(_losses(model, opt, s))
    state = opt.state_dict()
    names = ["weight", "bias"]
    by_name = {
        "state": {names[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    fresh = metaopt.PCGrad(torch.optim.Adam(_model().parameters(), lr=0.1), tasks=["a", "b"], seed=1)
    fresh.load_state_dict(by_name)
    again = fresh.state_dict()
    assert fresh.step_count == 3 and torch.equal(fresh.generator.get_state(), opt.generator.get_state())
    for i in state["state"]:
        for k, v in state["state"][i].items():
            assert torch.equal(v, again["state"][i][k])
    bad = {**by_name, "state": {**by_name["state"], "nothing": {}}}
    with pytest.raises(ValueError, match="keyed by names"):
        fresh.load_state_dict(bad)


def _one_process(kind: str):
    """A model and optimizer for the single-process DCP cases (``_stacks`` methods, and two
    Sequential Reptiles with an outer optimizer)."""
    from _stacks import TASKS, Net, make_opt

    model = Net()
    if kind == "sr_nesterov":  # Adam inside, Nesterov outside
        return model, metaopt.SequentialReptile(
            torch.optim.Adam(model.parameters(), lr=0.05),
            tasks=TASKS,
            inner_steps=3,
            outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.7, momentum=0.9, nesterov=True),
            allow_unused=True,
        )
    if kind == "sr_sgd_outer_adam":  # a stateless inner optimizer, a stateful outer one
        return model, metaopt.SequentialReptile(
            torch.optim.SGD(model.parameters(), lr=0.05),
            tasks=TASKS,
            inner_steps=3,
            outer_optimizer=lambda p: torch.optim.Adam(p, lr=0.1),
            allow_unused=True,
        )
    return model, make_opt(kind, model)


@pytest.mark.parametrize(
    "kind, saved_at",
    [
        ("gradnorm", 3),  # GradNorm's weight optimizer, which a fresh template has not stepped
        ("gradnorm_pcgrad", 3),
        ("sr_nesterov", 1),  # saved before the first outer step, the inner Adam stepped
        ("sr_sgd_outer_adam", 1),
        ("sequential_reptile", 0),  # saved before any step: the state DCP's initialization made
        ("pcgrad", 0),
        ("mtl", 0),
    ],
)
def test_dcp_resumes_from_any_step_in_one_process(tmp_path, kind, saved_at):
    """Found by review: a template lacked the fields of optimizers that had not stepped yet
    (GradNorm's weight optimizer, an outer optimizer before the first outer step), and state
    made by DCP's initialization (a checkpoint taken at step 0) was kept by the resumed run
    though the saving run dropped it. Every saved dict now has those fields, the record names
    the state an initialization made, and each run drops it at its next step."""
    import torch.distributed.checkpoint as dcp

    from _stacks import batch, loss_of

    def steps(model, opt, start, end):
        for s in range(start, end):
            # every parameter in every loss (at weight 0): the inner Adam has stepped them all, so
            # the checkpoint holds its state for all, as DCP's template does (docs/checkpoints.md)
            opt.step(
                {
                    t: loss_of(model, t, batch(s, t), reduction="mean")
                    + 0.0 * sum(p.sum() for p in model.parameters())
                    for t in opt.next_tasks()
                }
            )

    model, opt = _one_process(kind)
    steps(model, opt, 0, saved_at)
    dcp.save({"app": _dcp_worker.AppState(model, opt)}, checkpoint_id=str(tmp_path))
    steps(model, opt, saved_at, 7)
    model2, opt2 = _one_process(kind)
    dcp.load({"app": _dcp_worker.AppState(model2, opt2)}, checkpoint_id=str(tmp_path))
    assert opt2.step_count == saved_at
    steps(model2, opt2, saved_at, 7)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_a_refused_step_keeps_the_state_dcps_initialization_made():
    """The state is dropped once a step's checks have passed: a refused step changes nothing,
    that state included; the next real step then runs as a twin's that never met DCP."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    (model, opt), (twin_model, twin) = _one_process("sequential_reptile"), _one_process("sequential_reptile")
    get_state_dict(model, opt)
    before = opt.state_dict()
    assert before["state"] and "optimizer" in before["param_groups"][0]["metaopt"]["initialized"]
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        opt.step()
    after = opt.state_dict()
    old, new = before["param_groups"][0]["metaopt"], after["param_groups"][0]["metaopt"]
    assert (new["initialized"], new["step"], new["clock"]) == (old["initialized"], old["step"], old["clock"])
    assert torch.equal(new["generator"], old["generator"])
    assert all(torch.equal(before["state"][i][k], v) for i, e in after["state"].items() for k, v in e.items())
    from _stacks import batch, loss_of

    for s in range(4):
        for m, o in ((model, opt), (twin_model, twin)):
            o.step({t: loss_of(m, t, batch(s, t)) for t in o.next_tasks()})
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)
