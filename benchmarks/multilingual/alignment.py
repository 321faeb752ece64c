"""Cross-lingual alignment: how well an encoder's embeddings pair each name with its
translation, the forgetting a multilingual encoder suffers (Lee et al. 2022 measure a
multilingual model's forgetting of its pre-training; for a sentence encoder, what it learned
in pre-training is to put translations together).

CLDR names one entity (a territory, a language, a script, a currency, a city) in every
language, so the names of the same entities in two languages are parallel text.
:func:`aligned_names` lines them up; :func:`retrieval_accuracy` is the fraction of names whose
nearest neighbour (cosine) among the other language's names is their translation. It is
measured before and after fine-tuning; the drop is the forgetting.

The benchmark scores every pair of its languages on their test entities (:func:`pairs`,
:func:`mean_retrieval`).

Example::

    keys, a, b = aligned_names("de", "fr")
    enc = USEMultilingual.load()
    accuracy = retrieval_accuracy(enc(enc.tokenize(a)), enc(enc.tokenize(b)))
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .data import Split, entity_names

Pair = tuple[str, str, Tensor, Tensor]
"""Two languages and the rows of their splits that name the same entities (:func:`pairs`)."""


def aligned_names(
    a: str, b: str, keys: Iterable[tuple[str, str]] | None = None
) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """The entities named in both languages ``a`` and ``b`` (among ``keys``, if given: e.g. the
    test entities), sorted by key, with their names in each. An entity whose name is the same
    string in both languages is left out: retrieving it would test spelling, not alignment."""
    names_a = {e.key: e.name for e in entity_names(a)}
    names_b = {e.key: e.name for e in entity_names(b)}
    wanted = set(names_a) & set(names_b)
    if keys is not None:
        wanted &= set(keys)
    chosen = sorted(k for k in wanted if names_a[k] != names_b[k])
    return chosen, [names_a[k] for k in chosen], [names_b[k] for k in chosen]


def pairs(splits: dict[str, Split]) -> list[Pair]:
    """Every pair of the languages of ``splits`` (their test splits, say), with the rows that
    name the same entity in both, by entity key; an entity named by the same string in both is
    left out, as in :func:`aligned_names`, and so is a pair with fewer than 2 such entities.

    >>> de = Split(("Frankreich", "Polen", "Peru"), (0, 0, 0), (("t", "FR"), ("t", "PL"), ("t", "PE")))
    >>> fr = Split(("Pérou", "France"), (0, 0), (("t", "PE"), ("t", "FR")))
    >>> [(a, b, ra.tolist(), rb.tolist()) for a, b, ra, rb in pairs({"de": de, "fr": fr})]
    [('de', 'fr', [0, 2], [1, 0])]
    """
    out: list[Pair] = []
    codes = list(splits)
    for i, a in enumerate(codes):
        rows_a = {k: r for r, k in enumerate(splits[a].keys)}
        for b in codes[i + 1 :]:
            sb = splits[b]
            both = sorted(
                (rows_a[k], r)
                for r, k in enumerate(sb.keys)
                if k in rows_a and splits[a].names[rows_a[k]] != sb.names[r]
            )
            if len(both) >= 2:
                ra, rb = zip(*both)
                out.append((a, b, torch.tensor(ra), torch.tensor(rb)))
    return out


def mean_retrieval(features: dict[str, Tensor], pairs: list[Pair]) -> float:
    """:func:`retrieval_accuracy` averaged over ``pairs``, from each language's features (rows
    in its split's order)."""
    if not pairs:
        raise ValueError("mean_retrieval: no language pairs with shared entities")
    scores = [retrieval_accuracy(features[a][ra], features[b][rb]) for a, b, ra, rb in pairs]
    return sum(scores) / len(scores)


def retrieval_accuracy(source: Tensor, target: Tensor) -> float:
    """The fraction of rows ``i`` of ``source`` whose nearest row of ``target`` by cosine is
    row ``i`` (ties count as misses), both ways averaged: ``source`` and ``target`` are the
    embeddings of aligned names, (n, d) each.

    >>> e = torch.eye(3)
    >>> retrieval_accuracy(e, e), retrieval_accuracy(e, e[[1, 0, 2]])
    (1.0, 0.3333333333333333)
    """
    if source.shape != target.shape or source.ndim != 2 or len(source) == 0:
        raise ValueError(
            f"retrieval_accuracy: expected two (n, d) embeddings of the same shape, n >= 1, got "
            f"{tuple(source.shape)} and {tuple(target.shape)}"
        )
    a = torch.nn.functional.normalize(source.float(), dim=1)  # float32: the benchmark scores
    b = torch.nn.functional.normalize(target.float(), dim=1)  # 100 pairs per run
    sim = a @ b.T
    idx = torch.arange(len(sim))

    def hits(s: Tensor) -> float:
        own = s[idx, idx]
        others = s.clone()
        others[idx, idx] = -torch.inf
        return float((own > others.max(dim=1).values).double().mean())

    return (hits(sim) + hits(sim.T)) / 2
