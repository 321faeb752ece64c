"""FSDP2 (``fully_shard``) on 2 CPU ranks (gloo), every method the torch way and through the one
loop, against one float64 process on the concatenated batches (1e-9): metaopt's state follows
each parameter's shard (the slow weights, the per-task gradient rows), a per-task method sums
its Gramian over the shards in one all-reduce, and a decision such as refusing a non-finite
gradient is taken by every rank together. Under tensor parallelism (``parallelize_module``:
some parameters sharded, others replicated) the Reptile family, MTL and GradNorm over MTL equal
one process too, and the per-task gradient methods are refused when built. Under FSDP1
(``use_orig_params``) the Reptile family driven the torch way equals one process; the one loop
is refused at the step and the per-task gradient methods when built. The ranks run in spawned
processes with a deadline, so that a hang can never stall CI."""

from __future__ import annotations

import os

import _fsdp_worker
import pytest
import torch

from _spawn import file_store, spawn
from _stacks import METHODS, Net, batch, loss_of, torch_way_step

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

SUPPORTED = [*METHODS, "sequential_reptile_nesterov", "sequential_reptile_host"]
RECIPES = ["one_loop", "torch"]
NAN_RUNS = ["sequential_reptile", "mtl", "pcgrad", "gradvac", "gradnorm"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fsdp"))
    runs = [(m, r) for m in SUPPORTED for r in RECIPES]
    runs.append(("pcgrad_mixed", "one_loop"))
    spawn(_fsdp_worker.run, 2, (runs, NAN_RUNS, file_store(out), out))
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(2)]


def _single_process(name: str) -> list[torch.Tensor]:
    model = Net()
    opt = _fsdp_worker.build(name, model)
    for s in range(_fsdp_worker.STEPS):
        opt.step({t: loss_of(model, t, batch(s, t), reduction="mean") for t in opt.next_tasks()})
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", SUPPORTED)
def test_fsdp2_equals_one_process(results, name, recipe):
    r0, r1 = (res[(name, recipe)] for res in results)
    assert "error" not in r0, r0.get("error")
    assert r0["steps"] == r1["steps"] == _fsdp_worker.STEPS
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    ref = _single_process(name)
    for a, b in zip(r0["params"], ref):
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-9)
    assert any(not torch.equal(a, b) for a, b in zip(r0["params"], Net().parameters()))


def test_a_mix_of_sharded_and_plain_parameters_is_refused(results):
    for res in results:
        assert "plain tensors and the others DTensors" in res[("pcgrad_mixed", "one_loop")]["error"]


@pytest.mark.parametrize("name", NAN_RUNS)
def test_a_nan_in_one_ranks_shard_is_refused_on_every_rank(results, name):
    for res in results:
        r = res[("nan", name)]
        assert r["refused"] is not None and "non-finite" in r["refused"]
        assert r["unchanged"] and r["steps"] == 0


@pytest.mark.parametrize("name", NAN_RUNS)
def test_a_nan_in_one_ranks_shard_is_skipped_on_every_rank_on_the_device_path(results, name):
    """``nonfinite="skip"`` (a GPU's default): the ranks agree on the flag with no host read,
    and every rank skips the step with nothing moved."""
    for res in results:
        r = res[("nan_skip", name)]
        assert r["refused"] is None and r["finite"] is False and r["skipped"] == 1
        assert r["unchanged"]


PER_TASK = {
    "pcgrad",
    "gradvac",
    "weighted_upgrad",
    "sequential_reptile_gradvac",
    "sequential_reptile_weighted",
}


@pytest.mark.parametrize("name", SUPPORTED)
def test_state_and_communication_per_rank(results, name):
    """Per-task methods keep T rows of this rank's shards only (T x P/W, not T x P) and add, per
    step, one all-reduce of the T x T Gramian and one of the backward's flags (each task's
    gradient and loss, the update's range, split); GradNorm adds one of the T losses (averaged
    over the ranks) and one of the T squared norms of its layer's shards; every method ends with
    one all-reduce of the step's check (one flag for the gradients' shards, one per loss of the
    step). Everything else is FSDP2's own reduce-scatters and all-gathers."""
    T, steps = 3, _fsdp_worker.STEPS
    per_step = 1 if _fsdp_worker.method(name) in ("sequential_reptile", "reptile") else T
    calls, elements = 1, 1 + per_step  # the step's check: every shard's gradient, each loss
    if name in PER_TASK or name == "gradnorm_pcgrad":
        calls, elements = calls + 2, elements + T * T + 2 * T + 2
    if name.startswith("gradnorm"):
        calls, elements = calls + 2, elements + 2 * T
    for res in results:
        r = res[(name, "one_loop")]
        if name in PER_TASK or name == "gradnorm_pcgrad":
            assert r["jacobian_shape"] == (T, r["local_elements"])
        assert (r["all_reduce_calls"], r["all_reduce_elements"]) == (calls * steps, elements * steps)
    shards = [res[(name, "one_loop")]["local_elements"] for res in results]
    assert sum(shards) == sum(p.numel() for p in Net().parameters())


@pytest.mark.parametrize("name", ["mtl", "sequential_reptile", "pcgrad"])
def test_a_non_finite_loss_on_one_rank_is_refused_on_every_rank(results, name):
    """Rank 1's loss is +inf with finite gradients: the ranks agree on the losses' flags too, so
    neither steps (rank 0 says another rank's loss was not finite) and they stay in step."""
    messages = []
    for res in results:
        r = res[("inf_loss", name)]
        assert r["refused"] is not None and "non-finite loss" in r["refused"]
        assert r["unchanged"] and r["steps"] == 0
        messages.append(r["refused"])
    assert "another rank" in messages[0] and "inf" in messages[1]


