"""Stateful fuzzing of every optimizer and composition against the step contract.

One :class:`hypothesis.stateful.RuleBasedStateMachine`, parameterised by a factory (:data:`SPECS`),
drives a (model, optimizer) pair through random sequences of

* good steps (losses for exactly ``next_tasks()``, keys in either order);
* every kind of bad input of ``tests/test_errors.py`` and ``tests/test_hardening.py``
  (:data:`BAD_INPUTS`; corrupt state dicts, :data:`BAD_STATES`; an in-place write to a parameter
  behind a Reptile-family optimizer's back): each must raise a clear error and change nothing,
  bit for bit (parameters, ``.grad``, buffers, ``state_dict``, pending draw);
* hyper-parameter assignments: invalid ones (must raise naming the option and keep the old value,
  nothing else moving), valid ones, and ones valid alone that contradict the other options (the
  next step must be refused, changing nothing);
* state_dict round trips (in memory, or through ``torch.save``/``torch.load(weights_only=True)``)
  into a fresh model and optimizer built with another seed (the model's state first),
  ``copy.deepcopy`` and pickle round trips of ``(model, opt)``: the copy and the original then
  take the same 1-3 steps on the same data and must agree bit for bit (parameters, ``.grad``,
  buffers, ``state_dict``, pending draw);
* parameter re-allocation (``p.data = p.data.clone()``, which breaks packing): the pair must
  keep producing bit for bit what an untouched twin produces;
* ``use_slow_weights()`` blocks (Reptile family): the block sees φ, and everything is restored.

After every rule: all parameters finite and the step counter equal to the accepted steps.
After every accepted step that ends an outer step, θ equals φ bit for bit.

Budget: the CI profile keeps the whole file well under a minute on two cores; the long profile
(``METAOPT_LONG=1``, :data:`conftest.LONG`) takes more than 10,000 optimizer steps. Counters
(steps, rejected steps, copies, re-allocations, ...) are kept across the run and printed by the
last test, which also checks that every rule kind was exercised.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import LONG, TASKS, make_model
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import metaopt
from metaopt.parts.state_dict import record_of

from _snapshot import assert_same, assert_unchanged, held_state, snapshot

# ---------------------------------------------------------------- budget
SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
if LONG:
    SETTINGS = settings(
        max_examples=40,
        stateful_step_count=50,
        deadline=None,
        derandomize=False,
        database=None,
        suppress_health_check=SLOW,
    )
    MIN_STEPS = 10_000
else:
    SETTINGS = settings(
        max_examples=12,
        stateful_step_count=12,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=SLOW,
    )
    MIN_STEPS = 200

# ---------------------------------------------------------------- counters (printed at the end)
STATS: Counter[str] = Counter()
PER_SPEC: dict[str, Counter[str]] = {}
FINISHED: dict[str, float] = {}  # spec name -> wall seconds of its fuzz test
VIOLATIONS: list[str] = []


def count(spec: str, key: str, n: int = 1) -> None:
    STATS[key] += n
    PER_SPEC.setdefault(spec, Counter())[key] += n


# ---------------------------------------------------------------- models and data
N_BATCHES = 3


class Heads(torch.nn.Module):
    """A shared encoder and one linear head per task: ``forward(task, x)``."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.enc = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh())
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(6, 1) for t in TASKS})

    def forward(self, task: str, x: torch.Tensor) -> torch.Tensor:
        return self.heads[task](self.enc(x))


def bn_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 1)
    )


MODELS: dict[str, Callable[[int], torch.nn.Module]] = {
    "mlp": make_model,  # conftest's Linear-Tanh-Linear, every parameter shared
    "heads": Heads,
    "bn": bn_model,  # BatchNorm: floating buffers (running statistics)
}


def _batches() -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(11)
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for i, t in enumerate(TASKS):
        w = torch.randn(4, 1, generator=g) + i
        out[t] = []
        for _ in range(N_BATCHES):
            x = torch.randn(8, 4, generator=g)
            out[t].append((x, x @ w + 0.1 * torch.randn(8, 1, generator=g)))
    return out


DATA = _batches()


def forward(kind: str, model: torch.nn.Module, task: str, x: torch.Tensor) -> torch.Tensor:
    return model(task, x) if kind == "heads" else model(x)


def task_loss(kind: str, model: torch.nn.Module, task: str, batch: int) -> torch.Tensor:
    x, y = DATA[task][batch]
    return torch.nn.functional.mse_loss(forward(kind, model, task, x), y)


def first_weight(kind: str, model: Any) -> torch.Tensor:
    """A weight every task's loss reaches."""
    return model.enc[0].weight if kind == "heads" else model[0].weight


# ---------------------------------------------------------------- the factories
@dataclass
class Spec:
    """How to build one optimizer (or composition) on one kind of model.

    ``valid`` and ``invalid`` list hyper-parameter assignments ``(target, attribute, value)``;
    ``target`` is ``"opt"``, ``"inner"`` (the wrapped metaopt optimizer) or ``"group"`` (every
    param group of the torch optimizer, carried by the state_dict). ``conflicting`` lists
    assignments each valid alone that contradict the other options, ``(target, attribute,
    value, message)``: the next step must be refused with that message.
    """

    model: str
    build: Callable[[torch.nn.Module, int], Any]
    valid: list[tuple[str, str, Any]]
    invalid: list[tuple[str, str, Any]]
    slow_fast: bool = False
    buffers: bool = False
    conflicting: list[tuple[str, str, Any, str]] = field(default_factory=list)

    def make(self, seed: int) -> tuple[torch.nn.Module, Any]:
        model = MODELS[self.model](seed)
        return model, self.build(model, seed)


