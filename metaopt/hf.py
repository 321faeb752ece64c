"""The Hugging Face ``Trainer`` for every metaopt method (needs the ``hf`` extra).

``transformers.Trainer`` drives a model that returns one ``loss``, through ``loss.backward()``:
what the Reptile family (Sequential Reptile, Reptile) and MTL need. The per-task methods
(PCGrad, GradVac, ``Weighted``, GradNorm, and compositions such as
``SequentialReptile(PCGrad(...))``) need each task's loss: :class:`Trainer` takes them from a
model that returns ``{"losses": {task: loss}}`` (every task the optimizer's step wants, computed
from one batch holding every task's examples) and makes the backward pass with
``opt.backward(losses)``. Besides that it

* evaluates (``evaluate``, ``predict``, and the evaluations made during training) at the slow
  weights φ when the optimizer is of the Reptile family, as ``opt.use_slow_weights(model)``;
* adds the last step report's figures to each training log: ``metaopt/loss/<task>``,
  ``metaopt/weight/<task>`` (per-task methods), ``metaopt/cosine`` (the mean cosine between task
  gradients) and ``metaopt/conflicts``, ``metaopt/outer_steps`` (the Reptile family), and
  ``metaopt/skipped_steps`` (steps a ``GradScaler`` skipped so far).

Pass the metaopt optimizer as the Trainer's optimizer. Example (``tests/test_hf_every_method.py``
runs it for every method, against a hand-written loop)::

    from metaopt.hf import Trainer

    class Routed(Net):                    # every task's examples in one batch
        def forward(self, x, y, task_id):
            losses = {t: mse(super().forward(x[task_id == i], t), y[task_id == i])
                      for i, t in enumerate(TASKS)}
            return {"losses": losses, "loss": sum(losses.values())}

    opt = metaopt.PCGrad(torch.optim.AdamW(model.parameters(), lr=1e-3), tasks=TASKS)
    Trainer(model=model, args=args, train_dataset=steps, optimizers=(opt, scheduler)).train()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._extras import install_hint
from .base import MultiTaskOptimizer
from .gradnorm import GradNorm
from .report import StepReport
from .slow_fast import SlowFastOptimizer
from .surgery import GradientSurgery

try:
    import transformers
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(f"metaopt.hf needs transformers and accelerate: {install_hint('hf')}") from err

__all__ = ["Trainer", "report_logs"]


def report_logs(report: StepReport, optimizer: MultiTaskOptimizer) -> dict[str, float]:
    """The figures of a step report, as a Trainer logs them (floats; reading them is a host
    sync, made once per log). A composed optimizer's weights and cosines come from the wrapped
    method's report."""
    logs: dict[str, float] = {f"metaopt/loss/{t}": float(v) for t, v in report.losses.items()}
    source: StepReport | None = report
    while source is not None and source.weights is None and source.cosine is None:
        source = source.inner
    if source is not None:
        if source.weights is not None and source.weights.dim() == 1:
            logs.update((f"metaopt/weight/{t}", float(w)) for t, w in zip(source.tasks, source.weights))
        if source.cosine is not None and source.cosine.shape[-1] > 1:
            C = source.cosine
            T = C.shape[-1]
            logs["metaopt/cosine"] = float((C.sum() - C.diagonal().sum()) / (T * (T - 1)))
        if source.conflicts is not None:
            logs["metaopt/conflicts"] = float(source.conflicts)
    if isinstance(optimizer, SlowFastOptimizer):
        logs["metaopt/outer_steps"] = float(optimizer.outer_step_count)
    # skipped by a GradScaler (never counted as steps) and on the device (nonfinite="skip")
    logs["metaopt/skipped_steps"] = float(optimizer.clock - optimizer.step_count + optimizer.skipped_steps)
    return logs


class Trainer(transformers.Trainer):  # type: ignore[misc]
    """``transformers.Trainer`` for every metaopt method (see the module).

    For a per-task method (PCGrad, GradVac, ``Weighted``, GradNorm, alone or wrapped, as in
    ``SequentialReptile(PCGrad(...))``) the model returns ``{"losses": {task: loss}}`` with the
    tasks of ``opt.next_tasks()`` (and may return ``"loss"`` too, for evaluation); the backward
    pass is ``opt.backward(losses)``, each loss divided by the micro-batches of the optimizer
    step. For the others (the Reptile family over a torch optimizer, MTL) the step is
    ``transformers.Trainer``'s own, on ``"loss"``.
    """

    def _metaopt(self) -> MultiTaskOptimizer | None:
        opt = getattr(self, "optimizer", None)
        if not isinstance(opt, MultiTaskOptimizer):  # Accelerate's AcceleratedOptimizer wraps it
            opt = getattr(opt, "optimizer", None)
        return opt if isinstance(opt, MultiTaskOptimizer) else None

    @staticmethod
    def _wants_task_losses(opt: MultiTaskOptimizer) -> bool:
        """Whether the method needs each task's loss (a per-task method, alone or wrapped)."""
        level: MultiTaskOptimizer | None = opt
        while level is not None:
            if isinstance(level, (GradientSurgery, GradNorm)):
                return True
            level = level.inner
        return False

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any
    ) -> Tensor:
        opt = self._metaopt()
        if opt is None or not self._wants_task_losses(opt):  # one loss: loss.backward()
            return super().training_step(model, inputs, *args, **kwargs)
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            outputs = model(**inputs)
        losses = outputs.get("losses") if isinstance(outputs, dict) else None
        if not isinstance(losses, dict):
            raise TypeError(
                f"metaopt.hf.Trainer: every step of {type(opt).__name__} wants the loss of each of "
                f"{opt.next_tasks()}: the model must return {{'losses': {{task: loss}}}} from a "
                f"batch holding every task's examples, got {type(losses).__name__}"
            )
        # the micro-batches of this optimizer step (fewer in a last, shorter window), as the
        # Trainer divides its own loss
        steps = (
            getattr(self, "current_gradient_accumulation_steps", None)
            or self.args.gradient_accumulation_steps
        )
        scaled = {t: v / steps for t, v in losses.items()}
        opt.backward(scaled, grad_scaler=getattr(self.accelerator, "scaler", None))
        return sum((v.detach() for v in scaled.values()), torch.zeros((), device=self.args.device))

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``transformers.Trainer.evaluate``, at the slow weights for the Reptile family."""
        opt = self._metaopt()
        if isinstance(opt, SlowFastOptimizer):
            with opt.use_slow_weights(self.model):
                return super().evaluate(*args, **kwargs)  # type: ignore[no-any-return]
        return super().evaluate(*args, **kwargs)  # type: ignore[no-any-return]

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """``transformers.Trainer.predict``, at the slow weights for the Reptile family."""
        opt = self._metaopt()
        if isinstance(opt, SlowFastOptimizer):
            with opt.use_slow_weights(self.model):
                return super().predict(*args, **kwargs)
        return super().predict(*args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """``transformers.Trainer.log``, with the last step report's figures added to the
        training logs (those that carry ``loss``)."""
        opt = self._metaopt()
        report = None if opt is None else opt.last_report
        if opt is not None and report is not None and "loss" in logs:
            logs = {**logs, **report_logs(report, opt)}
        super().log(logs, *args, **kwargs)