def test_use_slow_weights_sees_the_swap_when_the_root_module_owns_parameters(results):
    """FSDP2 keeps the root module's gathered parameters after a forward without backward:
    use_slow_weights(model) reshards before and after the swap, so the evaluation sees φ, the
    next forward θ, and training goes on as in one process."""
    ref = _fsdp_worker.slow_eval(Net(), 0, 1)
    for res in results:
        r = res["slow_eval"]
        for key in ("fast_before", "slow", "fast_after"):
            torch.testing.assert_close(r[key], ref[key], rtol=0.0, atol=1e-9)
        assert not torch.equal(r["slow"], r["fast_before"])
        for a, b in zip(r["params"], ref["params"]):
            torch.testing.assert_close(a, b, rtol=0.0, atol=1e-9)
        assert "pass the model" in res["slow_without_model"]


def test_losses_sharing_a_forward_need_no_retain_graph_under_fsdp2(results):
    """One encoder forward feeding every head, PCGrad without retain_graph=True: each task's
    backward through FSDP2 keeps the graph for the next, so it equals one process with
    retain_graph=True (where autograd.grad needs it)."""
    ref = _fsdp_worker.shared_forward(_fsdp_worker.SharedNet(), 0, 1, retain_graph=True)
    for res in results:
        for a, b in zip(res["shared_forward"], ref):
            torch.testing.assert_close(a, b, rtol=0.0, atol=1e-9)


def test_local_trajectories_on_sharded_parameters_are_refused_when_built(results):
    """Without the replica group of a hybrid layout (tests/test_hybrid.py): every rank would
    average a different shard."""
    for res in results:
        assert "needs process_group=the replica dimension's group" in res["local_trajectories"]


def test_metaopts_rank_0_checkpoint_refuses_sharded_state_naming_dcp(results):
    for res in results:
        assert "torch.distributed.checkpoint" in res["rank0_checkpoint"]


# ---------------------------------------------------------------- tensor parallelism
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", _fsdp_worker.TP_SUPPORTED)
def test_tensor_parallel_equals_one_process(results, name, recipe):
    ranks = [res[("tp", name, recipe)] for res in results]
    for a, b in zip(*ranks):
        assert torch.equal(a, b)
    for a, b in zip(ranks[0], _single_process(name)):  # every rank ran the whole batch
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-9)
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0], Net().parameters()))


@pytest.mark.parametrize("name", _fsdp_worker.TP_SUPPORTED)
def test_tensor_parallel_nan_in_one_ranks_shard_is_refused_on_every_rank(results, name):
    for res in results:
        r = res[("tp_nan", name)]
        assert r["refused"] is not None and r["unchanged"] and r["steps"] == 0


@pytest.mark.parametrize("name", _fsdp_worker.TP_REFUSED)
def test_tensor_parallel_per_task_methods_are_refused_when_built(results, name):
    for res in results:
        message = res[("tp_refused", name)]
        assert message is not None and "tensor parallelism" in message


# ---------------------------------------------------------------- FSDP1
def _single_process_torch_way(name: str) -> list[torch.Tensor]:
    model = Net()
    opt = _fsdp_worker.build(name, model)
    for s in range(_fsdp_worker.STEPS):
        losses = {t: loss_of(model, t, batch(s, t), reduction="mean") for t in opt.next_tasks()}
        torch_way_step(_fsdp_worker.method(name), opt, losses)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", _fsdp_worker.FSDP1_SUPPORTED)
def test_fsdp1_the_torch_way_equals_one_process(results, name):
    ranks = [res[("fsdp1", name)] for res in results]
    for a, b in zip(*ranks):
        assert torch.equal(a, b)
    for a, b in zip(ranks[0], _single_process_torch_way(name)):
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-9)
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0], Net().parameters()))


@pytest.mark.parametrize("name", [*_fsdp_worker.FSDP1_SUPPORTED, "mtl"])
def test_fsdp1_one_loop_is_refused_at_the_step_with_nothing_moved(results, name):
    for res in results:
        message, steps = res[("fsdp1_one_loop", name)]
        assert "FSDP1" in message and "fully_shard" in message and steps == 0


@pytest.mark.parametrize("name", _fsdp_worker.FSDP1_REFUSED)
def test_fsdp1_per_task_methods_are_refused_when_built(results, name):
    for res in results:
        message = res[("fsdp1_refused", name)]
        assert message is not None and "FSDP1" in message


@pytest.mark.parametrize("name", _fsdp_worker.FSDP1_SUPPORTED)
def test_fsdp1_nan_in_one_ranks_shard_is_refused_on_every_rank(results, name):
    for res in results:
        r = res[("fsdp1_nan", name)]
        assert r["refused"] is not None and r["unchanged"] and r["steps"] == 0


def test_fsdp1_a_rank_whose_shard_is_all_frozen_steps_with_the_others(results):
    """Rank 0's shard holds frozen elements only, so it has no gradient of its own: the ranks
    agree that some rank has one, and both step, as one process does."""
    model = Net()
    model.enc.requires_grad_(False)
    opt = _fsdp_worker.frozen_encoder_sr(model)
    for s in range(5):
        (t,) = opt.next_tasks()
        loss_of(model, t, batch(s, t), reduction="mean").backward()
        opt.step()
        opt.zero_grad()
    ranks = [res["fsdp1_frozen_shard"] for res in results]
    for a, b, c in zip(*ranks, model.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c.detach(), rtol=0.0, atol=1e-9)


def test_fsdp1_with_process_group_local_joins_no_collective(results):
    """Rank 0 alone trains under FSDP1 over its own group; the other rank never steps, so a
    collective over all ranks would hang (the spawn's deadline would fail the test)."""
    assert [res["fsdp1_local"] for res in results] == [3, None]
