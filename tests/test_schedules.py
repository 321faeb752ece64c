"""Task schedules: frequencies, determinism, state."""

from __future__ import annotations

import collections

import pytest
import torch

from metaopt.schedules import TaskSchedule


def frequencies(s: TaskSchedule, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    counts = collections.Counter(s.draw(g) for _ in range(n))
    return torch.tensor([counts[i] for i in range(s.num_tasks)], dtype=torch.float64)


def chi_square(observed: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * observed.sum()
    return float(((observed - expected) ** 2 / expected).sum())


# 99.9% quantile of chi-square with 3 degrees of freedom: 16.27
@pytest.mark.parametrize("kind,sizes,tau,expected", [
    ("uniform", None, 1.0, [0.25, 0.25, 0.25, 0.25]),
    ("proportional", [1, 2, 3, 4], 1.0, [0.1, 0.2, 0.3, 0.4]),
    ("temperature", [1, 4, 9, 16], 2.0, [0.1, 0.2, 0.3, 0.4]),
])
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


@pytest.mark.parametrize("args,match", [
    ((0, "uniform"), "at least one"),
    ((3, "zipf"), "one of"),
    ((3, "proportional"), "task_sizes"),
])
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
