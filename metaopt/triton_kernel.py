"""A Triton kernel for the outer step, over lists of tensors as they are.

One launch per call walks every tensor of the lists (as torch's multi-tensor apply does): a
table of their addresses and sizes, and one program per block of ``BLOCK`` elements of one
tensor. Per element it computes the interpolation in the master dtype (float32 for half
parameters, else the parameters' own) and, in the same pass, writes the fast tensor rounded to
its dtype, round-to-nearest-even as torch's ``.to()`` rounds (bfloat16 by integer arithmetic on
the bits, so that it rounds alike on a GPU and in Triton's CPU interpreter)::

    dst ← dst + w · (src − dst);   fast ← round(copy_from)

(the interpolation in torch's ``lerp`` form, ``src − (src − dst)(1 − w)`` for w ≥ 0.5, exact at
both ends),
which is the contract of :func:`metaopt.interpolation.register_kernel`: the outer step
``φ ← φ + η(θ − φ); θ ← φ`` (``dst = φ``, ``src = θ``, ``copy_from = φ``), and the trajectory
mean's ``m ← m + (θ − m)/n; θ ← φ`` (``dst = m``, ``copy_from = φ``). ``interpolation="auto"``
chooses it on CUDA: :mod:`metaopt.interpolation` registers it there by itself when Triton is
installed (``register_kernel("cuda", outer_step)``). Tensors that are not contiguous go through
torch's ``lerp``, which computes the same.

Tested on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``) against a float64
reference (``tests/test_triton_kernel.py``). Example (needs ``triton``; on a CPU, set
``TRITON_INTERPRET=1`` before importing this module)::

    from metaopt.triton_kernel import outer_step
    outer_step([phi], [theta], 0.1, [theta], [phi])   # φ ← φ + 0.1 (θ − φ); θ ← φ
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from ._extras import install_hint
from .precision import master_form

try:
    import triton  # type: ignore[import-untyped]
    import triton.language as tl  # type: ignore[import-untyped]
except ImportError as err:  # pragma: no cover - the optional extra is missing
    raise ImportError(f"metaopt.triton_kernel needs Triton: {install_hint('triton')}") from err

__all__ = ["BLOCK", "outer_step"]

BLOCK = 1024
"""Elements per program: one block of one tensor."""

_TL = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.uint16,
}
"""Triton's element type for each torch dtype a pointer is read as; bfloat16 as its bits."""


@triton.jit
def _as_master(x, DTYPE: tl.constexpr, MASTER: tl.constexpr):
    """An element loaded as ``DTYPE`` (bfloat16: its 16 bits), widened to ``MASTER``."""
    if DTYPE == tl.uint16:  # bfloat16: the high half of a float32
        return (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True).to(MASTER)
    return x.to(MASTER)


@triton.jit
def _rounded(x, DTYPE: tl.constexpr):
    """``x`` (float32 or float64) rounded to nearest even in ``DTYPE`` (bfloat16: its bits)."""
    if DTYPE == tl.uint16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16)
    return x.to(DTYPE, fp_downcast_rounding="rtne") if DTYPE != x.dtype else x


