"""Shared fixtures: small models and task data with fixed seeds."""

from __future__ import annotations

import os

# Triton's kernels run on CPU tensors through its interpreter (tests/test_triton_*.py). Read
# when triton is first imported, which defines its own library functions (tl.sum, tl.zeros)
# for the interpreter or not: so before any test module imports it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The long profile (stateful fuzzing at >= 10,000 steps, 50+ SIGKILLs): off in CI, on with
# METAOPT_LONG=1. Tests marked ``long`` run only then; tests that scale their budget read LONG.
LONG = os.environ.get("METAOPT_LONG", "") not in ("", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "long: the long profile; runs only with METAOPT_LONG=1")


def pytest_collection_modifyitems(config, items):
    if LONG:
        return
    skip = pytest.mark.skip(reason="long profile: set METAOPT_LONG=1")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# The whole suite runs under torch.use_deterministic_algorithms(True), as a user's reproducible
# run would: an operation with no deterministic implementation (GradVac's target update once
# used put_, which raises there) fails here first. The mode also makes torch.empty fill new
# memory with NaN, so reading a buffer before writing it shows up. Tests that rely on the mode
# take the ``deterministic`` fixture below, so they keep it whatever this default becomes.
torch.use_deterministic_algorithms(True)

TASKS = ["ar", "bn", "fi"]


def make_model(seed: int = 0, width: int = 8) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))


def make_data(tasks=TASKS, n: int = 16, seed: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, t in enumerate(tasks):
        x = torch.randn(n, 4, generator=g)
        w = torch.randn(4, 1, generator=g) + i
        out[t] = (x, x @ w + 0.1 * torch.randn(n, 1, generator=g))
    return out


def task_loss(model: torch.nn.Module, data, task: str) -> torch.Tensor:
    x, y = data[task]
    return torch.nn.functional.mse_loss(model(x), y)


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture
def data():
    return make_data()


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for one test, the previous mode restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)
