"""The ``metaopt`` command: ``metaopt info`` reports what this machine offers; ``metaopt toy`` and
``metaopt benchmark`` run the scripts of a source checkout::

    $ metaopt info
    $ metaopt toy --steps 200
    $ metaopt benchmark --smoke
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import platform
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import metaopt
from metaopt._extras import EXTRAS, install_hint
from metaopt.interpolation import _KERNELS

__all__ = ["info", "main"]

# What the checkout's scripts import from the bench extra (import names): a script that stops on
# one of these missing is reported with the install command instead of a bare traceback.
_BENCH_MODULES = frozenset(
    {
        "torchjd",
        "qpsolvers",
        "quadprog",
        "tqdm",
        "matplotlib",
        "babel",
        "gflanguages",
        "safetensors",
        "tokenizers",
    }
)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> dict[str, object]:
    """What metaopt can use here: versions, devices, the interpolation engine's paths,
    ``torch.distributed`` backends and the optional extras (nothing is installed or started)."""
    dist = torch.distributed
    backends = []
    if dist.is_available():
        backends = [
            name
            for name, ok in (
                ("gloo", dist.is_gloo_available()),
                ("nccl", dist.is_nccl_available()),
                ("mpi", dist.is_mpi_available()),
            )
            if ok
        ]
    cuda = torch.cuda.is_available()
    return {
        "metaopt": metaopt.__version__,
        "imported from": str(Path(metaopt.__file__).resolve().parent),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "cuda": (
            f"{torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}"
            if cuda
            else "not available"
        ),
        "triton": "importable" if importlib.util.find_spec("triton") is not None else "not installed",
        "interpolation paths": "foreach, reference"
        + (
            f"; device kernels: {', '.join(sorted(_KERNELS))}"
            if _KERNELS
            else "; no device kernel registered"
        )
        + (
            "; Triton's kernel registered on CUDA at the first outer step"
            if "cuda" not in _KERNELS and importlib.util.find_spec("triton") is not None
            else ""
        ),
        "torch.distributed": ", ".join(backends) if backends else "not available",
        **{
            f"extra [{extra}]": ", ".join(f"{d} {_version(d)}" for d in dists)
            for extra, dists in EXTRAS.items()
        },
    }


def _checkout_script(relative: str) -> Path:
    root = Path(metaopt.__file__).resolve().parent.parent
    script = root / relative
    if not script.is_file():
        raise SystemExit(
            f"metaopt: {relative} is part of the source checkout, not of the installed "
            f"package (looked in {root}); run this from a checkout installed with "
            "pip install -e ."
        )
    return script


def _run(script: Path, argv: Sequence[str], relative: str) -> int:
    sys.path.insert(0, str(script.parent))
    saved = sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit_:
        if isinstance(exit_.code, str):  # the script's own message (e.g. a missing extra)
            print(exit_.code, file=sys.stderr)
            return 1
        return int(exit_.code or 0)
    except ModuleNotFoundError as err:
        missing = (err.name or "").split(".")[0]
        if missing not in _BENCH_MODULES:
            raise
        raise SystemExit(
            f"metaopt: {relative} needs {missing}, from the bench extra: {install_hint('bench')}"
        ) from err
    finally:
        sys.argv = saved
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metaopt`` console command."""
    ap = argparse.ArgumentParser(prog="metaopt", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, fast paths, distributed backends, extras")
    sub.add_parser("toy", help="benchmarks/toy.py of a checkout (needs the bench extra)", add_help=False)
    sub.add_parser("benchmark", help="the multilingual benchmark of a checkout (bench extra)", add_help=False)
    args, rest = ap.parse_known_args(argv)
    if args.command == "info":
        if rest:
            ap.error(f"unrecognized arguments: {' '.join(rest)}")
        for key, value in info().items():
            print(f"{key:22s} {value}")
        return 0
    script = {"toy": "benchmarks/toy.py", "benchmark": "benchmarks/multilingual/run.py"}[args.command]
    return _run(_checkout_script(script), rest, script)


if __name__ == "__main__":
    raise SystemExit(main())
