"""Local trajectories (``local_trajectories=True``) on 2 and 4 gloo ranks, spawned with a
deadline: W ranks equal one process running W trajectories per outer step on the same batches
(float64, 1e-9); η = 1 equals torch's own local SGD (``PostLocalSGDOptimizer`` +
``PeriodicModelAverager``); an outer Nesterov optimizer (DiLoCo's) equals its single-process
counterpart; each rank mixes all tasks on its own stream (sharding tasks across ranks would be
per-task Reptile, shown here too); wrong set-ups are refused with nothing moved."""

from __future__ import annotations

import os

import _local_worker as w
import pytest
import torch

import metaopt

from _spawn import file_store, spawn
from _stacks import TASKS, Net, loss_of

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

RUNS = [
    ("equivalence", {}),
    ("equivalence", {"recipe": "torch", "bucket_elements": 5}),
    ("local_sgd", {"recipe": "torch_zero"}),
    ("diloco", {}),
    ("sharded", {}),
    ("ddp_wrapped", {}),
    ("different_init", {}),
    ("verify", {}),
    ("composed", {}),
    ("reptile", {}),
    ("ddp_no_sync", {}),
    ("bf16", {}),
    ("other_options", {}),
    ("same_stream", {}),
    ("other_buckets", {}),
]
WORLDS = {2: RUNS, 4: RUNS[:4] + [RUNS[9]]}
INDEX = {2: list(range(len(RUNS))), 4: [0, 1, 2, 3, 9]}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for world, runs in WORLDS.items():
        d = str(tmp_path_factory.mktemp(f"local{world}"))
        spawn(w.run, world, (world, runs, file_store(d), d))
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=True) for r in range(world)]
        out[world] = {i: [rk[j] for rk in ranks] for j, i in enumerate(INDEX[world])}
    return out


def _ok(res):
    for r in res:
        assert "crash" not in r, r.get("crash")
    return res


def single_process(world: int, tasks: list[list[str]], kind: str, **options):
    """One process, ``world`` trajectories per outer step: trajectory r of each outer step runs
    the tasks and batches that rank r ran."""
    K = w.K
    order = [t for o in range(w.OUTER) for r in range(world) for t in tasks[r][o * K : (o + 1) * K]]
    model = Net()
    inner = w.sgd if kind == "local_sgd" else w.adam
    outer = (
        {"outer_optimizer": w.nesterov}
        if kind == "diloco"
        else {"outer_lr": 1.0 if kind == "local_sgd" else 0.5}
    )
    cls = metaopt.SequentialReptile
    if kind == "reptile":  # one task per trajectory: its draws, once per trajectory
        cls, order = metaopt.Reptile, order[::K]
        assert all(len(set(t[o * K : (o + 1) * K])) == 1 for t in tasks for o in range(w.OUTER))
    opt = cls(
        inner(list(model.parameters())),
        tasks=TASKS,
        inner_steps=K,
        tasks_per_outer_step=world,
        schedule=order,
        allow_unused=True,
        **outer,
        **options,
    )
    for o in range(w.OUTER):
        for r in range(world):
            for k in range(w.K):
                (task,) = opt.next_tasks()
                opt.step({task: loss_of(model, task, w.rank_batch(r, o * w.K + k, task))})
    return model, opt


def _close(a, b, atol=1e-9):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0.0, atol=atol)


@pytest.mark.parametrize("world", sorted(WORLDS))
@pytest.mark.parametrize("index", [0, 1, 3, 9])
def test_w_ranks_equal_one_process_with_w_trajectories(results, world, index):
    name, options = RUNS[index]
    ranks = _ok(results[world][index])
    for r in ranks[1:]:  # the slow weights (and, at an outer step, θ) bit-identical on every rank
        assert all(torch.equal(a, b) for a, b in zip(r["slow"], ranks[0]["slow"]))
        assert all(torch.equal(a, b) for a, b in zip(r["params"], ranks[0]["params"]))
    assert ranks[0]["outer"] == w.OUTER
    model, opt = single_process(world, [r["tasks"] for r in ranks], name)
    _close(ranks[0]["params"], list(model.parameters()))
    _close(ranks[0]["slow"], opt.slow_weights)
    assert opt.outer_step_count == w.OUTER


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_outer_lr_one_is_torchs_local_sgd(results, world):
    for r in _ok(results[world][2]):
        _close(r["params"], r["oracle"], atol=1e-12)
    ranks = results[world][2]
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[-1]["params"]))


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_each_rank_mixes_all_tasks_on_its_own_stream(results, world):
    ranks = _ok(results[world][0])
    streams = [r["tasks"] for r in ranks]
    assert len({tuple(s) for s in streams}) == world  # independent trajectories
    for s in streams:  # each mixes tasks within a trajectory
        trajectories = [s[o * w.K : (o + 1) * w.K] for o in range(w.OUTER)]
        assert any(len(set(t)) > 1 for t in trajectories)
    # the streams are those of the documented per-rank seeds: uniform over all tasks
    for rank, s in enumerate(streams):
        g = torch.Generator().manual_seed(metaopt._distributed.rank_seed(w.SEED, rank))
        longer = [TASKS[int(torch.randint(len(TASKS), (1,), generator=g))] for _ in range(600)]
        assert s == longer[: len(s)]
        assert all(150 < longer.count(t) < 250 for t in TASKS)


