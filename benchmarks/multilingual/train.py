"""One training run: a fresh top, one metaopt optimizer, the one loop, measurements.

The loop is the same for every method::

    wanted = opt.next_tasks()
    report = opt.step({t: loss(t) for t in wanted})

Data order is shared between methods: task ``t``'s batches come from a stream seeded by
(seed, t) alone, so two methods at the same seed see the same batches of a language in the same
order (methods that sample tasks also draw the same task sequence, from the optimizer's seeded
generator). Dropout is seeded by the run's seed.

Cost is measured two ways. Counted, and so independent of the machine's load: the updates
(``opt.step`` calls), the training examples fed to them (the rows of the batches that went in)
and the backward passes they ran (:class:`~counting.BackwardCounter`); with the peak memory,
read just before the first measurement point, these are what the cost verdict uses. Timed, and
so load-dependent: the wall-clock time of the optimizer steps only (loss computation, backward,
update; measurement points excluded), with the machine's load sampled around the same sections
(:class:`~system.LoadMeter`); reported, never used by a verdict.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

import metaopt

from .counting import BackwardCounter
from .evaluate import checkpoint, evaluation_weights, final_metrics, has_slow_weights
from .methods import BuildArgs, Method
from .prepare import Bench, SeedData
from .system import LoadMeter, PeakMemory, clock

Progress = Callable[[int], None]


class BatchStream:
    """Batches of one task: seeded shuffled epochs over its examples, without replacement
    within an epoch."""

    def __init__(self, size: int, batch_size: int, seed: int, task: str) -> None:
        self.size, self.batch_size = size, batch_size
        self.generator = torch.Generator().manual_seed(zlib.crc32(f"batches/{seed}/{task}".encode()))
        self.queue = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        while len(self.queue) < self.batch_size:
            self.queue = torch.cat([self.queue, torch.randperm(self.size, generator=self.generator)])
        idx, self.queue = self.queue[: self.batch_size], self.queue[self.batch_size :]
        return idx


OPTIONS: tuple[str, ...] = (
    "inner_steps",
    "outer_lr",
    "reptile_inner_steps",
    "gradvac_beta",
    "gradnorm_alpha",
)
"""Config fields a single run may override (:meth:`Trainer.run`): the methods' own options."""


