"""Forgetting measures for an encoder without an MLM head.

The paper measures forgetting as the MLM loss of the fine-tuned encoder under the *frozen*
pre-trained MLM head. Neither encoder of the benchmark ships an MLM head, so we build the same construction
on a held-out auxiliary task: :class:`LidProbe` is a linear language-identification head
fitted once on the frozen pre-trained encoder's mean-pooled embeddings of UDHR text windows
(from ``gflanguages``; no entity names, no fine-tuning data). It then stays frozen; its loss on
held-out windows, read through the fine-tuned encoder, rises as the encoder loses what the
probe relied on. :func:`embedding_drift` is the probe-free companion: one minus the mean cosine
between the current and the original sentence embeddings of the same held-out windows.

Both take a ``features`` callable (token-id lists -> ``(B, d)`` tensor), so they work with any
wrapping of the encoder (full model, or a frozen cached bottom plus trainable top layers);
:meth:`LidProbe.score` and :func:`drift_of` take already pooled features instead.

Why this stands in for the paper's MLM loss: both are the loss of a head that was fitted to the
*pre-trained* encoder and then frozen, on data the fine-tuning task never sees. The head can
only do well while the encoder still represents what it relied on, so a rising loss means the
fine-tuned encoder has lost pre-trained knowledge. Language identity is such knowledge: the
pre-trained MiniLM separates 26 languages well (accuracy about 0.72 from 4-word windows),
while the shared entity head rewards language-*invariant* features. For USE-multilingual,
trained to map translations together, the primary measure is cross-lingual retrieval
(:mod:`alignment`); the probe is reported beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

Features = Callable[[Sequence[Sequence[int]]], Tensor]

LID_LANGUAGES: tuple[str, ...] = (
    "en", "de", "fr", "es", "it", "pt", "nl", "sv", "da", "pl", "cs", "fi", "hu", "ro",
    "tr", "id", "vi", "sw", "ca", "hr", "sk", "et", "lt", "lv", "sl", "is", "ga", "cy",
)  # fmt: skip
"""Latin-script candidates; those with too little UDHR text in gflanguages are skipped."""


def udhr_windows(code: str, words: int = 4) -> list[str]:
    """Distinct, non-overlapping ``words``-word windows of the UDHR sample text of ``code``
    (``<code>_Latn`` in gflanguages), in text order."""
    langs = _languages()
    key = f"{code}_Latn"
    if key not in langs or not langs[key].HasField("sample_text"):
        return []
    st = langs[key].sample_text
    lines: list[str] = []
    for fld in ("tester", "poster_md", "specimen_36", "specimen_32", "specimen_21", "specimen_16"):
        for line in getattr(st, fld).split("\n"):
            line = line.strip()
            if line and line not in lines:
                lines.append(line)
    out: list[str] = []
    seen: set[str] = set()
    for line in lines:
        toks = line.split()
        for i in range(0, len(toks) - words + 1, words):
            w = " ".join(toks[i : i + words])
            if w not in seen:
                seen.add(w)
                out.append(w)
    return out


_LANGS: dict[str, Any] = {}


def _languages() -> dict[str, Any]:
    """gflanguages' language table (loaded once, about 0.3 s)."""
    if not _LANGS:
        import gflanguages

        _LANGS.update(gflanguages.LoadLanguages())
    return _LANGS


