"""Everything the runs share, built once per process: suites, tokens, frozen-bottom states, the
LID probe, the language pairs of the retrieval measure, and a factory for fresh trainable tops.

One-time work (the bottom states, the probe) goes through the disk cache (``cache.py``), keyed
by its configuration; a cached run prepares in about a second.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .alignment import Pair, pairs
from .backbone import Backbone, make_backbone
from .cache import DiskCache
from .config import Config
from .data import CATEGORIES, EntitySuite, build_entity_suite
from .features import SplitFeatures, StateBank, cached_bank
from .forgetting import LID_LANGUAGES, LidProbe
from .system import dist_version

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
    pairs: list[Pair] = field(default_factory=list)  # test and zero-shot rows naming one entity
    aligned: dict[str, SplitFeatures] = field(default_factory=dict)  # the splits ``pairs`` index


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
        self.backbone: Backbone = make_backbone(cfg.encoder, cfg.frozen_layers, cfg.dropout)
        self.encoder_id = self.backbone.identity()
        self.ids = {seed: self._tokenize(s) for seed, s in self.suites.items()}
        self.probe = self._probe()
        self.data: dict[tuple[str, int], SeedData] = {}
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
            part: {code: self.backbone.tokenize(split.names) for code, split in group.items()}
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
            "gflanguages": dist_version("gflanguages", "unknown"),
            "weight_decay": 1e-3,
            "seed": 0,
        }

        def build() -> tuple[dict[str, Tensor], dict[str, object]]:
            self.log("fitting the LID probe on the pre-trained encoder")
            probe = LidProbe.fit(
                self.backbone.tokenize,
                self.backbone.sentence_features,
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

    def _bank(self, init: str, seed: int, sequences: list[list[int]], desc: str) -> StateBank:
        backbone = self.backbone
        bank = cached_bank(
            self.cache,
            backbone.bottom(init, seed),
            sequences,
            backbone.bottom_identity(init, seed),
            wrap=self._bar(desc),
        )
        return bank.to(self.device)

    def _prepare_pretrained(self) -> None:
        self.log(f"frozen-bottom states of the pre-trained encoder ({self.backbone.name})")
        seqs = self._sequences(self.cfg.seeds) + self.probe.test_ids
        bank = self._bank("pretrained", 0, seqs, "bottom states (pre-trained)")
        self._pretrained_bank = bank
        lid = bank.split(self.probe.test_ids, self.probe.test_labels)
        for seed in self.cfg.seeds:
            self.data[("pretrained", seed)] = self._seed_data(bank, seed, "pretrained", lid)

    def _prepare_scratch(self, seed: int) -> None:
        if self.backbone.own_scratch_bottom:
            desc = f"bottom states (scratch, seed {seed})"
            bank = self._bank("scratch", seed, self._sequences([seed]), desc)
        elif ("pretrained", seed) in self.data:
            bank = self._pretrained_bank
        else:
            bank = self._bank("pretrained", 0, self._sequences([seed]), "bottom states (pre-trained)")
        self.data[("scratch", seed)] = self._seed_data(bank, seed, "scratch", None)

    def _seed_data(self, bank: StateBank, seed: int, init: str, lid: SplitFeatures | None) -> SeedData:
        suite, ids = self.suites[seed], self.ids[seed]

        def splits(part: str, group: dict) -> dict[str, SplitFeatures]:
            return {code: bank.split(ids[part][code], split.labels) for code, split in group.items()}

        test, zero_shot = splits("test", suite.test), splits("zero_shot", suite.zero_shot)
        return SeedData(
            seed,
            init,
            splits("train", suite.train),
            splits("dev", suite.dev),
            test,
            zero_shot,
            lid,
            pairs({**suite.test, **suite.zero_shot}),
            {**test, **zero_shot},
        )

    # ------------------------------------------------------------------ per run
    def model(self, init: str, seed: int) -> nn.Module:
        """A fresh trainable top (the encoder's top, :mod:`backbone`, of the ``init`` weights
        and a new head seeded by ``seed``), on the device, in training mode."""
        return self.backbone.top(init, seed, len(CATEGORIES)).to(self.device).train()


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
