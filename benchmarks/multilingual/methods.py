"""The compared methods: each a recipe that wraps AdamW in a metaopt optimizer.

Every method is driven by the same loop (``train.py``)::

    wanted = opt.next_tasks()
    report = opt.step({t: loss(t) for t in wanted})

so methods differ only in the optimizer built here. All of them use AdamW (weight decay from
the config) as the inner optimizer, on all trainable parameters: the top encoder layer and the
one linear head, all shared by every language.

================  ==============================================================================
``scratch``       sampled MTL on a *randomly initialised* encoder (same architecture, same
                  frozen/trainable split): what pre-training is worth
``linear-probe``  sampled MTL on the head only, encoder frozen (reference: no forgetting at all)
``stl``           single-task learning: one pre-trained model per language (``steps / T`` steps
                  each, so the same examples in total)
``mtl``           ``metaopt.MTL``: the sum of all T task losses per step
``mtl-sampled``   one sampled task per step = ``SequentialReptile(outer_lr=1)`` (exactly)
``control``       ``mtl-sampled`` at lr × η: moves as far from the pre-trained weights as
                  Sequential Reptile with inner lr lr and outer lr η
``gradnorm``      ``GradNorm(MTL(...))`` balancing gradient norms at the top layer's output dense
``pcgrad``        ``metaopt.PCGrad`` (sum of projected task gradients)
``gradvac``       ``metaopt.GradVac`` (EMA cosine targets, one group)
``reptile``       ``metaopt.Reptile``: K' steps on one task, then φ ← φ + η(θ − φ)
``seq-reptile``   ``metaopt.SequentialReptile``: K steps on sampled tasks, then the same
================  ==============================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import metaopt

from .config import ALL_METHODS, Config
from .encoder import TopClassifier


@dataclass(frozen=True)
class BuildArgs:
    """What a recipe needs: the model, the (already scaled) lr, the tasks and the seed."""

    model: TopClassifier
    lr: float
    tasks: list[str]
    seed: int
    cfg: Config

    def params(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def adamw(self) -> torch.optim.AdamW:
        """AdamW on the trainable parameters; the fused kernel where torch has one for the
        device (same update, about 3x cheaper than the per-tensor loop on CPU)."""
        params = self.params()
        try:
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.cfg.weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.cfg.weight_decay)


Recipe = Callable[[BuildArgs], metaopt.MultiTaskOptimizer]


@dataclass(frozen=True)
class Method:
    """One compared method.

    Attributes:
        name: the command-line name.
        label: the name in tables and plots.
        recipe: builds the optimizer.
        family: the computation, for re-use of identical runs (``control`` at lr × η equals
            ``mtl-sampled`` at that lr when it is on the grid: same family, init, lr and seed).
        init: ``"pretrained"`` or ``"scratch"``.
        all_tasks: takes one batch of every task per step (so ``steps / T`` steps).
        scale_lr_by_outer_lr: run at lr × η (the control).
        single_task: one model per language (STL).
        head_only: freeze the encoder layers; train the head alone.
    """

    name: str
    label: str
    recipe: Recipe
    family: str
    init: str = "pretrained"
    all_tasks: bool = False
    scale_lr_by_outer_lr: bool = False
    single_task: bool = False
    head_only: bool = False

    def effective_lr(self, lr: float, cfg: Config) -> float:
        """The inner optimizer's lr for grid value ``lr``."""
        return lr * cfg.outer_lr if self.scale_lr_by_outer_lr else lr

    def steps(self, cfg: Config) -> int:
        return cfg.steps_for(self.all_tasks)


def sampled_mtl(a: BuildArgs) -> metaopt.MultiTaskOptimizer:
    """One uniformly sampled task per step: Sequential Reptile with η = 1 (plain training)."""
    return metaopt.SequentialReptile(
        a.adamw(), tasks=a.tasks, inner_steps=a.cfg.inner_steps, outer_lr=1.0, seed=a.seed
    )


def mtl(a: BuildArgs) -> metaopt.MultiTaskOptimizer:
    return metaopt.MTL(a.adamw(), tasks=a.tasks)


