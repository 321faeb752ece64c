"""The paper's central measurement: how aligned the task gradients are."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor

from .aggregation import conflict_fraction, cosine_from_gramian, gramian
from .functional import unique_tensors
from .jacobian import task_gradients

__all__ = ["GradientDiagnostics", "gradient_diagnostics"]


@dataclass(frozen=True)
class GradientDiagnostics:
    """Per-task gradient geometry on a set of parameters.

    Attributes:
        tasks: task names, in the order of the matrices' rows.
        gramian: T×T inner products of the task gradients.
        cosine: T×T cosine similarities (0 for a zero gradient).
        conflicts: fraction of task pairs with a negative inner product.
        mean_cosine: mean off-diagonal cosine (the paper's alignment figure).
    """

    tasks: tuple[str, ...]
    gramian: Tensor
    cosine: Tensor
    conflicts: Tensor
    mean_cosine: Tensor


def gradient_diagnostics(
    losses: Mapping[str, Tensor], params: Iterable[Tensor], *, retain_graph: bool = False
) -> GradientDiagnostics:
    """Cosine matrix and conflict fraction of the task gradients of ``losses`` on ``params``.

    Computes one gradient row per task (``torch.autograd.grad``, nothing written into
    ``.grad``), the Gramian, and the cosines from it. Use ``retain_graph=True`` when the losses
    share a graph or are needed afterwards.

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, 1.0], requires_grad=True)
        >>> d = gradient_diagnostics({"a": w[0] * 2, "b": -w[0] + w[1]}, [w])
        >>> d.cosine
        tensor([[ 1.0000, -0.7071],
                [-0.7071,  1.0000]])
        >>> float(d.conflicts)
        1.0

    References:
        Lee et al. Sequential Reptile, ICLR 2022 (inter-task gradient cosine as the measure of
        alignment); Yu et al. 2020 (conflicting gradients).
    """
    if not losses:
        raise ValueError("gradient_diagnostics: no losses given")
    ps = unique_tensors(params)
    if not ps:
        raise ValueError("gradient_diagnostics: no parameters given")
    J = task_gradients(list(losses.values()), ps, retain_graph=retain_graph)
    G = gramian(J)
    cos = cosine_from_gramian(G)
    T = cos.shape[0]
    off = (cos.sum() - cos.diagonal().sum()) / max(T * (T - 1), 1)
    return GradientDiagnostics(tuple(losses), G, cos, conflict_fraction(G), off)