LR = [("group", "lr", 0.01), ("group", "lr", 0.05)]
BASE_INVALID = [("opt", "allow_unused", "yes")]
SLOW_FAST_VALID = [
    ("opt", "outer_lr", 0.0),
    ("opt", "outer_lr", 0.3),
    ("opt", "outer_lr", 1.0),
    ("opt", "inner_steps", 1),
    ("opt", "inner_steps", 2),
    ("opt", "inner_steps", 4),
    ("opt", "reset_inner_state", True),
    ("opt", "reset_inner_state", False),
    *[("opt", "tasks_per_outer_step", n) for n in (1, 2, 3)],
    ("opt", "timeout", 30.0),
    ("opt", "timeout", None),
]
SLOW_FAST_INVALID = [
    ("opt", "outer_lr", 2.0),
    ("opt", "outer_lr", -0.1),
    ("opt", "outer_lr", math.nan),
    ("opt", "outer_lr", "0.5"),
    ("opt", "inner_steps", 0),
    ("opt", "inner_steps", -1),
    ("opt", "inner_steps", 2.5),
    ("opt", "inner_steps", True),
    ("opt", "anneal_steps", 0),
    ("opt", "reset_inner_state", 1),
    ("opt", "tasks_per_outer_step", 0),
    ("opt", "tasks_per_outer_step", 1.0),
    ("opt", "timeout", 0),
    ("opt", "timeout", math.inf),
    ("opt", "timeout", "5"),
]
UNPAIRED = [("opt", "outer_lr_final", 0.0, "go together"), ("opt", "anneal_steps", 2, "go together")]


def surgery_options(
    target: str, gradvac: bool, reduction: bool = True
) -> tuple[list[tuple[str, str, Any]], list[tuple[str, str, Any]]]:
    """The options of a GradientSurgery method (Weighted has no reduction: its weighting scales
    the update)."""
    valid: list[tuple[str, str, Any]] = [(target, "retain_graph", True), (target, "retain_graph", False)]
    invalid: list[tuple[str, str, Any]] = [(target, "batched", "no"), (target, "retain_graph", 1)]
    if reduction:
        valid += [(target, "reduction", "sum"), (target, "reduction", "mean")]
        invalid += [(target, "reduction", "max"), (target, "reduction", None)]
    if gradvac:
        valid += [(target, "beta", b) for b in (0.0, 0.1, 0.5, 1.0)]
        invalid += [(target, "beta", 1.5), (target, "beta", -0.1), (target, "beta", math.nan)]
    return valid, invalid


GRADNORM_VALID = [("opt", "alpha", a) for a in (0.0, 0.5, 1.5, 3.0)]
GRADNORM_INVALID = [
    ("opt", "alpha", -1.0),
    ("opt", "alpha", math.inf),
    ("opt", "alpha", math.nan),
    ("opt", "alpha", "1"),
]


def _sr(m, s):
    return metaopt.SequentialReptile(
        torch.optim.Adam(m.parameters(), lr=0.02),
        tasks=TASKS,
        inner_steps=3,
        outer_lr=0.5,
        outer_lr_final=0.1,
        anneal_steps=4,
        interpolation="auto",
        seed=s,
        allow_unused=True,
    )


def _sr_bn(m, s):
    return metaopt.SequentialReptile(
        torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
        tasks=TASKS,
        inner_steps=2,
        outer_lr=0.4,
        buffers=m,
        state_device="cpu",  # host placement: φ streamed through the (CPU) device
        seed=s,
    )


def _reptile(m, s):
    return metaopt.Reptile(
        torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.5),
        tasks=TASKS,
        inner_steps=2,
        outer_lr=0.5,
        buffers=m,
        interpolation="foreach",
        seed=s,
    )


def _reptile_batched(m, s):
    return metaopt.Reptile(
        torch.optim.Adam(m.parameters(), lr=0.02),
        tasks=TASKS,
        inner_steps=2,
        tasks_per_outer_step=2,
        outer_lr=0.6,
        interpolation="reference",
        seed=s,
    )


def _outer_sgd(p):
    return torch.optim.SGD(p, lr=0.5, momentum=0.9, nesterov=True)


def _reptile_outer_opt(m, s):
    return metaopt.Reptile(
        torch.optim.SGD(m.parameters(), lr=0.05),
        tasks=TASKS,
        inner_steps=2,
        tasks_per_outer_step=2,
        outer_optimizer=_outer_sgd,
        interpolation="foreach",
        state_device="cpu",
        seed=s,
        allow_unused=True,
    )


def _pcgrad(m, s):
    return metaopt.PCGrad(torch.optim.Adam(m.parameters(), lr=0.02), tasks=TASKS, seed=s)


def _gradvac(m, s):
    return metaopt.GradVac(torch.optim.SGD(m.parameters(), lr=0.05), tasks=TASKS, beta=0.3, seed=s)


def _gradvac_parameter(m, s):
    return metaopt.GradVac(
        torch.optim.Adam(m.parameters(), lr=0.02),
        tasks=TASKS,
        beta=0.5,
        groups="parameter",
        shared=m.enc.parameters(),
        reduction="mean",
        seed=s,
    )


def _gradnorm_mtl(m, s):
    return metaopt.GradNorm(
        metaopt.MTL(torch.optim.Adam(m.parameters(), lr=0.02), tasks=TASKS, seed=s),
        layer=m.enc[0].parameters(),
        alpha=1.5,
        seed=s,
    )


def _mtl(m, s):
    return metaopt.MTL(torch.optim.AdamW(m.parameters(), lr=0.02), tasks=TASKS, reduction="mean", seed=s)


def _sr_gradvac(m, s):
    return metaopt.SequentialReptile(
        metaopt.GradVac(torch.optim.AdamW(m.parameters(), lr=0.02), tasks=TASKS, beta=0.2, seed=s),
        inner_steps=2,
        outer_lr=0.5,
        interpolation="auto",
        seed=s,
    )


