"""Helpers shared by the benchmark scripts: medians of interleaved repeats, the machine, and
the ends of spawned gloo ranks."""

from __future__ import annotations

import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable

import torch

__all__ = ["free_port", "leave_rank", "machine", "median_time", "sync"]


def sync(device: torch.device | str = "cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(
    fn: Callable[[], object], *, repeat: int = 15, warmup: int = 3, device: torch.device | str = "cpu"
) -> float:
    """Median wall time of ``fn`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
        f"python {platform.python_version()}"
    )


def free_port() -> int:
    """A TCP port free on this machine now, for a rendezvous of local ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def leave_rank() -> None:
    """End a spawned rank without interpreter finalization, its results written: gloo
    sometimes aborts a process at exit after destroy_process_group ("terminate called without
    an active exception", about 1 run in 20 here; pytorch/pytorch#179291)."""
    sys.stdout.flush()
    os._exit(0)