def gradnorm(a: BuildArgs) -> metaopt.MultiTaskOptimizer:
    """GradNorm over MTL; W is the top's last shared layer before the head
    (``last_shared_parameters``: MiniLM's last dense layer, the DAN's output layer)."""
    layer = a.model.last_shared_parameters()
    return metaopt.GradNorm(
        metaopt.MTL(a.adamw(), tasks=a.tasks), layer=layer, alpha=a.cfg.gradnorm_alpha, seed=a.seed
    )


def pcgrad(a: BuildArgs) -> metaopt.MultiTaskOptimizer:
    return metaopt.PCGrad(a.adamw(), tasks=a.tasks, shared=a.params(), seed=a.seed)


def gradvac(a: BuildArgs) -> metaopt.MultiTaskOptimizer:
    return metaopt.GradVac(a.adamw(), tasks=a.tasks, beta=a.cfg.gradvac_beta, shared=a.params(), seed=a.seed)


def reptile(a: BuildArgs) -> metaopt.MultiTaskOptimizer:
    return metaopt.Reptile(
        a.adamw(), tasks=a.tasks, inner_steps=a.cfg.reptile_inner_steps, outer_lr=a.cfg.outer_lr, seed=a.seed
    )


def seq_reptile(a: BuildArgs) -> metaopt.MultiTaskOptimizer:
    return metaopt.SequentialReptile(
        a.adamw(), tasks=a.tasks, inner_steps=a.cfg.inner_steps, outer_lr=a.cfg.outer_lr, seed=a.seed
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("scratch", "scratch (sampled MTL, random init)", sampled_mtl, "sampled", init="scratch"),
        Method("linear-probe", "linear probe (frozen encoder)", sampled_mtl, "probe", head_only=True),
        Method("stl", "STL (one model per language)", mtl, "stl", single_task=True, all_tasks=True),
        Method("mtl", "MTL (sum of all tasks)", mtl, "mtl", all_tasks=True),
        Method("mtl-sampled", "MTL (one sampled task) = SeqReptile η=1", sampled_mtl, "sampled"),
        Method("control", "control: sampled MTL at lr×η", sampled_mtl, "sampled", scale_lr_by_outer_lr=True),
        Method("gradnorm", "GradNorm", gradnorm, "gradnorm", all_tasks=True),
        Method("pcgrad", "PCGrad", pcgrad, "pcgrad", all_tasks=True),
        Method("gradvac", "GradVac", gradvac, "gradvac", all_tasks=True),
        Method("reptile", "Reptile", reptile, "reptile"),
        Method("seq-reptile", "Sequential Reptile", seq_reptile, "seq-reptile"),
    )
}
assert tuple(METHODS) == ALL_METHODS, "config.ALL_METHODS and methods.METHODS disagree"


_LAST_LAYER = {"use": "the averaging network's output layer (p3, d3)", "minilm": "top layer output.dense"}
"""GradNorm's W on each encoder (the top's ``last_shared_parameters``)."""


def describe(cfg: Config) -> dict[str, str]:
    """One line per method with the settings used, for the report."""
    eta, k, k1 = cfg.outer_lr, cfg.inner_steps, cfg.reptile_inner_steps
    return {
        "scratch": (
            "sampled MTL from a random init, same split: the top re-drawn Glorot-uniform over the "
            "pre-trained bottom"
            if cfg.encoder == "use"
            else "sampled MTL from a random init (BERT init), same split"
        ),
        "linear-probe": "sampled MTL, head only",
        "stl": "MTL on one language per model",
        "mtl": "sum of the T task losses, one backward",
        "mtl-sampled": f"SequentialReptile(outer_lr=1.0, inner_steps={k})",
        "control": f"mtl-sampled at lr × {eta}",
        "gradnorm": f"GradNorm(MTL, layer={_LAST_LAYER[cfg.encoder]}, alpha={cfg.gradnorm_alpha})",
        "pcgrad": "PCGrad(reduction='sum')",
        "gradvac": f"GradVac(beta={cfg.gradvac_beta}, groups='all')",
        "reptile": f"Reptile(inner_steps={k1}, outer_lr={eta})",
        "seq-reptile": f"SequentialReptile(inner_steps={k}, outer_lr={eta})",
    }
