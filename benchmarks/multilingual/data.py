"""The ``entity`` suite: CLDR entity typing, one task per language, built offline from babel.

Each example is a localized name from the Unicode CLDR data shipped with ``babel`` and its
label is the kind of entity it names (5 classes, see :data:`CATEGORIES`):

* ``territory``: ``Locale.parse(code).territories`` (``"Deutschland"``, ``"Europa"``),
* ``language``: ``.languages`` (``"Französisch"``),
* ``script``: ``.scripts`` (``"Kyrillisch"``),
* ``currency``: ``.currencies`` (``"Schweizer Franken"``),
* ``city``: exemplar cities, i.e. ``.time_zones`` entries that carry a ``"city"`` key.

Filters, applied per language:

* a name spelled exactly like the English name of the same entity is dropped, except for
  territories (otherwise Latin-script locales would be mostly English copies of each other;
  territories are kept because many countries are legitimately spelled the same);
* a name that occurs with two different labels in one language is dropped (``"Georgisch"`` is
  both a language and a script in German);
* duplicate (name, label) pairs are kept once.

Splits are **entity-disjoint**: the entity keys ``(category, code)`` are partitioned once per
seed into a train part, an optional dev part (for model selection) and a test part, shared by
all languages. So "Germany" is a test entity
in every language or in none, and test accuracy measures generalization to unseen entities,
not recall of a translation seen in another training language. Zero-shot languages (held out
of fine-tuning) are evaluated on their test entities too.

Example::

    suite = build_entity_suite(["de", "fr"], zero_shot_languages=["nl"], n_per_language=32)
    suite.train["de"].names[:2], suite.train["de"].labels[:2]
    suite.test["de"], suite.zero_shot["nl"], suite.dev["de"]  # dev: empty unless dev_fraction > 0

Building the default suite takes well under a second.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache

from babel import Locale, UnknownLocaleError

CATEGORIES: tuple[str, ...] = ("territory", "language", "script", "currency", "city")
"""Class names; a label is the index into this tuple."""

REFERENCE_LANGUAGE = "en"
"""Names identical to this locale's name of the same entity are dropped (except territories)."""

DEFAULT_TRAIN_LANGUAGES: tuple[str, ...] = ("de", "fr", "es", "it", "pt", "sv", "pl", "cs", "fi")
"""Nine Latin-script European training languages (an English WordPiece serves them best)."""

DEFAULT_ZERO_SHOT_LANGUAGES: tuple[str, ...] = ("nl", "da", "ro", "hu")
"""Held-out Latin-script languages for zero-shot evaluation."""

USE_TRAIN_LANGUAGES: tuple[str, ...] = ("de", "fr", "es", "it", "pl", "pt", "ru", "ja", "zh")
"""Nine of USE-multilingual v3's 16 languages (Latin, Cyrillic and CJK scripts), one task each:
the default of the benchmark on that encoder. ``zh`` is CLDR's Simplified Chinese (USE's
zh-cn)."""

USE_ZERO_SHOT_LANGUAGES: tuple[str, ...] = ("nl", "tr", "ar", "ko", "th", "zh_Hant")
"""USE's other languages but English (the reference language of the suite), held out for
zero-shot evaluation: two Latin-script, and Arabic, Korean, Thai and Traditional Chinese
scripts."""

LARGE_TRAIN_LANGUAGES: tuple[str, ...] = (
    # 40 languages: Latin-script European, other Latin-script, Cyrillic, Greek, other scripts.
    "de", "fr", "es", "it", "pt", "sv", "pl", "cs", "fi", "nb",
    "ca", "hr", "sk", "sl", "et", "lv", "lt", "is", "ga", "cy",
    "eu", "gl", "sq", "tr", "id", "vi", "sw", "zu", "af", "ms",
    "ru", "uk", "bg", "el", "ka", "hy", "he", "ar", "hi", "ko",
)  # fmt: skip
"""A 40-language option (several scripts); pair it with :data:`DEFAULT_ZERO_SHOT_LANGUAGES`."""


@dataclass(frozen=True)
class Entity:
    """One localized name: ``name`` is the string, ``label`` the index into :data:`CATEGORIES`,
    ``key`` the language-independent entity key ``(category, CLDR code)``."""

    name: str
    label: int
    key: tuple[str, str]


