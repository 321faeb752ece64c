"""Where a parameter's elements live: the local shard of a sharded parameter.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a parameter is a ``DTensor`` and each rank
holds one shard of it. metaopt's per-parameter state (the slow weights φ, the trajectory mean,
the per-task gradient rows) follows the same placement: it is kept for this rank's shard only.
Every outer-step operation is elementwise and runs on the shards as they are (FSDP2 gathers
the updated shards at the next forward). A per-task method's Gramian is a sum over elements:
each rank sums its own shard's products and one all-reduce of the T×T matrix over the sharded
mesh dimensions gives every rank the whole Gramian (:func:`Sharding.sum_`). A decision that must
be the same on every rank (refuse a step whose gradient is non-finite in one shard) is reduced
over the ranks (:func:`Sharding.agree`).

Plain tensors are their own local tensor, and nothing here communicates for them.

>>> import torch
>>> w = torch.nn.Parameter(torch.ones(3))
>>> local_tensor(w) is w, sharded([w]), Sharding.of([w], "X") is None
(True, False, True)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._distributed import _device
from ..jacobian import TaskJacobian, parameter_slices

__all__ = [
    "Sharding",
    "agree",
    "check_replica_group",
    "fsdp1_managed",
    "jacobian_through_engine",
    "local_tensor",
    "placed_like",
    "refuse_fsdp1",
    "reshard_gathered",
    "sharded",
]


_DTENSOR: list[type] = []  # DTensor, looked up once (none where torch.distributed is not built)


def _dtensor_class() -> type | None:
    if not _DTENSOR:
        if not torch.distributed.is_available():
            return None
        from torch.distributed.tensor import DTensor

        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def _is_dtensor(t: object) -> bool:
    # checked at every step for every gradient: a plain tensor returns at the first test
    if type(t) is Tensor or type(t) is torch.nn.Parameter:
        return False
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local_tensor(t: Tensor) -> Tensor:
    """The tensor that holds this rank's elements of ``t``: a ``DTensor``'s local shard (the
    same object at every call, so that state keyed by it stays valid), ``t`` itself otherwise.
    Writing into it in place writes into ``t``."""
    if _is_dtensor(t):
        # DTensor.to_local() returns this very tensor under no_grad for a plain DTensor, and a
        # fresh view of it for a Parameter(DTensor); metaopt's state is keyed by one object
        return t._local_tensor  # type: ignore[attr-defined,no-any-return]
    return t


def sharded(tensors: Iterable[Tensor]) -> bool:
    """Whether any of ``tensors`` is a ``DTensor``."""
    return any(_is_dtensor(t) for t in tensors)


@dataclass(frozen=True)
class Sharding:
    """How a set of parameters is spread over the ranks: the ``DeviceMesh`` they share and its
    dimensions along which they are sharded (each element on one rank of such a dimension) or
    replicated (the same values on every rank of it, as in HSDP's replica dimension).

    Built by :meth:`of`, which refuses what a per-task method cannot combine: a mix of sharded
    and plain parameters, several meshes, partial placements, or parameters sharded along
    different mesh dimensions (tensor parallelism replicates some and shards others)."""

    mesh: Any
    shard_dims: tuple[int, ...]

    @classmethod
    def of(cls, params: Sequence[Tensor], where: str) -> Sharding | None:
        """The sharding of ``params``, or ``None`` when none is a ``DTensor``."""
        dtensors = [p for p in params if _is_dtensor(p)]
        if not dtensors:
            return None
        if len(dtensors) != len(params):
            raise ValueError(
                f"{where}: {len(params) - len(dtensors)} of the {len(params)} parameters are plain "
                "tensors and the others DTensors (FSDP2 / tensor parallel); shard the whole model "
                "(fully_shard on the root module too) so that every parameter is a DTensor"
            )
        mesh = dtensors[0].device_mesh  # type: ignore[attr-defined]
        layouts = set()
        for p in dtensors:
            if p.device_mesh != mesh:  # type: ignore[attr-defined]
                raise ValueError(f"{where}: the parameters are spread over different device meshes")
            placements = p.placements  # type: ignore[attr-defined]
            if any(pl.is_partial() for pl in placements):
                raise ValueError(
                    f"{where}: a parameter has a Partial placement; it must be sharded or replicated"
                )
            layouts.add(tuple(d for d, pl in enumerate(placements) if pl.is_shard()))
        if len(layouts) > 1:
            raise ValueError(
                f"{where}: the parameters are sharded along different mesh dimensions "
                f"({sorted(layouts)}: tensor parallelism replicates some parameters and shards "
                "others); per-task gradient methods support FSDP2 and HSDP, where every "
                "parameter is sharded along the same dimensions"
            )
        return cls(mesh, layouts.pop())

    def _groups(self, dims: Iterable[int]) -> list[Any]:
        return [self.mesh.get_group(d) for d in dims]

    def sum_(self, tensor: Tensor) -> Tensor:
        """``tensor`` ← its sum over the ranks that hold the other shards, in place: a sum
        over elements (a Gramian) computed shard by shard becomes the whole sum on every rank."""
        for group in self._groups(self.shard_dims):
            torch.distributed.all_reduce(tensor, group=group)
        return tensor

    def agree(self, flags: Tensor) -> Tensor:
        """``flags`` (bool) and-reduced over every rank of the mesh, so that every rank takes
        the same decision."""
        out = flags.to(torch.int32)
        for group in self._groups(range(self.mesh.ndim)):
            torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MIN, group=group)
        return out.bool()


def refuse_fsdp1(params: Sequence[Tensor], where: str) -> None:
    """Refuse parameters that FSDP1 (``FullyShardedDataParallel``) manages: it marks the original
    parameters ``_fsdp_flattened`` and computes with flat parameters built from them, which are
    what autograd reaches, so per-task gradients (and a backward pass with ``inputs=``) cannot
    be taken with respect to the parameters the optimizer holds."""
    if fsdp1_managed(params):
        raise ValueError(
            f"{where}: the parameters are managed by FSDP1 (FullyShardedDataParallel), whose flat "
            "parameters autograd reaches instead of these, so per-task gradients cannot be taken; "
            "shard with FSDP2 (torch.distributed.fsdp.fully_shard), which metaopt supports, or "
            "drive the Reptile family the torch way (loss.backward())"
        )


def check_replica_group(params: Sequence[Tensor], group: Any, where: str) -> None:
    """Local trajectories over sharded parameters (hybrid: FSDP2 within each replica of the
    model, one trajectory per replica): ``group`` must be the replica dimension's group, whose
    ranks hold the same shard of the model in different replicas, so that averaging each rank's
    shard over it averages the replicas. Refused when it is missing or crosses the mesh the
    parameters are sharded over (it must meet that mesh in this rank only)."""
    if group is None:
        raise ValueError(
            f"{where}: local_trajectories=True on sharded parameters (FSDP2) needs process_group="
            "the replica dimension's group: shard the model within each replica (fully_shard("
            "model, mesh=mesh['shard']) on a 2-D DeviceMesh) and pass mesh.get_group('replicate'); "
            "with the default group every rank would average a different shard"
        )
    dist = torch.distributed
    meshes = {tuple(p.device_mesh.mesh.flatten().tolist()) for p in params if _is_dtensor(p)}  # type: ignore[attr-defined]
    replicas = set(dist.get_process_group_ranks(group))
    me = dist.get_rank()
    if any(set(m) & replicas != {me} for m in meshes):
        raise ValueError(
            f"{where}: process_group {sorted(replicas)} is not the replica dimension of the mesh "
            f"the parameters are sharded over ({sorted(meshes)}): it must hold one rank of each "
            "replica, each holding this rank's shard (mesh.get_group('replicate') of a 2-D "
            "DeviceMesh whose other dimension FSDP2 shards over)"
        )


def reshard_gathered(module: Any) -> None:
    """Drop the gathered (unsharded) parameters FSDP2 holds for the FSDP modules in ``module``
    (``FSDPModule.reshard()``), so that the next forward gathers the shards as they are now:
    FSDP2 keeps the root module's gathered parameters after a forward without backward.
    Nothing for ``None`` or a model without FSDP modules."""
    if module is None or not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def placed_like(local: Tensor, param: Tensor) -> Tensor:
    """``local`` (this rank's elements of a tensor shaped like ``param``) as a ``DTensor`` placed
    as ``param`` is, without a copy, where ``param`` is a ``DTensor``; ``local`` otherwise. How
    metaopt's per-parameter state is saved, so that ``torch.distributed.checkpoint`` saves each
    rank's shard and loads it back into the shards of any layout."""
    if not _is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local,
        param.device_mesh,  # type: ignore[attr-defined]
        param.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def fsdp1_managed(params: Sequence[Tensor]) -> bool:
    """Whether FSDP1 (``FullyShardedDataParallel``) manages any of ``params``: it marks the
    original parameters ``_fsdp_flattened``."""
    return any(getattr(p, "_fsdp_flattened", False) for p in params)


def agree(ok: Tensor, tensors: Sequence[Tensor], group: Any = None) -> Tensor:
    """``ok`` (bool) and-reduced over every rank of the meshes ``tensors`` (parameters, any
    placements) are spread over, so that every rank takes the same decision. For parameters
    FSDP1 manages, whose plain tensors do not say which ranks share them, over ``group`` (the
    optimizer's; ``None``: no collective, a single process or ``process_group="local"``).
    ``ok`` itself otherwise."""
    if fsdp1_managed(tensors):
        if group is None:
            return ok
        out = ok.to(device=_device(group), dtype=torch.int32)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MIN, group=group)
        return out.to(ok.device).bool()
    meshes: list[Any] = []
    for t in tensors:
        # each fully_shard call may build its own mesh object over the same ranks: equal ones
        if _is_dtensor(t) and all(t.device_mesh != m for m in meshes):  # type: ignore[attr-defined]
            meshes.append(t.device_mesh)  # type: ignore[attr-defined]
    for mesh in meshes:
        ok = Sharding(mesh, ()).agree(ok)
    return ok


def jacobian_through_engine(
    losses: Sequence[Tensor], params: Sequence[Tensor], out: Tensor, retain_graph: bool
) -> TaskJacobian:
    """Per-task gradients of sharded parameters, row ``t`` holding this rank's shards of the
    gradient of ``losses[t]`` (the columns of :func:`~metaopt.jacobian.parameter_slices` over the
    local shards), for parameters the losses' graphs do not reach: FSDP2 computes with gathered
    copies and reduce-scatters their gradients into the shards' ``.grad`` from its own backward
    hooks. So each loss runs its own ``backward()`` as after ``loss.backward()``, and its row is
    read from ``.grad``, which is cleared before each task and left cleared. A parameter whose
    ``.grad`` stays ``None`` is unreached by that task. Every backward but the last keeps the
    graph, whatever ``retain_graph`` says: losses that share part of their graph (one encoder
    forward) then need no ``retain_graph=True``, and a backward cannot fail half-way on a freed
    graph, which would leave FSDP2's hooks mid-backward. The graphs are held no longer than the
    losses are: the peak is the T graphs the forward built."""
    locals_ = [local_tensor(p) for p in params]
    slices = parameter_slices(locals_)
    reached: list[list[bool]] = []
    for t, loss in enumerate(losses):
        for p in params:
            p.grad = None
        torch.autograd.backward(loss, retain_graph=retain_graph or t < len(losses) - 1)
        row = out[t]
        hits = []
        for p, sl in zip(params, slices):
            g = p.grad
            if g is None:
                row[sl].zero_()
            else:
                row[sl].copy_(local_tensor(g).reshape(-1))
            hits.append(g is not None)
        reached.append(hits)
    for p in params:
        p.grad = None
    return TaskJacobian(out, torch.tensor(reached, dtype=torch.bool).reshape(len(losses), len(params)))
