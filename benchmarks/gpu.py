"""The accelerator checks, in one run on a lent GPU: every fast path against float64, the outer
step against its floor, host syncs per method, whole steps of the methods, host placement.

Sections (each prints one markdown table):

* **paths**: each interpolation path (``reference``, ``foreach``, ``kernel``: the Triton kernel
  where it is registered) on fresh random mBERT-shaped parameters, fp32 and bf16: the largest
  error of φ against a float64 loop (relative to φ's scale), whether θ equals φ rounded as
  torch's ``.to()`` rounds, and the median time against the floor (twice a ``copy_`` of the
  parameters: the outer step's four passes at copy bandwidth).
* **syncs**: every method's steady-state step (the one loop and the torch way) under
  ``torch.cuda.set_sync_debug_mode("error")``: ``none``, or the first host read it makes.
* **steps**: whole steps of MTL, PCGrad, GradVac and Sequential Reptile (and a naive PCGrad:
  one backward per task, flattened gradients, projections in Python, as pytorch-pcgrad does) on
  a random Transformer encoder with T tasks: median milliseconds and peak device memory.
* **host**: Sequential Reptile with ``state_device="cpu"`` against its state beside the
  parameters: equal bit for bit, the device bytes metaopt holds between outer steps (the
  allocator's), pinned buffers, the outer step's time.
* **gramian**: the float64 Gramian of T = 8 float32 gradient rows (BERT-base length) by the
  Triton kernel and by the chunked float64 path, against ``J @ J.T`` in float32 (TF32 off, the
  target's unit of cost): the largest error relative to the two rows' norms (against float64)
  and the median time.
* **capture**: Sequential Reptile's inner step over a capturable AdamW, compiled with
  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), against the eager steps.

Run::

    python benchmarks/gpu.py                          # on the GPU: full sizes, under 5 minutes
    python benchmarks/gpu.py --device cpu --smoke     # the dry run the tests make (small sizes;
                                                      # the kernel through Triton's interpreter)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _timing import median_time, sync  # noqa: E402

TASKS8 = [f"t{i}" for i in range(8)]


def _setup(device: torch.device) -> None:
    """On the CPU the Triton kernel runs through the interpreter (set before Triton loads)."""
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _median_ms(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median milliseconds of ``fn`` (:func:`_timing.median_time`, synchronised on a GPU)."""
    return median_time(fn, repeat=repeat, warmup=2, device=device) * 1e3


def _table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")


# ---------------------------------------------------------------------- paths
def paths(device: torch.device, scale: int, repeat: int) -> None:
    from interpolation import mbert_shapes

    from metaopt.interpolation import Interpolator, register_kernel

    rows = []
    if device.type == "cpu":  # the dry run: the Triton kernel through the interpreter
        try:
            from metaopt.triton_kernel import outer_step

            register_kernel("cpu", outer_step)
        except ImportError:
            pass
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(1)
        shapes = mbert_shapes(scale)
        start = [torch.randn(s, generator=g, dtype=torch.float64) * 0.02 + 0.01 for s in shapes]
        moved = [t + torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.01 for t in start]
        elements = sum(t.numel() for t in start)
        a = torch.ones(elements, dtype=dtype, device=device)
        b = torch.empty_like(a)
        floor = 2 * _median_ms(lambda a=a, b=b: b.copy_(a), device, repeat)
        engines = {}
        for method in ("reference", "foreach", "auto"):
            theta = [t.to(device=device, dtype=dtype) for t in start]
            engine = Interpolator(theta, method=method)  # type: ignore[arg-type]
            for t, m in zip(theta, moved):
                t.copy_(m)
            # φ starts at θ as given (already rounded), so θ's master form is θ itself
            phi0 = [s.to(dtype).double() for s in start]
            expected = [p + 0.3 * (m.to(dtype).double() - p) for p, m in zip(phi0, moved)]
            engine.interpolate(0.3)
            scale_ = max(float(e.abs().max()) for e in expected)
            err = (
                max(float((p.double().cpu() - e).abs().max()) for p, e in zip(engine.slow, expected)) / scale_
            )
            rounded = all(torch.equal(t, p.to(dtype)) for t, p in zip(theta, engine.slow))
            name = engine.path()[0] if method == "auto" else method
            if name in engines:
                continue
            engines[name] = True
            ms = _median_ms(lambda e=engine: e.interpolate(0.3), device, repeat)
            rows.append([str(dtype).removeprefix("torch."), name, err, rounded, ms, ms / floor])
    if device.type == "cpu":
        register_kernel("cpu", None)
    _table(
        f"paths ({device}, {elements:,} parameters in {len(shapes)} tensors)",
        ["dtype", "path", "max rel. error of φ", "θ = round(φ)", "ms", "× floor"],
        rows,
    )


