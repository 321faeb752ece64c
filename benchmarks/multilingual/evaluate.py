"""Measurements of a trained top: accuracy, forgetting, and the inter-task gradient cosine.

All of them are taken at the *evaluation weights*: the model's parameters, except for the
Reptile family (any ``metaopt.SlowFastOptimizer``), whose parameters are temporarily set to the
slow weights φ (:func:`evaluation_weights`). Dropout is off while measuring.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import metaopt

from .alignment import mean_retrieval
from .features import SplitFeatures
from .forgetting import LidProbe, drift_of
from .prepare import SeedData

EVAL_CHUNK = 512


def has_slow_weights(optimizer: metaopt.MultiTaskOptimizer) -> bool:
    """Whether the model to evaluate is the slow weights φ: a slow/fast optimizer (Reptile,
    Sequential Reptile) with η < 1. With η = 1 (sampled MTL) φ is only a stale copy of θ between
    outer steps, and θ is the model."""
    return isinstance(optimizer, metaopt.SlowFastOptimizer) and optimizer.current_outer_lr() < 1.0


@contextmanager
def evaluation_weights(optimizer: metaopt.MultiTaskOptimizer) -> Iterator[None]:
    """Inside the block the parameters hold the slow weights φ when :func:`has_slow_weights`;
    they are restored afterwards. A no-op for other methods."""
    if not has_slow_weights(optimizer):
        yield
        return
    assert isinstance(optimizer, metaopt.SlowFastOptimizer)
    with optimizer.use_slow_weights():
        yield


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off inside the block; the previous mode is restored."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@torch.no_grad()
def accuracy(model: nn.Module, split: SplitFeatures, features: Tensor | None = None) -> float:
    """Fraction of ``split`` classified correctly by the model's head (batched, no graph);
    ``features``: the split's :func:`pooled_features`, where the caller has them already."""
    feats = pooled_features(model, split) if features is None else features
    chunks = zip(feats.split(EVAL_CHUNK), split.labels.split(EVAL_CHUNK))
    correct = sum(int((model.head(f).argmax(-1) == labels).sum()) for f, labels in chunks)
    return correct / max(len(split), 1)


@torch.no_grad()
def pooled_features(model: nn.Module, split: SplitFeatures) -> Tensor:
    """The model's sentence features of every example of ``split``."""
    return torch.cat([model.features(tokens, mask) for tokens, mask, _ in split.chunks(EVAL_CHUNK)])


def task_losses(model: nn.Module, probes: Mapping[str, SplitFeatures]) -> dict[str, Tensor]:
    """Each task's mean cross-entropy on its probe examples (with graph, for gradients)."""
    out = {}
    for task, split in probes.items():
        tokens, mask, labels = split.batch(torch.arange(len(split)))
        out[task] = F.cross_entropy(model(tokens, mask), labels)
    return out


def checkpoint(model: nn.Module, probes: Mapping[str, SplitFeatures]) -> dict[str, Any]:
    """Training loss and inter-task gradient geometry on all trainable (shared) parameters,
    from each task's whole probe set (``metaopt.gradient_diagnostics``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with eval_mode(model):
        losses = task_losses(model, probes)
        diag = metaopt.gradient_diagnostics(losses, params)
    return {
        "train_loss": float(torch.stack([v.detach() for v in losses.values()]).mean()),
        "cosine": float(diag.mean_cosine),
        "conflicts": float(diag.conflicts),
        "cosine_matrix": [[round(float(x), 4) for x in row] for row in diag.cosine],
    }


def final_metrics(
    model: nn.Module, data: SeedData, probe: LidProbe | None, forgetting: str
) -> dict[str, Any]:
    """Per-language dev, test and zero-shot accuracy; the forgetting measures (pre-trained
    encoder only: a scratch encoder has nothing to forget): LID-probe loss and accuracy,
    embedding drift, and cross-lingual retrieval among the test and zero-shot languages on
    their test entities (:mod:`alignment`), its error ``1 − retrieval``; ``forgetting`` names
    the one of them (``"lid_loss"`` or ``"retrieval_error"``) copied to the ``forgetting``
    field, the measure the verdicts read."""
    out: dict[str, Any] = {}
    with eval_mode(model):
        out["dev"] = {code: accuracy(model, split) for code, split in data.dev.items()}
        feats = {}
        for part, group in (("test", data.test), ("zero_shot", data.zero_shot)):
            out[part] = {}
            for code, split in group.items():
                feats[code] = pooled_features(model, split)
                out[part][code] = accuracy(model, split, feats[code])
        if probe is not None and data.lid is not None:
            pooled = pooled_features(model, data.lid)
            out.update(probe.score(pooled))
            out["drift"] = drift_of(pooled, probe.reference_features)
            for code, split in data.aligned.items():  # STL's own data hold one test language
                if code not in feats:
                    feats[code] = pooled_features(model, split)
            out["retrieval"] = mean_retrieval(feats, data.pairs) if data.pairs else None
        else:
            out.update({"lid_loss": None, "lid_acc": None, "drift": None, "retrieval": None})
    out["retrieval_error"] = None if out["retrieval"] is None else 1.0 - out["retrieval"]
    out["forgetting"] = out[forgetting]
    for part in ("dev", "test", "zero_shot"):
        values = list(out[part].values())
        out[f"{part}_mean"] = sum(values) / len(values) if values else None
    return out
