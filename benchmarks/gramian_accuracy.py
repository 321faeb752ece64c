"""The Triton Gramian kernel's accuracy on random rows of any range, against float64.

Draws ``--cases`` random (T, P) matrices: T up to 32 rows, P up to 5,000 columns, each row
scaled by 10^e with e in [-30, 30] for float32 and [-3, 3] for half, with a random offset. Each
case's error is the largest ``|G − G64| / (‖g_i‖ ‖g_j‖)`` over its entries, where G64 is
``J Jᵀ`` in float64 from the same entries. Prints the worst case and the bound the kernel
promises (log2(BLOCK) + 1 float32 roundings).

On a CPU the kernel runs through Triton's interpreter (set before Triton loads)::

    python benchmarks/gramian_accuracy.py --cases 200            # docs/performance.md's figure
    python benchmarks/gramian_accuracy.py --device cuda          # on a GPU
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton  # type: ignore[import-untyped]

    from metaopt.triton_gramian import block, gramian_float64

    rng = random.Random(args.seed)
    worst, where = 0.0, ""
    for case in range(args.cases):
        T = rng.choice([1, 2, 3, 8, 9, 17, 32])
        P = rng.choice([1, 5, 17, 129, 1000, 5000])
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
        span = 30 if dtype == torch.float32 else 3
        g = torch.Generator().manual_seed(case)
        scale = torch.tensor([10.0 ** rng.randint(-span, span) for _ in range(T)], dtype=torch.float64)
        J = (
            (torch.randn(T, P, generator=g, dtype=torch.float64) + rng.choice([0.0, 0.1, 3.0]))
            * scale[:, None]
        ).to(dtype)
        exact = J.double() @ J.double().T
        norms = exact.diagonal().sqrt()
        G = gramian_float64(J.to(args.device)).cpu()
        err = float(((G - exact).abs() / (norms[:, None] * norms[None, :])).max())
        if err > worst:
            worst, where = err, f"T = {T}, P = {P}, {str(dtype).replace('torch.', '')}"
    bound = (math.log2(block(1)) + 1) * torch.finfo(torch.float32).eps / 2
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    print(f"# benchmarks/gramian_accuracy.py on {args.device}; {versions}")
    print(f"{args.cases} cases: largest error {worst:.3g} of the rows' norms ({where}); bound {bound:.3g}")


if __name__ == "__main__":
    main()
