"""A Triton kernel for the Gramian ``G = J Jᵀ`` of float32 (or half) per-task gradients, in
one pass over ``J``, accurate to float64's range and to about 1e-7 of the gradients' norms.

The float64 path of :func:`metaopt.aggregation.gramian` upcasts ``J`` chunk by chunk; on a GPU
that costs a float64 copy of every chunk and one launch per chunk. This kernel reads ``J``
once. Each program walks tiles of BLOCK columns (:func:`block`) of all T rows. For each tile it:

* scales each row by a power of two (exact) so that its largest entry is in [0.5, 1): no
  product overflows float32 and none that matters underflows, whatever the gradients' range;
* multiplies the tile by its transpose in float32, every product rounded once and the BLOCK
  products of a pair summed as a tree (no TF32, no tensor cores): an error of at most
  log2(BLOCK) + 1 float32 roundings (about 5e-7) relative to the product of the two rows'
  norms over the tile;
* adds the product, scaled back by the two powers of two, into a float64 accumulator.

The programs' T×T partial sums are added in float64 by torch, in a fixed order (no atomics:
the same bits at every run). The result is float64. Every finite float32 ``J`` gives a finite
Gramian, as on the float64 path, and a non-finite entry gives a non-finite diagonal. Exactly
antiparallel rows still cancel exactly: ``x·(−x)`` is ``−(x·x)`` bit for bit.

:func:`metaopt.aggregation.gramian` takes it for a 2-d float32, float16 or bfloat16 ``J`` on
CUDA with ``dtype=torch.float64`` (what PCGrad and GradVac ask for), when Triton is installed.
Tested on the CPU through Triton's interpreter against float64 (``tests/test_triton_gramian.py``).
Example (needs ``triton``; on a CPU, set ``TRITON_INTERPRET=1`` before importing this module)::

    from metaopt.triton_gramian import gramian_float64
    G = gramian_float64(J)      # (T, T) float64, J: (T, P) float32 with unit column stride
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._extras import install_hint

try:
    import triton  # type: ignore[import-untyped]
    import triton.language as tl  # type: ignore[import-untyped]
except ImportError as err:  # pragma: no cover - the optional extra is missing
    raise ImportError(f"metaopt.triton_gramian needs Triton: {install_hint('triton')}") from err

from .triton_kernel import _TL, _as_master

__all__ = ["MAX_TASKS", "PROGRAMS", "block", "gramian_float64", "supports"]

MAX_TASKS = 32
"""The largest T the kernel takes (its T×T×BLOCK products live in registers); beyond, the
float64 path of :func:`metaopt.aggregation.gramian` runs."""

PROGRAMS = 512
"""At most this many programs, each with its own float64 partial Gramian (a few per SM of an
H100; fewer programs would leave the memory bandwidth unused, more would add partial sums)."""


@triton.jit
def _power_of_two(e, DTYPE: tl.constexpr):
    """2^e, exactly, for integer ``e`` in the normal range of ``DTYPE`` (float32 or float64),
    built from its exponent bits."""
    if DTYPE == tl.float64:
        return ((e.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _gramian_kernel(
    J,
    out,
    T,
    P,
    row_stride,
    tiles_per_program,
    DTYPE: tl.constexpr,
    TP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    J = J.to(tl.pointer_type(DTYPE))  # bfloat16 is read as its bits
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    rows = tl.arange(0, TP)
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros((TP, TP), dtype=tl.float64)
    for k in range(tiles_per_program):
        offs = (k * programs + pid) * BLOCK + cols  # tiles interleaved over the programs
        mask = (rows[:, None] < T) & (offs[None, :] < P)
        raw = tl.load(J + rows[:, None] * row_stride + offs[None, :], mask=mask, other=0)
        x = _as_master(raw, DTYPE, tl.float32)
        # each row's exponent: its largest entry is m·2^(E−127) with m in [1, 2); scaled by
        # 2^−(E−126) it lies in [0.5, 1). A zero or subnormal row has E = 0 (scaled by 2^126,
        # exactly), an inf or NaN one E = 255 (it stays non-finite).
        amax = tl.max(tl.abs(x), axis=1)
        e = ((amax.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 126
        half = e // 2  # two normal factors cover e in [-126, 129]
        xs = x * _power_of_two(-half, tl.float32)[:, None] * _power_of_two(half - e, tl.float32)[:, None]
        tile = tl.sum(xs[:, None, :] * xs[None, :, :], axis=2)  # one rounding per product, a tree
        scale = _power_of_two(e[:, None] + e[None, :], tl.float64)
        acc += tile.to(tl.float64) * scale
    tl.store(out + pid * TP * TP + rows[:, None] * TP + rows[None, :], acc)


def supports(J: Tensor) -> bool:
    """Whether :func:`gramian_float64` takes ``J``: 2-d, at most :data:`MAX_TASKS` rows,
    float32 or half, unit column stride."""
    return (
        J.ndim == 2
        and J.shape[0] <= MAX_TASKS
        and J.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and (J.stride(1) == 1 or J.shape[1] <= 1)
    )


def block(T: int) -> int:
    """Columns per tile for T rows: 8192 products in registers per program, 16 to 128 columns.
    The float32 error of a tile grows with log2 of it; the float64 sum over tiles adds almost
    none."""
    TP = triton.next_power_of_2(max(T, 1))
    return max(16, min(128, 8192 // (TP * TP)))


def gramian_float64(J: Tensor) -> Tensor:
    """``J Jᵀ`` in float64 for a (T, P) ``J`` that :func:`supports` takes, in one pass over
    ``J`` (see the module). Not made symmetric: :func:`metaopt.aggregation.gramian` does that."""
    if not supports(J):
        raise ValueError(
            f"gramian_float64: J must be 2-d float32/float16/bfloat16 with unit column stride and "
            f"at most {MAX_TASKS} rows, got {J.dtype} of shape {tuple(J.shape)} and strides {J.stride()}"
        )
    T, P = J.shape
    TP = triton.next_power_of_2(max(T, 1))
    BLOCK = block(T)
    tiles = triton.cdiv(P, BLOCK)
    programs = max(1, min(PROGRAMS, tiles))
    out = torch.empty((programs, TP, TP), dtype=torch.float64, device=J.device)
    if T:
        _gramian_kernel[(programs,)](
            J,
            out,
            T,
            P,
            J.stride(0),
            triton.cdiv(tiles, programs),
            DTYPE=_TL[J.dtype],
            TP=TP,
            BLOCK=BLOCK,
        )
    else:
        out.zero_()
    return out.sum(0)[:T, :T]
