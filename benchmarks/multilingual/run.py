"""The multilingual benchmark: Sequential Reptile's four claims on real data, offline.

    python benchmarks/multilingual/run.py            # default: about 4-7 min on 2 CPU cores
    python benchmarks/multilingual/run.py --smoke    # every method end to end, < 1 min
    python benchmarks/multilingual/run.py --full --device cuda   # 5 seeds, 10k steps, for a GPU

Fine-tunes the top of USE-multilingual v3 (``--encoder minilm``: all-MiniLM-L6-v2) on CLDR
entity typing in T languages with every method through the one metaopt loop, the same
examples, the same AdamW and the same lr grid, then writes ``<out>/<suite>.json``,
``<out>/<suite>.md`` and PNG figures. See README.md here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make the package importable (PEP 366), and measure the
    # metaopt of this checkout, not whichever copy the environment has installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "multilingual"

import torch
from tqdm import tqdm

from .analysis import Analysis
from .backbone import ENCODERS, check_installed
from .cache import DiskCache, default_cache_dir
from .config import ALL_METHODS, SUITES, Config, preset, with_overrides
from .data import check_language
from .methods import METHODS
from .plots import all_figures
from .prepare import Bench, build_suites
from .report import markdown, reference_numbers, write_json
from .system import default_threads, load_average, machine, versions
from .train import warm_up
from .workers import default_workers, run_tasks

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _language(code: str) -> str:
    """argparse type: a babel code with enough entity data (the error names the code)."""
    try:
        check_language(code)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return code


def positive_number(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/multilingual/run.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny end-to-end run (< 1 min)")
    mode.add_argument(
        "--full",
        action="store_true",
        help="5 seeds, a 6-point lr grid, 10k steps (40 languages on minilm): for a GPU",
    )
    p.add_argument(
        "--suite",
        choices=SUITES,
        default="entity",
        help="benchmark suite (only 'entity' is built; 'lemma' is not)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=ALL_METHODS,
        metavar="METHOD",
        help=f"methods to run, from: {', '.join(ALL_METHODS)}",
    )
    p.add_argument(
        "--encoder",
        choices=ENCODERS,
        default=None,
        help="the pre-trained encoder: use (USE-multilingual v3, the default) or minilm "
        "(all-MiniLM-L6-v2, English)",
    )
    p.add_argument("--seeds", type=positive_number(int), metavar="N", help="number of seeds (0..N-1)")
    p.add_argument(
        "--lrs",
        nargs="+",
        type=positive_number(float),
        metavar="LR",
        help="the lr grid every method is run on",
    )
    p.add_argument(
        "--languages",
        nargs="+",
        type=_language,
        metavar="CODE",
        help="training languages (babel codes), one task each",
    )
    p.add_argument(
        "--zero-shot",
        nargs="+",
        type=_language,
        metavar="CODE",
        help="held-out languages for zero-shot evaluation",
    )
    p.add_argument(
        "--n-per-language",
        type=positive_number(int),
        metavar="N",
        help="labelled training names per language",
    )
    p.add_argument("--steps", type=positive_number(int), help="single-task steps per run (sets the examples)")
    p.add_argument("--inner-steps", type=positive_number(int), metavar="K", help="Sequential Reptile's K")
    p.add_argument("--outer-lr", type=positive_number(float), metavar="ETA", help="η of the Reptile family")
    p.add_argument("--frozen-layers", type=int, metavar="k", help="frozen bottom layers (0-5)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument(
        "--threads",
        type=positive_number(int),
        help="torch CPU threads (default: 1 on a CPU, torch's own on a GPU)",
    )
    p.add_argument(
        "--workers",
        type=positive_number(int),
        help="worker processes for the runs (default: one per core, at most 2, on a CPU; 1 on a GPU)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="output folder (default benchmarks/results, or benchmarks/results/smoke|full)",
    )
    p.add_argument("--cache-dir", type=Path, help=f"cache folder (default {default_cache_dir()})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--from-results",
        type=Path,
        metavar="JSON",
        help="rebuild the Markdown, the figures and the analysis of an existing "
        "results file (no training); written next to it unless --out is given",
    )
    return p


def config_from_args(args: argparse.Namespace, p: argparse.ArgumentParser) -> Config:
    """The preset of the chosen mode with the command line's overrides, validated."""
    base = preset("smoke" if args.smoke else "full" if args.full else "default", args.encoder or "use")
    cfg = with_overrides(
        base,
        suite=args.suite,
        train_languages=tuple(args.languages) if args.languages else None,
        zero_shot_languages=tuple(args.zero_shot) if args.zero_shot else None,
        methods=tuple(dict.fromkeys(args.methods)) if args.methods else None,
        seeds=tuple(range(args.seeds)) if args.seeds else None,
        lrs=tuple(args.lrs) if args.lrs else None,
        n_per_language=args.n_per_language,
        steps=args.steps,
        inner_steps=args.inner_steps,
        outer_lr=args.outer_lr,
        frozen_layers=args.frozen_layers,
        device=args.device,
        threads=args.threads,
    )
    if cfg.outer_lr > 1:
        p.error(f"--outer-lr must be in (0, 1], got {cfg.outer_lr}")
    if not 0 <= cfg.frozen_layers <= 5:
        p.error(f"--frozen-layers must be in 0..5, got {cfg.frozen_layers}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {cfg.device}: CUDA is not available")
    if cfg.device not in ("cpu",) and not cfg.device.startswith("cuda"):
        p.error(f"--device must be cpu or cuda[:N], got {cfg.device!r}")
    return cfg


