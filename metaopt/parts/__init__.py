"""Parts of the optimizer layer, each holding one kind of state in an explicit record.

An optimizer (:class:`metaopt.MultiTaskOptimizer` and its methods) is a step template over
parts; each part here owns one piece of state and nothing else, and says what it holds as a
record that can be taken, checked and put back:

* :class:`~metaopt.parts.stream.TaskStream` (:class:`~metaopt.parts.stream.StreamRecord`): which
  tasks each step wants, the draws' generator, the step counters;
* :class:`~metaopt.parts.slots.TrajectorySlots`: the wrapped optimizer's state of each
  trajectory of a batched outer step (batched Reptile, DiLoCo's one inner optimizer per worker);
* :mod:`~metaopt.parts.slow_state`: the Reptile family's per-parameter records (slow weights,
  accumulator, outer-optimizer and parked fields) in the state dict, parsed and checked whole;
* :mod:`~metaopt.parts.grads`: the checks on losses and gradients a step makes before anything
  moves (one host sync);
* :mod:`~metaopt.parts.state_dict`: the state-dict layout every optimizer shares, its version and
  the migration of older layouts.

The step template (``metaopt/base.py``) takes every part's record before a step and commits at
one point; a step refused before that point puts the records back, so it changes nothing.
Nothing in this package imports an optimizer class.
"""

from __future__ import annotations

__all__: list[str] = []