# ---------------------------------------------------------------------- models and methods
class Encoder(torch.nn.Module):
    """A random Transformer encoder with one linear head per task (inputs: token embeddings)."""

    def __init__(self, width: int, layers: int, tasks: list[str]) -> None:
        super().__init__()
        torch.manual_seed(0)
        block = torch.nn.TransformerEncoderLayer(
            width, max(1, width // 64), 4 * width, dropout=0.0, batch_first=True
        )
        self.body = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(width, 2) for t in tasks})

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](self.body(x).mean(1))


def method(name: str, model: torch.nn.Module, tasks: list[str]):
    import metaopt

    inner = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if name == "MTL":
        return metaopt.MTL(inner, tasks=tasks)
    if name == "PCGrad":
        return metaopt.PCGrad(inner, tasks=tasks)
    if name == "GradVac":
        return metaopt.GradVac(inner, tasks=tasks, beta=0.01)
    if name == "GradNorm":
        return metaopt.GradNorm(
            metaopt.MTL(inner, tasks=tasks), layer=list(model.body.layers[-1].parameters())
        )
    if name == "SequentialReptile":
        return metaopt.SequentialReptile(inner, tasks=tasks, inner_steps=4, outer_lr=0.1, allow_unused=True)
    if name == "Reptile":
        return metaopt.Reptile(inner, tasks=tasks, inner_steps=4, outer_lr=0.1, allow_unused=True)
    raise KeyError(name)


def _losses(model, opt, batches) -> dict[str, torch.Tensor]:
    return {
        t: torch.nn.functional.cross_entropy(model(*batches[t][:1], t), batches[t][1])
        for t in opt.next_tasks()
    }


def _batches(tasks, width, batch, seq, device, dtype):
    g = torch.Generator().manual_seed(2)
    return {
        t: (
            torch.randn(batch, seq, width, generator=g).to(device, dtype),
            torch.randint(0, 2, (batch,), generator=g).to(device),
        )
        for t in tasks
    }


