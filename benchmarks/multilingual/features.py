"""Frozen-bottom states, computed once per encoder and indexed per data split.

The bottom of the split model (:mod:`backbone`: MiniLM's embeddings and first k layers, token
by token; USE's pooled vector, one row per name) never changes during fine-tuning, so its
output for every name is computed once. A :class:`StateBank`
holds the states of a set of token sequences as one packed ``(n_tokens, hidden)`` tensor; a
:class:`SplitFeatures` is one data split's view into a bank (a row index per token), from which
a batch is two gathers: no Python loop per example, no padding in the dense layers.

The banks are cached on disk (``cache.py``), keyed by what the bottom depends on (the encoder
files, MiniLM's ``k``) and a digest of the token sequences.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .backbone import Bottom, Wrap
from .cache import DiskCache

Sequences = Sequence[Sequence[int]]


def sequences_digest(seqs: Sequences) -> str:
    """SHA-256 of a list of token sequences (order-sensitive)."""
    h = hashlib.sha256()
    for s in seqs:
        h.update(b",".join(str(t).encode() for t in s))
        h.update(b";")
    return h.hexdigest()


@dataclass
class StateBank:
    """Packed states of distinct token sequences: rows ``offsets[i]:offsets[i+1]`` of
    ``states`` belong to ``sequences[i]`` (one per token for MiniLM, one per name for USE)."""

    sequences: list[tuple[int, ...]]
    states: Tensor  # (n_rows, hidden)
    offsets: Tensor  # (len(sequences) + 1,) long

    def __post_init__(self) -> None:
        self._row = {s: i for i, s in enumerate(self.sequences)}

    def to(self, device: torch.device) -> StateBank:
        return StateBank(self.sequences, self.states.to(device), self.offsets)

    def split(self, ids: Sequences, labels: Sequence[int] | Tensor) -> SplitFeatures:
        """The features of one split (every sequence must be in the bank)."""
        missing = [s for s in ids if tuple(s) not in self._row]
        if missing:
            raise KeyError(f"{len(missing)} sequence(s) are not in the state bank")
        rows = torch.tensor([self._row[tuple(s)] for s in ids], dtype=torch.long)
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts  # a sequence's rows: its tokens, or one vector
        width = int(lengths.max()) if len(ids) else 0
        mask = torch.arange(width)[None, :] < lengths[:, None]
        index = (starts[:, None] + torch.arange(width)[None, :]) * mask
        device = self.states.device
        return SplitFeatures(
            self.states,
            index.to(device),
            mask.to(device),
            torch.as_tensor(labels, dtype=torch.long).to(device),
        )


@dataclass
class SplitFeatures:
    """One split (a language's train, dev or test names; the LID windows) as a view into a
    :class:`StateBank`: ``index[i, j]`` is the bank row of token ``j`` of example ``i``."""

    states: Tensor
    index: Tensor  # (N, L) long
    mask: Tensor  # (N, L) bool
    labels: Tensor  # (N,) long

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Packed token states ``(n, hidden)``, mask ``(B, L_batch)`` and labels of examples
        ``idx``."""
        idx = idx.to(self.index.device)
        mask = self.mask[idx]
        width = int(mask.sum(1).max())
        mask = mask[:, :width]
        return self.states[self.index[idx, :width][mask]], mask, self.labels[idx]

    def chunks(self, size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """All examples in order, ``size`` at a time (for evaluation)."""
        for start in range(0, len(self), size):
            yield self.batch(torch.arange(start, min(start + size, len(self))))

    def subset(self, count: int | None) -> SplitFeatures:
        """The first ``count`` examples (all if ``None``)."""
        if count is None or count >= len(self):
            return self
        return SplitFeatures(self.states, self.index[:count], self.mask[:count], self.labels[:count])


def build_bank(bottom: Bottom, sequences: Sequences, wrap: Wrap | None = None) -> StateBank:
    """Run the frozen ``bottom`` (:class:`backbone.Backbone`'s) over the distinct sequences
    (``wrap``: an optional progress bar around its loop over chunks)."""
    uniq = sorted({tuple(s) for s in sequences})
    if not uniq:
        raise ValueError("build_bank: no sequences")
    states = bottom(uniq, wrap)
    lengths = torch.tensor([0] + [len(s) for s in states], dtype=torch.long)
    return StateBank(uniq, torch.cat(states), lengths.cumsum(0))


def cached_bank(
    cache: DiskCache | None,
    bottom: Bottom,
    sequences: Sequences,
    identity: str,
    wrap: Wrap | None = None,
) -> StateBank:
    """:func:`build_bank`, stored in and reloaded from ``cache`` (when given) under a key made
    of the bottom's ``identity`` and the sequences' digest; the reloaded sequences are checked."""
    uniq = sorted({tuple(s) for s in sequences})
    if cache is None:
        return build_bank(bottom, uniq, wrap)
    key = {"bottom": identity, "sequences": sequences_digest(uniq), "count": len(uniq)}

    def build() -> tuple[dict[str, Tensor], dict[str, object]]:
        bank = build_bank(bottom, uniq, wrap)
        tokens = torch.tensor([t for s in uniq for t in s], dtype=torch.long)
        lengths = torch.tensor([len(s) for s in uniq], dtype=torch.long)
        return {"states": bank.states, "offsets": bank.offsets, "tokens": tokens, "lengths": lengths}, {}

    tensors, _ = cache.load_or_build("bottom", key, build)
    tokens = tensors["tokens"].split(tensors["lengths"].tolist())
    stored = [tuple(t.tolist()) for t in tokens]
    if stored != uniq:  # a digest collision or a hand-edited entry: never use wrong states
        cache.log("cache: bottom states do not match their sequences; rebuilding them")
        return build_bank(bottom, uniq, wrap)
    return StateBank(uniq, tensors["states"], tensors["offsets"])