def plan(cfg: Config) -> list[tuple[str, float, int]]:
    """(method, grid lr, seed) of every run, seed-major so that an interrupted run has complete
    comparisons for its first seeds."""
    return [(m, lr, seed) for seed in cfg.seeds for m in cfg.methods for lr in cfg.lrs]


def run_key(cfg: Config, method: str, lr: float, seed: int) -> tuple[Any, ...]:
    """Identity of the computation: runs with equal keys are the same computation (e.g. the
    control at lr·η and sampled MTL at that lr)."""
    m = METHODS[method]
    return (m.family, m.init, m.head_only, m.single_task, round(m.effective_lr(lr, cfg), 12), seed)


def execute(
    cfg: Config,
    bench: Bench,
    show_progress: bool,
    workers: int = 1,
    cache_dir: Path | None = None,
    threads: int = 1,
) -> list[dict[str, Any]]:
    """Every run of the plan, in this process or in ``workers`` worker processes
    (:mod:`workers`), with one progress bar (ETA) over all training examples. A run whose
    computation another run of the plan already is (:func:`run_key`) is trained once and
    recorded under both names."""
    runs = plan(cfg)
    first: dict[tuple[Any, ...], tuple[str, float, int]] = {}
    copies: dict[tuple[Any, ...], int] = {}
    for method, lr, seed in runs:
        key = run_key(cfg, method, lr, seed)
        first.setdefault(key, (method, lr, seed))
        copies[key] = copies.get(key, 0) + 1
    done: dict[tuple[Any, ...], dict[str, Any]] = {}
    with tqdm(
        total=cfg.examples * len(runs),
        unit="ex",
        unit_scale=True,
        desc="training",
        dynamic_ncols=True,
        disable=not show_progress,
        smoothing=0.05,
    ) as bar:
        for key, record in run_tasks(bench, first, workers, cache_dir, threads, bar.update):
            done[key] = record
            bar.set_postfix_str(f"{record['method']} lr={record['lr']:.0e} seed={record['seed']}")
            bar.update(cfg.examples * (copies[key] - 1))  # its copies under other names
    records = []
    for method, lr, seed in runs:
        key = run_key(cfg, method, lr, seed)
        record = done[key]
        if first[key] != (method, lr, seed):
            record = {
                **record,
                "method": method,
                "lr": lr,
                "seed": seed,
                "same_run_as": f"{record['method']} lr={record['lr']:g}",
            }
        records.append(record)
    return records


def _bar_factory(show: bool) -> Callable[[str], Callable[[Iterable[int]], Iterable[int]]]:
    def make(desc: str) -> Callable[[Iterable[int]], Iterable[int]]:
        return lambda it: tqdm(it, desc=desc, leave=False, disable=not show, dynamic_ncols=True)

    return make


