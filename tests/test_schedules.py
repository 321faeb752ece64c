"""Task schedules: frequencies, determinism, state."""

from __future__ import annotations

import collections

import pytest
import torch

from metaopt.parts.state_dict import record_of
from metaopt.schedules import TaskSchedule


def frequencies(s: TaskSchedule, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    counts = collections.Counter(s.draw(g) for _ in range(n))
    return torch.tensor([counts[i] for i in range(s.num_tasks)], dtype=torch.float64)


def chi_square(observed: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * observed.sum()
    return float(((observed - expected) ** 2 / expected).sum())


# 99.9% quantile of chi-square with 3 degrees of freedom: 16.27
@pytest.mark.parametrize(
    "kind,sizes,tau,expected",
    [
        ("uniform", None, 1.0, [0.25, 0.25, 0.25, 0.25]),
        ("proportional", [1, 2, 3, 4], 1.0, [0.1, 0.2, 0.3, 0.4]),
        ("temperature", [1, 4, 9, 16], 2.0, [0.1, 0.2, 0.3, 0.4]),
    ],
)
def test_frequencies_match_requested_distribution(kind, sizes, tau, expected):
    s = TaskSchedule(4, kind, sizes=sizes, temperature=tau)
    torch.testing.assert_close(s.probabilities, torch.tensor(expected, dtype=torch.float64))
    obs = frequencies(s, 8000)
    assert chi_square(obs, s.probabilities) < 16.27


def test_round_robin_visits_every_task_once_per_round_in_varied_order():
    s = TaskSchedule(5, "round_robin")
    g = torch.Generator().manual_seed(0)
    rounds = [[s.draw(g) for _ in range(5)] for _ in range(20)]
    assert all(sorted(r) == list(range(5)) for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1


def test_same_seed_same_sequence_and_state_round_trip():
    s = TaskSchedule(3, "round_robin")
    g = torch.Generator().manual_seed(3)
    _ = [s.draw(g) for _ in range(4)]
    state, gstate = s.state_dict(), g.get_state()
    rest = [s.draw(g) for _ in range(7)]
    t = TaskSchedule(3, "round_robin")
    t.load_state_dict(state)
    h = torch.Generator()
    h.set_state(gstate)
    assert [t.draw(h) for _ in range(7)] == rest


def test_global_rng_untouched():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    s = TaskSchedule(4, "uniform")
    g = torch.Generator().manual_seed(1)
    [s.draw(g) for _ in range(10)]
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "args,match",
    [
        ((0, "uniform"), "at least one"),
        ((3, "zipf"), "one of"),
        ((3, "proportional"), "task_sizes"),
    ],
)
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        TaskSchedule(*args)


def test_bad_sizes_and_temperature():
    with pytest.raises(ValueError, match="3 tasks"):
        TaskSchedule(3, "proportional", sizes=[1, 2])
    with pytest.raises(ValueError, match="positive"):
        TaskSchedule(2, "proportional", sizes=[1, 0])
    with pytest.raises(ValueError, match="temperature"):
        TaskSchedule(2, "temperature", sizes=[1, 2], temperature=0.0)


# ---------------------------------------------------------------- Fish-style schedules
def test_without_replacement_gives_distinct_tasks_within_every_trajectory():
    """K <= T distinct tasks per trajectory (round_robin carries its round across outer steps,
    so trajectories repeat tasks)."""
    import metaopt

    tasks = [f"t{i}" for i in range(5)]
    for kind, expect_repeats in (("without_replacement", False), ("round_robin", True)):
        model = torch.nn.Linear(2, 1)
        opt = metaopt.SequentialReptile(
            torch.optim.SGD(model.parameters(), lr=0.01), tasks=tasks, inner_steps=3, schedule=kind, seed=0
        )
        repeats = 0
        for _ in range(200):
            drawn = []
            for _ in range(3):
                (t,) = opt.next_tasks()
                drawn.append(t)
                opt.step({t: model(torch.ones(1, 2)).sum()})
            repeats += len(set(drawn)) < 3
        assert (repeats > 0) == expect_repeats, (kind, repeats)


def test_without_replacement_longer_than_the_task_list_balances_each_trajectory():
    import metaopt

    model = torch.nn.Linear(2, 1)
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.01),
        tasks=["a", "b", "c"],
        inner_steps=7,
        schedule="without_replacement",
        seed=3,
    )
    for _ in range(20):
        counts = collections.Counter()
        for _ in range(7):
            (t,) = opt.next_tasks()
            counts[t] += 1
            opt.step({t: model(torch.ones(1, 2)).sum()})
        assert sorted(counts.values()) == [2, 2, 3]


