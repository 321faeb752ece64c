"""Per-inner-step overhead of Sequential Reptile over the bare wrapped optimizer.

All variants run the same model, the same batches and the same task sequence: bare AdamW, and
Sequential Reptile driven the torch way (``loss.backward(); opt.step(); opt.zero_grad()``) and
through the one loop (``opt.step(losses)``).
Measurements rotate through the variants in blocks (the order rotates too) so that drift on a
shared machine hits all alike. The wrapper's own per-step work is also timed directly. The
outer step (every K inner steps) is included, amortised, in Sequential Reptile's times.

    python benchmarks/overhead.py            # K = 100, a 2-layer transformer encoder
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metaopt
from metaopt.jacobian import compiled_graph, reaches_any
from metaopt.parts.grads import all_finite

from _timing import machine

TASKS = [f"t{i}" for i in range(9)]


def make_model(d: int, layers: int, vocab: int) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
    return nn.ModuleDict(
        {
            "emb": nn.Embedding(vocab, d),
            "enc": nn.TransformerEncoder(layer, layers, enable_nested_tensor=False),
            "head": nn.Linear(d, 5),
        }
    )


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
    batches = [
        (torch.randint(vocab, (args.batch, 16), generator=g), torch.randint(5, (args.batch,), generator=g))
        for _ in range(k)
    ]

    bare_model = make_model(args.d, args.layers, vocab)
    bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=1e-4)
    n_params = sum(p.numel() for p in bare_model.parameters())

    def sequential_reptile() -> tuple[nn.Module, metaopt.SequentialReptile]:
        model = make_model(args.d, args.layers, vocab)
        return model, metaopt.SequentialReptile(
            torch.optim.AdamW(model.parameters(), lr=1e-4),
            tasks=TASKS,
            inner_steps=k,
            outer_lr=0.1,
            seed=0,
        )

    torch_model, torch_opt = sequential_reptile()
    loop_model, loop_opt = sequential_reptile()

    def bare_block() -> float:
        t0 = time.perf_counter()
        for b in batches:
            bare_opt.zero_grad()
            loss_of(bare_model, b).backward()
            bare_opt.step()
        return (time.perf_counter() - t0) / k

    def torch_way(model: nn.Module, opt: metaopt.SequentialReptile) -> Callable[[], float]:
        def block() -> float:
            t0 = time.perf_counter()
            for b in batches:  # one full outer step: K inner steps and the interpolation
                opt.next_tasks()
                opt.zero_grad()
                loss_of(model, b).backward()
                opt.step()
            return (time.perf_counter() - t0) / k

        return block

    def one_loop_block() -> float:
        t0 = time.perf_counter()
        for b in batches:
            (task,) = loop_opt.next_tasks()
            loop_opt.step({task: loss_of(loop_model, b)})
        return (time.perf_counter() - t0) / k

    variants: dict[str, Callable[[], float]] = {
        "bare AdamW": bare_block,
        "SequentialReptile, torch way": torch_way(torch_model, torch_opt),
        "SequentialReptile, one loop": one_loop_block,
    }
    names = list(variants)
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.blocks):  # rotate the order: the later ones of a round ran slower here
        order = names[i % len(names) :] + names[: i % len(names)]
        for n in order:
            times[n].append(variants[n]())
    base = statistics.median(times["bare AdamW"])
    print(
        f"model: {n_params / 1e6:.2f}M params, batch {args.batch}x16 tokens; K = {k}; "
        f"{args.blocks} blocks of {k} steps per variant"
    )
    print(f"machine: {machine()}")
    for n in names:
        t = statistics.median(times[n])
        line = f"{n:45s} {t * 1e3:8.2f} ms / inner step"
        if n != "bare AdamW":
            paired = statistics.median([y / x - 1 for x, y in zip(times["bare AdamW"], times[n])])
            line += (
                f"   overhead {100 * (t / base - 1):+6.2f} % (median of paired blocks {100 * paired:+.2f} %)"
            )
        print(line)

    # The end-to-end difference sits within run-to-run noise on a shared machine, so also time
    # the wrapper's own work per inner step directly (the gradient computation is the same
    # autograd pass in every loop).
    sr_model, sr_opt = torch_model, torch_opt
    loss = loss_of(sr_model, batches[0])
    wanted = sr_opt.next_tasks()
    grads = [torch.randn_like(p) for p in sr_model.parameters()]
    params = list(sr_model.parameters())
    n = 2000
    parts = {
        "loss structure checks (one loop)": lambda: sr_opt._check_losses({wanted[0]: loss}, wanted, "step"),
        "reach and compiled-graph checks (one loop)": lambda: (
            reaches_any(loss, params),
            compiled_graph(loss),
        ),
        "finite gradients (1 sync)": lambda: bool(all_finite(grads)),
        "parameter-set check": sr_opt._sync_params,
        "external-change check": sr_opt._changed_params,
        "version record": sr_opt._record_versions,
        "schedule draw": lambda: sr_opt.schedule.draw(sr_opt.generator),
    }
    total = 0.0
    print("wrapper work per inner step:")
    for name, fn in parts.items():
        t = timeit.timeit(fn, number=n) / n
        total += t
        print(f"  {name:44s} {t * 1e6:8.1f} us")
    t_outer = timeit.timeit(lambda: sr_opt.engine.interpolate(0.1), number=50) / 50
    total += t_outer / k
    print(f"  {'outer step / K':44s} {t_outer / k * 1e6:8.1f} us  ({t_outer * 1e3:.2f} ms every {k} steps)")
    print(f"  {'total':44s} {total * 1e6:8.1f} us = {100 * total / base:.2f} % of a bare step")


if __name__ == "__main__":
    main()
