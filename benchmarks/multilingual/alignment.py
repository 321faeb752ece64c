"""Cross-lingual alignment: how well an encoder's embeddings pair each name with its
translation, the forgetting a multilingual encoder suffers (Lee et al. 2022 measure a
multilingual model's forgetting of its pre-training; for a sentence encoder, what it learned
in pre-training is to put translations together).

CLDR names one entity (a territory, a language, a script, a currency, a city) in every
language, so the names of the same entities in two languages are parallel text.
:func:`aligned_names` lines them up; :func:`retrieval_accuracy` is the fraction of names whose
nearest neighbour (cosine) among the other language's names is their translation. It is
measured before and after fine-tuning; the drop is the forgetting.

Example::

    keys, a, b = aligned_names("de", "fr")
    enc = USEMultilingual.load()
    accuracy = retrieval_accuracy(enc(enc.tokenize(a)), enc(enc.tokenize(b)))
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .data import entity_names


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
    a = torch.nn.functional.normalize(source.double(), dim=1)
    b = torch.nn.functional.normalize(target.double(), dim=1)
    sim = a @ b.T
    idx = torch.arange(len(sim))

    def hits(s: Tensor) -> float:
        own = s[idx, idx]
        others = s.clone()
        others[idx, idx] = -torch.inf
        return float((own > others.max(dim=1).values).double().mean())

    return (hits(sim) + hits(sim.T)) / 2
