"""The timing scripts under benchmarks/ run (tiny sizes, one repeat), so they cannot rot; their
figures are measured by hand and recorded in benchmarks/README.md, never asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(
    "script, args, expect",
    [
        (
            "overhead.py",
            [
                "--inner-steps",
                "3",
                "--blocks",
                "2",
                "--d",
                "16",
                "--layers",
                "1",
                "--batch",
                "4",
                "--threads",
                "1",
            ],
            "SequentialReptile, torch way",
        ),
        ("ddp.py", ["--tasks", "3", "--width", "16", "--repeats", "1"], "one all-reduce of the T rows"),
        (
            "sinusoid.py",
            [
                "--seeds",
                "1",
                "--iterations",
                "3",
                "--meta-batch",
                "2",
                "--inner-steps",
                "2",
                "--pool",
                "10",
                "--eval-tasks",
                "3",
            ],
            "Sequential Reptile   MSE",
        ),
        # whole PCGrad/GradVac steps against TorchJD (needs the bench extra's torchjd)
        (
            "aggregation.py",
            ["--step", "--cases", "T=40, P=2e4", "--repeats", "1", "--batch", "2"],
            "metaopt / TorchJD",
        ),
        # bytes are counted, not timed: K times fewer with local trajectories
        (
            "local_trajectories.py",
            ["--steps", "20", "--inner-steps", "5", "--width", "16", "--outer-width", "16", "--repeats", "1"],
            "bytes  DDP / local: 5.0x",
        ),
    ],
)
def test_timing_script_runs(script, args, expect):
    if script == "aggregation.py":
        pytest.importorskip("torchjd")
    out = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert expect in out


def test_memory_script_measures_one_shard_of_slow_weights_under_fsdp2():
    """benchmarks/memory.py counts the tensors metaopt holds per rank (bytes, not time): Sequential
    Reptile's slow weights are one fp32 copy of the parameters (4 bytes per parameter) in one
    process and under DDP, and one shard of them (half, on 2 ranks, up to FSDP2's padding) under
    FSDP2, for fp32 and bf16 parameters alike (fp32 masters); with host placement none of it is
    beside the parameters."""
    out = subprocess.run(
        [sys.executable, str(BENCH / "memory.py")], capture_output=True, text=True, timeout=240, check=True
    ).stdout
    measured = out.split("# extrapolated")[0]
    for table in measured.split("## ")[1:]:  # fp32, then bf16 parameters
        rows = {
            line.split("|")[1].strip(): [c.strip() for c in line.split("|")[3:-1]]
            for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| mode")
        }
        assert float(rows["one process"][0]) == 4.0 and float(rows["ddp"][0]) == 4.0
        assert 2.0 <= float(rows["fsdp2"][0]) <= 2.04
        assert float(rows["fsdp2"][3]) < float(rows["one process"][3]) / 1.9  # PCGrad's rows: sharded too
        assert rows["one process"][2] == "0.000 (+4.000 host)"  # host placement
        device, host = rows["fsdp2"][2].split(" (+")
        assert float(device) == 0.0 and 2.0 <= float(host.split()[0]) <= 2.04
        assert rows["local"][2] == "n/a"  # refused with local trajectories


def test_the_gpu_script_dry_run_on_the_cpu():
    """benchmarks/gpu.py (the prepared run for a lent GPU) at small sizes on the CPU: every
    interpolation path, the Triton kernel through the interpreter included, matches float64
    and rounds θ as torch does; every method's whole step runs; host placement equals the
    state beside the parameters bit for bit."""
    out = subprocess.run(
        [sys.executable, str(BENCH / "gpu.py"), "--device", "cpu", "--smoke"],
        capture_output=True,
        text=True,
        timeout=400,
        check=True,
    ).stdout
    sections = {part.split("\n")[0]: part for part in out.split("\n## ")[1:]}

    def rows(prefix: str) -> list[list[str]]:
        (text,) = [v for k, v in sections.items() if k.startswith(prefix)]
        return [
            [c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines()
            if line.startswith("| ")
            and not line.startswith("| dtype")
            and not line.startswith("| method")
            and not line.startswith("| state_device")
        ]

    found = {(r[0], r[1]) for r in rows("paths")}
    assert found == {(d, p) for d in ("float32", "bfloat16") for p in ("reference", "foreach", "kernel")}
    for r in rows("paths"):
        assert float(r[2]) < 1e-6 and r[3] == "True", r
    assert [r[0] for r in rows("whole steps")] == [
        "MTL",
        "PCGrad",
        "GradVac",
        "SequentialReptile",
        "naive PCGrad",
    ]
    assert all(float(r[3]) > 0 for r in rows("whole steps"))
    (title,) = [k for k in sections if k.startswith("host placement")]
    assert "equal bit for bit across placements: True" in title


def test_the_gramian_accuracy_script_on_the_cpu():
    """benchmarks/gramian_accuracy.py (docs/performance.md's accuracy figure) at a few cases,
    through Triton's interpreter: its largest error stays within the bound it prints."""
    pytest.importorskip("triton")
    out = subprocess.run(
        [sys.executable, str(BENCH / "gramian_accuracy.py"), "--cases", "12"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    line = out.strip().splitlines()[-1]
    error = float(line.split("largest error ")[1].split()[0])
    bound = float(line.split("bound ")[1])
    assert line.startswith("12 cases") and 0 < error <= bound


def test_time_demo_times_a_command_in_a_fresh_clone_and_stops_its_spinners(tmp_path: Path) -> None:
    """benchmarks/time_demo.py (the README's demo times) on a short command: the clone holds the
    committed files, the time covers the command, and the busy processes end with it."""
    import importlib.util
    import json
    import os

    spec = importlib.util.spec_from_file_location("time_demo", BENCH / "time_demo.py")
    assert spec is not None and spec.loader is not None
    time_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(time_demo)
    probe = "import time, pathlib; assert pathlib.Path('benchmarks/time_demo.py').is_file(); time.sleep(0.3)"
    summary = time_demo.main(["--busy", "1", "--command", f"{sys.executable} -c {json.dumps(probe)}"])
    assert summary["returncode"] == 0 and summary["wall_seconds"] >= 0.3
    committed = json.loads((BENCH / "results" / "entity.json").read_text())  # what the clone holds
    assert summary["verdicts"] == {k: v["verdict"] for k, v in committed["analysis"]["claims"].items()}
    (pid,) = summary["busy_pids"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    failed = time_demo.main(["--command", f"{sys.executable} -c 'raise SystemExit(3)'"])
    assert failed["returncode"] == 3 and failed["busy_pids"] == []
