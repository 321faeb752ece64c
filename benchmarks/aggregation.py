"""Benchmark: one aggregation step (T×P per-task gradients in, P-vector update out), on CPU.

Compares metaopt's PCGrad and GradVac with TorchJD's ``PCGrad()`` and ``GradVac()``
aggregators (both include the Gramian ``J Jᵀ`` and the combination ``wᵀJ``). Also times the
Gramian-to-weights part alone and the floor that any Gramian-based method pays (one Gramian and
one ``wᵀJ``).

Run::

    python benchmarks/aggregation.py            # T in {2, 8, 40}, P in {1e5, 1e6, 1e7}
    python benchmarks/aggregation.py --quick    # P in {1e5, 1e6}, fewer repeats
    python benchmarks/aggregation.py --baseline ../old-checkout   # before / after, see below
    python benchmarks/aggregation.py --step     # whole training steps against TorchJD, see below

TorchJD is optional (the ``bench`` extra: ``pip install torchjd matplotlib tqdm``); without it only
metaopt's timings are printed.

``--baseline DIR`` loads a second copy of metaopt from the checkout ``DIR`` (for instance a
``git worktree`` of the previous commit) and times it side by side with this checkout's,
interleaved in one process, instead of the TorchJD table: ``pcgrad`` and ``gradvac`` for each
T and P, then one ``PCGrad.step`` / ``GradVac.step`` on a model with a shared 1000×1000 layer
(P = 1.0e6) and T heads (T = 9, or ``--surgery-tasks``), both as a whole (nine backward passes
included) and with the Jacobian already computed (only the aggregation, the checks and the SGD step).

``--step`` times whole training steps instead, on two cases (``STEP_CASES``): T = 40 tasks on one
shared 200×100 layer (P = 2e4) and T = 16 tasks on a shared MLP 256-1024-1024-128 (P = 1.4e6),
each task with its own batch (``--batch``, default 32) and an MSE loss. The T losses are computed
first, untimed (their forward time is printed apart); then one step is timed: metaopt's
``PCGrad(...).step(losses)`` / ``GradVac(...).step(losses)`` against TorchJD's
``autojac.backward(losses)`` + ``jac_to_grad(params, PCGrad())`` / ``GradVac(beta)`` + the same
SGD step. Ratio = metaopt / TorchJD (lower: metaopt faster). The last column is the peak resident
memory a first step on a fresh model adds (beyond the losses' graphs; metaopt's buffers kept
between steps included), each library measured in a fresh process. With ``--baseline DIR`` the
metaopt of ``DIR`` runs in the same loop ("before").
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metaopt._extras import install_hint
from metaopt.aggregation import (
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
        _, _, state["targets"] = gradvac(J, targets=state["targets"], beta=beta, generator=gen, out=out)

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


def load_checkout(path: str, name: str) -> ModuleType:
    """Import the metaopt package of the checkout at ``path`` under the module name ``name``
    (the package imports itself relatively, so two copies live side by side)."""
    root = Path(path).resolve() / "metaopt"
    spec = importlib.util.spec_from_file_location(
        name, root / "__init__.py", submodule_search_locations=[str(root)]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline: no metaopt package under {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, seed: int) -> dict[str, list[float]]:
    """Seconds of every call, the variants in a fresh random order on every repeat."""
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    shuffler = random.Random(seed)
    for _ in range(repeats):
        shuffler.shuffle(names)
        for name in names:
            times[name].append(timed(variants[name]))
    return times


def paired(times: dict[str, list[float]], new: str, old: str) -> str:
    """Median of new/old over the repeats (each pair ran in the same repeat), and both medians."""
    ratio = statistics.median(a / b for a, b in zip(times[new], times[old]))
    return (
        f"{statistics.median(times[old]) * 1e3:.2f} | {statistics.median(times[new]) * 1e3:.2f} | {ratio:.3f}"
    )


def surgery_variants(
    pkg: ModuleType, tag: str, T: int, width: int, beta: float
) -> dict[str, Callable[[], object]]:
    """One full step and one step on a precomputed Jacobian, for PCGrad and GradVac of ``pkg``."""
    out: dict[str, Callable[[], object]] = {}
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, width, generator=gen) for _ in range(T)]
    ys = [torch.randn(16, 1, generator=gen) for _ in range(T)]
    tasks = [f"t{i}" for i in range(T)]
    for method in ("PCGrad", "GradVac"):
        torch.manual_seed(0)
        enc = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh())
        heads = torch.nn.ModuleList(torch.nn.Linear(width, 1) for _ in range(T))
        params = [*enc.parameters(), *heads.parameters()]
        kw = {"beta": beta} if method == "GradVac" else {}
        opt = getattr(pkg, method)(
            torch.optim.SGD(params, lr=1e-6), tasks=tasks, shared=enc.parameters(), seed=0, **kw
        )

        def losses(enc: torch.nn.Module = enc, heads: torch.nn.ModuleList = heads) -> dict[str, torch.Tensor]:
            return {t: torch.nn.functional.mse_loss(heads[i](enc(xs[i])), ys[i]) for i, t in enumerate(tasks)}

        out[f"{tag} {method} step"] = lambda opt=opt, losses=losses: opt.step(losses())
        # the same step on a fixed Jacobian: this package's task_jacobian, replaced for this
        # optimizer only, fills its buffer by a copy (the same copy for both packages)
        opt.step(losses())
        J = opt._jacobian.clone()
        reached = torch.ones(T, len(params), dtype=torch.bool)
        for i in range(T):
            for k, p in enumerate(params):
                if any(p is q for h, head in enumerate(heads) if h != i for q in head.parameters()):
                    reached[i, k] = False
        module = sys.modules[f"{pkg.__name__}.surgery"]
        result = sys.modules[f"{pkg.__name__}.jacobian"].TaskJacobian
        real = module.task_jacobian
        cheap = {t: sum(p.sum() for p in params) * 0.0 for t in tasks}

        def fixed_step(
            opt: object = opt,
            J: torch.Tensor = J,
            reached: torch.Tensor = reached,
            module: ModuleType = module,
            real: Callable[..., object] = real,
            result: type = result,
            cheap: dict[str, torch.Tensor] = cheap,
        ) -> None:
            def fill(losses: object, params: object, *, out: torch.Tensor, **kw: object) -> object:
                out.copy_(J)
                return result(out, reached)

            module.task_jacobian = fill
            try:
                opt.step(cheap)  # type: ignore[attr-defined]
            finally:
                module.task_jacobian = real

        out[f"{tag} {method} aggregation"] = fixed_step
    return out


def compare(
    baseline: str, tasks: list[int], sizes: list[int], quick: bool, beta: float, surgery_tasks: list[int]
) -> None:
    """Before / after: the checkout at ``baseline`` against this one, interleaved."""
    old = load_checkout(baseline, "metaopt_baseline")
    new = load_checkout(str(Path(__file__).resolve().parents[1]), "metaopt_current")
    print(f"# before: {Path(baseline).resolve()}; after: this checkout")
    print("# median ms per call; after/before = median over repeats of the paired ratio\n")
    print("| T | P | PCGrad before | after | after/before | GradVac before | after | after/before |")
    print("|---|---|---|---|---|---|---|---|")
    for T in tasks:
        for P in sizes:
            gen = torch.Generator().manual_seed(0)
            J = torch.randn(T, P, generator=gen)
            buf = torch.empty(P)
            variants: dict[str, Callable[[], object]] = {}
            for tag, pkg in (("old", old), ("new", new)):
                agg = pkg.aggregation
                state = {"t": torch.zeros(T, T, dtype=torch.float64)}

                def pc(
                    agg: ModuleType = agg,
                    J: torch.Tensor = J,
                    gen: torch.Generator = gen,
                    buf: torch.Tensor = buf,
                ) -> None:
                    agg.pcgrad(J, generator=gen, out=buf)

                def gv(
                    agg: ModuleType = agg,
                    state: dict[str, torch.Tensor] = state,
                    J: torch.Tensor = J,
                    gen: torch.Generator = gen,
                    buf: torch.Tensor = buf,
                ) -> None:
                    _, _, state["t"] = agg.gradvac(J, targets=state["t"], beta=beta, generator=gen, out=buf)

                variants[f"{tag} pc"], variants[f"{tag} gv"] = pc, gv
            big = T * P >= 10**7
            times = interleaved(variants, 7 if big else (11 if quick else 21), T * P)
            print(
                f"| {T} | {P:.0e} | {paired(times, 'new pc', 'old pc')} "
                f"| {paired(times, 'new gv', 'old gv')} |",
                flush=True,
            )
    width = 1000
    P = width * width + width
    print(f"\nSurgery step, shared P = {P:.2e} (+ T heads), SGD:\n")
    print("| T | step | before | after | after/before |")
    print("|---|---|---|---|---|")
    for T in surgery_tasks:
        variants = {
            **surgery_variants(old, "old", T, width, beta),
            **surgery_variants(new, "new", T, width, beta),
        }
        times = interleaved(variants, 9 if quick else 25, 7)
        for method in ("PCGrad", "GradVac"):
            for part in ("step", "aggregation"):
                print(
                    f"| {T} | {method} {part} "
                    f"| {paired(times, f'new {method} {part}', f'old {method} {part}')} |",
                    flush=True,
                )


# ---------------------------------------------------------------------------------------------
# --step: whole training steps against TorchJD


# name -> (T, widths of the shared model's linear layers, bias). Each task has its own batch
# through the shared model (no heads): TorchJD's ``autojac.backward`` then back-propagates
# every loss through every task's branch (one vmapped pass), metaopt one pass per task.
STEP_CASES: dict[str, tuple[int, list[int], bool]] = {
    "T=40, P=2e4": (40, [200, 100], False),  # one 200x100 layer: P = 20,000
    "MLP T=16, P=1.4e6": (16, [256, 1024, 1024, 128], True),  # P = 1,443,968
}


def shared_model(widths: list[int], bias: bool) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for k, (a, b) in enumerate(zip(widths, widths[1:])):
        if k:
            layers.append(torch.nn.ReLU())
        layers.append(torch.nn.Linear(a, b, bias=bias))
    return torch.nn.Sequential(*layers)


def step_pair(
    case: str, lib: str, method: str, batch: int, beta: float, package: ModuleType | None = None
) -> tuple[Callable[[], list[torch.Tensor]], Callable[[list[torch.Tensor]], None]]:
    """``forward() -> losses`` (one per task, each on its own batch) and ``step(losses)`` (the
    library's backward, aggregation and an SGD step) on a fresh copy of the case's model. ``lib``
    is ``"metaopt"`` (this checkout's, or ``package``) or ``"torchjd"``."""
    T, widths, bias = STEP_CASES[case]
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(T, batch, widths[0], generator=gen)
    ys = torch.randn(T, batch, widths[-1], generator=gen)
    torch.manual_seed(0)
    model = shared_model(widths, bias)
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, lr=1e-3)

    def forward() -> list[torch.Tensor]:
        return [torch.nn.functional.mse_loss(model(xs[i]), ys[i]) for i in range(T)]

    if lib == "metaopt":
        if package is None:
            import metaopt as package
        names = [f"t{i}" for i in range(T)]
        kw = {"beta": beta} if method == "GradVac" else {}
        opt = getattr(package, method)(sgd, tasks=names, seed=0, **kw)

        def step(losses: list[torch.Tensor]) -> None:
            opt.step(dict(zip(names, losses)))

        return forward, step
    from torchjd.autojac import backward, jac_to_grad

    agg = tjd.PCGrad() if method == "PCGrad" else tjd.GradVac(beta=beta)

    def tjd_step(losses: list[torch.Tensor]) -> None:
        backward(losses)
        jac_to_grad(params, agg)
        sgd.step()
        sgd.zero_grad()

    return forward, tjd_step


def memory_probe(case: str, lib: str, method: str, batch: int, beta: float) -> float | None:
    """Peak memory (MB) a library's first step on a fresh model adds over what the losses' graphs
    hold: its transient memory and what it keeps between steps (metaopt's Jacobian and gradient
    buffers). Run by ``--memory-probe`` in a fresh process, after two steps on another copy of
    the model (so that neither library's one-time set-up counts); resident memory, as
    benchmarks/multilingual/system.py measures it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from multilingual.system import PeakMemory

    forward, step = step_pair(case, lib, method, batch, beta)
    for _ in range(2):
        step(forward())
    del forward, step
    gc.collect()
    forward, step = step_pair(case, lib, method, batch, beta)
    losses = forward()
    peak = PeakMemory(torch.device("cpu"))
    peak.start()
    step(losses)
    return peak.peak_mb()


def probe_in_subprocess(case: str, lib: str, method: str, batch: int, beta: float, threads: int) -> str:
    cmd = [sys.executable, __file__, "--threads", str(threads), "--batch", str(batch), "--beta", str(beta)]
    cmd += ["--memory-probe", case, lib, method]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()
    return out[-1] if out else "n/a"


def load_text() -> str:
    try:
        return "load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average n/a"


def whole_steps(
    cases: list[str], batch: int, beta: float, repeats: int | None, threads: int, baseline: str | None
) -> None:
    """Median ms of one step (the losses computed before the clock starts) and the median of the
    per-repeat ratios metaopt / TorchJD (lower: metaopt faster), all variants interleaved in a
    fresh random order every repeat; then the peak memory each step adds, each in a fresh
    process. With ``baseline``, the metaopt of that checkout runs beside this one ("before")."""
    before = None if baseline is None else load_checkout(baseline, "metaopt_baseline")
    libs = ["metaopt", "torchjd"] + ([] if before is None else ["before"])
    print(f"# {load_text()} (start)")
    print(f"# per-task batch {batch}; ratio = metaopt / TorchJD, median of the per-repeat ratios")
    if before is not None:
        print(f"# before: the metaopt of {Path(baseline).resolve()}")  # type: ignore[arg-type]
    print()
    extra = "| before | before / TorchJD " if before is not None else ""
    print(
        f"| case | method | forward (untimed) | metaopt | TorchJD | metaopt / TorchJD {extra}"
        "| extra MB metaopt / TorchJD |"
    )
    print("|---" * (7 + 2 * (before is not None)) + "|")
    for case in cases:
        pairs = {
            (lib, method): step_pair(
                case,
                "torchjd" if lib == "torchjd" else "metaopt",
                method,
                batch,
                beta,
                before if lib == "before" else None,
            )
            for lib in libs
            for method in ("PCGrad", "GradVac")
        }
        forward = pairs["metaopt", "PCGrad"][0]
        for fwd, step in pairs.values():  # warm-up
            step(fwd())
        times: dict[object, list[float]] = {key: [] for key in [*pairs, "forward"]}
        T, widths, _ = STEP_CASES[case]
        n = repeats or (7 if T * sum(a * b for a, b in zip(widths, widths[1:])) > 10**7 else 21)
        order = list(times)
        shuffler = random.Random(n)
        for _ in range(n):
            shuffler.shuffle(order)
            for key in order:
                if key == "forward":
                    times[key].append(timed(forward))
                    continue
                fwd, step = pairs[key]  # type: ignore[index]
                losses = fwd()
                t0 = time.perf_counter()
                step(losses)
                times[key].append(time.perf_counter() - t0)
        del pairs

        def ms(key: object, times: dict[object, list[float]] = times) -> str:
            return f"{statistics.median(times[key]) * 1e3:.1f}"

        def ratio(lib: str, method: str, times: dict[object, list[float]] = times) -> str:
            pairs_ = zip(times[lib, method], times["torchjd", method])
            return f"{statistics.median(a / b for a, b in pairs_):.3f}"

        for method in ("PCGrad", "GradVac"):
            mem = [
                probe_in_subprocess(case, lib, method, batch, beta, threads) for lib in ("metaopt", "torchjd")
            ]
            try:
                mem_text = f"{mem[0]} / {mem[1]} ({float(mem[0]) / float(mem[1]):.2f}x)"
            except ValueError:
                mem_text = f"{mem[0]} / {mem[1]}"
            cells = [case, method, ms("forward"), ms(("metaopt", method)), ms(("torchjd", method))]
            cells.append(ratio("metaopt", method))
            if before is not None:
                cells += [ms(("before", method)), ratio("before", method)]
            print("| " + " | ".join(cells + [mem_text]) + " |", flush=True)
    print(f"\n# {load_text()} (end)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="P in {1e5, 1e6}, fewer repeats")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", type=int, nargs="*", default=[2, 8, 40])
    parser.add_argument("--sizes", type=float, nargs="*", default=None)
    parser.add_argument("--beta", type=float, default=0.01, help="GradVac EMA rate")
    parser.add_argument(
        "--baseline", default=None, help="checkout of metaopt to compare with, before / after (see above)"
    )
    parser.add_argument(
        "--surgery-tasks",
        type=int,
        nargs="*",
        default=[9],
        help="T of the surgery-step model with --baseline",
    )
    parser.add_argument(
        "--step",
        action="store_true",
        help="whole training steps against TorchJD (T=40, P=2e4 and an MLP with T=16, P=1.4e6)",
    )
    parser.add_argument("--cases", nargs="*", default=list(STEP_CASES), help="--step: cases to run")
    parser.add_argument("--batch", type=int, default=32, help="--step: examples per task")
    parser.add_argument("--repeats", type=int, default=None, help="--step: repeats (default 21, MLP 7)")
    parser.add_argument("--memory-probe", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe is not None:  # one step's peak memory, in this fresh process
        case, lib, method = args.memory_probe
        mb = memory_probe(case, lib, method, batch=args.batch, beta=args.beta)
        print("n/a" if mb is None else f"{mb:.1f}")
        return
    if args.step:
        if tjd is None:
            raise SystemExit(f"--step compares with TorchJD: {install_hint('bench')}")
        print(f"# CPU: {cpu_model()}, torch.get_num_threads() = {torch.get_num_threads()}")
        print(
            f"# torch {torch.__version__}, torchjd {importlib.metadata.version('torchjd')}, "
            f"Python {platform.python_version()}"
        )
        whole_steps(args.cases, args.batch, args.beta, args.repeats, args.threads, args.baseline)
        return
    sizes = [int(p) for p in (args.sizes or ([1e5, 1e6] if args.quick else [1e5, 1e6, 1e7]))]
    if args.baseline is not None:
        print(f"# CPU: {cpu_model()}, torch.get_num_threads() = {torch.get_num_threads()}")
        print(f"# torch {torch.__version__}, Python {platform.python_version()}")
        compare(args.baseline, args.tasks, sizes, args.quick, args.beta, args.surgery_tasks)
        return

    tjd_version = importlib.metadata.version("torchjd") if tjd is not None else None
    print(f"# CPU: {cpu_model()}, torch.get_num_threads() = {torch.get_num_threads()}")
    tjd_text = tjd_version or "not installed"
    print(f"# torch {torch.__version__}, torchjd {tjd_text}, Python {platform.python_version()}")
    if tjd is None:
        print(f"# torchjd is not installed (to compare: {install_hint('bench')})")
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