@triton.jit
def _outer_kernel(
    dst_at,
    src_at,
    fast_at,
    copy_at,
    sizes,
    chunk_tensor,
    chunk_start,
    w,
    DST: tl.constexpr,
    SRC: tl.constexpr,
    FAST: tl.constexpr,
    HAS_FAST: tl.constexpr,
    COPY_IS_DST: tl.constexpr,
    MASTER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    i = tl.load(chunk_tensor + c)
    offs = tl.load(chunk_start + c) + tl.arange(0, BLOCK)
    mask = offs < tl.load(sizes + i)
    dst = tl.load(dst_at + i).to(tl.pointer_type(DST))
    src = tl.load(src_at + i).to(tl.pointer_type(SRC))
    d = tl.load(dst + offs, mask=mask)
    raw = tl.load(src + offs, mask=mask)
    s = _as_master(raw, SRC, DST)
    if COPY_IS_DST:
        phi = d  # φ before the update
    else:
        phi = tl.load(tl.load(copy_at + i).to(tl.pointer_type(DST)) + offs, mask=mask)
    if MASTER:  # θ of lower precision: its master form θ + (φ − round(φ))
        s = s + (phi - _as_master(_rounded(phi, SRC), SRC, DST))
    # torch's lerp: exact at both ends (w = 1 gives src exactly: a trajectory mean starts so)
    d = tl.where(w < 0.5, d + w * (s - d), s - (s - d) * (1.0 - w))
    tl.store(dst + offs, d, mask=mask)
    if HAS_FAST:
        if COPY_IS_DST:
            phi = d  # φ after the update
        fast = tl.load(fast_at + i).to(tl.pointer_type(FAST))
        tl.store(fast + offs, _rounded(phi, FAST), mask=mask)


def _table(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device, non_blocking=True)


_TABLES: OrderedDict[tuple[object, ...], tuple[Tensor, ...]] = OrderedDict()
"""The launch tables of recent calls, by the tensors' addresses and sizes: an outer step over
the same tensors reuses them instead of building and uploading one entry per block again
(174k blocks for mBERT's 178M parameters). A table holds addresses only, so it stays right for
any tensors at those addresses with those sizes."""

_TABLES_KEPT = 8


def _tables(lists: Sequence[Sequence[Tensor]], device: torch.device) -> tuple[Tensor, ...]:
    """The address tables of ``lists`` (each a list of tensors), their sizes, and each block's
    tensor and start, on ``device``."""
    sizes = [t.numel() for t in lists[0]]
    key = (device, tuple(sizes), *(tuple(t.data_ptr() for t in ts) for ts in lists))
    found = _TABLES.get(key)
    if found is not None:
        _TABLES.move_to_end(key)
        return found
    chunk_tensor = [k for k, size in enumerate(sizes) for _ in range(0, size, BLOCK)]
    chunk_start = [a for size in sizes for a in range(0, size, BLOCK)]
    tables = (
        *(_table(ts, device) for ts in lists),
        torch.tensor(sizes, dtype=torch.int64).to(device, non_blocking=True),
        torch.tensor(chunk_tensor, dtype=torch.int64).to(device, non_blocking=True),
        torch.tensor(chunk_start, dtype=torch.int64).to(device, non_blocking=True),
    )
    _TABLES[key] = tables
    while len(_TABLES) > _TABLES_KEPT:
        _TABLES.popitem(last=False)
    return tables


def outer_step(
    dst: list[Tensor], src: list[Tensor], w: float, fast: list[Tensor] | None, copy_from: list[Tensor]
) -> None:
    """``dst ← dst + w·(src − dst)`` then, if ``fast`` is given, ``fast ← copy_from`` rounded to
    ``fast``'s dtype, pairwise over the lists (the :func:`metaopt.interpolation.register_kernel`
    contract), in one launch for the contiguous tensors. ``dst`` and ``copy_from`` share one
    dtype (the master: float32 or float64); ``src`` and ``fast`` may be lower precision, and a
    lower-precision ``src`` is θ as it is, taken in its master form ``θ + (φ − round(φ))`` with φ
    = ``copy_from`` before the update (``outer_step.forms_master``): one pass, where torch
    would form it first."""
    n = len(dst)
    if len(src) != n or len(copy_from) != n or (fast is not None and len(fast) != n):
        raise ValueError("outer_step: the tensor lists differ in length")
    fast_list = list(fast) if fast is not None else None
    rows = [
        i
        for i in range(n)
        if dst[i].numel()
        and all(t.is_contiguous() for t in (dst[i], src[i], copy_from[i]))
        and (fast_list is None or fast_list[i].is_contiguous())
    ]
    rest = [i for i in range(n) if dst[i].numel() and i not in set(rows)]
    if rest:  # not contiguous: torch's lerp, the same computation
        masters = master_form([src[i] for i in rest], [copy_from[i] for i in rest])
        torch._foreach_lerp_([dst[i] for i in rest], masters, w)
        if fast_list is not None:
            torch._foreach_copy_([fast_list[i] for i in rest], [copy_from[i] for i in rest])
    if not rows:
        return
    for key in {
        (dst[i].dtype, src[i].dtype, None if fast_list is None else fast_list[i].dtype) for i in rows
    }:
        _launch(
            [
                i
                for i in rows
                if (dst[i].dtype, src[i].dtype, None if fast_list is None else fast_list[i].dtype) == key
            ],
            dst,
            src,
            w,
            fast_list,
            copy_from,
        )


def _launch(
    rows: list[int],
    dst: list[Tensor],
    src: list[Tensor],
    w: float,
    fast: list[Tensor] | None,
    copy_from: list[Tensor],
) -> None:
    device = dst[rows[0]].device
    d, s = [dst[i] for i in rows], [src[i] for i in rows]
    c = [copy_from[i] for i in rows]
    f = [fast[i] for i in rows] if fast is not None else d
    copy_is_dst = all(a.data_ptr() == b.data_ptr() for a, b in zip(c, d))
    d_at, s_at, f_at, c_at, sizes, chunk_tensor, chunk_start = _tables([d, s, f, c], device)
    _outer_kernel[(len(chunk_tensor),)](
        d_at,
        s_at,
        f_at,
        c_at,
        sizes,
        chunk_tensor,
        chunk_start,
        float(w),
        DST=_TL[d[0].dtype],
        SRC=_TL[s[0].dtype],
        FAST=_TL[f[0].dtype],
        HAS_FAST=fast is not None,
        COPY_IS_DST=copy_is_dst,
        MASTER=s[0].dtype != d[0].dtype,
        BLOCK=BLOCK,
    )


outer_step.forms_master = True  # type: ignore[attr-defined]