def test_sharding_tasks_over_ranks_is_per_task_reptile(results):
    ranks = _ok(results[2][4])
    assert [set(r["tasks"]) for r in ranks] == [{"a"}, {"b"}]
    # = Reptile with two trajectories per outer step, one task each ...
    model = Net()
    opt = metaopt.Reptile(
        w.adam(list(model.parameters())),
        tasks=TASKS,
        inner_steps=w.K,
        outer_lr=0.5,
        tasks_per_outer_step=2,
        schedule=["a", "b"],
        allow_unused=True,
    )
    for o in range(w.OUTER):
        for r in range(2):
            for k in range(w.K):
                (task,) = opt.next_tasks()
                assert task == TASKS[r]
                opt.step({task: loss_of(model, task, w.rank_batch(r, o * w.K + k, task))})
    _close(ranks[0]["params"], list(model.parameters()))
    # ... which is not what the default (mixed trajectories) computes
    assert not all(torch.allclose(a, b) for a, b in zip(ranks[0]["params"], results[2][0][0]["params"]))


def test_a_model_wrapped_in_ddp_is_refused_with_nothing_moved(results):
    for r in _ok(results[2][5]):
        assert r["error"] and "DistributedDataParallel" in r["error"], r
        assert not r["moved"] and r["step_count"] == 0


def test_different_parameters_on_the_ranks_are_refused(results):
    for r in _ok(results[2][6]):
        assert r["error"] and "slow weights" in r["error"] and "same seed" in r["error"], r
        assert r["step_count"] == 0


def test_verify_ranks_catches_slow_weights_that_diverged(results):
    for r in _ok(results[2][7]):
        assert r["error"] and "no longer bit-identical" in r["error"], r
        assert "Nothing was updated" in r["error"]
        # refused before the outer step after the write on one rank, with nothing moved
        assert r["outer"] == 1 and r["step_count"] == 2 * w.K - 1 and not r["moved"]


def test_composed_local_trajectories(results):
    ranks = _ok(results[2][8])
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["slow"], ranks[1]["slow"]))
    assert ranks[0]["outer"] == w.OUTER
    assert "process_group='local'" in ranks[0]["unwrapped_error"]


def test_local_trajectories_need_torch_distributed():
    model = Net()
    with pytest.raises(RuntimeError, match="init_process_group"):
        metaopt.SequentialReptile(w.adam(model.parameters()), tasks=TASKS, local_trajectories=True)
    with pytest.raises(ValueError, match="local_trajectories=True"):
        metaopt.SequentialReptile(w.adam(model.parameters()), tasks=TASKS, process_group=object())


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_bucketed_all_reduce_gives_the_same_result(results, world):
    """Buckets of 5 elements against one all-reduce (and the torch way against the one loop,
    which agree bit for bit on their own): the same bits on 2 ranks, where a sum of two has one
    order; on 4, gloo picks its reduction order by message size, so only to rounding."""
    one, bucketed = _ok(results[world][0]), _ok(results[world][1])
    for a, b in zip(one, bucketed):
        for x, y in zip(a["params"], b["params"]):
            if world == 2:
                assert torch.equal(x, y)
            else:
                torch.testing.assert_close(x, y, rtol=0.0, atol=1e-12)


def test_ddp_with_no_sync_is_local_trajectories(results):
    for wrapped, bare in zip(_ok(results[2][10]), results[2][0]):
        assert all(torch.equal(x, y) for x, y in zip(wrapped["params"], bare["params"]))


def test_half_precision_averages_a_float32_master(results):
    ranks = _ok(results[2][11])
    assert set(ranks[0]["dtypes"]) == {"torch.float32"}
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["slow"], ranks[1]["slow"]))
    assert all(p.dtype == torch.bfloat16 for p in ranks[0]["params"])
    for p, s in zip(ranks[0]["params"], ranks[0]["slow"]):  # θ = φ rounded, after the outer step
        assert torch.equal(p, s.to(torch.bfloat16))


@pytest.mark.parametrize(
    "index, expect",
    [(12, "run with other options"), (13, "the same task stream"), (14, "run with other options")],
)
def test_ranks_out_of_step_are_refused_with_nothing_moved(results, index, expect):
    for r in _ok(results[2][index]):
        assert r["error"] and expect in r["error"] and "Nothing was updated" in r["error"], r
        assert r["step_count"] == 0 and not r["moved"]


def test_checksum_tells_apart_what_ranks_could_get_wrong():
    from metaopt._distributed import checksum

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * 65521 + 5, generator=g)
    same = x.clone()
    assert checksum([x]) == checksum([same])
    bits = x.view(torch.int32).clone()
    bits[10:13] += torch.tensor([1, -2, 1], dtype=torch.int32)  # ulp-sized, sums to zero
    assert checksum([x]) != checksum([bits.view(torch.float32)])
    swapped = x.clone()
    swapped[[0, 65521]] = swapped[[65521, 0]]
    assert checksum([x]) != checksum([swapped])
    assert checksum([torch.ones(2, 3)]) != checksum([torch.ones(3, 2)])
    assert checksum([x]) != checksum([x.double()])
    assert checksum([torch.tensor([0.0])]) != checksum([torch.tensor([-0.0])])
    nan = torch.tensor([float("nan"), 1.0])
    assert checksum([nan]) == checksum([nan.clone()])
    assert checksum([x[::2]]) == checksum([x[::2].contiguous()])  # values, not layout
    for dtype in (torch.bfloat16, torch.float16, torch.float64, torch.uint8):
        a = (x * 10).to(dtype)
        b = a.clone()
        b.view(torch.uint8)[7] ^= 1  # one bit
        assert checksum([a]) != checksum([b])
