"""Settings of one benchmark run, and the three presets (default, ``--smoke``, ``--full``).

Everything a result depends on is a field of :class:`Config`; the whole config is written into
the results file. Budget rule: every method sees the same number of training examples
(``steps * batch_size``). A method that takes one batch of *every* task per step (MTL, GradNorm,
PCGrad, GradVac) therefore takes ``steps / T`` steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .data import (
    DEFAULT_TRAIN_LANGUAGES,
    DEFAULT_ZERO_SHOT_LANGUAGES,
    LARGE_TRAIN_LANGUAGES,
    USE_TRAIN_LANGUAGES,
    USE_ZERO_SHOT_LANGUAGES,
)

ALL_METHODS: tuple[str, ...] = (
    "scratch",
    "linear-probe",
    "stl",
    "mtl",
    "mtl-sampled",
    "control",
    "gradnorm",
    "pcgrad",
    "gradvac",
    "reptile",
    "seq-reptile",
)
"""Every method name, in table order (``methods.py`` defines them)."""

DEFAULT_METHODS: tuple[str, ...] = tuple(m for m in ALL_METHODS if m not in ("linear-probe", "stl"))
"""The default run leaves out the two reference rows that only ``--full`` affords."""

SUITES: tuple[str, ...] = ("entity",)
"""Implemented suites (the ``lemma`` suite of the issue is not built)."""


FORGETTING: dict[str, str] = {"use": "retrieval_error", "minilm": "lid_loss"}
"""Per encoder, the record field that measures forgetting (copied to ``forgetting``, the field
the verdicts read): cross-lingual retrieval for the multilingual USE, the LID probe for the
English MiniLM."""

MEASURES: dict[str, tuple[str, str]] = {
    "retrieval_error": ("cross-lingual retrieval error", "retrieval error"),
    "lid_loss": ("LID-probe loss", "LID loss"),
}
"""Each forgetting measure's name in prose and as a column title."""