def _gradnorm_pcgrad(m, s):
    return metaopt.GradNorm(
        metaopt.PCGrad(torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.5), tasks=TASKS, seed=s),
        layer=m[2].parameters(),
        alpha=0.5,
        seed=s,
    )


def _random_weighting(G):
    """A Gramian weighting that draws from the global RNG (as TorchJD's PCGradWeighting does):
    Weighted must make it reproducible from its own generator, through every copy and reload."""
    return (0.5 + torch.rand(G.shape[-1], dtype=G.dtype)) / G.diagonal().sqrt().clamp_min(1e-12)


def _weighted(m, s):
    return metaopt.Weighted(
        torch.optim.Adam(m.parameters(), lr=0.02), weighting=_random_weighting, tasks=TASKS, seed=s
    )


def _sr_weighted(m, s):
    return metaopt.SequentialReptile(
        metaopt.Weighted(
            torch.optim.SGD(m.parameters(), lr=0.05), weighting=_random_weighting, tasks=TASKS, seed=s
        ),
        inner_steps=2,
        outer_lr=0.5,
        seed=s,
    )


_sv, _si = surgery_options("opt", gradvac=False)
_gv, _gi = surgery_options("opt", gradvac=True)
_iv, _ii = surgery_options("inner", gradvac=True)
_pv, _pi = surgery_options("inner", gradvac=False)
_wv, _wi = surgery_options("opt", gradvac=False, reduction=False)
_wiv, _wii = surgery_options("inner", gradvac=False, reduction=False)
SPECS: dict[str, Spec] = {
    "sequential_reptile": Spec(
        "heads",
        _sr,
        SLOW_FAST_VALID + LR + [("opt", "anneal_steps", 2), ("opt", "outer_lr_final", 0.0)],
        SLOW_FAST_INVALID + BASE_INVALID,
        slow_fast=True,
        conflicting=[
            ("opt", "anneal_steps", None, "go together"),
            ("opt", "outer_lr_final", None, "go together"),
        ],
    ),
    "sequential_reptile_bn": Spec(
        "bn",
        _sr_bn,
        SLOW_FAST_VALID + LR,
        SLOW_FAST_INVALID + BASE_INVALID,
        slow_fast=True,
        buffers=True,
        conflicting=UNPAIRED,
    ),
    "reptile": Spec(
        "bn",
        _reptile,
        SLOW_FAST_VALID + LR,
        SLOW_FAST_INVALID + BASE_INVALID,
        slow_fast=True,
        buffers=True,
        conflicting=UNPAIRED,
    ),
    "reptile_batched": Spec(
        "mlp",
        _reptile_batched,
        SLOW_FAST_VALID + LR,
        SLOW_FAST_INVALID + BASE_INVALID,
        slow_fast=True,
        conflicting=UNPAIRED,
    ),
    # with an outer optimizer its lr is the outer step size: outer_lr is not an option to set
    "reptile_outer_optimizer": Spec(
        "heads",
        _reptile_outer_opt,
        [v for v in SLOW_FAST_VALID if v[1] != "outer_lr"] + LR,
        SLOW_FAST_INVALID + BASE_INVALID,
        slow_fast=True,
        conflicting=UNPAIRED + [("opt", "outer_lr", 0.5, "outer_optimizer")],
    ),
    "pcgrad": Spec("heads", _pcgrad, _sv + LR, _si + BASE_INVALID),
    "gradvac": Spec("mlp", _gradvac, _gv + LR, _gi + BASE_INVALID),
    "gradvac_parameter_groups": Spec("heads", _gradvac_parameter, _gv + LR, _gi + BASE_INVALID),
    "gradnorm_mtl": Spec(
        "heads",
        _gradnorm_mtl,
        GRADNORM_VALID + [("inner", "reduction", "sum"), ("inner", "reduction", "mean")] + LR,
        GRADNORM_INVALID + [("inner", "reduction", "max")] + BASE_INVALID,
    ),
    "mtl": Spec(
        "bn",
        _mtl,
        [("opt", "reduction", "sum"), ("opt", "reduction", "mean")] + LR,
        [("opt", "reduction", "max"), ("opt", "reduction", 1)] + BASE_INVALID,
    ),
    "sequential_reptile_gradvac": Spec(
        "heads",
        _sr_gradvac,
        SLOW_FAST_VALID + _iv + LR,
        SLOW_FAST_INVALID + _ii + BASE_INVALID,
        slow_fast=True,
        conflicting=UNPAIRED,
    ),
    "gradnorm_pcgrad": Spec(
        "mlp", _gradnorm_pcgrad, GRADNORM_VALID + _pv + LR, GRADNORM_INVALID + _pi + BASE_INVALID
    ),
    "weighted": Spec("heads", _weighted, _wv + LR, _wi + BASE_INVALID),
    "sequential_reptile_weighted": Spec(
        "mlp",
        _sr_weighted,
        SLOW_FAST_VALID + _wiv + LR,
        SLOW_FAST_INVALID + _wii + BASE_INVALID,
        slow_fast=True,
        conflicting=UNPAIRED,
    ),
}


# ---------------------------------------------------------------- bad inputs
def _nan_grad(kind, model, task, batch):
    """A finite loss with a NaN gradient: d/dw sqrt(|w - w|²) at 0."""
    w = first_weight(kind, model)
    return task_loss(kind, model, task, batch) + torch.sqrt((w - w.detach()).pow(2).sum())


def _overflow_grad(kind, model, task, batch):
    """A finite loss whose gradient overflows float32: the value is 0·1e20·1e20, the gradient 1e40."""
    w = first_weight(kind, model)
    return task_loss(kind, model, task, batch) + (w - w.detach()).sum() * 1e20 * 1e20