@dataclass
class LidProbe:
    """A frozen linear LID head over mean-pooled encoder features (see module docstring)."""

    languages: list[str]
    weight: Tensor
    bias: Tensor
    test_ids: list[list[int]]
    test_labels: Tensor
    reference_features: Tensor  # the pre-trained encoder's features of test_ids
    fit_report: dict[str, float]

    @classmethod
    @torch.no_grad()
    def fit(
        cls,
        tokenize: Callable[[list[str]], list[list[int]]],
        features: Features,
        languages: Sequence[str] = LID_LANGUAGES,
        min_windows: int = 24,
        max_windows: int = 40,
        weight_decay: float = 1e-3,
        seed: int = 0,
    ) -> LidProbe:
        """Fit on half of each language's windows (alternating), test on the other half, from
        the pre-trained encoder's sentence ``features`` of the windows ``tokenize`` gives.

        Deterministic given ``seed``; takes about a second on 2 CPU cores.
        """
        langs, tr_ids, tr_y, te_ids, te_y = [], [], [], [], []
        for code in languages:
            wins = udhr_windows(code)
            if len(wins) < min_windows:
                continue
            wins = wins[:max_windows]
            label = len(langs)
            langs.append(code)
            ids = tokenize(wins)
            tr_ids += ids[0::2]
            te_ids += ids[1::2]
            tr_y += [label] * len(ids[0::2])
            te_y += [label] * len(ids[1::2])

        x_tr, x_te = features(tr_ids), features(te_ids)
        y_tr = torch.tensor(tr_y)
        g = torch.Generator().manual_seed(seed)
        w = torch.zeros(len(langs), x_tr.shape[1])
        w.normal_(0.0, 0.01, generator=g)
        b = torch.zeros(len(langs))
        w.requires_grad_(True)
        b.requires_grad_(True)
        with torch.enable_grad():
            opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=300, line_search_fn="strong_wolfe")

            def closure() -> Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(x_tr @ w.T + b, y_tr) + weight_decay * (w * w).sum()
                loss.backward()
                return loss

            opt.step(closure)
        w, b = w.detach(), b.detach()
        y_te = torch.tensor(te_y)
        logits = x_te @ w.T + b
        report = {
            "languages": float(len(langs)),
            "train_acc": float(((x_tr @ w.T + b).argmax(-1) == y_tr).float().mean()),
            "test_loss": float(F.cross_entropy(logits, y_te)),
            "test_acc": float((logits.argmax(-1) == y_te).float().mean()),
            "test_windows": float(len(te_ids)),
        }
        return cls(langs, w, b, te_ids, y_te, x_te, report)

    @torch.no_grad()
    def evaluate(self, features: Features) -> dict[str, float]:
        """Probe loss and accuracy on the held-out windows, through ``features``."""
        x = torch.cat([features(self.test_ids[i : i + 256]) for i in range(0, len(self.test_ids), 256)])
        return self.score(x)

    @torch.no_grad()
    def score(self, pooled: Tensor) -> dict[str, float]:
        """Probe loss and accuracy from the pooled features ``(n_windows, d)`` of the held-out
        windows (in :attr:`test_ids` order)."""
        pooled = pooled.to(self.weight.device, self.weight.dtype)
        logits = pooled @ self.weight.T + self.bias
        labels = self.test_labels.to(logits.device)
        return {
            "lid_loss": float(F.cross_entropy(logits, labels)),
            "lid_acc": float((logits.argmax(-1) == labels).float().mean()),
        }

    def to_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and JSON metadata that :meth:`from_tensors` restores (for the disk cache)."""
        lengths = torch.tensor([len(x) for x in self.test_ids], dtype=torch.long)
        flat = torch.tensor([t for x in self.test_ids for t in x], dtype=torch.long)
        tensors = {
            "weight": self.weight.contiguous(),
            "bias": self.bias.contiguous(),
            "test_tokens": flat,
            "test_lengths": lengths,
            "test_labels": self.test_labels,
            "reference_features": self.reference_features.contiguous(),
        }
        return tensors, {"languages": list(self.languages), "fit_report": dict(self.fit_report)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> LidProbe:
        """Inverse of :meth:`to_tensors`."""
        pieces = tensors["test_tokens"].split(tensors["test_lengths"].tolist())
        return cls(
            list(meta["languages"]),
            tensors["weight"],
            tensors["bias"],
            [p.tolist() for p in pieces],
            tensors["test_labels"],
            tensors["reference_features"],
            dict(meta["fit_report"]),
        )


@torch.no_grad()
def embedding_drift(features: Features, reference: Tensor, ids: Sequence[Sequence[int]]) -> float:
    """``1 - mean cos(features(ids), reference)``: 0 for the unchanged encoder."""
    x = torch.cat([features(ids[i : i + 256]) for i in range(0, len(ids), 256)])
    return drift_of(x, reference)


def drift_of(pooled: Tensor, reference: Tensor) -> float:
    """``1 - mean cos(pooled, reference)`` row by row: 0 for the unchanged encoder."""
    reference = reference.to(pooled.device, pooled.dtype)
    return float(1.0 - F.cosine_similarity(pooled, reference, dim=-1).mean())
