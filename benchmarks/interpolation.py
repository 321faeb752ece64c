"""Time each interpolation path on an mBERT-shaped parameter list against the copy floor.

The Reptile outer step reads φ and θ and writes φ and θ: four passes over the parameters. A
plain ``copy_`` of the same bytes is two passes, so the floor is twice the copy time. Prints,
per path, the median time, the effective bandwidth (4 passes) and the ratio to the floor.

The paths are the engine's (``"auto"``: a kernel registered for the device type, else
foreach; ``"foreach"``; ``"reference"``). For comparison only, one ``lerp_`` + ``copy_`` over a
single flat buffer is timed too: what packing the parameters into one buffer would buy, which
metaopt no longer does (it re-pointed the model's tensors; see metaopt.interpolation).

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


def _flat_step(phi: torch.Tensor, theta: torch.Tensor, weight: float) -> None:
    """φ ← φ + w (θ − φ); θ ← φ over one flat buffer each (the comparison row)."""
    phi.lerp_(theta.to(phi.dtype) if theta.dtype != phi.dtype else theta, weight)
    theta.copy_(phi)


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
    for method, name in [
        ("auto", "auto (engine default: {path})"),
        ("foreach", "foreach (_foreach_lerp_ + _foreach_copy_)"),
        ("reference", "reference (per-tensor loop)"),
    ]:
        fast = fresh()
        engine = Interpolator(fast, method=method)  # type: ignore[arg-type]
        t = median_time(partial(engine.interpolate, 0.1), repeat=args.repeat, device=device)
        rows.append((name.format(path="+".join(engine.path())), t))
        del engine, fast
    # not a metaopt path: the single flat buffer that packing the parameters would give
    theta = torch.randn(n, generator=g).to(device=device, dtype=dtype)
    phi = theta.to(torch.float32 if master == 4 else dtype, copy=True)
    t = median_time(partial(_flat_step, phi, theta, 0.1), repeat=args.repeat, device=device)
    rows.append(("one flat buffer, lerp_ + copy_ (comparison)", t))
    del theta, phi
    print(f"{'path':45s} {'ms':>8s} {'GB/s':>8s} {'x floor':>8s}")
    for name, t in rows:
        print(f"{name:45s} {t * 1e3:8.2f} {nbytes / t / 1e9:8.1f} {t / floor:8.2f}")


if __name__ == "__main__":
    main()
