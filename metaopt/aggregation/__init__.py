"""Aggregation layer: pure functions of a T×P matrix of per-task gradients.

Data flow of one step (see docs/design.md)::

    J (T, P) --gramian--> G (T, T) --*_weights--> w (T,) --aggregate--> update = wᵀJ (P,)

The O(T²P) work is the one Gramian and the O(TP) combination; PCGrad and GradVac only touch the
T×T Gramian, in float64, in T-1 vectorised rounds. Stateful pieces (GradVac's EMA targets) are
explicit inputs and outputs, never hidden.

>>> import torch
>>> from metaopt.aggregation import gramian, pcgrad_weights, random_order, aggregate
>>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
>>> order = random_order(2, torch.Generator().manual_seed(0))
>>> aggregate(J, pcgrad_weights(gramian(J), order))
tensor([0.5000, 1.5000])
"""

from .basic import aggregate, mean_weights, sum_weights
from .gradvac import gradvac, gradvac_weights
from .gramian import conflict_fraction, cosine_from_gramian, gramian
from .pcgrad import pcgrad, pcgrad_weights, random_order

__all__ = [
    "aggregate",
    "conflict_fraction",
    "cosine_from_gramian",
    "gradvac",
    "gradvac_weights",
    "gramian",
    "mean_weights",
    "pcgrad",
    "pcgrad_weights",
    "random_order",
    "sum_weights",
]
