"""Times ``make demo`` as a new user meets it: in a fresh clone of this checkout's committed
state, set-up included, optionally with other processes keeping cores busy the whole time.

    python benchmarks/time_demo.py             # a quiet machine
    python benchmarks/time_demo.py --busy 1    # one core kept busy by a spinning process

Prints one JSON object: the wall-clock seconds of the command, its exit status, and from the
benchmark's results file its own runtime, the load averages it read and the four verdicts. The
README's demo times come from this script.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPIN = "while True: pass"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python benchmarks/time_demo.py", description=__doc__)
    p.add_argument("--busy", type=int, default=0, help="processes spinning on a core meanwhile")
    p.add_argument("--command", default="make demo", help="what to time in the clone")
    args = p.parse_args(argv)
    if args.busy < 0:
        p.error(f"--busy must be >= 0, got {args.busy}")
    with tempfile.TemporaryDirectory(prefix="metaopt-demo-") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.busy)]
        try:
            start = time.perf_counter()
            done = subprocess.run(shlex.split(args.command), cwd=clone)
            wall = time.perf_counter() - start
        finally:
            for s in spinners:
                s.kill()
                s.wait()
        summary: dict[str, Any] = {
            "command": args.command,
            "busy": args.busy,
            "wall_seconds": round(wall, 1),
            "returncode": done.returncode,
            "busy_pids": [s.pid for s in spinners],
        }
        results = clone / "benchmarks" / "results" / "entity.json"
        if done.returncode == 0 and results.is_file():
            payload = json.loads(results.read_text())
            summary.update(
                runtime_seconds=round(payload["runtime_seconds"], 1),
                load_average_start=payload["load_average_start"],
                load_average_end=payload["load_average_end"],
                workers=payload.get("workers"),
                verdicts={k: v["verdict"] for k, v in payload["analysis"]["claims"].items()},
            )
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    raise SystemExit(0 if main()["returncode"] == 0 else 1)