def _log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def write_outputs(cfg: Config, records: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> Analysis:
    """The figures, ``<suite>.md`` and ``<suite>.json`` in ``out``."""
    analysis = Analysis(cfg, records)
    meta = {**meta, "figures": all_figures(analysis, meta["reference"], out, cfg.suite)}
    (out / f"{cfg.suite}.md").write_text(markdown(analysis, meta, meta["figures"]))
    write_json(out / f"{cfg.suite}.json", {**meta, "analysis": analysis.to_dict(), "runs": records})
    return analysis


def rebuild(path: Path, out: Path | None, p: argparse.ArgumentParser) -> Analysis:
    """Re-analyse the runs of a results file (``--from-results``)."""
    try:
        payload = json.loads(path.read_text())
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in payload["config"].items()}
        fields.setdefault("encoder", "minilm")  # files from before the encoder choice: MiniLM
        cfg = Config(**fields)
        records = payload["runs"]
        meta = {k: v for k, v in payload.items() if k not in ("analysis", "runs")}
        meta["config"] = cfg.to_dict()
        if "forgetting_pretrained" not in meta["reference"]:  # MiniLM files: the LID loss
            meta["reference"] = {
                **meta["reference"],
                "forgetting_pretrained": meta["reference"]["lid_loss_pretrained"],
            }
            records = [{**r, "forgetting": r.get("forgetting", r.get("lid_loss"))} for r in records]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        p.error(f"--from-results {path}: not a readable results file ({exc})")
    out = out or path.parent
    out.mkdir(parents=True, exist_ok=True)
    return write_outputs(cfg, records, meta, out)


def _print_claims(analysis: Analysis) -> None:
    for warning in analysis.edge_warnings():
        print(f"  warning: {warning}")
    for name, c in analysis.claims().items():
        print(f"  claim {name}: {c['verdict']}")


def main(argv: Sequence[str] | None = None) -> int:
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start = load_average()
    p = parser()
    args = p.parse_args(argv)
    if args.from_results:
        _print_claims(rebuild(args.from_results, args.out, p))
        return 0
    cfg = config_from_args(args, p)
    try:
        suites = build_suites(cfg)
        check_installed(cfg.encoder)
    except (ValueError, FileNotFoundError) as exc:
        p.error(str(exc))
    threads = cfg.threads or default_threads(cfg.device)
    torch.set_num_threads(threads)
    workers = args.workers or default_workers(cfg.device)
    why = "" if cfg.threads else " (the default on a CPU: threads on busy cores wait for each other)"
    _log(f"torch threads: {threads}{why}; worker processes: {workers}")
    for note in cfg.budget_notes():
        _log(f"note: {note}")
    if cfg.mode == "full" and cfg.device == "cpu":
        _log("note: --full is sized for a GPU (--device cuda); on a CPU it takes many hours")
    out = args.out or (RESULTS if cfg.mode == "default" else RESULTS / cfg.mode)
    out.mkdir(parents=True, exist_ok=True)
    show = not args.no_progress
    cache_dir = args.cache_dir or default_cache_dir()
    bench = Bench(cfg, DiskCache(cache_dir, log=_log), _log, wrap=_bar_factory(show), suites=suites)
    if workers == 1:
        warm_up(bench)
    records = execute(cfg, bench, show, workers, cache_dir, threads)

    command = "python benchmarks/multilingual/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {
        "suite": cfg.suite,
        "command": command.strip(),
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runtime_seconds": time.perf_counter() - t0,
        "prepare_seconds": bench.prepare_seconds,
        "workers": workers,
        "threads": threads,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "config": cfg.to_dict(),
        "versions": versions(),
        "machine": machine(bench.device),
        "reference": reference_numbers(bench),
        "probe": {"languages": bench.probe.languages, **bench.probe.fit_report},
        "budget_notes": cfg.budget_notes(),
    }
    analysis = write_outputs(cfg, records, meta, out)
    print(f"wrote {out / (cfg.suite + '.md')} and .json in {meta['runtime_seconds']:.0f} s")
    _print_claims(analysis)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
