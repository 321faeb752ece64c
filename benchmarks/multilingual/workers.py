"""Runs of the plan in worker processes, one torch thread each (by default).

On a CPU the runs are independent and small (a few seconds each), so processes beat threads:
two single-threaded workers use both cores of a quiet 2-core machine, and on a busy machine
they never wait for each other the way torch's intra-op threads do (``system.default_threads``).
Each worker builds its own :class:`~prepare.Bench` from the disk cache the parent filled, so its
runs are the computations the parent would have run: same seeds, same data, one thread.

Example::

    with RunPool(cfg, cache_dir, workers=2, threads=1) as pool:
        for key, record in pool.map({key: ("seq-reptile", 1e-3, 0)}):
            ...
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from .cache import DiskCache
from .config import Config
from .methods import METHODS
from .prepare import Bench
from .train import Progress, Trainer, warm_up

Task = tuple[str, float, int] | tuple[str, float, int, dict[str, Any]]
"""(method, grid lr, seed), and optionally method options for the run (``Trainer.run``)."""

_TRAINER: Trainer | None = None


def default_workers(device: str) -> int:
    """Worker processes when ``--workers`` is not given: on a CPU one per core, at most 2 (the
    machines this benchmark is sized for); on a GPU 1 (the runs share the device)."""
    if device != "cpu":
        return 1
    return max(1, min(2, os.cpu_count() or 1))


def _start(cfg: Config, cache_dir: Path | None, threads: int) -> None:
    global _TRAINER
    torch.set_num_threads(threads)
    cache = DiskCache(cache_dir, log=lambda m: None) if cache_dir is not None else None
    bench = Bench(cfg, cache, log=lambda m: None)
    warm_up(bench)
    _TRAINER = Trainer(bench)


def timed_run(trainer: Trainer, task: Task, progress: Progress = lambda n: None) -> dict[str, Any]:
    """The record of ``task`` trained by ``trainer``, with its wall-clock ``wall_seconds``."""
    method, lr, seed = task[:3]
    options = task[3] if len(task) > 3 else None
    start = time.perf_counter()
    record = trainer.run(METHODS[method], lr, seed, progress=progress, options=options)
    record["wall_seconds"] = time.perf_counter() - start
    return record


def _run(task: Task) -> dict[str, Any]:
    assert _TRAINER is not None, "worker not started"
    return timed_run(_TRAINER, task)


def run_tasks(
    bench: Bench,
    tasks: dict[Any, Task],
    workers: int,
    cache_dir: Path | None,
    threads: int,
    progress: Progress = lambda n: None,
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(key, record) of every task: in this process on ``bench`` when ``workers`` is 1 (in
    order, ``progress`` told of every batch's examples), else in a :class:`RunPool` (as they
    finish, ``progress`` told of a run's examples when it ends)."""
    if workers <= 1:
        trainer = Trainer(bench)
        for key, task in tasks.items():
            yield key, timed_run(trainer, task, progress)
        return
    with RunPool(bench.cfg, cache_dir, workers, threads) as pool:
        for key, record in pool.map(tasks):
            progress(record["examples"])
            yield key, record


class RunPool:
    """``workers`` spawned processes that each prepare a :class:`~prepare.Bench` for ``cfg``
    (from the cache in ``cache_dir``), run torch on ``threads`` threads, and train the tasks
    given to :meth:`map`."""

    def __init__(self, cfg: Config, cache_dir: Path | None, workers: int, threads: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),  # no fork of a threaded parent
            initializer=_start,
            initargs=(cfg, cache_dir, threads),
        )

    def map(self, tasks: dict[Any, Task]) -> Iterator[tuple[Any, dict[str, Any]]]:
        """(key, record) of each task as it finishes; a worker's error is raised here."""
        pending: dict[Future[dict[str, Any]], Any] = {
            self._pool.submit(_run, task): key for key, task in tasks.items()
        }
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield pending.pop(future), future.result()

    def __enter__(self) -> RunPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
