"""LoRA adapters (PEFT) trained with Sequential Reptile and PCGrad over ``model.parameters()``.

A small random encoder (offline: nothing is downloaded) gets LoRA adapters on its two
projections and one trainable head per task (``modules_to_save``); everything else is frozen.
The optimizers are built over ``model.parameters()``, as a PEFT user builds them: metaopt keeps
state (slow weights, per-task gradient rows, the wrapped AdamW's moments) for the adapters and
heads only, and never copies or touches the frozen base.

Run with ``python examples/lora.py`` (needs the ``peft`` extra: ``pip install peft``).
"""

from __future__ import annotations

import torch

import metaopt

TASKS = ["ar", "bn", "fi"]


class Encoder(torch.nn.Module):
    """A two-layer encoder with one linear head per task."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(16, width)
        self.mix = torch.nn.Linear(width, width)
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(width, 1) for t in TASKS})

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](torch.tanh(self.mix(torch.tanh(self.embed(x)))))


def lora_model(seed: int = 0) -> torch.nn.Module:
    """The encoder with LoRA (rank 4) on ``embed`` and ``mix``, and trainable heads."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - depends on the environment
        from metaopt._extras import install_hint

        raise ImportError(f"examples/lora.py needs peft: {install_hint('peft')}") from err
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed", "mix"], modules_to_save=[f"heads.{t}" for t in TASKS]
    )
    return get_peft_model(Encoder(), config)


def batch(step: int, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Task ``task``'s batch at ``step``: a fixed random read-out of the inputs, per task."""
    g = torch.Generator().manual_seed(1000 * step + TASKS.index(task))
    x = torch.randn(32, 16, generator=g)
    w = torch.linspace(-1.0, 1.0, 16).reshape(16, 1) * (TASKS.index(task) + 1)
    return x, torch.tanh(x @ w)


def build(method: str, model: torch.nn.Module) -> metaopt.MultiTaskOptimizer:
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)  # every parameter, frozen ones too
    if method == "SequentialReptile":
        return metaopt.SequentialReptile(
            inner, tasks=TASKS, inner_steps=4, outer_lr=0.5, seed=0, allow_unused=True
        )
    return metaopt.PCGrad(inner, tasks=TASKS, seed=0)


def state_bytes(opt: metaopt.MultiTaskOptimizer) -> int:
    """Bytes of every tensor in the optimizer's state (the wrapped AdamW's and metaopt's)."""
    state = opt.state_dict()["state"]
    return sum(
        v.numel() * v.element_size()
        for fields in state.values()
        for v in fields.values()
        if torch.is_tensor(v)
    )


def train(method: str, steps: int = 40) -> dict[str, float]:
    model = lora_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = build(method, model)
    first = last = 0.0
    for s in range(steps):
        losses = {t: (model(batch(s, t)[0], t) - batch(s, t)[1]).pow(2).mean() for t in opt.next_tasks()}
        report = opt.step(losses)
        value = float(sum(report.losses.values()) / len(report.losses))
        first, last = (value if s == 0 else first), value
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return {
        "first_loss": first,
        "last_loss": last,
        "trainable_bytes": trainable,
        "frozen_bytes": base,
        "state_bytes": state_bytes(opt),
    }


def main(steps: int = 40) -> dict[str, dict[str, float]]:
    results = {}
    for method in ("SequentialReptile", "PCGrad"):
        r = train(method, steps)
        results[method] = r
        state, adapters, base = r["state_bytes"] / 1e3, r["trainable_bytes"] / 1e3, r["frozen_bytes"] / 1e3
        print(
            f"{method:17s} loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}; optimizer state "
            f"{state:.1f} kB for {adapters:.1f} kB of adapters and heads ({state / adapters:.1f}x); "
            f"frozen base {base:.1f} kB, untouched, no state"
        )
    return results


if __name__ == "__main__":
    main()
