"""Shared pieces of the training-stack tests (test_training_stacks.py, test_ddp.py): a small
multi-head model, every method and composition, deterministic batches, and the two recipes a
user writes (the one loop and the torch way)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import metaopt

TASKS = ["a", "b", "c"]
REPTILE_FAMILY = {"sequential_reptile", "reptile"}  # driven by loss.backward() the torch way


class Net(nn.Module):
    """A shared encoder and one head per task; ``forward(x, task)`` routes to the head."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Linear(4, 6)
        self.heads = nn.ModuleDict({t: nn.Linear(6, 1) for t in TASKS})
        self.to(dtype)

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](torch.tanh(self.enc(x)))


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.05)


def make_opt(name: str, model: Net, seed: int = 0) -> metaopt.MultiTaskOptimizer:
    p, enc = list(model.parameters()), list(model.enc.parameters())
    if name == "sequential_reptile":
        return metaopt.SequentialReptile(
            _adam(p), tasks=TASKS, inner_steps=3, outer_lr=0.5, seed=seed, allow_unused=True
        )
    if name == "reptile":
        return metaopt.Reptile(
            _adam(p),
            tasks=TASKS,
            inner_steps=2,
            outer_lr=0.5,
            tasks_per_outer_step=2,
            seed=seed,
            allow_unused=True,
        )
    if name == "mtl":
        return metaopt.MTL(_adam(p), tasks=TASKS, seed=seed)
    if name == "pcgrad":
        return metaopt.PCGrad(_adam(p), tasks=TASKS, seed=seed)
    if name == "gradvac":
        return metaopt.GradVac(_adam(p), tasks=TASKS, beta=0.5, seed=seed)
    if name == "gradnorm":
        return metaopt.GradNorm(metaopt.MTL(_adam(p), tasks=TASKS), layer=enc, seed=seed)
    if name == "sequential_reptile_gradvac":
        return metaopt.SequentialReptile(
            metaopt.GradVac(_adam(p), tasks=TASKS, beta=0.5, seed=seed),
            inner_steps=2,
            outer_lr=0.5,
            seed=seed,
        )
    if name == "weighted_upgrad":  # a TorchJD Gramian weighting through metaopt's interface
        from torchjd.aggregation import UPGradWeighting

        return metaopt.Weighted(_adam(p), weighting=UPGradWeighting(), tasks=TASKS, seed=seed)
    if name == "sequential_reptile_weighted":
        from torchjd.aggregation import MGDAWeighting

        return metaopt.SequentialReptile(
            metaopt.Weighted(_adam(p), weighting=MGDAWeighting(), tasks=TASKS, seed=seed),
            inner_steps=2,
            outer_lr=0.5,
            seed=seed,
        )
    if name == "gradnorm_pcgrad":
        return metaopt.GradNorm(metaopt.PCGrad(_adam(p), tasks=TASKS, seed=seed), layer=enc, seed=seed)
    raise KeyError(name)


METHODS = [
    "sequential_reptile",
    "reptile",
    "mtl",
    "pcgrad",
    "gradvac",
    "gradnorm",
    "sequential_reptile_gradvac",
    "gradnorm_pcgrad",
]
try:  # TorchJD's weightings through metaopt.Weighted, where the optional extra is installed
    import torchjd.aggregation  # noqa: F401

    METHODS += ["weighted_upgrad", "sequential_reptile_weighted"]
except ImportError:
    pass


def batch(
    step: int, task: str, n: int = 8, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``task`` at ``step``: the same on every call (and every rank)."""
    g = torch.Generator().manual_seed(1000 * step + TASKS.index(task))
    x = torch.randn(n, 4, generator=g, dtype=dtype)
    w = torch.arange(1.0, 5.0, dtype=dtype).reshape(4, 1) * (TASKS.index(task) - 1)
    return x, x @ w + 0.3


def loss_of(
    model: nn.Module,
    task: str,
    xy: tuple[torch.Tensor, torch.Tensor],
    reduction: str = "sum",
    extra: Callable[[nn.Module], torch.Tensor] | None = None,
) -> torch.Tensor:
    x, y = xy
    err = (model(x, task) - y).pow(2)
    loss = err.sum() if reduction == "sum" else err.mean()
    return loss if extra is None else loss + extra(model)


def one_loop_step(
    opt: metaopt.MultiTaskOptimizer, model: nn.Module, step: int, **kw: Any
) -> metaopt.StepReport:
    return opt.step({t: loss_of(model, t, batch(step, t), **kw) for t in opt.next_tasks()})


def backward_the_torch_way(
    name: str, opt: metaopt.MultiTaskOptimizer, losses: dict[str, torch.Tensor], grad_scaler: Any = None
) -> None:
    """What a user writes: ``loss.backward()`` (scaled, with a GradScaler) for the Reptile
    family, ``opt.backward(losses)`` for the others."""
    if name in REPTILE_FAMILY:
        (loss,) = losses.values()
        (loss if grad_scaler is None else grad_scaler.scale(loss)).backward()
    else:
        opt.backward(losses, grad_scaler=grad_scaler)


def torch_way_step(
    name: str, opt: metaopt.MultiTaskOptimizer, losses: dict[str, torch.Tensor]
) -> metaopt.StepReport:
    """The torch way on one batch: backward, ``opt.step()``, ``opt.zero_grad()``."""
    backward_the_torch_way(name, opt, losses)
    report = opt.step()
    opt.zero_grad()
    return report


def scaler_step(
    name: str,
    opt: metaopt.MultiTaskOptimizer,
    model: nn.Module,
    losses: dict[str, torch.Tensor],
    scaler: Any,
    max_norm: float,
) -> None:
    """The fp16 recipe: scaled backward, ``unscale_``, clip, ``scaler.step``, ``update``."""
    backward_the_torch_way(name, opt, losses, grad_scaler=scaler)
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_norm)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


def torch_style_step(
    name: str, opt: metaopt.MultiTaskOptimizer, model: nn.Module, step: int, micro: int = 1, **kw: Any
) -> metaopt.StepReport:
    """``loss.backward()`` (Reptile family) or ``opt.backward(losses)`` on ``micro``
    micro-batches (row slices of the step's batch), then ``opt.step(); opt.zero_grad()``."""
    wanted = opt.next_tasks()
    for m in range(micro):
        parts = {}
        for t in wanted:
            x, y = batch(step, t)
            rows = slice(m * len(x) // micro, (m + 1) * len(x) // micro)
            parts[t] = loss_of(model, t, (x[rows], y[rows]), **kw)
        backward_the_torch_way(name, opt, parts)
    report = opt.step()
    opt.zero_grad()
    return report


def method_state(opt: metaopt.MultiTaskOptimizer) -> list[torch.Tensor]:
    """Every tensor of the optimizer's state dict, in order (for bit-for-bit comparisons)."""
    return tensors_of(opt.state_dict())


def tensors_of(value: Any) -> list[torch.Tensor]:
    """Every tensor (and every other leaf, hashed) of a nested state, in order."""
    out: list[torch.Tensor] = []

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            out.append(v.detach().clone())
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out.append(torch.tensor(hash(str(v)) % (2**61)))

    walk(value)
    return out