class Trainer:
    """Runs methods on a prepared :class:`~prepare.Bench`; remembers the (method-independent)
    measurement at initialisation per (init, seed)."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.cfg = bench.cfg
        self._initial: dict[tuple[Any, ...], dict[str, Any]] = {}

    def run(
        self,
        method: Method,
        lr: float,
        seed: int,
        progress: Progress = lambda n: None,
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Train ``method`` at grid lr ``lr`` and ``seed``; return the run's record.
        ``options`` replaces method options of the config for this run (:data:`OPTIONS`:
        K, η, ...; the K × η sweep), never what the prepared data depend on."""
        if options:
            unknown = sorted(set(options) - set(OPTIONS))
            if unknown:
                raise ValueError(f"not method options: {unknown}; expected some of {list(OPTIONS)}")
            view = copy.copy(self)  # shares the measurement at initialisation
            view.cfg = dataclasses.replace(self.cfg, **options)
            return view.run(method, lr, seed, progress)
        data = self.bench.data[(method.init, seed)]
        tasks = list(self.cfg.train_languages)
        if method.single_task:
            return self._single_task(method, lr, seed, data, tasks, progress)
        record = self._train(method, lr, seed, data, tasks, method.steps(self.cfg), progress, measure=True)
        return {"method": method.name, "lr": lr, "seed": seed, **record}

    # ------------------------------------------------------------------ internals
    def _initial_point(
        self, model: torch.nn.Module, method: Method, seed: int, probes: dict[str, Any]
    ) -> dict[str, Any]:
        key = (method.init, method.head_only, seed, tuple(probes))
        if key not in self._initial:
            self._initial[key] = {"step": 0, "examples": 0, "outer_steps": 0, **checkpoint(model, probes)}
        return dict(self._initial[key])

    def _train(
        self,
        method: Method,
        lr: float,
        seed: int,
        data: SeedData,
        tasks: list[str],
        steps: int,
        progress: Progress,
        measure: bool,
    ) -> dict[str, Any]:
        cfg, bench = self.cfg, self.bench
        gc.collect()
        torch.manual_seed(seed)
        model = bench.model(method.init, seed)
        if method.head_only:
            model.layers.requires_grad_(False)
        size = cfg.cosine_probe_size
        probes = {t: data.train[t].subset(size) for t in tasks} if measure else {}
        curve = [self._initial_point(model, method, seed, probes)] if measure else []
        memory = PeakMemory(bench.device)
        memory.start()
        effective_lr = method.effective_lr(lr, cfg)
        opt = method.recipe(BuildArgs(model, effective_lr, tasks, seed, cfg))
        streams = {t: BatchStream(len(data.train[t]), cfg.batch_size, seed, t) for t in tasks}
        marks = set(cfg.checkpoint_steps(steps)) if measure else {steps}
        counter = BackwardCounter(model.parameters())
        load = LoadMeter()
        peak: float | None = None
        examples = updates = 0
        seconds = 0.0
        load.start()
        start = clock(bench.device)
        for step in range(1, steps + 1):
            wanted = opt.next_tasks()
            losses = {}
            fed = 0
            for t in wanted:
                tokens, mask, labels = data.train[t].batch(streams[t].next())
                losses[t] = F.cross_entropy(model(tokens, mask), labels)
                fed += labels.shape[0]
            with counter.counting():
                opt.step(losses)
            updates += 1
            examples += fed
            progress(fed)
            if step in marks:
                seconds += clock(bench.device) - start
                load.stop()
                if peak is None:
                    peak = memory.peak_mb()
                if measure and _moved(opt, curve):
                    with evaluation_weights(opt):
                        curve.append(
                            {
                                "step": step,
                                "examples": examples,
                                "outer_steps": _outer_steps(opt),
                                **checkpoint(model, probes),
                            }
                        )
                if step < steps:  # the last step is always a mark: nothing left to time
                    load.start()
                    start = clock(bench.device)
        counter.remove()
        with evaluation_weights(opt):
            probe = bench.probe if method.init == "pretrained" else None
            metrics = final_metrics(model, data, probe, self.cfg.forgetting)
        outer = _outer_steps(opt)
        return {
            "effective_lr": effective_lr,
            "steps": steps,
            "outer_steps": outer,
            **metrics,
            "curve": curve,
            **cost_fields(updates, examples, counter.passes, counter.full_passes, peak),
            **timing_fields(seconds, updates, examples, [load.summary()]),
        }

    def _single_task(
        self, method: Method, lr: float, seed: int, data: SeedData, tasks: list[str], progress: Progress
    ) -> dict[str, Any]:
        """STL: one model per language, ``steps / T`` steps each (same examples in total)."""
        steps = method.steps(self.cfg)
        parts = []
        for t in tasks:
            own = dataclasses.replace(
                data, dev={t: data.dev[t]} if t in data.dev else {}, test={t: data.test[t]}
            )
            parts.append((t, self._train(method, lr, seed, own, [t], steps, progress, measure=False)))
        zs_langs = list(data.zero_shot)
        record: dict[str, Any] = {
            "method": method.name,
            "lr": lr,
            "seed": seed,
            "effective_lr": method.effective_lr(lr, self.cfg),
            "steps": steps,
            "outer_steps": None,
            "dev": {t: p["dev"][t] for t, p in parts if t in p["dev"]},
            "test": {t: p["test"][t] for t, p in parts},
            "zero_shot": {z: _mean([p["zero_shot"][z] for _, p in parts]) for z in zs_langs},
            "curve": [],
        }
        for name in ("lid_loss", "lid_acc", "drift", "retrieval", "retrieval_error", "forgetting"):
            values = [p[name] for _, p in parts if p[name] is not None]
            record[name] = _mean(values) if values else None
        for part in ("dev", "test", "zero_shot"):
            record[f"{part}_mean"] = _mean(list(record[part].values())) if record[part] else None
        peaks = [p["peak_mb"] for _, p in parts if p["peak_mb"] is not None]
        total = {
            k: sum(p[k] for _, p in parts)
            for k in ("updates", "examples", "backward_passes", "full_backward_passes", "train_seconds")
        }
        record.update(
            cost_fields(
                total["updates"],
                total["examples"],
                total["backward_passes"],
                total["full_backward_passes"],
                max(peaks) if peaks else None,
            )
        )
        record.update(
            timing_fields(total["train_seconds"], total["updates"], total["examples"], [p for _, p in parts])
        )
        return record


