"""Parts of the optimizer layer, each holding one kind of state in an explicit record.

An optimizer (:class:`metaopt.MultiTaskOptimizer` and its methods) is a step template over
parts; each part here owns one piece of state and nothing else, and says what it holds as a
record that can be taken, checked and put back:

* :class:`~metaopt.parts.stream.TaskStream` (:class:`~metaopt.parts.stream.StreamRecord`): which
  tasks each step wants, the draws' generator, the step counters;
* :class:`~metaopt.parts.outer.OuterStep`: the slow weights φ, the trajectory mean and the outer
  rule (interpolation at η, or an outer optimizer);
* :class:`~metaopt.parts.trajectory.TrajectoryClock`: inner steps into the trajectory,
  trajectories into the outer step, outer steps taken;
* :class:`~metaopt.parts.slots.TrajectorySlots`: the wrapped optimizer's state of each
  trajectory of a batched outer step (batched Reptile, DiLoCo's one inner optimizer per worker);
* :class:`~metaopt.parts.loss_weights.LossWeights`: GradNorm's task weights, reference losses
  and the weights' optimizer;
* :class:`~metaopt.parts.params.ParamSet`: the wrapped optimizer's parameters, followed as
  groups are added;
* :mod:`~metaopt.parts.grads`: the checks on losses and gradients a step makes before anything
  moves (one host sync), and the summed losses' backward pass;
* :mod:`~metaopt.parts.ranks`: the checks that the ranks of a distributed run agree;
* :mod:`~metaopt.parts.placement`: where a parameter's elements live (FSDP2's local shards),
  the per-task gradients read through FSDP2's backward, the Gramian summed over the shards and
  the decisions every rank takes together;
* :mod:`~metaopt.parts.state_dict`: the state-dict layout every optimizer shares, its version and
  the migration of older layouts.

The step template (``metaopt/base.py``) checks everything before anything moves and changes the
parts at one commit point, after the inner step; the task streams, whose draws are made lazily
(``next_tasks()``), are put back from their records when a step is refused, so a refused step
changes nothing. Nothing in this package imports an optimizer class.
"""

from __future__ import annotations

__all__: list[str] = []