@dataclass(frozen=True)
class Split:
    """Names, integer labels and entity keys of one language, in a fixed (seeded) order (the
    keys line up names of the same entity across languages, :mod:`alignment`)."""

    names: tuple[str, ...]
    labels: tuple[int, ...]
    keys: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        return len(self.names)

    def class_counts(self) -> list[int]:
        """Number of examples per class, indexed like :data:`CATEGORIES`."""
        counts = Counter(self.labels)
        return [counts.get(i, 0) for i in range(len(CATEGORIES))]


@dataclass(frozen=True)
class EntitySuite:
    """A built suite. ``train``/``test``/``dev`` are keyed by training language (the tasks),
    ``zero_shot`` by held-out language. Dicts keep the order the languages were given in.
    ``dev`` holds names of entities that are in neither the train nor the test part (empty
    when the suite was built with ``dev_fraction=0``)."""

    train: dict[str, Split]
    test: dict[str, Split]
    zero_shot: dict[str, Split]
    seed: int
    dev: dict[str, Split] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        """The training languages, one task each."""
        return list(self.train)

    @property
    def num_classes(self) -> int:
        return len(CATEGORIES)


def _parse(code: str) -> Locale:
    try:
        return Locale.parse(code)
    except (UnknownLocaleError, ValueError, TypeError) as exc:
        raise ValueError(f"unknown language code {code!r} (babel/CLDR has no such locale)") from exc


def _english_city(tz: str, english: Locale) -> str:
    """English exemplar city of a time zone: CLDR's English name, else derived from the tz id."""
    entry = english.time_zones.get(tz, {})
    return entry.get("city") or tz.split("/")[-1].replace("_", " ")


@cache
def entity_names(code: str) -> tuple[Entity, ...]:
    """All filtered names of language ``code``, sorted by (label, name) so the result does not
    depend on dict order.

    Raises:
        ValueError: if babel does not know ``code``, or ``code`` is the reference language.
    """
    if code == REFERENCE_LANGUAGE:
        raise ValueError(
            f"language {code!r} is the reference language: its names define the English filter, "
            "so it has no non-territory names left"
        )
    loc = _parse(code)
    english = _parse(REFERENCE_LANGUAGE)
    sources = {
        "territory": (loc.territories, english.territories),
        "language": (loc.languages, english.languages),
        "script": (loc.scripts, english.scripts),
        "currency": (loc.currencies, english.currencies),
    }
    raw: list[tuple[str, str, str]] = []  # (name, category, code)
    for category, (local, reference) in sources.items():
        for key, name in local.items():
            if category != "territory" and name == reference.get(key):
                continue
            raw.append((name, category, key))
    for tz, entry in loc.time_zones.items():
        city = entry.get("city")
        if city and city != _english_city(tz, english):
            raw.append((city, "city", tz))

    labels_of: dict[str, set[str]] = defaultdict(set)
    for name, category, _ in raw:
        labels_of[name].add(category)
    seen: set[tuple[str, str]] = set()
    out: list[Entity] = []
    for name, category, key in raw:
        name = name.strip()
        if not name or len(labels_of[name]) > 1 or (name, category) in seen:
            continue
        seen.add((name, category))
        out.append(Entity(name, CATEGORIES.index(category), (category, key)))
    out.sort(key=lambda e: (e.label, e.name))
    return tuple(out)


def check_language(code: str, min_names: int = 300, min_per_category: int = 5) -> int:
    """Validate that ``code`` has enough data; return its number of names.

    Raises:
        ValueError: naming the code and the count, if it is unknown, has fewer than
            ``min_names`` names, or a category with fewer than ``min_per_category`` names.
    """
    names = entity_names(code)
    if len(names) < min_names:
        raise ValueError(
            f"language {code!r} has too little data: {len(names)} names after filtering "
            f"(need at least {min_names})"
        )
    counts = Counter(e.label for e in names)
    for i, category in enumerate(CATEGORIES):
        if counts.get(i, 0) < min_per_category:
            raise ValueError(
                f"language {code!r} has too little data: {counts.get(i, 0)} {category} names "
                f"(need at least {min_per_category})"
            )
    return len(names)


def available_languages(min_names: int = 300, min_per_category: int = 5) -> list[str]:
    """Plain language codes (no territory/script variants) that pass :func:`check_language`."""
    from babel.localedata import locale_identifiers

    out = []
    for ident in sorted(locale_identifiers()):
        if "_" in ident or ident in (REFERENCE_LANGUAGE, "root"):
            continue
        try:
            check_language(ident, min_names, min_per_category)
        except ValueError:
            continue
        out.append(ident)
    return out


