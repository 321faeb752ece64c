"""GradVac: Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, ICLR 2021).

GradVac generalises PCGrad from "no negative cosine" to "no cosine below an adaptive target".
For every ordered task pair (i, j) (and every parameter group) it keeps an EMA target
``t_ij`` (``\\hat\\phi_{ij}`` in the paper), starting at 0. Task ``i`` visits the other tasks in
a random order; for each visited ``j``:

1. ``cos = cos(g_i', g_j)`` with ``g_i'`` the current modified gradient of task ``i`` and ``g_j``
   the *original* gradient of task ``j``;
2. if ``cos < t_ij``, add ``coef * g_j`` with
   ``coef = |g_i'| (t sqrt(1-cos²) - cos sqrt(1-t²)) / (|g_j| sqrt(1-t²))``, which turns the
   cosine into exactly ``t_ij``;
3. then ``t_ij <- (1-beta) t_ij + beta * cos`` (the cosine measured *before* the correction).

The update is the sum (``reduction="sum"``, default) or the mean of the modified gradients.
With ``beta = 0`` the targets stay 0 and GradVac is PCGrad under the same order.

Like :mod:`~metaopt.aggregation.pcgrad`, everything is computed from the Gramian ``G = J Jᵀ``:
``g_i' = Σ_k C[i, k] g_k``, ``g_i'·g_j = (C G)[i, j]`` and ``|g_i'|²`` is updated in closed
form after each correction; the T visiting chains run in parallel, T-1 vectorised rounds (in
NumPy for a CPU ``G``, as PCGrad's).

Conventions beyond the paper (documented choices):

* A pair where ``g_i'`` or ``g_j`` is the zero vector has no cosine: no correction, and its
  target is left unchanged (a task absent from this step does not drag targets to 0).
* ``sqrt(1 - t²)`` is floored at 1e-8 so a target of exactly ±1 gives a large but finite
  correction.
* ``|g_i'|²`` is tracked in closed form; when a correction cancels it to below a fraction
  ``tau`` of the terms it was summed from (``|g_i'|² + 2|c g_i'·g_j| + c²|g_j|²``), ``g_i'`` is
  exactly zero up to rounding and is treated as the zero vector from then on. Without this,
  rounding noise of relative size ``eps`` in ``|g_i'|²`` would become a spurious ``sqrt(eps)``
  in ``|g_i'|``, and the next cosines would be noise. ``tau`` follows the precision the Gramian
  was computed in: 1e-10 for float64, ``1024 eps`` (1.2e-4) for float32 (at most 1e-2). The
  float64 Gramian of a float32 ``J`` (what :func:`gradvac` and :class:`~metaopt.GradVac` use)
  is a float64 Gramian: antiparallel float32 rows cancel exactly as they do in float64.

Scale: like PCGrad's, task ``i``'s chain is homogeneous of degree 1 in ``g_i`` and of degree 0
in the ``g_j`` it is corrected with, and the cosines and targets do not depend on scale at all.
With the float64 Gramian of a float32 ``J`` nothing in the loop overflows or underflows.

References:
    Zirui Wang, Yulia Tsvetkov, Orhan Firat, Yuan Cao. *Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models*. ICLR 2021.
    https://arxiv.org/abs/2010.05874

>>> import torch
>>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
>>> targets = torch.full((2, 2), 0.5)
>>> update, w, new_targets = gradvac(J, targets=targets, beta=0.1,
...                                  generator=torch.Generator().manual_seed(0))
>>> w  # each orthogonal gradient is pulled towards the other, to cosine 0.5
tensor([1.5774, 1.5774], dtype=torch.float64)
>>> new_targets  # 0.9 * 0.5 + 0.1 * 0.0 off the diagonal
tensor([[0.5000, 0.4500],
        [0.4500, 0.5000]])
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validate import (
    check_beta,
    check_gramian_shape,
    check_order_shape,
    check_reduction,
    check_targets_shape,
    check_update,
    check_values,
    compute_dtype,
)
from .basic import aggregate
from .pcgrad import _combine, _order_and_gramian, _plan

__all__ = ["gradvac", "gradvac_weights"]

_MIN_SIN = 1e-8
# A corrected squared norm below this fraction of the terms it was summed from is cancellation
# (for a float64 Gramian; see _cancel_fraction for lower precisions).
_CANCEL = 1e-10


def _cancel_fraction(*dtypes: torch.dtype) -> float:
    """The cancellation fraction ``tau`` for a loop fed by (or run in) these dtypes: 1e-10 for
    float64, 1024 machine epsilons of the least precise one otherwise (1.2e-4 for float32),
    capped at 1e-2 so that half precision does not cancel everything."""
    eps = max(torch.finfo(d).eps for d in dtypes)
    return min(1e-2, max(_CANCEL, 1024 * eps))


def gradvac_weights(
    G: Tensor,
    order: Tensor,
    targets: Tensor,
    beta: float,
    reduction: str = "sum",
    *,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """GradVac weights ``w`` (update = ``wᵀJ``) and the updated EMA targets, from ``G = J Jᵀ``.

    Pure: ``targets`` is not modified; feed the returned targets to the next call. Runs in
    float64 (float32 on MPS): in NumPy for a CPU ``G``, otherwise on ``G``'s device with no host
    synchronisation in the loop (see :mod:`~metaopt.aggregation._backend`); only deterministic
    operations (it runs under ``torch.use_deterministic_algorithms(True)``). ``G`` and
    ``targets`` are detached: the outputs are constants for autograd.

    Every intermediate is a product or ratio of at most two gradient norms (times at most 1e8,
    from the ``sqrt(1 - t²)`` floor), so on a float64 ``G`` the weights are finite for nonzero
    norms from about 1e-140 to 1e140: any float32 gradients, when ``G`` is accumulated in float64
    (``gramian(J, dtype=torch.float64)``, as :func:`gradvac` does). The cancellation test
    follows ``G``'s precision (the ``tau`` rule in the docstring of the
    ``metaopt.aggregation.gradvac`` module): on a float32 ``G`` of antiparallel rows the targets
    are the float64 ones to float32 precision, not noise; the update there is good to about
    ``sqrt(eps)`` = 3e-4 of the rows (the sine of a cosine at -1 amplifies ``G``'s rounding),
    so accumulate ``G`` in float64 for the float64 answer.

    Args:
        G: (..., T, T) Gramian; each leading index is a parameter group with its own targets
            (the paper's per-layer variants).
        order: (T, T-1) integer tensor shared by all groups, or one per group; row ``i``
            lists the other tasks in the order task ``i`` visits them (see
            :func:`~metaopt.aggregation.random_order`).
        targets: (..., T, T) EMA cosine targets ``t_ij`` in [-1, 1] (start with zeros); the
            diagonal is unused.
        beta: EMA rate in [0, 1]; the paper uses small values such as 1e-2.
        reduction: ``"sum"`` (paper, default) or ``"mean"``.
        validate: check finiteness of ``G``, the ``order`` rows and the target range (one
            host sync). Turn off only for inputs known to be valid.

    Returns:
        ``(w, new_targets)``, the (..., T) weights in ``G``'s dtype and the (..., T, T) targets
        in ``targets``' dtype.

    Example:
        >>> G = torch.tensor([[1.0, -1.0], [-1.0, 2.0]])
        >>> w, t = gradvac_weights(G, torch.tensor([[1], [0]]), torch.zeros(2, 2), beta=0.5)
        >>> w  # beta=0, or targets at 0 as here, gives the PCGrad weights
        tensor([2.0000, 1.5000])
        >>> t
        tensor([[ 0.0000, -0.3536],
                [-0.3536,  0.0000]])
    """
    where = "gradvac_weights"
    T = check_gramian_shape(G, where)
    check_order_shape(order, G, where)
    check_targets_shape(targets, G, where)
    beta = check_beta(beta, where)
    check_reduction(reduction, where)
    if validate:
        check_values(where, G, order=order, targets=targets)
    plan = _plan(G, order)
    ops = plan.ops
    tau = _cancel_fraction(G.dtype, compute_dtype(G))
    new_targets = targets.detach().clone(memory_format=torch.contiguous_format)
    if T == 1:
        return _combine(plan, None, reduction, G.dtype), new_targets

    cdt = compute_dtype(G)
    # the divisor of a cosine without a pair (den = 0); a pair's own den, |g_i'| |g_j|, is a
    # product of two norms of the supported range (above 1e-280 in float64), far above it
    tiny = torch.finfo(cdt).tiny
    # NumPy: no warnings for the divisions by 0 (replaced by 0) and by a tiny norm (clamped)
    with ops.quiet():
        # per round r (rows) and task row n (columns): see _Plan
        t_all = ops.take(ops.asarray(targets.detach().to(cdt)), plan.flat)  # read before any update
        gjj = ops.clamp_min(plan.gjj, 0.0)  # |g_j|² of the task visited
        nj = ops.sqrt(gjj)
        sin_t = ops.clamp_min(ops.sqrt(ops.clamp_min(1.0 - t_all * t_all, 0.0)), _MIN_SIN)
        # coef = |g_i'| (t sin - cos sin_t) / (|g_j| sin_t) = (t/sin_t sin - cos) |g_i'| / |g_j|,
        # with 1 / |g_j| := 0 for a zero g_j
        inv_nj = ops.where(nj > 0.0, 1.0 / nj, 0.0)
        t_sin = t_all / sin_t
        M = plan.dots()  # M[s, n] = g_i'·g_j for the task j that row n visits in round s
        n2 = ops.clamp_min(plan.diag, 0.0)  # |g_i'|², kept >= 0
        dots, ts, njs, t_s, inv, gj = (list(x) for x in (M, t_all, nj, t_sin, inv_nj, gjj))  # views
        coefs, cos_list, den_list = [], [], []
        for r0, table in plan.tables():
            for r, visited in enumerate(table, start=r0):
                dot = dots[r]
                ni = ops.sqrt(n2)
                den = ni * njs[r]  # 0 iff the pair has no cosine (g_i' or g_j is zero)
                # such a pair gets coef 0 below whatever its cosine (|g_i'| = 0 or 1 / |g_j| = 0)
                cos = ops.clamp(dot / ops.clamp_min(den, tiny), -1.0, 1.0)
                sin = ops.sqrt(1.0 - cos * cos)
                coef = (t_s[r] * sin - cos) * ni * inv[r] * (cos < ts[r])  # only where cos < t
                coefs.append(coef)
                cos_list.append(cos)
                den_list.append(den)
                if r + 1 < T - 1:
                    # |g_i' + c g_j|² = |g_i'|² + 2 c g_i'·g_j + c² |g_j|². When the sum cancels to
                    # rounding noise, the corrected gradient is zero: say so exactly (module notes).
                    cg2 = coef * dot * 2.0  # (dot views M: read before the update below)
                    M += coef * visited  # g_i' += coef g_j, seen through every later dot product
                    rest = coef * coef * gj[r] + n2
                    n2 = rest + cg2
                    n2 = n2 * (n2 > (rest + ops.abs(cg2)) * tau)

    if beta > 0.0:
        valid_all, cos_all = ops.stack(den_list) > 0.0, ops.stack(cos_list)
        ema = ops.where(valid_all, (1.0 - beta) * t_all + beta * cos_all, t_all)
        # plan.flat lists every off-diagonal entry exactly once: a plain indexed copy, which
        # (unlike put_) torch implements deterministically
        new_targets.view(-1).index_copy_(
            0, plan.flat_t.reshape(-1), ops.to_tensor(ema).reshape(-1).to(new_targets.dtype)
        )
    return _combine(plan, ops.stack(coefs), reduction, G.dtype), new_targets


def gradvac(
    jacobian: Tensor,
    *,
    targets: Tensor,
    beta: float,
    generator: torch.Generator | None = None,
    reduction: str = "sum",
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """GradVac aggregation of per-task gradients (Wang et al. 2021).

    Computes the Gramian in float64 (float32 on MPS), draws each task's visiting order from
    ``generator`` (never the global RNG; ``None`` seeds a private generator from OS entropy),
    runs :func:`gradvac_weights` and combines ``update = wᵀJ``. One host sync checks the
    Gramian, the targets and the update's size.

    Supported range: for a float32 ``J``, any finite entries whose update fits float32; the
    update is refused (``ValueError``) when its norm bound ``Σ_k |w_k| |g_k|`` exceeds 2^126
    (8.5e37), which every update with an entry beyond float32's maximum does. For a float64
    ``J``: rows of norm 1e-140 to 1e140.

    Args:
        jacobian: (T, P) per-task gradients, or (..., T, P) groups with their own targets
            (sharing one order).
        targets: (..., T, T) EMA targets (zeros at the first step).
        beta: EMA rate in [0, 1].
        generator: source of the random visiting order.
        reduction: ``"sum"`` (paper, default) or ``"mean"``.
        out: optional (..., P) buffer for the update.

    Returns:
        ``(update, weights, new_targets)``, the update in ``J``'s dtype, the weights in the
        Gramian's (float64) and the targets in ``targets``' dtype.

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> update, w, t = gradvac(J, targets=torch.zeros(2, 2), beta=0.0)
        >>> update  # PCGrad's, whatever the order for two tasks
        tensor([0.5000, 1.5000])
    """
    order, G = _order_and_gramian(jacobian, reduction, generator, "gradvac")
    check_targets_shape(targets, G, "gradvac")
    w, new_targets = gradvac_weights(G, order, targets, beta, reduction, validate=False)
    split = check_update("gradvac", G, w, jacobian.dtype, targets=targets)
    return aggregate(jacobian, w if split else w.to(jacobian.dtype), out=out), w, new_targets