def _first_layer_only(kind, model, task, batch):
    """A loss that reaches only the first layer (the rest of the model gets no gradient)."""
    x = DATA[task][batch][0]
    return (model.enc(x) if kind == "heads" else model[0](x)).pow(2).mean()


def _non_scalar(kind, model, task, batch):
    x, y = DATA[task][batch]
    return (forward(kind, model, task, x) - y).pow(2)


# kind -> (how one task's loss is replaced, or None for a change of the whole mapping; error; match)
BAD_INPUTS: dict[str, tuple[Any, type[Exception], str]] = {
    "nan": (lambda k, m, t, b: task_loss(k, m, t, b) * math.nan, ValueError, "non-finite loss"),
    "inf": (lambda k, m, t, b: task_loss(k, m, t, b) * math.inf, ValueError, "non-finite loss"),
    "-inf": (lambda k, m, t, b: task_loss(k, m, t, b) * -math.inf, ValueError, "non-finite loss"),
    "missing": (None, ValueError, r"missing \["),
    "extra": (None, ValueError, r"unexpected \['xx'\]"),
    "non_mapping": (None, TypeError, "mapping"),
    "non_scalar": (_non_scalar, ValueError, "scalar"),
    "detached": (lambda k, m, t, b: task_loss(k, m, t, b).detach(), ValueError, "does not require grad"),
    "non_tensor": (lambda k, m, t, b: 1.0, TypeError, "not a Tensor"),
    "nan_gradient": (_nan_grad, ValueError, "non-finite gradient"),
    "overflowing_gradient": (_overflow_grad, ValueError, "non-finite gradient"),
    # a module left out of the optimizer ("reaches none" / "does not reach the GradNorm layer")
    "stranger": (None, ValueError, "reach"),
    # every task's loss leaves parameters without gradient (refused unless allow_unused=True)
    "unreached": (_first_layer_only, ValueError, "get no gradient|does not reach the GradNorm layer"),
}


