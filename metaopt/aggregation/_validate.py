"""Input checks shared by the aggregation functions.

Every public function of :mod:`metaopt.aggregation` validates its arguments and raises a
``ValueError`` (or ``TypeError`` for a wrong kind of object) that names the argument and what
was expected. Checks of *values* (finite Gramian, valid permutation, targets in [-1, 1], an
update that fits J's dtype) are folded into one boolean tensor and read back with a single host
synchronisation; pass ``validate=False`` to the weight functions to skip them on an accelerator.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ._scaling import update_bound, update_flags, update_limit

REDUCTIONS = ("sum", "mean")


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype the T×T weight loops run in: float64 wherever the device supports it."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def check_reduction(reduction: str, where: str) -> None:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_beta(beta: float, where: str) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"{where}: beta must be a float in [0, 1], got {beta!r}")
    beta = float(beta)
    if not (0.0 <= beta <= 1.0):  # also rejects NaN
        raise ValueError(f"{where}: beta must be in [0, 1], got {beta!r}")
    return beta


def check_matrix(x: Tensor, name: str, where: str) -> None:
    """``x`` is a floating tensor with at least two dimensions."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(
            f"{where}: {name} must have shape (..., T, P) / (..., T, T), got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{where}: {name} must be a floating-point tensor, got {x.dtype}")


def check_gramian_shape(G: Tensor, where: str) -> int:
    """``G`` is a floating (..., T, T) tensor with T >= 1; returns T."""
    check_matrix(G, "G", where)
    T = G.shape[-1]
    if G.shape[-2] != T:
        raise ValueError(f"{where}: G must be square in its last two dims, got shape {tuple(G.shape)}")
    if T < 1:
        raise ValueError(f"{where}: G must describe at least one task, got shape {tuple(G.shape)}")
    return T


def check_order_shape(order: Tensor, G: Tensor, where: str) -> None:
    """``order`` is an integer (T, T-1) tensor, or one per leading index of ``G``."""
    T = G.shape[-1]
    if not isinstance(order, Tensor):
        raise TypeError(f"{where}: order must be a torch.Tensor, got {type(order).__name__}")
    if order.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"{where}: order must be an integer tensor, got {order.dtype}")
    if order.ndim < 2 or tuple(order.shape[-2:]) != (T, T - 1):
        raise ValueError(
            f"{where}: order must have shape (T, T-1) = ({T}, {T - 1}) (row i: the other tasks in "
            f"the order task i visits them), got shape {tuple(order.shape)}"
        )
    lead = tuple(G.shape[:-2])
    olead = tuple(order.shape[:-2])
    if olead and olead != lead:
        raise ValueError(
            f"{where}: a batched order must have shape {lead + (T, T - 1)} to match G, "
            f"got {tuple(order.shape)}"
        )
    if order.device != G.device:
        raise ValueError(f"{where}: order is on {order.device} but G is on {G.device}")


@functools.lru_cache(maxsize=64)
def _sorted_others(T: int, device: torch.device) -> Tensor:
    """(T, T-1): row i is 0..T-1 without i, in increasing order."""
    k = torch.arange(T - 1, device=device)
    i = torch.arange(T, device=device)
    return k.unsqueeze(0) + (k.unsqueeze(0) >= i.unsqueeze(1)).long()


def _order_ok(order: Tensor, T: int) -> Tensor:
    """0-dim bool: every row i of ``order`` is a permutation of {0..T-1} minus {i}."""
    if T <= 1:
        return torch.ones((), dtype=torch.bool, device=order.device)
    return (order.long().sort(dim=-1).values == _sorted_others(T, order.device)).all()


def check_values(
    where: str,
    G: Tensor,
    order: Tensor | None = None,
    targets: Tensor | None = None,
) -> None:
    """Value checks with one host sync: finite ``G``, valid ``order`` rows, targets in [-1, 1]."""
    T = G.shape[-1]
    ok = torch.isfinite(G).all()
    if order is not None:
        ok = ok & _order_ok(order, T)
    if targets is not None:
        ok = ok & (targets.abs() <= 1).all()  # NaN compares False
    if bool(ok):
        return
    if not bool(torch.isfinite(G).all()):
        raise ValueError(f"{where}: G contains non-finite values (NaN or inf)")
    if order is not None and not bool(_order_ok(order, T)):
        raise ValueError(
            f"{where}: each row i of order must be a permutation of the other tasks "
            f"{{0..{T - 1}}} \\ {{i}} (no repeats, no i itself)"
        )
    raise ValueError(f"{where}: targets must be finite cosines in [-1, 1]")


def check_update(
    where: str, G: Tensor, weights: Tensor, dtype: torch.dtype, targets: Tensor | None = None
) -> bool:
    """One host sync for a whole aggregation: finite ``G``, ``targets`` in [-1, 1], and an
    update ``wᵀJ`` that fits ``dtype`` (see :mod:`._scaling`); the weights were computed
    unchecked before. Returns whether the weights must be applied split rather than cast."""
    ok_g = torch.isfinite(G).all()
    ok_t = ok_g if targets is None else (targets.abs() <= 1).all()  # NaN compares False
    flags = torch.cat([torch.stack([ok_g, ok_t]), update_flags(weights, G, dtype)]).tolist()
    if all(flags[:3]):
        return bool(flags[3])
    if not flags[0]:
        raise ValueError(f"{where}: G contains non-finite values (NaN or inf)")
    if not flags[1]:
        raise ValueError(f"{where}: targets must be finite cosines in [-1, 1]")
    bound = float(update_bound(weights, G).max())
    raise ValueError(
        f"{where}: the update does not fit {dtype}: its norm is bounded by "
        f"sum_k |w_k| |g_k| = {bound:.3g}, above the {update_limit(dtype):.3g} accepted"
    )


def check_targets_shape(targets: Tensor, G: Tensor, where: str) -> None:
    if not isinstance(targets, Tensor):
        raise TypeError(f"{where}: targets must be a torch.Tensor, got {type(targets).__name__}")
    if tuple(targets.shape) != tuple(G.shape):
        raise ValueError(
            f"{where}: targets must have the shape of G {tuple(G.shape)} (one EMA target per "
            f"ordered task pair and parameter group), got {tuple(targets.shape)}"
        )
    if not targets.is_floating_point():
        raise ValueError(f"{where}: targets must be a floating-point tensor, got {targets.dtype}")
    if targets.device != G.device:
        raise ValueError(f"{where}: targets are on {targets.device} but G is on {G.device}")


def prod(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))
