"""Benchmark: one aggregation step (T×P per-task gradients in, P-vector update out), on CPU.

Compares metaopt's PCGrad and GradVac with TorchJD's ``PCGrad()`` and ``GradVac()``
aggregators (both include the Gramian ``J Jᵀ`` and the combination ``wᵀJ``). Also times the
Gramian-to-weights part alone and the floor that any Gramian-based method pays (one Gramian and
one ``wᵀJ``).

Run::

    python benchmarks/aggregation.py            # T in {2, 8, 40}, P in {1e5, 1e6, 1e7}
    python benchmarks/aggregation.py --quick    # P in {1e5, 1e6}, fewer repeats

TorchJD is optional (``pip install torchjd`` or the ``bench`` extra); without it only
metaopt's timings are printed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metaopt.aggregation import (  # noqa: E402
    aggregate,
    gradvac,
    gradvac_weights,
    gramian,
    pcgrad,
    pcgrad_weights,
    random_order,
)

try:
    import torchjd.aggregation as tjd
except ImportError:  # pragma: no cover - depends on the environment
    tjd = None


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_cell(T: int, P: int, repeats: int, beta: float) -> dict[str, float]:
    """Median seconds of each variant; variants are interleaved so that load drifts hit all."""
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(T, P, generator=gen)
    out = torch.empty(P)
    G = gramian(J)
    state = {"targets": torch.zeros(T, T, dtype=torch.float64)}

    def mo_pcgrad() -> None:
        pcgrad(J, generator=gen, out=out)

    def mo_pcgrad_alloc() -> None:
        pcgrad(J, generator=gen)

    def mo_gradvac() -> None:
        _, _, state["targets"] = gradvac(
            J, targets=state["targets"], beta=beta, generator=gen, out=out
        )

    def mo_pc_weights() -> None:
        pcgrad_weights(G, random_order(T, gen))

    def mo_gv_weights() -> None:
        gradvac_weights(G, random_order(T, gen), state["targets"], beta)

    def floor() -> None:
        gramian(J)
        aggregate(J, torch.ones(T), out=out)

    variants: dict[str, Callable[[], None]] = {
        "mo_pcgrad": mo_pcgrad,
        "mo_pcgrad_alloc": mo_pcgrad_alloc,
        "mo_gradvac": mo_gradvac,
        "mo_pc_weights": mo_pc_weights,
        "mo_gv_weights": mo_gv_weights,
        "floor": floor,
    }
    if tjd is not None:
        tjd_pc, tjd_gv = tjd.PCGrad(), tjd.GradVac(beta=beta)
        tjd_pcw, tjd_gvw = tjd.PCGradWeighting(), tjd.GradVacWeighting(beta=beta)
        variants.update(
            {
                "tjd_pcgrad": lambda: tjd_pc(J),
                "tjd_gradvac": lambda: tjd_gv(J),
                "tjd_pc_weights": lambda: tjd_pcw(G),
                "tjd_gv_weights": lambda: tjd_gvw(G),
            }
        )
    for fn in variants.values():  # warm-up (first-touch allocations, lazy init)
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    # A fresh order every repeat: whichever call comes first after a long Python-only stretch
    # (TorchJD's weight loops) pays for waking the BLAS threads, so no variant keeps that seat.
    shuffler = random.Random(T * P)
    names = list(variants)
    for _ in range(repeats):
        shuffler.shuffle(names)
        for name in names:
            times[name].append(timed(variants[name]))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="P in {1e5, 1e6}, fewer repeats")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", type=int, nargs="*", default=[2, 8, 40])
    parser.add_argument("--sizes", type=float, nargs="*", default=None)
    parser.add_argument("--beta", type=float, default=0.01, help="GradVac EMA rate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(p) for p in (args.sizes or ([1e5, 1e6] if args.quick else [1e5, 1e6, 1e7]))]

    tjd_version = importlib.metadata.version("torchjd") if tjd is not None else None
    print(f"# CPU: {cpu_model()}, torch.get_num_threads() = {torch.get_num_threads()}")
    tjd_text = tjd_version or "not installed"
    print(f"# torch {torch.__version__}, torchjd {tjd_text}, Python {platform.python_version()}")
    if tjd is None:
        print("# torchjd is not installed: `pip install torchjd` (or the `bench` extra) to compare")
    print("# median ms per call; ratio = torchjd / metaopt (higher: metaopt faster)")
    print()
    header = (
        "| T | P | floor: G + wᵀJ | PCGrad metaopt | (no out=) | PCGrad torchjd | ratio "
        "| GradVac metaopt | GradVac torchjd | ratio "
        "| PCGrad w(G) mo / tjd | GradVac w(G) mo / tjd |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    total0 = time.perf_counter()
    for T in args.tasks:
        for P in sizes:
            big = T * P >= 10**8
            repeats = 5 if big else (7 if T * P >= 10**7 else (9 if args.quick else 21))
            r = bench_cell(T, P, repeats, args.beta)
            ms = {k: v * 1e3 for k, v in r.items()}

            def ratio(a: str, b: str, ms: dict[str, float] = ms) -> str:
                return f"{ms[a] / ms[b]:.1f}x" if a in ms else "-"

            def val(k: str, ms: dict[str, float] = ms) -> str:
                return f"{ms[k]:.2f}" if k in ms else "-"

            print(
                f"| {T} | {P:.0e} | {ms['floor']:.2f} | {ms['mo_pcgrad']:.2f} "
                f"| {ms['mo_pcgrad_alloc']:.2f} "
                f"| {val('tjd_pcgrad')} | {ratio('tjd_pcgrad', 'mo_pcgrad')} "
                f"| {ms['mo_gradvac']:.2f} | {val('tjd_gradvac')} "
                f"| {ratio('tjd_gradvac', 'mo_gradvac')} "
                f"| {ms['mo_pc_weights']:.3f} / {val('tjd_pc_weights')} "
                f"| {ms['mo_gv_weights']:.3f} / {val('tjd_gv_weights')} |",
                flush=True,
            )
    print(f"\n# total {time.perf_counter() - total0:.0f} s")


if __name__ == "__main__":
    main()
