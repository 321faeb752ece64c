"""State dicts saved by metaopt 0.1.0 (layout 1, tests/data/state_v1.pt, written by
tests/data/make_v1_states.py with 0.1.0) load into today's optimizers and continue to the
parameters 0.1.0 itself reached; today's layout is torch.optim's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import metaopt

DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(DATA))
import make_v1_states as v1  # noqa: E402

from metaopt.parts.state_dict import record_of  # noqa: E402

SAVED = torch.load(DATA / "state_v1.pt", weights_only=True)


def test_the_file_was_written_by_metaopt_0_1():
    assert SAVED["metaopt"] == "0.1.0"
    for run in SAVED["runs"].values():
        assert "engine" in str(run["optimizer"]) or "optimizer" in run["optimizer"]


@pytest.mark.parametrize("name", v1.NAMES)
def test_a_0_1_state_dict_continues_as_0_1_did(name):
    run = SAVED["runs"][name]
    net = v1.model(seed=99)  # other initial values: everything comes from the saved state
    net.load_state_dict(run["model"])
    opt = v1.build(name, net)
    opt.load_state_dict(run["optimizer"])
    state = opt.state_dict()
    assert record_of(state)["version"] == 3 and set(state) == {"state", "param_groups"}
    for s in range(v1.SAVED_AT, v1.SAVED_AT + v1.CONTINUED):
        v1.step(opt, net, s)
    for p, q in zip(net.parameters(), run["after"]):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", v1.NAMES)
def test_todays_state_dict_is_in_torch_optims_layout_and_round_trips(name):
    """``state`` by parameter index holds the wrapped optimizer's fields (Adam's moments) and
    metaopt's own (``metaopt_slow``, ...); reloading it into a fresh optimizer continues
    identically."""

    def reload(opt, net):
        state = opt.state_dict()
        adam = set(state["state"][0]) - {k for k in state["state"][0] if k.startswith("metaopt_")}
        assert {"exp_avg", "exp_avg_sq", "step"} <= adam
        if isinstance(opt, metaopt.SlowFastOptimizer):
            assert all("metaopt_slow" in state["state"][i] for i in range(len(list(net.parameters()))))
        opt = v1.build(name, net)
        opt.load_state_dict(torch.load(_saved(state), weights_only=True))
        return opt

    _reload_continues_identically(name, reload)


def _reload_continues_identically(name, reload):
    """A run of ``name`` saved and reloaded mid-way (``reload(opt, net) -> opt``) ends where the
    uninterrupted run ends, bit for bit."""
    runs = []
    for reloaded in (False, True):
        net = v1.model()
        opt = v1.build(name, net)
        for s in range(v1.SAVED_AT):
            v1.step(opt, net, s)
        if reloaded:
            opt = reload(opt, net)
        for s in range(v1.SAVED_AT, v1.SAVED_AT + v1.CONTINUED):
            v1.step(opt, net, s)
        runs.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _saved(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def _as_layout_2(state: dict) -> dict:
    """Layout 2, as the release before layout 3 wrote it: the record (version 2, and a wrapped
    optimizer's nested under ``inner``, version 2 too) beside ``state`` and ``param_groups``."""
    groups = [dict(g) for g in state["param_groups"]]
    record = dict(groups[0].pop("metaopt"))
    record["version"] = 2
    if isinstance(record.get("inner"), dict):
        record["inner"] = {**record["inner"], "version": 2}
    return {"state": state["state"], "param_groups": groups, "metaopt": record}


@pytest.mark.parametrize("name", v1.NAMES)
def test_a_layout_2_state_dict_loads_and_continues_identically(name):
    """The record moved into the first param group in layout 3 (where DCP's ``get_state_dict``
    keeps it); a layout-2 state dict is migrated and continues exactly as the run it came
    from, and the wrapped torch optimizer's param groups get no record."""

    def reload(opt, net):
        old = torch.load(_saved(_as_layout_2(opt.state_dict())), weights_only=True)
        opt = v1.build(name, net)
        opt.load_state_dict(old)
        assert all("metaopt" not in g for g in opt.base_optimizer.param_groups)
        assert record_of(opt.state_dict())["version"] == 3
        return opt

    _reload_continues_identically(name, reload)
