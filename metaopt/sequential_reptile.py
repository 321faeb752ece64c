"""Sequential Reptile (Lee, Lee, Lee & Hwang, ICLR 2022, arXiv 2110.02600)."""

from __future__ import annotations

from .slow_fast import SlowFastOptimizer

__all__ = ["SequentialReptile"]


class SequentialReptile(SlowFastOptimizer):
    """Sequential Reptile: one Reptile trajectory through batches of *all* tasks.

    Per outer step the fast weights θ start at the slow weights φ; each of the K inner steps
    draws a task from the schedule and takes one step of the wrapped optimizer on that task's
    loss; then ``φ ← φ + η(θ_K − φ)`` and ``θ ← φ``. Because consecutive inner steps come from
    different tasks, the second-order term of the Reptile expansion rewards inner products of
    gradients of *different* tasks: the implicit objective is
    ``Σ_k L_{t_k} − (α/2) Σ_{j<k} ⟨∇L_{t_j}, ∇L_{t_k}⟩``. Each step costs one forward/backward on
    one batch (gradient surgery costs T).

    With η = 1 it is plain multi-task training with one sampled task per step (exactly, when the
    inner optimizer state is carried). A one-task Sequential Reptile is serial Reptile.

    Defaults: ``inner_steps=1000`` and ``outer_lr=0.1`` are the paper's values *as recalled*
    (the published text could not be checked when this was written: verify against arXiv
    2110.02600 before relying on them). The paper does not say whether AdamW's state is
    carried across outer steps (carried by default here, as in Fish and the official Reptile
    code) nor which task distribution it samples (uniform by default). The paper's inner
    optimizer is AdamW with lr 3e-5.

    Composition: wrapping another metaopt optimizer, e.g.
    ``SequentialReptile(GradVac(AdamW(...)))``, makes each inner step a step of that optimizer,
    and ``next_tasks()`` asks for what *it* wants (all tasks, for gradient surgery); the slow
    weights interpolate every K such steps.

    Args:
        optimizer: the inner optimizer (AdamW in the paper), or a metaopt optimizer.
        tasks: task names. See :class:`~metaopt.slow_fast.SlowFastOptimizer` for the other
            options (``inner_steps``, ``outer_lr``, ``tasks_per_outer_step``, annealing,
            ``outer_optimizer``, ``reset_inner_state``, ``schedule``, ``task_sizes``,
            ``temperature``, ``buffers``, ``flatten``, ``interpolation``, ``seed``,
            ``allow_unused``, ``nonfinite``, and for several processes ``local_trajectories``,
            ``process_group``, ``verify_ranks``, ``bucket_elements``, ``timeout``: see
            docs/scaling.md) and the construction order it documents.

    Example:
        >>> import torch, metaopt
        >>> model = torch.nn.Linear(3, 1)
        >>> data = {t: torch.randn(16, 3) for t in ["ar", "bn", "fi"]}
        >>> opt = metaopt.SequentialReptile(torch.optim.AdamW(model.parameters(), lr=1e-3),
        ...                                 tasks=list(data), inner_steps=10, outer_lr=0.1, seed=0)
        >>> for _ in range(20):
        ...     wanted = opt.next_tasks()            # one task per inner step
        ...     report = opt.step({t: model(data[t]).pow(2).mean() for t in wanted})
        >>> opt.outer_step_count
        2

    References:
        Lee, Lee, Lee & Hwang. Sequential Reptile: Inter-Task Gradient Alignment for
        Multilingual Learning. ICLR 2022. arXiv:2110.02600.
        Nichol, Achiam & Schulman. On First-Order Meta-Learning Algorithms. arXiv:1803.02999.
    """

    def _draw_tasks(self) -> list[str]:
        if self.inner is not None:
            return self.inner.next_tasks()
        return [self.tasks[self.schedule.draw(self.generator)]]