def test_a_given_order_is_followed_and_cycled_and_resumes():
    import metaopt

    model = torch.nn.Linear(2, 1)
    order = ["b", "a", "a", "c"]
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.01), tasks=["a", "b", "c"], inner_steps=3, schedule=order
    )
    seen = []
    for _ in range(6):
        (t,) = opt.next_tasks()
        seen.append(t)
        opt.step({t: model(torch.ones(1, 2)).sum()})
    assert seen == order + order[:2]
    fresh = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.01), tasks=["a", "b", "c"], inner_steps=3, schedule=order
    )
    fresh.load_state_dict(opt.state_dict())
    assert fresh.next_tasks() == ["a"]  # order[6 % 4]
    with pytest.raises(ValueError, match="unknown tasks"):
        metaopt.SequentialReptile(torch.optim.SGD(model.parameters(), lr=0.01), tasks=["a"], schedule=["z"])


@pytest.mark.parametrize("build", ["sr", "sr_without", "reptile_batched", "sr_gradvac", "pcgrad"])
def test_planned_tasks_are_the_draws_that_follow_and_move_nothing(build):
    import metaopt

    model = torch.nn.Linear(2, 1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    tasks = ["a", "b", "c", "d"]
    opt = {
        "sr": lambda: metaopt.SequentialReptile(sgd, tasks=tasks, inner_steps=3, seed=1),
        "sr_without": lambda: metaopt.SequentialReptile(
            sgd, tasks=tasks, inner_steps=3, seed=1, schedule="without_replacement", tasks_per_outer_step=2
        ),
        "reptile_batched": lambda: metaopt.Reptile(
            sgd, tasks=tasks, inner_steps=2, tasks_per_outer_step=3, seed=1
        ),
        "sr_gradvac": lambda: metaopt.SequentialReptile(metaopt.GradVac(sgd, tasks=tasks), inner_steps=2),
        "pcgrad": lambda: metaopt.PCGrad(sgd, tasks=tasks),
    }[build]()
    x = torch.ones(1, 2)
    for _ in range(2):  # start mid-trajectory
        opt.step({t: (i + 1) * model(x).sum() for i, t in enumerate(opt.next_tasks())})
    state = opt.state_dict()
    plan = opt.planned_tasks(25)
    after = opt.state_dict()
    assert torch.equal(record_of(state)["generator"], record_of(after)["generator"])
    assert record_of(state)["pending"] == record_of(after)["pending"]
    for wanted in plan:
        assert opt.next_tasks() == wanted
        opt.step({t: (i + 1) * model(x).sum() for i, t in enumerate(wanted)})


def test_batched_sequential_reptile_averages_its_trajectories():
    """tasks_per_outer_step = 2: φ ← φ + η(mean(θ¹, θ²) − φ), each trajectory from φ; checked
    against two plain SGD runs from φ over the same tasks (SGD has no state to carry)."""
    import metaopt

    torch.manual_seed(0)
    data = {t: torch.randn(8, 3, dtype=torch.float64) for t in "abc"}
    model = torch.nn.Linear(3, 1).double()
    phi = [p.detach().clone() for p in model.parameters()]
    opt = metaopt.SequentialReptile(
        torch.optim.SGD(model.parameters(), lr=0.1),
        tasks=list(data),
        inner_steps=2,
        outer_lr=0.5,
        tasks_per_outer_step=2,
        seed=4,
    )
    plan = [w[0] for w in opt.planned_tasks(4)]
    for t in plan:
        opt.step({t: model(data[t]).pow(2).mean()})
    ends = []
    for traj in (plan[:2], plan[2:]):
        ref = torch.nn.Linear(3, 1).double()
        with torch.no_grad():
            for p, v in zip(ref.parameters(), phi):
                p.copy_(v)
        sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
        for t in traj:
            sgd.zero_grad()
            ref(data[t]).pow(2).mean().backward()
            sgd.step()
        ends.append([p.detach() for p in ref.parameters()])
    for p, v, a, b in zip(model.parameters(), phi, *ends):
        torch.testing.assert_close(p.detach(), v + 0.5 * ((a + b) / 2 - v), rtol=1e-12, atol=1e-14)
    assert opt.outer_step_count == 1


def _batched_adam(model):
    import metaopt

    return metaopt.SequentialReptile(
        torch.optim.Adam(model.parameters(), lr=0.05),
        tasks=list("abc"),
        inner_steps=2,
        outer_lr=0.5,
        tasks_per_outer_step=2,
        seed=4,
    )


def _data():
    g = torch.Generator().manual_seed(0)
    return {t: torch.randn(8, 3, generator=g, dtype=torch.float64) for t in "abc"}


def test_batched_trajectories_each_carry_their_own_adam_state():
    """Trajectory i of every outer step continues the Adam moments of trajectory i of the
    previous one, as n workers would: checked over 3 outer steps against two plain Adam
    optimizers on two copies of the model, each restarted from φ at every outer step."""
    data = _data()
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 1).double()
    workers = [torch.nn.Linear(3, 1).double() for _ in range(2)]
    adams = [torch.optim.Adam(w.parameters(), lr=0.05) for w in workers]
    phi = [p.detach().clone() for p in model.parameters()]
    opt = _batched_adam(model)
    plan = [w[0] for w in opt.planned_tasks(12)]
    for t in plan:
        opt.step({t: model(data[t]).pow(2).mean()})
    for o in range(3):
        ends = []
        for i, (ref, adam) in enumerate(zip(workers, adams)):
            with torch.no_grad():
                for p, v in zip(ref.parameters(), phi):
                    p.copy_(v)
            for t in plan[4 * o + 2 * i : 4 * o + 2 * i + 2]:
                adam.zero_grad()
                ref(data[t]).pow(2).mean().backward()
                adam.step()
            ends.append([p.detach().clone() for p in ref.parameters()])
        phi = [v + 0.5 * ((a + b) / 2 - v) for v, a, b in zip(phi, *ends)]
    for p, v in zip(model.parameters(), phi):
        torch.testing.assert_close(p.detach(), v, rtol=0.0, atol=1e-12)
    assert opt.outer_step_count == 3


