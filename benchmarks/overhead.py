"""Per-inner-step overhead of Sequential Reptile over the bare wrapped optimizer.

Both run the same model, the same batches and the same task sequence; measurements alternate
between the two in blocks (and which goes first alternates too) so that drift on a shared
machine hits both alike. The wrapper's own per-step work is also timed directly. The outer step
(every K inner steps) is included, amortised, in Sequential Reptile's time.

    python benchmarks/overhead.py            # K = 100, a 2-layer transformer encoder
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine  # noqa: E402

import metaopt  # noqa: E402

TASKS = [f"t{i}" for i in range(9)]


def make_model(d: int, layers: int, vocab: int) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
    return nn.ModuleDict({
        "emb": nn.Embedding(vocab, d),
        "enc": nn.TransformerEncoder(layer, layers, enable_nested_tensor=False),
        "head": nn.Linear(d, 5),
    })


def loss_of(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    h = model["enc"](model["emb"](x)).mean(1)
    return nn.functional.cross_entropy(model["head"](h), y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inner-steps", type=int, default=100)
    ap.add_argument("--blocks", type=int, default=6, help="alternating measurement blocks per method")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    k = args.inner_steps
    g = torch.Generator().manual_seed(0)
    vocab = 4000
    batches = [(torch.randint(vocab, (args.batch, 16), generator=g),
                torch.randint(5, (args.batch,), generator=g)) for _ in range(k)]

    bare_model = make_model(args.d, args.layers, vocab)
    bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=1e-4)
    sr_model = make_model(args.d, args.layers, vocab)
    sr_opt = metaopt.SequentialReptile(torch.optim.AdamW(sr_model.parameters(), lr=1e-4),
                                       tasks=TASKS, inner_steps=k, outer_lr=0.1, seed=0)
    n_params = sum(p.numel() for p in bare_model.parameters())

    def bare_block() -> float:
        t0 = time.perf_counter()
        for b in batches:
            bare_opt.zero_grad()
            loss_of(bare_model, b).backward()
            bare_opt.step()
        return (time.perf_counter() - t0) / k

    def sr_block() -> float:
        t0 = time.perf_counter()
        for b in batches:   # one full outer step: K inner steps and the interpolation
            (task,) = sr_opt.next_tasks()
            sr_opt.step({task: loss_of(sr_model, b)})
        return (time.perf_counter() - t0) / k

    bare_block(); sr_block()   # warm-up
    bare_t, sr_t = [], []
    for i in range(args.blocks):   # alternate which runs first: the second of a pair ran slower here
        if i % 2:
            sr_t.append(sr_block())
            bare_t.append(bare_block())
        else:
            bare_t.append(bare_block())
            sr_t.append(sr_block())
    b, s = statistics.median(bare_t), statistics.median(sr_t)
    paired = statistics.median([y / x - 1 for x, y in zip(bare_t, sr_t)])
    print(f"model: {n_params / 1e6:.2f}M params, batch {args.batch}x16 tokens; K = {k}")
    print(f"machine: {machine()}")
    print(f"bare AdamW            {b * 1e3:8.2f} ms / inner step")
    print(f"SequentialReptile     {s * 1e3:8.2f} ms / inner step (outer step amortised)")
    print(f"overhead              {100 * (s / b - 1):+7.2f} %  (median of paired blocks: {100 * paired:+.2f} %)")

    # The end-to-end difference sits within run-to-run noise on a shared machine, so also time
    # the wrapper's own work per inner step directly (the gradient computation is the same
    # autograd pass in both loops).
    loss = loss_of(sr_model, batches[0])
    wanted = sr_opt.next_tasks()
    grads = [torch.randn_like(p) for p in sr_model.parameters()]
    n = 2000
    parts = {
        "loss structure checks": lambda: sr_opt._check_losses({wanted[0]: loss}, wanted),
        "finite losses and gradients (1 sync)": lambda: sr_opt._require_finite({wanted[0]: loss}, grads=grads),
        "parameter-set check": sr_opt._sync_params,
        "external-change check": sr_opt._changed_params,
        "version record": sr_opt._record_versions,
        "schedule draw": lambda: sr_opt.schedule.draw(sr_opt.generator),
        "step report": lambda: sr_opt._report({wanted[0]: loss}),
    }
    total = 0.0
    print("wrapper work per inner step:")
    for name, fn in parts.items():
        t = timeit.timeit(fn, number=n) / n
        total += t
        print(f"  {name:34s} {t * 1e6:8.1f} us")
    t_outer = timeit.timeit(lambda: sr_opt.engine.interpolate(0.1), number=50) / 50
    total += t_outer / k
    print(f"  {'outer step / K':34s} {t_outer / k * 1e6:8.1f} us  ({t_outer * 1e3:.2f} ms every {k} steps)")
    print(f"  {'total':34s} {total * 1e6:8.1f} us = {100 * total / b:.2f} % of a bare step")


if __name__ == "__main__":
    main()
