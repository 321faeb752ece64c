"""The small record every ``step`` returns, for logging."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["StepReport"]


@dataclass(frozen=True)
class StepReport:
    """What one call of ``step(losses)`` did.

    Attributes:
        tasks: the tasks whose losses fed this step, in schedule order.
        losses: each task's loss, detached (0-dim tensors: no host sync is forced on you).
        outer_update: whether a slow-weight (Reptile) interpolation happened at the end of the step.
        weights: per-task weights the aggregation gave the task gradients (surgery methods), or
            the loss weights (GradNorm); ``None`` where a method has none.
        cosine: the T×T cosine matrix of the task gradients on the shared parameters, where the
            method computed the Gramian anyway; ``None`` otherwise.
        conflicts: fraction of task pairs whose gradients conflict (negative inner product), where
            ``cosine`` is known.
        inner: the report of a wrapped metaopt optimizer, when optimizers are composed.
        step: number of inner steps taken so far, this one included.
        skipped: ``GradScaler`` skipped this step (non-finite scaled gradients): nothing moved
            but the task stream, whose draw the skipped batch used up.
        finite: where the step's finiteness was decided on the device (``nonfinite="skip"``),
            that 0-dim bool flag: ``False`` when the step was skipped there. ``None`` where it
            was checked on the host (a non-finite step then raised).

    Example:
        >>> import torch
        >>> r = StepReport(tasks=("en",), losses={"en": torch.tensor(0.5)}, step=1)
        >>> r.outer_update
        False
    """

    tasks: tuple[str, ...]
    losses: dict[str, Tensor]
    outer_update: bool = False
    weights: Tensor | None = None
    cosine: Tensor | None = None
    conflicts: Tensor | None = None
    inner: StepReport | None = None
    step: int = 0
    skipped: bool = False
    finite: Tensor | None = None
    extra: dict[str, object] = field(default_factory=dict)
