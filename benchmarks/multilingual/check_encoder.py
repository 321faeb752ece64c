"""Checks of the plain-torch all-MiniLM-L6-v2 port (there is no reference implementation here).

1. Golden values: the sentence-transformers documentation (sbert.net, "Usage" page) prints the
   cosine matrix of three sentences for all-MiniLM-L6-v2: 0.6660, 0.1046, 0.1411. We must match
   to 4 decimals.
2. Padding invariance: a name embedded alone equals the same name embedded in a padded batch.
3. Packed = padded: a layer run on packed tokens (the fast path) equals the textbook padded
   computation at every real token.
4. Sanity of similarities: related words / translations / paraphrases score above unrelated
   ones, and a randomly initialised model of the same architecture does not show the pattern.

Run: ``python benchmarks/multilingual/check_encoder.py`` (exits non-zero if 1, 2 or 3 fails).
``tests/test_benchmark.py`` runs 1 to 3 as well.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: make the package importable (PEP 366)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "multilingual"

import torch
import torch.nn.functional as F
from torch import Tensor

from .encoder import Layer, MiniLM, Tokenizer, build_scratch, cosine, load_pretrained, load_tokenizer, pack

GOLDEN_SENTENCES = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
GOLDEN = torch.tensor([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
NAMES = ["Deutschland", "Schweizer Franken", "Kyrillisch", "Santo Domingo", "Vereinigte Staaten von Amerika"]
TOLERANCE = 1e-4

PAIRS = [  # (a, b, related?)
    ("A man is playing a guitar.", "A person plays a musical instrument.", True),
    ("A man is playing a guitar.", "The stock market fell sharply today.", False),
    ("How old are you?", "What is your age?", True),
    ("How old are you?", "The weather is sunny.", False),
    ("dog", "puppy", True),
    ("dog", "car", False),
    ("Germany", "Deutschland", True),
    ("Germany", "banana", False),
    ("French", "Französisch", True),
    ("French", "Dollar", False),
    ("Swiss franc", "Schweizer Franken", True),
    ("Swiss franc", "Kyrillisch", False),
]


@torch.no_grad()
def golden_error(model: MiniLM, tok: Tokenizer) -> float:
    """Max |difference| from the documented cosine matrix."""
    e = model.eval().embed(tok.batch(GOLDEN_SENTENCES))
    return float((cosine(e, e) - GOLDEN).abs().max())


@torch.no_grad()
def padding_error(model: MiniLM, tok: Tokenizer) -> float:
    """Max |difference| between names embedded in one padded batch and one by one."""
    model.eval()
    batch = model.embed(tok.batch(NAMES))
    alone = torch.cat([model.embed(tok.batch([n])) for n in NAMES])
    return float((batch - alone).abs().max())


def padded_layer(layer: Layer, x: Tensor, mask: Tensor) -> Tensor:
    """The textbook post-LN BERT block on padded ``(B, L, d)`` states (eval mode)."""
    att = layer.attention
    b, n, d = x.shape

    def heads(t: Tensor) -> Tensor:
        return t.view(b, n, att.self.heads, d // att.self.heads).transpose(1, 2)

    o = F.scaled_dot_product_attention(
        heads(att.self.query(x)),
        heads(att.self.key(x)),
        heads(att.self.value(x)),
        attn_mask=mask[:, None, None, :],
    )
    x = att.output.LayerNorm(x + att.output.dense(o.transpose(1, 2).reshape(b, n, d)))
    return layer.output.LayerNorm(x + layer.output.dense(F.gelu(layer.intermediate.dense(x))))


@torch.no_grad()
def packed_error(model: MiniLM, tok: Tokenizer) -> float:
    """Max |difference| between the packed layer and :func:`padded_layer` at real tokens."""
    model.eval()
    batch = tok.batch(NAMES)
    x = model.embeddings(batch.input_ids)
    layer = model.encoder.layer[0]
    fast = layer(pack(x, batch.attention_mask), batch.attention_mask)
    slow = pack(padded_layer(layer, x, batch.attention_mask), batch.attention_mask)
    return float((fast - slow).abs().max())


@torch.no_grad()
def main() -> int:
    torch.manual_seed(0)
    tok = load_tokenizer()
    model = load_pretrained().eval()
    checks = [
        ("golden cosines (sbert.net docs)", golden_error(model, tok)),
        ("padding invariance", padding_error(model, tok)),
        ("packed layer = padded layer", packed_error(model, tok)),
    ]
    ok = True
    for i, (name, err) in enumerate(checks, 1):
        print(f"{i}. {name}: max |diff| = {err:.2e}")
        ok &= err < TOLERANCE
    scratch = build_scratch(seed=0).eval()
    print("4. cosine of pairs (pre-trained | random init):")
    for a, b, related in PAIRS:
        x = cosine(model.embed(tok.batch([a])), model.embed(tok.batch([b])))
        y = cosine(scratch.embed(tok.batch([a])), scratch.embed(tok.batch([b])))
        kind = "related  " if related else "unrelated"
        print(f"   {kind} {a!r:40} {b!r:28} {float(x):6.3f} | {float(y):6.3f}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
