"""TaskSchedule's task sizes and temperature: bad values refused at construction (naming the
argument and the value), extreme valid ones drawn from without overflow."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import torch

import metaopt
from metaopt.schedules import TaskSchedule


def draws(s: TaskSchedule, n: int = 2000, seed: int = 0) -> collections.Counter[int]:
    g = torch.Generator().manual_seed(seed)
    return collections.Counter(s.draw(g) for _ in range(n))


@pytest.mark.parametrize("kind", ["proportional", "temperature"])
@pytest.mark.parametrize(
    "sizes,shown",
    [
        ([1.0, math.inf], "inf"),
        ([math.nan, 2.0], "nan"),
        ([-math.inf, 2.0], "-inf"),
        ([True, 2], "True"),
        ([np.bool_(True), 2], "True"),
        (["3", 2], "'3'"),
        ([None, 2], "None"),
        ([1 + 2j, 2], "(1+2j)"),
        ([10**400, 2], "1000"),  # a Python int too large for a float
        ([torch.tensor([1.0, 2.0]), 2], "tensor"),
    ],
)
def test_bad_task_sizes_are_refused_at_construction(kind, sizes, shown):
    with pytest.raises(ValueError, match="task_sizes") as info:
        TaskSchedule(2, kind, sizes=sizes, temperature=2.0)
    assert shown in str(info.value)


@pytest.mark.parametrize(
    "tau,shown",
    [
        (math.inf, "inf"),
        (math.nan, "nan"),
        (-1.0, "-1.0"),
        (0.0, "0.0"),
        (True, "True"),
        ("2", "'2'"),
        (None, "None"),
    ],
)
def test_bad_temperature_is_refused_at_construction(tau, shown):
    with pytest.raises(ValueError, match="temperature") as info:
        TaskSchedule(2, "temperature", sizes=[1, 2], temperature=tau)
    assert shown in str(info.value)


def test_bad_temperature_is_refused_through_the_optimizer():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="temperature.*inf"):
        metaopt.SequentialReptile(
            torch.optim.SGD(model.parameters(), lr=0.1),
            tasks=["a", "b"],
            schedule="temperature",
            task_sizes={"a": 1, "b": 2},
            temperature=math.inf,
        )
    with pytest.raises(ValueError, match="task_sizes.*inf"):
        metaopt.SequentialReptile(
            torch.optim.SGD(model.parameters(), lr=0.1),
            tasks=["a", "b"],
            schedule="proportional",
            task_sizes={"a": 1, "b": math.inf},
        )


@pytest.mark.parametrize(
    "sizes,tau",
    [
        ([1e300, 1e308, 5e307], 1e-3),  # n^(1/τ) overflowed to inf: inf/inf = NaN
        ([10.0, 1000.0, 100.0], 1e-300),  # 1/τ = 1e300: every n^(1/τ) is inf
        ([2.0, 3.0, 1.0], 5e-324),  # 1/τ is inf
        ([1e5, 1e6, 2e5], 1e-5),
        ([1e-300, 1e-200, 1e-250], 1e-3),  # small sizes: n^(1/τ) underflowed to 0, sum 0
    ],
)
def test_a_small_temperature_picks_the_largest_task(sizes, tau):
    s = TaskSchedule(3, "temperature", sizes=sizes, temperature=tau)
    p = s.probabilities
    assert bool(p.isfinite().all()) and bool((p >= 0).all())
    torch.testing.assert_close(p, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    assert draws(s, 200) == {1: 200}


def test_a_small_temperature_shares_between_tied_largest_tasks():
    s = TaskSchedule(3, "temperature", sizes=[5, 1e6, 1e6], temperature=1e-3)
    torch.testing.assert_close(s.probabilities, torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64))
    counts = draws(s)
    assert set(counts) == {1, 2} and abs(counts[1] - counts[2]) < 200


@pytest.mark.parametrize("sizes", [[1, 10, 100, 1000], [1e-300, 1.0, 1e300, 1e308]])
def test_a_large_temperature_is_nearly_uniform(sizes):
    s = TaskSchedule(4, "temperature", sizes=sizes, temperature=1e6)
    p = s.probabilities
    torch.testing.assert_close(p, torch.full((4,), 0.25, dtype=torch.float64), atol=1e-3, rtol=0)
    counts = draws(s, 4000)
    assert all(800 < counts[i] < 1200 for i in range(4)), counts


def test_proportional_over_huge_and_tiny_sizes():
    s = TaskSchedule(3, "proportional", sizes=[1e308, 1e308, 1e-308])
    torch.testing.assert_close(s.probabilities, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    assert set(draws(s, 500)) == {0, 1}


def test_ordinary_sizes_of_other_number_types_still_work():
    for sizes in ([1, 2, 3], (1.0, 2.0, 3.0), np.array([1, 2, 3]), [np.int64(1), np.float32(2), 3]):
        s = TaskSchedule(3, "proportional", sizes=sizes)
        torch.testing.assert_close(s.probabilities, torch.tensor([1, 2, 3], dtype=torch.float64) / 6)
    s = TaskSchedule(3, "proportional", sizes=list(torch.tensor([1, 2, 3])))  # 0-dim tensors
    torch.testing.assert_close(s.probabilities, torch.tensor([1, 2, 3], dtype=torch.float64) / 6)
    s = TaskSchedule(3, "temperature", sizes=[1, 4, 9], temperature=np.float64(2.0))
    torch.testing.assert_close(s.probabilities, torch.tensor([1, 2, 3], dtype=torch.float64) / 6)