def _entity_partition(
    seed: int, test_fraction: float, dev_fraction: float = 0.0
) -> Callable[[tuple[str, str]], str]:
    """A seeded, order-independent ``"test"``/``"dev"``/``"train"`` decision per entity key
    (the same in every language). The test part does not depend on ``dev_fraction``."""

    def part(key: tuple[str, str]) -> str:
        u = random.Random(f"entity-split/{seed}/{key[0]}/{key[1]}").random()
        if u < test_fraction:
            return "test"
        return "dev" if u < test_fraction + dev_fraction else "train"

    return part


def _as_split(entities: Sequence[Entity]) -> Split:
    return Split(
        tuple(e.name for e in entities), tuple(e.label for e in entities), tuple(e.key for e in entities)
    )


def build_entity_suite(
    train_languages: Sequence[str] = DEFAULT_TRAIN_LANGUAGES,
    zero_shot_languages: Sequence[str] = DEFAULT_ZERO_SHOT_LANGUAGES,
    *,
    n_per_language: int | None = None,
    test_size: int | None = 200,
    test_fraction: float = 0.3,
    dev_fraction: float = 0.0,
    dev_size: int | None = 100,
    seed: int = 0,
    min_names: int = 300,
) -> EntitySuite:
    """Build per-language train/test splits of the ``entity`` suite.

    Args:
        train_languages: babel codes of the fine-tuning languages (one task each).
        zero_shot_languages: codes held out of fine-tuning, evaluated on test entities only.
        n_per_language: if given, keep only this many training names per language (a seeded
            uniform sample): the few-label setting, where pre-training matters most.
        test_size: cap on test names per language (a seeded sample), to keep evaluation cheap;
            ``None`` keeps all test entities.
        test_fraction: fraction of entity keys that go to the test side.
        dev_fraction: fraction of entity keys held out of training for a dev split of each
            training language (model selection); 0 (default) builds no dev split.
        dev_size: cap on dev names per language (a seeded sample); ``None`` keeps all.
        seed: determines the entity partition and every sample; same seed, same suite.
        min_names: a language with fewer filtered names is rejected.

    Raises:
        ValueError: for an unknown code, a code listed twice or in both lists, a language with
            too little data (the message names the code and the count), or ``n_per_language``
            larger than a language's training pool.
    """
    langs = list(train_languages) + list(zero_shot_languages)
    dupes = sorted(c for c, k in Counter(langs).items() if k > 1)
    if dupes:
        raise ValueError(f"language codes listed twice (or both trained and zero-shot): {dupes}")
    if not train_languages:
        raise ValueError("need at least one training language")
    if n_per_language is not None and n_per_language < 1:
        raise ValueError(f"n_per_language must be positive, got {n_per_language}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not 0.0 <= dev_fraction < 1.0 - test_fraction:
        raise ValueError(f"dev_fraction must be in [0, 1 - test_fraction), got {dev_fraction}")
    for code in langs:
        check_language(code, min_names=min_names)

    part = _entity_partition(seed, test_fraction, dev_fraction)

    def held_out(code: str, which: str, size: int | None) -> Split:
        pool = [e for e in entity_names(code) if part(e.key) == which]
        random.Random(f"{which}/{seed}/{code}").shuffle(pool)
        return _as_split(pool if size is None else pool[:size])

    train: dict[str, Split] = {}
    for code in train_languages:
        pool = [e for e in entity_names(code) if part(e.key) == "train"]
        random.Random(f"train/{seed}/{code}").shuffle(pool)
        if n_per_language is not None:
            if n_per_language > len(pool):
                raise ValueError(
                    f"language {code!r} has too little data: {len(pool)} training names, "
                    f"n_per_language={n_per_language}"
                )
            pool = pool[:n_per_language]
        train[code] = _as_split(pool)
    return EntitySuite(
        train=train,
        test={code: held_out(code, "test", test_size) for code in train_languages},
        zero_shot={code: held_out(code, "test", test_size) for code in zero_shot_languages},
        seed=seed,
        dev={code: held_out(code, "dev", dev_size) for code in train_languages} if dev_fraction > 0 else {},
    )