class NaivePCGrad:
    """pytorch-pcgrad's way: one backward per task, flattened gradients, projections in a
    Python loop over the pairs (the comparison the issue's target names)."""

    def __init__(self, model: torch.nn.Module, tasks: list[str]) -> None:
        self.params = list(model.parameters())
        self.inner = torch.optim.AdamW(self.params, lr=1e-4)
        self.tasks = tasks

    def next_tasks(self) -> list[str]:
        return self.tasks

    def step(self, losses: dict[str, torch.Tensor]) -> None:
        grads = []
        for i, loss in enumerate(losses.values()):
            gs = torch.autograd.grad(loss, self.params, retain_graph=i < len(losses) - 1, allow_unused=True)
            grads.append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(p)).reshape(-1)
                        for g, p in zip(gs, self.params)
                    ]
                )
            )
        projected = [g.clone() for g in grads]
        for i, gi in enumerate(projected):
            for j in torch.randperm(len(grads)).tolist():
                if j != i:
                    dot = torch.dot(gi, grads[j])
                    if dot < 0:
                        gi -= dot / grads[j].pow(2).sum() * grads[j]
        merged = torch.stack(projected).sum(0)
        offset = 0
        for p in self.params:
            p.grad = merged[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.inner.step()
        self.inner.zero_grad()


def _drive(name: str, drive: str, model, opt, data) -> None:
    """One step, through the one loop or the torch way."""
    losses = _losses(model, opt, data)
    if drive == "one loop":
        opt.step(losses)
    elif name in ("SequentialReptile", "Reptile"):
        next(iter(losses.values())).backward()
        opt.step()
    else:
        opt.backward(losses)
        opt.step()
    opt.zero_grad()


def syncs(device: torch.device, width: int, layers: int, batch: int, seq: int) -> None:
    names = ["MTL", "PCGrad", "GradVac", "GradNorm", "SequentialReptile", "Reptile"]
    rows = []
    for name in names:
        for drive in ("one loop", "torch way"):
            if device.type != "cuda":
                rows.append([name, drive, "n/a (needs CUDA)"])
                continue
            model = Encoder(width, layers, TASKS8[:3]).to(device)
            opt = method(name, model, TASKS8[:3])
            data = _batches(TASKS8[:3], width, batch, seq, device, torch.float32)

            for _ in range(5):
                _drive(name, drive, model, opt, data)  # past the first steps' checks
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                _drive(name, drive, model, opt, data)
                found = "none"
            except RuntimeError as err:
                found = str(err).splitlines()[0][:90]
            finally:
                torch.cuda.set_sync_debug_mode(0)
            rows.append([name, drive, found])
    _table(f"host syncs in a steady-state step ({device})", ["method", "drive", "first sync"], rows)


def steps(
    device: torch.device, width: int, layers: int, batch: int, seq: int, tasks: int, repeat: int
) -> None:
    names = ["MTL", "PCGrad", "GradVac", "SequentialReptile", "naive PCGrad"]
    rows = []
    for name in names:
        model = Encoder(width, layers, TASKS8[:tasks]).to(device)
        opt = (
            NaivePCGrad(model, TASKS8[:tasks])
            if name == "naive PCGrad"
            else method(name, model, TASKS8[:tasks])
        )
        data = _batches(TASKS8[:tasks], width, batch, seq, device, torch.float32)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = _median_ms(lambda m=model, o=opt, d=data: o.step(_losses(m, o, d)), device, repeat)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        params = sum(p.numel() for p in model.parameters())
        rows.append([name, tasks, params, ms, peak])
        del model, opt
    _table(
        f"whole steps ({device}, width {width}, {layers} layers, batch {batch} x {seq} per task)",
        ["method", "T", "parameters", "ms per step", "peak GiB"],
        rows,
    )


def host(device: torch.device, width: int, layers: int, steps_: int) -> None:
    import metaopt

    rows, finals = [], {}
    for placement in (None, "cpu"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)
        base = torch.cuda.memory_allocated() if device.type == "cuda" else None
        opt = metaopt.SequentialReptile(
            torch.optim.SGD(model.parameters(), lr=1e-3),
            tasks=["a"],
            inner_steps=4,
            outer_lr=0.5,
            state_device=placement,
        )
        g = torch.Generator().manual_seed(3)
        outer = []
        for _ in range(steps_):
            opt.next_tasks()
            model(torch.randn(8, width, generator=g).to(device)).pow(2).mean().backward()
            before = opt.outer_step_count
            sync(device)
            start = time.perf_counter()
            opt.step()
            sync(device)
            if opt.outer_step_count > before:
                outer.append((time.perf_counter() - start) * 1e3)
            opt.zero_grad(set_to_none=True)
        held = None if base is None else (torch.cuda.memory_allocated() - base) / 2**20
        pinned = (
            all(b.is_pinned() for b in opt.engine.slow_buffers)
            if placement and device.type == "cuda"
            else "n/a"
        )
        finals[placement] = [p.detach().cpu() for p in model.parameters()]
        rows.append([str(placement), held if held is not None else "n/a", pinned, statistics.median(outer)])
        del model, opt
    equal = all(torch.equal(a, b) for a, b in zip(finals[None], finals["cpu"]))
    _table(
        f"host placement ({device}; equal bit for bit across placements: {equal})",
        ["state_device", "device MiB held after training (params, grads none)", "pinned", "outer step ms"],
        rows,
    )


# ---------------------------------------------------------------------- gramian
def gramian_paths(device: torch.device, T: int, P: int, repeat: int) -> None:
    import importlib

    from metaopt.aggregation import gramian

    module = importlib.import_module("metaopt.aggregation.gramian")
    g = torch.Generator(device=device).manual_seed(0)
    J = torch.randn(T, P, generator=g, device=device) * torch.logspace(-3, 3, T, device=device)[:, None]
    J[1] = -J[0] + 1e-3 * J[2]  # a nearly antiparallel pair
    exact = torch.zeros(T, T, dtype=torch.float64, device=device)
    for s in range(0, P, 1 << 22):  # float64 reference, chunk by chunk
        c = J[:, s : s + (1 << 22)].double()
        exact += c @ c.T
    norms = exact.diagonal().sqrt()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    floor = _median_ms(lambda: J @ J.T, device, repeat)
    rows: list[list[Any]] = [["J @ J.T float32 (TF32 off)", "n/a", floor, 1.0]]
    if device.type != "cuda":  # the kernel through Triton's interpreter, for the dry run
        from metaopt.triton_gramian import gramian_float64, supports

        module._FLOAT64_KERNELS[device.type] = (gramian_float64, supports)
    saved = dict(module._FLOAT64_KERNELS)
    for label, use_kernel in (("Triton kernel (float64 sums)", True), ("float64 chunks", False)):
        if not use_kernel:
            module._FLOAT64_KERNELS[device.type] = None
        elif module._float64_kernel(J) is None:
            rows.append([label, "not available", float("nan"), float("nan")])
            continue
        G = gramian(J, dtype=torch.float64)
        err = float(((G - exact).abs() / (norms[:, None] * norms[None, :])).max())
        ms = _median_ms(lambda: gramian(J, dtype=torch.float64), device, repeat)
        rows.append([label, err, ms, ms / floor])
    module._FLOAT64_KERNELS.clear()
    module._FLOAT64_KERNELS.update(saved)
    _table(
        f"float64 Gramian, T = {T}, P = {P} ({device})",
        ["path", "max error / (norm_i norm_j)", "ms", "x J@J.T"],
        rows,
    )


# ---------------------------------------------------------------------- capture
def capture(device: torch.device, width: int, steps_: int) -> None:
    import metaopt

    if device.type != "cuda":
        _table("CUDA-graph capture of the inner step", ["case", "result"], [["capture", "n/a (needs CUDA)"]])
        return
    ends: dict[str, Any] = {}
    for mode in ("eager", "reduce-overhead"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)
        ).to(device)
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
        opt = metaopt.SequentialReptile(adamw, tasks=TASKS8[:3], inner_steps=4, outer_lr=0.5)
        step = opt.step if mode == "eager" else torch.compile(opt.step, mode="reduce-overhead")
        g = torch.Generator(device=device).manual_seed(1)
        try:
            for _ in range(steps_):
                opt.next_tasks()
                x = torch.randn(16, width, generator=g, device=device)
                model(x).pow(2).mean().backward()
                step()
                opt.zero_grad()
            ends[mode] = [p.detach().clone() for p in model.parameters()]
        except Exception as err:  # reported, not raised: the table says what failed
            ends[mode] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
    compiled, eager = ends["reduce-overhead"], ends["eager"]
    if isinstance(compiled, str) or isinstance(eager, str):
        result = compiled if isinstance(compiled, str) else f"eager failed: {eager}"
    else:
        gap = max(float((a - b).abs().max()) for a, b in zip(compiled, eager))
        result = f"ran; max |compiled - eager| = {gap:.3g}"
    title = "CUDA-graph capture of the inner step (capturable AdamW)"
    _table(title, ["case", "result"], [["reduce-overhead", result]])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="small sizes (the tests' dry run)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    _setup(device)
    versions = f"torch {torch.__version__}"
    try:
        import triton  # type: ignore[import-untyped]

        versions += f", triton {triton.__version__}"
    except ImportError:
        versions += ", no triton"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# benchmarks/gpu.py on {card}; {versions}")
    if args.smoke:
        paths(device, scale=48, repeat=2)
        syncs(device, width=32, layers=1, batch=2, seq=4)
        steps(device, width=32, layers=1, batch=2, seq=4, tasks=3, repeat=2)
        host(device, width=16, layers=2, steps_=8)
        gramian_paths(device, T=8, P=3000, repeat=2)
        capture(device, width=16, steps_=4)
    else:
        paths(device, scale=1, repeat=20)
        syncs(device, width=768, layers=2, batch=8, seq=64)
        steps(device, width=768, layers=12, batch=8, seq=128, tasks=8, repeat=10)
        host(device, width=4096, layers=8, steps_=40)
        gramian_paths(device, T=8, P=110_000_000, repeat=10)
        capture(device, width=1024, steps_=12)


if __name__ == "__main__":
    main()