@pytest.mark.parametrize("how", ["state_dict", "deepcopy", "pickle"])
def test_a_parked_trajectory_state_survives_a_resume_mid_outer_step(how):
    """Saved after the first trajectory of an outer step (its Adam state parked, the second
    trajectory's live), the copy continues exactly as the original."""
    import copy
    import pickle

    data = _data()

    def run(model, opt, steps):
        for _ in range(steps):
            (t,) = opt.next_tasks()
            opt.step({t: model(data[t]).pow(2).mean()})

    torch.manual_seed(1)
    model = torch.nn.Linear(3, 1).double()
    opt = _batched_adam(model)
    run(model, opt, 6)  # outer step 1 done, trajectory 1 of outer step 2 done (its state parked)
    if how == "state_dict":
        torch.manual_seed(1)
        model2 = torch.nn.Linear(3, 1).double()
        opt2 = _batched_adam(model2)
        model2.load_state_dict(model.state_dict())
        opt2.load_state_dict(opt.state_dict())
    else:
        twin = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
        model2, opt2 = twin
    run(model, opt, 6)
    run(model2, opt2, 6)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(opt.slow_weights, opt2.slow_weights))


def test_lowering_tasks_per_outer_step_mid_outer_step_keeps_one_state_per_trajectory():
    """n lowered from 3 to 2 after the third trajectory started: that trajectory ends the
    outer step, its state is dropped (there is no trajectory 2 any more), and the next outer
    step's trajectories 0 and 1 continue the states of trajectories 0 and 1; a resume
    continues identically."""
    import metaopt

    data = _data()
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 1).double()
    opt = metaopt.SequentialReptile(
        torch.optim.Adam(model.parameters(), lr=0.05),
        tasks=list("abc"),
        inner_steps=2,
        outer_lr=0.5,
        tasks_per_outer_step=3,
        seed=4,
    )

    def run(model, opt, steps):
        for _ in range(steps):
            (t,) = opt.next_tasks()
            opt.step({t: model(data[t]).pow(2).mean()})

    run(model, opt, 5)  # trajectories 0, 1 done; trajectory 2 half-way
    states = {i: {id(p): v["exp_avg"].clone() for p, v in st.items()} for i, st in opt._slots.items()}
    opt.tasks_per_outer_step = 2
    run(model, opt, 1)  # ends trajectory 2 and the outer step
    assert opt.outer_step_count == 1 and set(opt._slots) == {1}
    live = {id(p): v["exp_avg"] for p, v in opt.state.items()}
    assert all(torch.equal(live[k], v) for k, v in states[0].items())  # trajectory 0's state
    import copy

    saved_model, saved_opt = copy.deepcopy((model.state_dict(), opt.state_dict()))
    run(model, opt, 6)
    torch.manual_seed(1)
    model2 = torch.nn.Linear(3, 1).double()
    opt2 = metaopt.SequentialReptile(
        torch.optim.Adam(model2.parameters(), lr=0.05),
        tasks=list("abc"),
        inner_steps=2,
        outer_lr=0.5,
        tasks_per_outer_step=3,
        seed=4,
    )
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    assert opt2.tasks_per_outer_step == 2
    run(model2, opt2, 6)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
