"""Time each interpolation path on an mBERT-shaped parameter list against the copy floor.

The Reptile outer step reads φ and θ and writes φ and θ: four passes over the parameters. A
plain ``copy_`` of the same bytes is two passes, so the floor is twice the copy time. Prints,
per path, the median time, the effective bandwidth (4 passes) and the ratio to the floor.

    python benchmarks/interpolation.py                 # CPU, scaled-down mBERT (about 22M params)
    python benchmarks/interpolation.py --scale 1       # full size, 177.9M params (a GPU)
    python benchmarks/interpolation.py --device cuda --scale 1
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metaopt.functional import pack_parameters
from metaopt.interpolation import Interpolator

from _timing import machine, median_time


def mbert_shapes(scale: int = 1) -> list[tuple[int, ...]]:
    """The 199 parameter shapes of multilingual BERT-base, hidden and vocab divided by ``scale``."""
    h, vocab, inter = 768 // scale, 119547 // scale, 3072 // scale
    shapes: list[tuple[int, ...]] = [(vocab, h), (512, h), (2, h), (h,), (h,)]
    for _ in range(12):
        shapes += [(h, h), (h,)] * 4  # q, k, v, attention output
        shapes += [(h,), (h,)]  # attention LayerNorm
        shapes += [(inter, h), (inter,), (h, inter), (h,)]
        shapes += [(h,), (h,)]  # output LayerNorm
    shapes += [(h, h), (h,)]  # pooler
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--scale", type=int, default=None, help="divide hidden and vocab sizes (default 1 on GPU, 3 on CPU)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    scale = args.scale if args.scale is not None else (1 if device.type == "cuda" else 3)
    dtype = getattr(torch, args.dtype)
    shapes = mbert_shapes(scale)
    g = torch.Generator().manual_seed(0)

    def fresh() -> list[torch.Tensor]:
        return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]

    n = sum(torch.Size(s).numel() for s in shapes)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    master = 4 if dtype in (torch.float16, torch.bfloat16) else itemsize
    nbytes = 2 * n * itemsize + 2 * n * master  # read θ, φ; write φ, θ
    print(f"{len(shapes)} tensors, {n / 1e6:.1f}M parameters ({args.dtype}), device {device}")
    print(f"machine: {machine()}")

    src = torch.randn(n, generator=g).to(device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    t_copy = median_time(lambda: dst.copy_(src), repeat=args.repeat, device=device)
    copy_bw = 2 * n * 4 / t_copy
    floor = nbytes / copy_bw
    print(
        f"copy_ of {n * 4 / 1e6:.0f} MB: {t_copy * 1e3:.2f} ms = {copy_bw / 1e9:.1f} GB/s "
        f"(read+write); floor for the outer step = {floor * 1e3:.2f} ms\n"
    )

    rows = []
    variants = [
        ("flat (engine default)", True, "flat", None),
        ("flat unblocked (lerp_ + copy_)", True, "flat", 0),
        ("flat, 1M-element blocks", True, "flat", 1 << 20),
        ("foreach (_foreach_lerp_ + _foreach_copy_)", False, "foreach", None),
        ("reference (per-tensor loop)", False, "reference", None),
    ]
    for name, packed, method, block in variants:
        fast = fresh()
        if packed:
            pack_parameters(fast)
        engine = Interpolator(fast, method=method, block_size=block)  # type: ignore[arg-type]
        t = median_time(partial(engine.interpolate, 0.1), repeat=args.repeat, device=device)
        rows.append((name, t))
        del engine, fast
    print(f"{'path':45s} {'ms':>8s} {'GB/s':>8s} {'x floor':>8s}")
    for name, t in rows:
        print(f"{name:45s} {t * 1e3:8.2f} {nbytes / t / 1e9:8.1f} {t / floor:8.2f}")


if __name__ == "__main__":
    main()