def cost_fields(
    updates: int, examples: int, passes: int, full_passes: int, peak_mb: float | None
) -> dict[str, Any]:
    """The counted cost of a run, per update and per 1,000 training examples, and its peak
    memory: what the cost verdict reads (nothing here depends on the machine's load)."""
    return {
        "updates": updates,
        "examples": examples,
        "backward_passes": passes,
        "full_backward_passes": full_passes,
        "examples_per_update": examples / updates,
        "backward_per_update": passes / updates,
        "full_backward_per_update": full_passes / updates,
        "backward_per_1k_examples": 1000 * passes / examples,
        "full_backward_per_1k_examples": 1000 * full_passes / examples,
        "peak_mb": peak_mb,
    }


def timing_fields(seconds: float, updates: int, examples: int, loads: list[dict[str, Any]]) -> dict[str, Any]:
    """The timed cost of a run, per update and per training example, with the load measured
    around the same sections (``loads``: :meth:`~system.LoadMeter.summary` of each part, weighted
    equally). Load-dependent: reported, never used by a verdict."""
    samples = [x for part in loads for x in part["load_1min_samples"]]
    others = [part["other_cpu_cores"] for part in loads if part["other_cpu_cores"] is not None]
    own = [part["own_cpu_cores"] for part in loads if part["own_cpu_cores"] is not None]
    return {
        "train_seconds": seconds,
        "ms_per_example": 1000 * seconds / examples,
        "ms_per_step": 1000 * seconds / updates,
        "load_1min_samples": samples,
        "load_1min_mean": _mean(samples) if samples else None,
        "load_1min_max": max(samples) if samples else None,
        "other_cpu_cores": _mean(others) if others else None,
        "own_cpu_cores": _mean(own) if own else None,
    }


def _outer_steps(opt: metaopt.MultiTaskOptimizer) -> int | None:
    return opt.outer_step_count if isinstance(opt, metaopt.SlowFastOptimizer) else None


def _moved(opt: metaopt.MultiTaskOptimizer, curve: list[dict[str, Any]]) -> bool:
    """False when the evaluation weights cannot have changed since the last measurement (slow
    weights between two outer steps), so the measurement would repeat the previous one."""
    if not has_slow_weights(opt) or not curve:
        return True
    return curve[-1].get("outer_steps") != _outer_steps(opt)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def warm_up(bench: Bench, steps: int = 5) -> None:
    """A few untimed steps so that one-time library initialisation is not billed to the first
    measured run."""
    seed = bench.cfg.seeds[0]
    init = "pretrained" if ("pretrained", seed) in bench.data else "scratch"
    data = bench.data[(init, seed)]
    model = bench.model(init, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    task = next(iter(data.train))
    stream = BatchStream(len(data.train[task]), bench.cfg.batch_size, seed, task)
    for _ in range(steps):
        tokens, mask, labels = data.train[task].batch(stream.next())
        opt.zero_grad()
        F.cross_entropy(model(tokens, mask), labels).backward()
        opt.step()