@dataclass(frozen=True)
class Config:
    """One benchmark run. Learning rates are the grid *every* method is run on; the control
    runs sampled MTL at ``lr * outer_lr`` for each grid value."""

    mode: str = "default"
    suite: str = "entity"
    encoder: str = "use"
    train_languages: tuple[str, ...] = USE_TRAIN_LANGUAGES
    zero_shot_languages: tuple[str, ...] = USE_ZERO_SHOT_LANGUAGES
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    # data
    n_per_language: int | None = 32
    test_size: int | None = None
    dev_fraction: float = 0.1
    dev_size: int | None = 100
    # model and training (frozen_layers and dropout: MiniLM only)
    frozen_layers: int = 5
    dropout: float = 0.1
    batch_size: int = 16
    steps: int = 540
    weight_decay: float = 0.01
    # method options
    outer_lr: float = 0.1
    inner_steps: int = 54
    reptile_inner_steps: int = 18
    gradvac_beta: float = 0.01
    gradnorm_alpha: float = 1.5
    # measurement
    checkpoints: int = 4
    cosine_probe_size: int | None = None
    lid_languages: tuple[str, ...] | None = None
    lid_max_windows: int = 40
    device: str = "cpu"
    threads: int | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def examples(self) -> int:
        """Training examples every run sees."""
        return self.steps * self.batch_size

    @property
    def num_tasks(self) -> int:
        return len(self.train_languages)

    @property
    def forgetting(self) -> str:
        """The field that measures forgetting on this run's encoder (:data:`FORGETTING`)."""
        return FORGETTING[self.encoder]

    @property
    def other_forgetting(self) -> str:
        """The other measure of :data:`MEASURES`, shown beside it."""
        return next(m for m in MEASURES if m != self.forgetting)

    def steps_for(self, all_tasks: bool) -> int:
        """Optimizer steps of a method: ``steps``, or ``steps / T`` (at least 1) when each
        step takes a batch of every task."""
        return max(1, round(self.steps / self.num_tasks)) if all_tasks else self.steps

    def checkpoint_steps(self, steps: int) -> list[int]:
        """The steps after which the gradient cosine and training loss are measured: evenly
        spaced, the last one at the end of training."""
        count = max(1, min(self.checkpoints, steps))
        return sorted({max(1, round(steps * (i + 1) / count)) for i in range(count)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def budget_notes(self) -> list[str]:
        """Where the step counts do not divide evenly (examples or outer steps then differ a
        little between methods), one line each."""
        notes = []
        if self.steps % self.num_tasks:
            notes.append(
                f"{self.steps} steps is not a multiple of T = {self.num_tasks}: all-task "
                f"methods take {self.steps_for(True)} steps, "
                f"{self.steps_for(True) * self.num_tasks * self.batch_size} examples "
                f"instead of {self.examples}"
            )
        for name, k in (("Sequential Reptile", self.inner_steps), ("Reptile", self.reptile_inner_steps)):
            if self.steps % k:
                notes.append(
                    f"{name}: K = {k} does not divide {self.steps} steps; the last "
                    f"{self.steps % k} inner steps never reach the slow weights"
                )
        return notes


DEFAULT = Config()
"""The default run, on USE-multilingual v3: 9 training languages and 6 zero-shot ones, 3 seeds,
lr grid {1e-4, 3e-4, 1e-3, 3e-3, 1e-2} (the control adds sampled MTL at 1e-5 and 3e-5),
540 steps = 60 steps of all 9 tasks, so every method sees exactly 8,640 examples; Sequential
Reptile K = 54 (6 steps per task) gives 10 outer steps, Reptile K = 18 gives 30. README.md has
its measured time."""

SMOKE = Config(
    mode="smoke",
    train_languages=("de", "fr", "es"),
    zero_shot_languages=("nl",),
    methods=ALL_METHODS,
    seeds=(0,),
    lrs=(1e-4,),
    n_per_language=16,
    test_size=40,
    dev_size=20,
    batch_size=8,
    steps=48,
    inner_steps=12,
    reptile_inner_steps=6,
    checkpoints=2,
    lid_languages=("fr", "es", "it", "nl", "sv", "pl", "fi", "hu"),
    lid_max_windows=16,
)
"""End to end in well under a minute: every method, one seed, one lr, tiny data."""

FULL = Config(
    mode="full",
    methods=ALL_METHODS,
    seeds=(0, 1, 2, 3, 4),
    lrs=(3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    n_per_language=128,
    steps=10_000,
    inner_steps=1000,
    reptile_inner_steps=100,
    checkpoints=10,
    cosine_probe_size=128,
)
"""The larger setting for a GPU (``--device cuda``): 5 seeds, a 6-point lr grid, 128 names per
language, 10,000 steps with K = 1000 (the paper's value); on MiniLM, 40 training languages
(:func:`preset`). Untested on a CPU budget."""

PRESETS: dict[str, Config] = {"default": DEFAULT, "smoke": SMOKE, "full": FULL}


def preset(mode: str, encoder: str = "use") -> Config:
    """The preset ``mode`` (``default``, ``smoke`` or ``full``) on ``encoder``. On MiniLM the
    languages are Latin-script European ones (40 of several scripts in ``full``), and the
    default keeps the grid and budget it was measured with: lr {3e-5, 1e-4, 3e-4, 1e-3}, 306
    steps, K = 102 (3 outer steps), since its steps cost 3× USE's."""
    base = PRESETS[mode]
    if encoder == "use":
        return base
    if encoder != "minilm":
        raise ValueError(f"unknown encoder {encoder!r}")
    changes: dict[str, Any] = {"encoder": encoder}
    if mode != "smoke":
        changes["zero_shot_languages"] = DEFAULT_ZERO_SHOT_LANGUAGES
        changes["train_languages"] = LARGE_TRAIN_LANGUAGES if mode == "full" else DEFAULT_TRAIN_LANGUAGES
    if mode == "default":
        changes.update(lrs=(3e-5, 1e-4, 3e-4, 1e-3), steps=306, inner_steps=102)
    if mode == "full":
        changes["lrs"] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
    return replace(base, **changes)


def with_overrides(base: Config, **changes: Any) -> Config:
    """``base`` with the fields in ``changes`` that are not ``None`` replaced."""
    return replace(base, **{k: v for k, v in changes.items() if v is not None})
