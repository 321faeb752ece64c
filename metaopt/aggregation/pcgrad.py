"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020).

For every task ``i``, PCGrad visits the other tasks ``j`` in a random order; whenever the current
(already modified) gradient ``g_i'`` conflicts with the *original* gradient ``g_j``
(``g_i'·g_j < 0``) it removes the component of ``g_i'`` along ``g_j``:
``g_i' <- g_i' - (g_i'·g_j / |g_j|²) g_j``. The update is the **sum** of the modified gradients
(the paper's Algorithm 1 and the official code); ``reduction="mean"`` divides by T.

Every ``g_i'`` stays a combination of the original gradients, ``g_i' = Σ_k C[i, k] g_k``, so the
whole procedure only needs the Gramian ``G = J Jᵀ``: ``g_i'·g_j = (C G)[i, j]``. The update is
``wᵀJ`` with ``w = Σ_i C[i, :]``. Tasks are independent of each other, so the T projection
chains run in parallel: round ``r`` projects every ``g_i'`` against its own ``order[i, r]``,
giving T-1 rounds of four vectorised T-sized operations, against a table of the visited rows
gathered once: in NumPy for a CPU ``G`` (a quarter of torch's per-call overhead; same numbers,
see :mod:`~metaopt.aggregation._backend`), in torch on ``G``'s device otherwise, without host
synchronisation.

Scale: task ``i``'s chain is homogeneous of degree 1 in ``g_i`` and of degree 0 in every ``g_j``
it is projected on, so the weights only depend on ratios of gradient norms and every quantity in
the loop is a product or ratio of at most two of them. With the float64 Gramian of a float32
``J`` (what :func:`pcgrad` and :class:`~metaopt.PCGrad` use) no step of it can overflow or
underflow, whatever the rows' scales; the combination ``wᵀJ`` is then done exactly split (see
:func:`~metaopt.aggregation.aggregate`), so a weight of 1e39 on a row of norm 1e-21 is fine.

References:
    Tianhe Yu, Saurabh Kumar, Abhishek Gupta, Sergey Levine, Karol Hausman, Chelsea Finn.
    *Gradient Surgery for Multi-Task Learning*. NeurIPS 2020. https://arxiv.org/abs/2001.06782

>>> import torch
>>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
>>> update, w = pcgrad(J, generator=torch.Generator().manual_seed(0))
>>> w
tensor([2.0000, 1.5000], dtype=torch.float64)
>>> update
tensor([0.5000, 1.5000])
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._backend import backend
from ._validate import (
    check_gramian_shape,
    check_matrix,
    check_order_shape,
    check_reduction,
    check_update,
    check_values,
    compute_dtype,
    prod,
)
from .basic import aggregate
from .gramian import gramian

__all__ = ["pcgrad", "pcgrad_weights", "random_order"]


def random_order(
    num_tasks: int, generator: torch.Generator, device: torch.device | str | None = None
) -> Tensor:
    """Draw the order in which each task visits the others, from ``generator`` only.

    Row ``i`` is a uniformly random permutation of ``{0..T-1} \\ {i}``, drawn independently per
    row (argsort of uniform keys, with task ``i``'s own key pushed last). The global RNG is
    never touched.

    Args:
        num_tasks: T >= 1.
        generator: the ``torch.Generator`` to draw from (its device is used for the draw).
        device: where to put the result (default: the generator's device).

    Returns:
        (T, T-1) int64 tensor.

    Example:
        >>> random_order(3, torch.Generator().manual_seed(0))
        tensor([[2, 1],
                [2, 0],
                [0, 1]])
    """
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"random_order: num_tasks must be an int >= 1, got {num_tasks!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"random_order: generator must be a torch.Generator, got {generator!r}")
    T = num_tasks
    keys = torch.rand((T, T), generator=generator, device=generator.device, dtype=torch.float64)
    keys.fill_diagonal_(2.0)  # uniform keys are < 1: each task's own index sorts last
    order = keys.argsort(dim=1)[:, : T - 1]
    # drawn on the host, where the generator is; copied without waiting for the device (an
    # asynchronous copy from pageable memory returns once the few bytes are staged)
    return order.to(device, non_blocking=True) if device is not None else order


def _fresh_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        g = torch.Generator()
        g.seed()  # OS entropy: non-reproducible, but the global RNG stays untouched
        return g
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")
    return generator


def _order_and_gramian(
    jacobian: Tensor, reduction: str, generator: torch.Generator | None, where: str
) -> tuple[Tensor, Tensor]:
    """Shared prologue of the convenience aggregators: validate, draw the visiting order from
    ``generator`` (never the global RNG), and compute the Gramian in float64 (see
    :func:`~metaopt.aggregation.gramian`)."""
    check_matrix(jacobian, "jacobian", where)
    check_reduction(reduction, where)
    order = random_order(jacobian.shape[-2], _fresh_generator(generator), device=jacobian.device)
    return order, gramian(jacobian, dtype=compute_dtype(jacobian))


# Elements of the visited-pair table gathered at once (see _Plan.tables): bounds its memory
# (2 MiB in float64) whatever T and the number of groups.
_TABLE_ELEMENTS = 1 << 18


@dataclass
class _Plan:
    """The Gramian and index tables shared by the PCGrad and GradVac loops, in the loops' array
    library (NumPy on CPU, torch elsewhere: see :mod:`._backend`).

    The B = prod(G.shape[:-2]) Gramians are flattened into ``Gf`` (B*T*T,); task ``i`` of group
    ``b`` is the flattened task row ``n = b*T + i``. Everything indexed by round ``r`` (0 to
    T-2) and task row is laid out (T-1, B*T), one row per round, so that a round reads its
    vectors as views and broadcasts them against (T-1, B*T) tables. With ``j = order[b, i, r]``
    the task visited in round ``r``:

    * ``order[r, n] = j``; ``rows[r, n] = b*T + j`` (its flattened task row);
    * ``flat[r, n] = n*T + j``: entry (i, j) of group b, as an index into ``Gf`` (or into any
      (..., T, T) tensor laid out like ``G``);
    * ``gjj[r, n] = |g_j|²``.
    """

    ops: Any  # _backend's operations for this device
    T: int
    lead: tuple[int, ...]
    Gf: Any  # (B*T*T,) compute dtype
    order: Any  # (T-1, B*T) int64
    rows: Any  # (T-1, B*T) int64
    flat: Any  # (T-1, B*T) int64
    flat_t: Tensor  # ``flat`` as a torch tensor on G's device
    diag: Any  # (B*T,): |g_i|² of each task row
    gjj: Any  # (T-1, B*T)

    def dots(self) -> Any:
        """(T-1, B*T): ``G[b, i, order[b, i, r]]``, the entry each task row reads in round r."""
        return self.ops.take(self.Gf, self.flat)

    def tables(self) -> Iterator[tuple[int, Any]]:
        """``(r0, table)`` blocks covering every round: ``table[r - r0, s, n] =
        G[b, order[b, i, r], order[b, i, s]]`` (shape (rounds, T-1, B*T)), the visited row
        ``g_j`` of round ``r`` against every task that row ``n`` visits, in visiting order.

        Gathered a block of rounds at a time (at most 2^18 entries) instead of round by round:
        one gather instead of one per round, in bounded memory.
        """
        R, N = self.order.shape
        step = max(1, _TABLE_ELEMENTS // max(1, R * N))
        for r0 in range(0, R, step):
            index = self.rows[r0 : r0 + step, None, :] * self.T + self.order[None, :, :]
            yield r0, self.ops.take(self.Gf, index)


@functools.lru_cache(maxsize=64)
def _bases(B: int, T: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For flattened task rows n = b*T + i: b*T, n*T and n*T + i, the offsets of its group's
    rows, of its entries and of its diagonal entry."""
    n = torch.arange(B * T, device=device)
    return n - n % T, n * T, n * T + n % T


def _plan(G: Tensor, order: Tensor) -> _Plan:
    T = G.shape[-1]
    lead = tuple(G.shape[:-2])
    B = prod(lead)
    dev = G.device
    ops = backend(dev)
    Gf = G.detach().to(compute_dtype(G)).reshape(-1)
    ob = order.to(device=dev, dtype=torch.int64).expand(lead + (T, T - 1)).reshape(B * T, T - 1).T
    row_base, flat_base, diag_base = _bases(B, T, dev)
    rows = (ob + row_base).contiguous()  # b*T + j
    flat = (ob + flat_base).contiguous()  # (b*T + i)*T + j
    diag = Gf.take(diag_base)
    Gf, ob, rows_a, flat_a, diag = (ops.asarray(x) for x in (Gf, ob.contiguous(), rows, flat, diag))
    return _Plan(
        ops=ops,
        T=T,
        lead=lead,
        Gf=Gf,
        order=ob,
        rows=rows_a,
        flat=flat_a,
        flat_t=flat,
        diag=diag,
        gjj=ops.take(diag, rows_a),
    )


def _combine(plan: _Plan, coefs: Any, reduction: str, dtype: torch.dtype) -> Tensor:
    """w[b, k] = Σ_i C[b, i, k]: ones (C's identity part) plus every added coefficient, added in
    round order (``coefs`` is (T-1, B*T), one per round and task row)."""
    ops, T = plan.ops, plan.T
    w = ops.ones(plan.diag.shape[0], like=plan.Gf)
    if T > 1:
        ops.index_add(w, plan.rows.reshape(-1), coefs.reshape(-1))
    if reduction == "mean":
        w /= T
    return ops.to_tensor(w).reshape(plan.lead + (T,)).to(dtype)


def pcgrad_weights(G: Tensor, order: Tensor, reduction: str = "sum", *, validate: bool = True) -> Tensor:
    """PCGrad weights ``w`` such that the PCGrad update is ``wᵀJ``, computed from ``G = J Jᵀ``.

    Runs in float64 (the loop is O(T³) on T×T numbers; float32 on MPS); a zero gradient ``g_j``
    is never projected on. Every intermediate is a product or ratio of at most two gradient
    norms, so on a float64 ``G`` the weights are finite for nonzero norms from about 1e-150 to
    1e150: any float32 gradients (float32 norms lie in [1e-45, 1e41]); accumulate ``G`` from a
    float32 ``J`` with ``gramian(J, dtype=torch.float64)``, as :func:`pcgrad` does, or a float32
    ``G`` itself overflows above norms of 1.8e19. The weights are computed from a detached
    ``G``: they are constants for autograd.

    Args:
        G: (..., T, T) Gramian; leading dims are independent groups.
        order: (T, T-1) integer tensor (or one per leading index of ``G``); row ``i`` lists
            the other tasks in the order task ``i`` visits them (see :func:`random_order`).
        reduction: ``"sum"`` (paper, default) or ``"mean"`` (divide by T).
        validate: check that ``G`` is finite and each row of ``order`` is a permutation of
            the other tasks (one host sync). Turn off only for inputs known to be valid.

    Returns:
        (..., T) weights in ``G``'s dtype and device.

    Example:
        >>> G = torch.tensor([[1.0, -1.0], [-1.0, 2.0]])
        >>> pcgrad_weights(G, torch.tensor([[1], [0]]))
        tensor([2.0000, 1.5000])
    """
    where = "pcgrad_weights"
    T = check_gramian_shape(G, where)
    check_order_shape(order, G, where)
    check_reduction(reduction, where)
    if validate:
        check_values(where, G, order=order)
    plan = _plan(G, order)
    if T == 1:
        return _combine(plan, None, reduction, G.dtype)
    ops = plan.ops
    with ops.quiet():
        # c = -min(g_i'·g_j, 0) / |g_j|², with 1/|g_j|² := 0 for a zero g_j (its dot is 0 too).
        neg_inv = list(ops.where(plan.gjj > 0, -1.0 / plan.gjj, 0.0))
    M = plan.dots()  # M[s, n] = g_i'·g_j for the task j that row n visits in round s
    dots = list(M)  # views: each round reads its row after the rounds before it updated M
    coefs = []
    for r0, table in plan.tables():
        for r, visited in enumerate(table, start=r0):
            c = ops.clamp_max(dots[r], 0.0) * neg_inv[r]
            coefs.append(c)
            if r + 1 < T - 1:
                M += c * visited  # g_i' += c g_j, seen through every later dot product
    return _combine(plan, ops.stack(coefs), reduction, G.dtype)


def pcgrad(
    jacobian: Tensor,
    *,
    generator: torch.Generator | None = None,
    reduction: str = "sum",
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """PCGrad aggregation of a (T, P) matrix of per-task gradients (Yu et al. 2020).

    Computes the Gramian in float64 (float32 on MPS), draws each task's visiting order from
    ``generator`` (never from the global RNG; ``None`` seeds a private generator from OS
    entropy, so pass a seeded one for reproducibility), computes :func:`pcgrad_weights` and
    combines ``update = wᵀJ``. One host sync checks the Gramian and the update's size.

    Supported range: for a float32 ``J``, any finite entries whose update fits float32. The
    update is refused (``ValueError``) when its norm bound ``Σ_k |w_k| |g_k|`` exceeds 2^126
    (8.5e37), which every update with an entry beyond float32's maximum does. For a float64
    ``J``: rows of norm 1e-150 to 1e150.

    Args:
        jacobian: (T, P) per-task gradients, or (..., T, P) groups sharing one order.
        generator: source of the random visiting order.
        reduction: ``"sum"`` (paper, default) or ``"mean"``.
        out: optional (..., P) buffer for the update (see :func:`aggregate`).

    Returns:
        ``(update, weights)`` of shapes (..., P) and (..., T); the update in ``J``'s
        dtype, the weights in the Gramian's (float64), where they are always representable.

    Example:
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> pcgrad(J, generator=torch.Generator().manual_seed(0), reduction="mean")[0]
        tensor([0.2500, 0.7500])
    """
    order, G = _order_and_gramian(jacobian, reduction, generator, "pcgrad")
    w = pcgrad_weights(G, order, reduction, validate=False)  # the order is valid by construction
    split = check_update("pcgrad", G, w, jacobian.dtype)
    return aggregate(jacobian, w if split else w.to(jacobian.dtype), out=out), w