def _levels(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The metaopt records of a state dict, outermost first (a composed optimizer nests its
    wrapped one's under ``inner``)."""
    out = []
    level = record_of(state) if isinstance(state, dict) else None
    while isinstance(level, dict):
        out.append(level)
        level = level.get("inner")
    return out


def _meta_tensor(state: dict[str, Any]) -> bool:
    """Replace the first non-scalar tensor of the torch optimizer's own per-parameter fields by
    a meta tensor (only torch's own load finds it, after metaopt's part was applied: a rollback
    is needed)."""
    for per_param in state["state"].values():
        for key, value in per_param.items():
            if not key.startswith("metaopt_") and isinstance(value, torch.Tensor) and value.dim() > 0:
                per_param[key] = torch.empty(value.shape, device="meta")
                return True
    return False


def _first_slow(value: Any) -> Callable[[dict[str, Any]], bool]:
    """Set the first parameter's slow weights (where there are any) to ``value``."""

    def corrupt(state: dict[str, Any]) -> bool:
        for per_param in state["state"].values():
            if "metaopt_slow" in per_param:
                per_param["metaopt_slow"] = value
                return True
        return False

    return corrupt


def _set(level: int, key: str, value: Any) -> Callable[[dict[str, Any]], bool]:
    def corrupt(state: dict[str, Any]) -> bool:
        levels = _levels(state)
        if level >= len(levels):
            return False
        levels[level][key] = value
        return True

    return corrupt


def _first_of(key: str, value: Any) -> Callable[[dict[str, Any]], bool]:
    """Set ``key`` (at whichever level has it) to ``value``."""

    def corrupt(state: dict[str, Any]) -> bool:
        for level in _levels(state):
            if key in level:
                level[key] = value
                return True
        return False

    return corrupt


# kind -> (corrupt the state dict in place, False where it does not apply; error; match)
BAD_STATES: dict[str, tuple[Callable[[dict[str, Any]], bool], Any, str | None]] = {
    "not_metaopt": (
        lambda s: s["param_groups"][0].pop("metaopt") is not None,
        ValueError,
        "not a metaopt state dict",
    ),
    "class": (_set(0, "class", "Adam"), ValueError, "saved by Adam"),
    "inner_class": (_set(1, "class", "Adam"), ValueError, "saved by Adam"),
    "tasks": (_set(0, "tasks", ["x"]), ValueError, "saved tasks"),
    "step": (_set(0, "step", -1), ValueError, "step count"),
    "inner_step": (_set(1, "step", 1.5), ValueError, "step count"),
    "generator": (_set(0, "generator", torch.zeros(3, dtype=torch.uint8)), ValueError, "generator"),
    "pending": (_set(0, "pending", ["zz"]), ValueError, "pending"),
    "slow_weight_shape": (_first_slow(torch.zeros(3)), ValueError, "shape"),
    "slow_weight_nan": (_first_slow(torch.tensor(float("nan"))), ValueError, "shape|finite"),
    "gradnorm_weights": (_first_of("weights", -torch.ones(len(TASKS))), ValueError, "positive"),
    "gradvac_targets": (
        _first_of("targets", torch.zeros(1, 1, 1, dtype=torch.float64)),
        ValueError,
        "targets have shape",
    ),
    "meta_tensor": (_meta_tensor, (NotImplementedError, RuntimeError), None),
    "pending_order": (_set(0, "pending", list(reversed(TASKS))), ValueError, "pending"),
    "unknown_field": (
        lambda s: bool(s["state"]) and s["state"][next(iter(s["state"]))].update(metaopt_bogus=1) is None,
        ValueError,
        "metaopt_bogus",
    ),
    "inner_count_negative": (
        lambda s: "inner_count" in record_of(s) and _set(0, "inner_count", -1)(s),
        ValueError,
        "inner_count",
    ),
    "clock_below_step": (
        lambda s: record_of(s)["step"] > 0 and _set(0, "clock", 0)(s),
        ValueError,
        "clock",
    ),
}

STEPS = st.lists(st.integers(0, N_BATCHES - 1), min_size=1, max_size=3)


# ---------------------------------------------------------------- the machine
class OptimizerMachine(RuleBasedStateMachine):
    """Drives one (model, optimizer) pair built by ``spec``; subclassed per factory."""

    name: str = ""
    spec: Spec

    def __init__(self) -> None:
        super().__init__()
        self.model: torch.nn.Module
        self.opt: Any
        self.seed = 0
        self.accepted = 0  # steps the current pair has taken
        self.options: dict[tuple[str, str], Any] = {}  # valid assignments made so far
        self.stranger = MODELS[self.spec.model](99)

    # ------------------------------------------------------------ helpers
    def target(self, opt: Any, where: str) -> Any:
        return opt.inner if where == "inner" else opt

    def fast_tensors(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """What a Reptile-family optimizer interpolates: the parameters, then (buffers=model)
        the floating buffers; in the order of ``opt.slow_weights``."""
        out: list[torch.Tensor] = list(model.parameters())
        if self.spec.buffers:
            out += [b for b in model.buffers() if b.is_floating_point()]
        return out

    def losses(self, model, opt, batch: int, reverse: bool = False) -> dict[str, torch.Tensor]:
        wanted = opt.next_tasks()
        order = list(reversed(wanted)) if reverse else wanted
        return {t: task_loss(self.spec.model, model, t, batch) for t in order}

    def take_step(
        self, model, opt, batch: int, reverse: bool = False, twin: bool = False, torch_way: bool = False
    ) -> None:
        wanted = opt.next_tasks()
        if torch_way:  # opt.backward(losses); opt.step(); opt.zero_grad()
            opt.backward(self.losses(model, opt, batch, reverse))
            report = opt.step()
            opt.zero_grad()
            count(self.name, "torch_way_steps")
        else:
            report = opt.step(self.losses(model, opt, batch, reverse))
        count(self.name, "twin_steps" if twin else "steps")
        assert list(report.tasks) == wanted
        if self.spec.slow_fast and report.outer_update:  # θ ← φ, bit for bit
            fast = self.fast_tensors(model)
            assert len(fast) == len(opt.slow_weights)
            for i, (p, phi) in enumerate(zip(fast, opt.slow_weights)):
                assert torch.equal(p, phi), f"fast tensor {i} differs from φ after an outer step"
            count(self.name, "outer_steps")

    def fresh_copy(self, seed: int, through_file: bool) -> tuple[torch.nn.Module, Any]:
        """A model and optimizer built with ``seed``, given the same options, then loaded with
        the current pair's state dicts (the model's first), in memory (the loaded state must not
        alias the source's) or through torch.save/torch.load(weights_only=True)."""
        saved = {"model": self.model.state_dict(), "opt": self.opt.state_dict()}
        if through_file:
            buf = io.BytesIO()
            torch.save(saved, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
        model, opt = self.spec.make(seed)
        for (where, attr), value in self.options.items():  # options are code, not state
            setattr(self.target(opt, where), attr, value)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        return model, opt

    def twin_run(self, other: tuple[torch.nn.Module, Any], steps: list[int], keep: str) -> None:
        """The same steps on the current pair and ``other``; both must agree bit for bit.
        Continue with ``keep`` ("other" or "self")."""
        model, opt = other
        # .grad is not state: a copied Parameter drops it (torch) and the next step replaces it
        assert_same(
            {**snapshot(self.model, self.opt), "grads": None}, {**snapshot(model, opt), "grads": None}
        )
        for b in steps:
            self.take_step(self.model, self.opt, b)
            self.take_step(model, opt, b, twin=True)
        assert_same(snapshot(self.model, self.opt), snapshot(model, opt))
        self.accepted += len(steps)
        if keep == "other":
            self.model, self.opt = model, opt

    # ------------------------------------------------------------ rules
    @initialize(seed=st.sampled_from([0, 1, 2]))
    def build(self, seed: int) -> None:
        self.seed = seed
        self.model, self.opt = self.spec.make(seed)

    @rule(batches=STEPS, reverse=st.booleans(), torch_way=st.booleans())
    def good_steps(self, batches: list[int], reverse: bool, torch_way: bool) -> None:
        for b in batches:
            self.take_step(self.model, self.opt, b, reverse, torch_way=torch_way)
            self.accepted += 1

    @rule(batch=st.integers(0, N_BATCHES - 1), twice=st.booleans())
    def dropped_backward(self, batch: int, twice: bool) -> None:
        """backward(losses) (once, or accumulated twice), then zero_grad() instead of step():
        nothing but .grad moved, and zero_grad leaves no trace."""
        parts = [self.losses(self.model, self.opt, batch) for _ in range(1 + twice)]
        before = snapshot(self.model, self.opt)  # after the forward passes (BatchNorm statistics)
        for losses in parts:
            self.opt.backward(losses)
        self.opt.zero_grad()
        after = snapshot(self.model, self.opt)
        assert_same({**before, "grads": None}, {**after, "grads": None})
        count(self.name, "dropped_backwards")

    @rule(batch=st.integers(0, N_BATCHES - 1), torch_way=st.booleans())
    def skipped_step(self, batch: int, torch_way: bool) -> None:
        """torch.amp's contract (``found_inf`` set on the optimizer, then ``step()``), as
        GradScaler.step drives it: no parameter (unless the skipped step ends a trajectory),
        inner-optimizer or method state moves; the draw is used up, the clock advances."""
        model, opt = self.model, self.opt
        plan = opt.planned_tasks(2)
        assert opt.next_tasks() == plan[0]
        losses = self.losses(model, opt, batch)
        if torch_way:
            opt.backward(losses)
        before = snapshot(model, opt)
        clock, taken = opt.clock, opt.step_count
        # a skipped step counts in the trajectory: if it ends one, θ restarts (from φ)
        ends = self.spec.slow_fast and opt._inner_count + 1 >= opt.inner_steps
        opt.found_inf = torch.ones(())
        try:
            report = opt.step()
        finally:
            del opt.found_inf
        opt.zero_grad()
        assert report.skipped and (opt.clock, opt.step_count) == (clock + 1, taken)
        after = snapshot(model, opt)
        assert after["pending"] == plan[1]
        if not ends:
            assert_same(before["params"], after["params"])
        assert report.outer_update <= ends
        count(self.name, "skipped_steps")

    @rule(
        kind=st.sampled_from(["nan_gradient", "nan", "inf", "overflowing_gradient"]),
        batch=st.integers(0, N_BATCHES - 1),
        pick=st.integers(0, len(TASKS) - 1),
        torch_way=st.booleans(),
    )
    def device_skipped_step(self, kind: str, batch: int, pick: int, torch_way: bool) -> None:
        """``nonfinite="skip"`` (a GPU's default) forced here: a non-finite step does not raise
        but is skipped on the device. No parameter (unless the step ends a trajectory), no
        inner-optimizer or method state moves (a state the step created is a fresh one, zeros);
        the step is served and counted, and reported once at the next state_dict."""
        model, opt = self.model, self.opt
        # a step first, so that every part's state is a stepped one: a state created only for
        # a state dict (DCP's initialization) is dropped by the next step, skipped or taken
        self.take_step(model, opt, batch)
        self.accepted += 1
        make_bad, _, _ = BAD_INPUTS[kind]
        wanted = opt.next_tasks()
        losses = self.losses(model, opt, batch)
        task = wanted[pick % len(wanted)]
        losses[task] = make_bad(self.spec.model, model, task, batch)
        before = snapshot(model, opt)
        clock, taken, skipped = opt.clock, opt.step_count, opt.skipped_steps
        ends = self.spec.slow_fast and opt._inner_count + 1 >= opt.inner_steps
        mode = opt.nonfinite
        opt.nonfinite = "skip"
        try:
            if torch_way:
                opt.backward(losses)
                report = opt.step()
            else:
                report = opt.step(losses)
        finally:
            opt.nonfinite = mode
        opt.zero_grad()
        self.accepted += 1  # served and counted, as the host cannot know it was skipped
        assert report.finite is not None and not bool(report.finite)
        assert (opt.clock, opt.step_count, opt.skipped_steps) == (clock + 1, taken + 1, skipped + 1)
        with pytest.warns(RuntimeWarning, match=r"1 step\(s\) were skipped on the device"):
            after = snapshot(model, opt, draw=False)
        if not ends:
            assert_same(before["params"], after["params"])
            assert_same(held_state(before["state"]), held_state(after["state"], fresh_from=before["state"]))
        count(self.name, "device_skipped_steps")

    @rule(batch=st.integers(0, N_BATCHES - 1), steps=STEPS)
    def model_zero_grad_drops_backward(self, batch: int, steps: list[int]) -> None:
        """backward(losses), then the *model's* zero_grad (what the Hugging Face Trainer calls):
        the next steps equal those of a twin that never saw that backward."""
        twin = self.fresh_copy(self.seed + 1, through_file=False)
        self.opt.backward(self.losses(self.model, self.opt, batch))
        self.model.zero_grad()
        self.losses(*twin, batch)  # the same forward passes (BatchNorm statistics), no backward
        self.twin_run(twin, steps, keep="self")
        count(self.name, "model_zero_grads")

    @rule(batch=st.integers(0, N_BATCHES - 1))
    def grad_spoiled_after_backward(self, batch: int) -> None:
        """A NaN written into .grad between backward(losses) and step() is refused by step()
        with nothing but .grad moved."""
        model, opt = self.model, self.opt
        opt.backward(self.losses(model, opt, batch))
        grads = [p.grad for p in model.parameters() if p.grad is not None and p.requires_grad]
        with torch.no_grad():
            grads[0].view(-1)[0] = float("nan")
        before = snapshot(model, opt)
        with pytest.raises(ValueError, match="non-finite"):
            opt.step()
        assert_same({**before, "grads": None}, {**snapshot(model, opt), "grads": None})
        opt.zero_grad()
        count(self.name, "spoiled_grads")

    @rule(
        kinds=st.lists(st.sampled_from(["nan_gradient", "nan", "inf"]), min_size=1, max_size=2),
        batch=st.integers(0, N_BATCHES - 1),
        pick=st.integers(0, len(TASKS) - 1),
    )
    def refused_torch_way_step(self, kinds: list[str], batch: int, pick: int) -> None:
        """backward(losses) with a non-finite value leaves it in .grad; step() refuses and
        nothing but .grad moved."""
        for kind in kinds:
            model, opt = self.model, self.opt
            make_bad, _, _ = BAD_INPUTS[kind]
            wanted = opt.next_tasks()
            losses = self.losses(model, opt, batch)
            losses[wanted[pick % len(wanted)]] = make_bad(
                self.spec.model, model, wanted[pick % len(wanted)], batch
            )
            before = snapshot(model, opt)
            opt.backward(losses)
            with pytest.raises(ValueError, match="non-finite"):
                opt.step()
            assert_same({**before, "grads": None}, {**snapshot(model, opt), "grads": None})
            opt.zero_grad()
            count(self.name, "refused_torch_way_steps")

    @rule(
        kinds=st.lists(st.sampled_from(sorted(BAD_INPUTS)), min_size=1, max_size=3),
        batch=st.integers(0, N_BATCHES - 1),
        pick=st.integers(0, len(TASKS) - 1),
    )
    def bad_steps(self, kinds: list[str], batch: int, pick: int) -> None:
        for kind in kinds:
            self.bad_step(kind, batch, pick)

    def bad_step(self, kind: str, batch: int, pick: int) -> None:
        model, opt, mk = self.model, self.opt, self.spec.model
        make_bad, exc, match = BAD_INPUTS[kind]
        wanted = opt.next_tasks()
        task = wanted[pick % len(wanted)]
        losses: Any = self.losses(model, opt, batch)
        if kind == "unreached":
            innermost = opt
            while innermost.inner is not None:
                innermost = innermost.inner
            if innermost.allow_unused:  # then a legitimate step (task heads)
                return
            losses = {t: make_bad(mk, model, t, batch) for t in wanted}
        elif kind == "missing":
            del losses[task]
        elif kind == "extra":
            losses["xx"] = task_loss(mk, model, task, batch)
        elif kind == "non_mapping":
            losses = list(losses.values())
        elif kind == "stranger":
            losses[task] = task_loss(mk, self.stranger, task, batch)
        else:
            losses[task] = make_bad(mk, model, task, batch)
        before = snapshot(model, opt)  # after the forward passes (BatchNorm statistics move there)
        with pytest.raises(exc, match=match):
            opt.step(losses)
        assert_unchanged(before, model, opt)
        count(self.name, "rejected")
        count(self.name, f"rejected:{kind}")

    @rule(batch=st.integers(0, N_BATCHES - 1))
    def refused_step_that_drew(self, batch: int) -> None:
        """A good step (which uses up any pending draw), then step() with no gradient: the
        refused step made the draw itself, and must put every task stream of the composition
        back (generator, pending draw, schedule round, held task)."""
        model, opt = self.model, self.opt
        self.take_step(model, opt, batch)
        self.accepted += 1
        opt.zero_grad()
        before = snapshot(model, opt, draw=False)  # no draw is pending: the step makes it
        assert record_of(before["state"])["pending"] is None
        with pytest.raises(ValueError, match="gradient"):
            opt.step()
        assert_same(before, snapshot(model, opt, draw=False))
        count(self.name, "refused_steps_that_drew")

    @rule(kinds=st.lists(st.sampled_from(sorted(BAD_STATES)), min_size=1, max_size=3))
    def load_bad_state(self, kinds: list[str]) -> None:
        for kind in kinds:
            corrupt, exc, match = BAD_STATES[kind]
            state = copy.deepcopy(self.opt.state_dict())
            if not corrupt(state):
                continue
            before = snapshot(self.model, self.opt)
            with pytest.raises(exc, match=match):
                self.opt.load_state_dict(state)
            assert_unchanged(before, self.model, self.opt)
            count(self.name, "bad_loads")
            count(self.name, f"bad_load:{kind}")

    @precondition(lambda self: bool(self.spec.conflicting))
    @rule(data=st.data(), batch=st.integers(0, N_BATCHES - 1))
    def conflicting_option(self, data: st.DataObject, batch: int) -> None:
        where, attr, value, match = data.draw(st.sampled_from(self.spec.conflicting), label="assignment")
        obj = self.target(self.opt, where)
        kept = getattr(obj, attr)
        setattr(obj, attr, value)  # valid alone
        losses = self.losses(self.model, self.opt, batch)
        before = snapshot(self.model, self.opt)
        with pytest.raises(ValueError, match=match):
            self.opt.step(losses)
        assert_unchanged(before, self.model, self.opt)
        setattr(obj, attr, kept)
        count(self.name, "rejected")
        count(self.name, "rejected:conflicting_option")

    @precondition(lambda self: self.spec.slow_fast)
    @rule(which=st.integers(0, 63), reset=st.booleans(), batch=st.integers(0, N_BATCHES - 1))
    def external_write(self, which: int, reset: bool, batch: int) -> None:
        """An in-place write outside the optimizer is refused at the next step (the slow weights
        no longer match); then φ is re-taken from θ, or the change accepted."""
        params = list(self.model.parameters())
        with torch.no_grad():
            params[which % len(params)].mul_(0.5)
        losses = self.losses(self.model, self.opt, batch)
        before = snapshot(self.model, self.opt)
        with pytest.raises(ValueError, match="changed outside the optimizer"):
            self.opt.step(losses)
        assert_unchanged(before, self.model, self.opt)
        count(self.name, "rejected")
        count(self.name, "rejected:external_write")
        if reset:
            self.opt.reset_slow_weights()
            for p, phi in zip(self.fast_tensors(self.model), self.opt.slow_weights, strict=True):
                assert torch.equal(p, phi)
        else:
            self.opt.accept_parameter_changes()

    @rule(data=st.data())
    def set_invalid_option(self, data: st.DataObject) -> None:
        where, attr, value = data.draw(st.sampled_from(self.spec.invalid), label="assignment")
        obj = self.target(self.opt, where)
        kept = getattr(obj, attr)
        before = snapshot(self.model, self.opt)
        with pytest.raises((ValueError, TypeError), match=attr):
            setattr(obj, attr, value)
        assert getattr(obj, attr) == kept and type(getattr(obj, attr)) is type(kept)
        assert_unchanged(before, self.model, self.opt)
        count(self.name, "invalid_options")

    @rule(data=st.data())
    def set_valid_option(self, data: st.DataObject) -> None:
        where, attr, value = data.draw(st.sampled_from(self.spec.valid), label="assignment")
        if where == "group":
            for g in self.opt.param_groups:
                g[attr] = value
        else:
            setattr(self.target(self.opt, where), attr, value)
            assert getattr(self.target(self.opt, where), attr) == value
            self.options[(where, attr)] = value
        count(self.name, "valid_options")

    @rule(offset=st.integers(1, 1000), through_file=st.booleans(), steps=STEPS)
    def reload_state_dict(self, offset: int, through_file: bool, steps: list[int]) -> None:
        self.twin_run(self.fresh_copy(self.seed + offset, through_file), steps, keep="other")
        count(self.name, "reloads")

    @rule(steps=STEPS)
    def deepcopy_pair(self, steps: list[int]) -> None:
        self.twin_run(copy.deepcopy((self.model, self.opt)), steps, keep="other")
        count(self.name, "deepcopies")

    @rule(steps=STEPS)
    def pickle_pair(self, steps: list[int]) -> None:
        # both ways, picked from the steps already drawn (an extra draw would reshuffle the
        # derandomized CI profile)
        if sum(steps) % 2:  # plain pickle writes each tensor with its own storage: views come back copies
            twin = pickle.loads(pickle.dumps((self.model, self.opt)))
        else:  # torch.save keeps storages shared
            buf = io.BytesIO()
            torch.save((self.model, self.opt), buf)
            buf.seek(0)
            twin = torch.load(buf, weights_only=False)
        self.twin_run(twin, steps, keep="other")
        count(self.name, "pickles")

    @rule(which=st.lists(st.integers(0, 63), min_size=1, max_size=2), steps=STEPS)
    def reallocate(self, which: list[int], steps: list[int]) -> None:
        twin = self.fresh_copy(self.seed + 1, through_file=False)  # untouched, in the same state
        params = list(self.model.parameters())
        with torch.no_grad():
            for i in which:
                p = params[i % len(params)]
                p.data = p.data.clone()  # breaks packing; values unchanged
        self.twin_run(twin, steps, keep="self")
        count(self.name, "reallocations", len(which))

    @precondition(lambda self: self.spec.slow_fast)
    @rule()
    def evaluate_at_slow_weights(self) -> None:
        model, opt = self.model, self.opt
        before = snapshot(model, opt)
        x = DATA[TASKS[0]][0][0]
        with opt.use_slow_weights():
            inside = self.fast_tensors(model)
            assert len(inside) == len(opt.slow_weights)
            for i, (p, phi) in enumerate(zip(inside, opt.slow_weights)):
                assert torch.equal(p, phi), f"tensor {i} does not hold φ inside use_slow_weights()"
            model.eval()
            with torch.no_grad():
                out = forward(self.spec.model, model, TASKS[0], x)
            model.train()
            assert bool(out.isfinite().all())
        assert_unchanged(before, model, opt)
        count(self.name, "slow_weight_blocks")

    # ------------------------------------------------------------ invariants
    @invariant()
    def parameters_finite_and_counted(self) -> None:
        if not hasattr(self, "opt"):
            return
        for i, p in enumerate(self.model.parameters()):
            assert bool(p.isfinite().all()), f"parameter {i} is not finite"
        assert self.opt.step_count == self.accepted


def machine_for(name: str) -> type[OptimizerMachine]:
    return type(f"Fuzz_{name}", (OptimizerMachine,), {"name": name, "spec": SPECS[name]})


@pytest.fixture
def one_thread():
    """The models are tiny: a second intra-op thread only adds synchronisation, which on a busy
    two-core machine costs more than the work (BatchNorm forward: 7x slower measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(SPECS))
def test_fuzz(name, one_thread):
    start = time.perf_counter()
    try:
        run_state_machine_as_test(machine_for(name), settings=SETTINGS)
    except BaseException:
        VIOLATIONS.append(name)
        raise
    FINISHED[name] = time.perf_counter() - start


RULE_COUNTERS = [
    "steps",
    "rejected",
    "invalid_options",
    "valid_options",
    "reloads",
    "deepcopies",
    "pickles",
    "reallocations",
    "bad_loads",
    "refused_steps_that_drew",
]


def test_fuzz_summary(capsys):
    """Print the run's figures; when every factory ran, check each rule kind was exercised."""
    with capsys.disabled():
        total_steps = STATS["steps"] + STATS["twin_steps"]
        print(
            f"\nfuzz summary ({'long' if LONG else 'ci'} profile): {dict(sorted(STATS.items()))}; "
            f"optimizer steps in total {total_steps}; violations {len(VIOLATIONS)} {VIOLATIONS}; "
            f"wall {sum(FINISHED.values()):.1f} s"
        )
        for name, c in PER_SPEC.items():
            shown = {k: v for k, v in sorted(c.items()) if ":" not in k}
            print(f"  {name:28s} {FINISHED.get(name, float('nan')):6.1f} s  {shown}")
    if set(FINISHED) != set(SPECS):
        pytest.skip("not every factory's fuzz test ran in this session")
    assert not VIOLATIONS
    assert total_steps >= MIN_STEPS
    # the fuzzer exercised everything: every rule and every kind of bad input across the run; in
    # the long profile also every rule for every factory (hypothesis switches rules off at random
    # per example, so the short CI profile does not reach every rule of every factory)
    rules = RULE_COUNTERS + [
        "slow_weight_blocks",
        "outer_steps",
        "rejected:external_write",
        "rejected:conflicting_option",
    ]
    kinds = [f"rejected:{k}" for k in BAD_INPUTS] + [f"bad_load:{k}" for k in BAD_STATES]
    for key in rules + kinds:
        assert STATS[key] > 0, f"{key} never ran"
    if LONG:
        for name, spec in SPECS.items():
            for key in rules if spec.slow_fast else RULE_COUNTERS:
                assert PER_SPEC[name][key] > 0, f"{name}: {key} never ran"
