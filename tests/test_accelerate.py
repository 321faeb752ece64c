"""Hugging Face Accelerate: ``Accelerator.save_state`` / ``load_state`` (safetensors for the
model, its default) resume every method bit for bit, driven the torch way, through the one
loop, with ``accelerator.accumulate`` over two micro-batches, and with ``GradScaler`` skips;
in one process, each run also equals the same training without Accelerate. The model file holds
every tensor and the optimizer file carries metaopt's record. On two processes (gloo,
``prepare`` wrapping the model in DDP) every method resumes bit for bit too, the torch way and
through the one loop, and equals one process on the whole batch."""

from __future__ import annotations

import warnings

import pytest
import torch

from _spawn import file_store, spawn
from _stacks import (
    METHODS,
    REPTILE_FAMILY,
    Net,
    backward_the_torch_way,
    batch,
    loss_of,
    make_opt,
    method_state,
)

pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

N, M = 5, 6  # saved after N steps (mid-trajectory for the Reptile family), then M more
BAD = {2, N + 2}  # scaler_skip: steps whose loss is inf, one before and one after the save
DRIVES = ["torch", "one_loop", "accum2", "scaler_skip"]


def _build(name: str, drive: str, seed: int):
    AcceleratorState._reset_state(True)  # Accelerate's state is a process-wide singleton
    GradientState._reset_state()
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2 if drive == "accum2" else 1)
    if drive == "scaler_skip":  # what mixed_precision="fp16" sets up on a GPU
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = Net(seed)
    opt = make_opt(name, model)
    pmodel, aopt = acc.prepare(model, opt)
    assert isinstance(aopt, AcceleratedOptimizer) and aopt.optimizer is opt
    return acc, pmodel, aopt, opt


def _losses(model, opt, step: int, micro: int = 1, m: int = 0, scale: float = 1.0):
    out = {}
    for t in opt.next_tasks():
        x, y = batch(step, t)
        rows = slice(m * len(x) // micro, (m + 1) * len(x) // micro)
        out[t] = loss_of(model, t, (x[rows], y[rows])) * scale
    return out


def _train(name: str, drive: str, acc, model, aopt, opt, steps) -> None:
    for s in steps:
        if drive == "one_loop":
            aopt.step(_losses(model, opt, s))  # AcceleratedOptimizer passes the losses on
            aopt.zero_grad()
            continue
        micro = 2 if drive == "accum2" else 1
        for m in range(micro):
            with acc.accumulate(model):
                scale = float("inf") if drive == "scaler_skip" and s in BAD else 1.0
                losses = _losses(model, opt, s, micro, m, scale)
                if name in REPTILE_FAMILY:
                    acc.backward(next(iter(losses.values())))
                else:
                    opt.backward({t: v / micro for t, v in losses.items()}, grad_scaler=acc.scaler)
                aopt.step()
                aopt.zero_grad()


def _plain(name: str, drive: str) -> list[torch.Tensor]:
    """The same training without Accelerate: the oracle of the one-process runs."""
    model = Net(0)
    opt = make_opt(name, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if drive == "scaler_skip" else None
    micro = 2 if drive == "accum2" else 1
    for s in range(N + M):
        if drive == "one_loop":
            opt.step(_losses(model, opt, s))
            opt.zero_grad()
            continue
        for m in range(micro):
            scale = float("inf") if scaler is not None and s in BAD else 1.0
            losses = {t: v / micro for t, v in _losses(model, opt, s, micro, m, scale).items()}
            backward_the_torch_way(name, opt, losses, grad_scaler=scaler)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
    return [*model.parameters(), *method_state(opt)]


@pytest.mark.parametrize("drive", DRIVES)
@pytest.mark.parametrize("name", METHODS)
def test_save_state_and_load_state_resume_bit_for_bit(tmp_path, name, drive):
    from safetensors.torch import load_file

    acc, model, aopt, opt = _build(name, drive, seed=0)
    _train(name, drive, acc, model, aopt, opt, range(N))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "some tensors were not saved" warning
        acc.save_state(str(tmp_path))
    clock = opt.clock
    _train(name, drive, acc, model, aopt, opt, range(N, N + M))
    uninterrupted = [*acc.unwrap_model(model).parameters(), *method_state(opt)]

    assert len(load_file(tmp_path / "model.safetensors")) == len(Net(0).state_dict())
    saved = torch.load(tmp_path / "optimizer.bin", weights_only=True)
    assert saved["param_groups"][0]["metaopt"]["clock"] == clock

    acc2, model2, aopt2, opt2 = _build(name, drive, seed=1)  # other initial values
    acc2.load_state(str(tmp_path))
    assert opt2.clock == clock
    _train(name, drive, acc2, model2, aopt2, opt2, range(N, N + M))
    resumed = [*acc2.unwrap_model(model2).parameters(), *method_state(opt2)]
    assert len(resumed) == len(uninterrupted)
    for a, b in zip(uninterrupted, resumed):
        assert torch.equal(a, b)
    if drive == "scaler_skip":
        assert opt2.clock - opt2.step_count == len(BAD)
    for a, b in zip(uninterrupted, _plain(name, drive)):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    import _accelerate_worker

    out = str(tmp_path_factory.mktemp("accelerate2"))
    cases = [(name, drive) for name in METHODS for drive in ("torch", "one_loop")]
    spawn(_accelerate_worker.run, 2, (cases, file_store(out), out))
    return [torch.load(f"{out}/rank{r}.pt", weights_only=True) for r in range(2)]


def _one_process(name: str, drive: str, steps: int) -> list[torch.Tensor]:
    """The oracle of the two-process runs: one process on the whole batch (DDP's mean of the
    two halves' mean gradients is the whole batch's mean gradient)."""
    model = Net(0)
    opt = make_opt(name, model)
    for s in range(steps):
        losses = {t: loss_of(model, t, batch(s, t), reduction="mean") for t in opt.next_tasks()}
        if drive == "one_loop":
            opt.step(losses)
        else:
            backward_the_torch_way(name, opt, losses)
            opt.step()
        opt.zero_grad()
    return list(model.parameters())


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
@pytest.mark.parametrize("drive", ["torch", "one_loop"])
@pytest.mark.parametrize("name", METHODS)
def test_two_processes_resume_bit_for_bit_and_equal_one_process(two_processes, name, drive):
    import _accelerate_worker as w

    for rank in two_processes:
        r = rank[(name, drive)]
        assert r["clocks"] == (w.N, w.N)  # the loaded optimizer is at the saved step
        assert len(r["resumed_state"]) == len(r["uninterrupted_state"])
        for a, b in zip(
            [*r["uninterrupted"], *r["uninterrupted_state"]], [*r["resumed"], *r["resumed_state"]]
        ):
            assert torch.equal(a, b)
    ranks = [rank[(name, drive)]["uninterrupted"] for rank in two_processes]
    for a, b in zip(*ranks):
        assert torch.equal(a, b)  # the replicas agree
    for a, b in zip(ranks[0], _one_process(name, drive, w.N + w.M)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
