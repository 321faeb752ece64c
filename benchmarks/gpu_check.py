"""Host placement on an accelerator, checked in one run: Sequential Reptile with its state
beside the parameters and in (pinned) host memory, against a float64 reference on the CPU, with
the device bytes metaopt holds between outer steps read from the device's own allocator, and
the outer step's time side by side.

For each dtype (fp32, bf16 parameters) and placement (``None``, ``"cpu"``):

* **equal**: the parameters after ``--steps`` steps equal (bit for bit) the other placement's,
  and the float64 reference's to the dtype's rounding (``max_rel``, relative to the parameters'
  largest magnitude);
* **device bytes**: the allocator's bytes after training minus those of the same training with
  the wrapped optimizer alone (between outer steps: after an outer step, gradients dropped);
  with host placement the target is 0, and the slow weights are pinned;
* **outer step**: median milliseconds of an outer step (``torch.cuda.Event`` timing on CUDA).

On a machine without CUDA it runs the same checks on the CPU (the device bytes are then not
measurable and print ``null``), which ``tests/test_benchmark_scripts.py`` does with ``--smoke``.

Run::

    python benchmarks/gpu_check.py            # on the GPU machine: one JSON line per case
    python benchmarks/gpu_check.py --smoke    # a few steps of a small model (the test)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metaopt  # noqa: E402

TASKS = ["a", "b", "c"]


def model_of(width: int, depth: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return (
        torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))
        .to(device=device, dtype=torch.float64)
        .to(dtype)
    )


def batches(steps: int, width: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, width, generator=g, dtype=torch.float64) for _ in range(steps)]


def train(model, opt, data, device, dtype, outer_times: list[float] | None = None) -> None:
    """The torch way over ``data``; the milliseconds of each step that made an outer step are
    appended to ``outer_times`` (CUDA events on a GPU)."""
    for x in data:
        opt.next_tasks()
        model(x.to(device=device, dtype=dtype)).pow(2).mean().backward()
        before = opt.outer_step_count
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            opt.step()
            end.record()
            torch.cuda.synchronize()
            took = begin.elapsed_time(end)
        else:
            start = time.perf_counter()
            opt.step()
            took = (time.perf_counter() - start) * 1e3
        if outer_times is not None and opt.outer_step_count > before:
            outer_times.append(took)
        opt.zero_grad(set_to_none=True)


def sequential_reptile(model, placement, inner_steps: int):
    return metaopt.SequentialReptile(
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        tasks=TASKS,
        inner_steps=inner_steps,
        outer_lr=0.5,
        seed=0,
        state_device=placement,
    )


def allocated(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated(device)


def run_case(dtype_name: str, args, device: torch.device) -> list[dict]:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    data = batches(args.steps, args.width)

    # the wrapped optimizer alone: the device bytes of the training without metaopt
    model = model_of(args.width, args.depth, dtype, device)
    base = allocated(device)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for x in data[:2]:
        model(x.to(device=device, dtype=dtype)).pow(2).mean().backward()
        plain.step()
        plain.zero_grad(set_to_none=True)
    plain_bytes = None if base is None else allocated(device) - base  # type: ignore[operator]
    del model, plain

    ref_model = model_of(args.width, args.depth, torch.float64, torch.device("cpu"))
    ref = sequential_reptile(ref_model, None, args.inner_steps)
    train(ref_model, ref, data, torch.device("cpu"), torch.float64)
    reference = [p.detach() for p in ref_model.parameters()]
    scale = max(float(p.abs().max()) for p in reference)

    rows, finals = [], {}
    for placement in (None, "cpu"):
        model = model_of(args.width, args.depth, dtype, device)
        base = allocated(device)
        opt = sequential_reptile(model, placement, args.inner_steps)
        times: list[float] = []
        train(model, opt, data, device, dtype, times)
        held = None if base is None else allocated(device) - base - plain_bytes  # type: ignore[operator]
        finals[placement] = [p.detach().cpu() for p in model.parameters()]
        rel = max(float((a.double() - b).abs().max()) for a, b in zip(finals[placement], reference)) / scale
        buffers = opt.engine.slow_buffers
        rows.append(
            {
                "dtype": dtype_name,
                "state_device": placement,
                "device": str(device),
                "max_rel": rel,
                "device_bytes_held": held,
                "params_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                "pinned": all(b.is_pinned() for b in buffers)
                if placement and device.type == "cuda"
                else None,
                "outer_step_ms": statistics.median(times) if times else None,
                "outer_steps": opt.outer_step_count,
            }
        )
        del model, opt
    equal = all(torch.equal(a, b) for a, b in zip(finals[None], finals["cpu"]))
    for r in rows:
        r["equal_across_placements"] = equal
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a small model, a few steps (the test)")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--inner-steps", type=int, default=5)
    args = parser.parse_args()
    if args.smoke:
        args.width, args.depth, args.steps = 32, 2, 12
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            }
        )
    )
    for dtype_name in ("fp32", "bf16"):
        for row in run_case(dtype_name, args, device):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
