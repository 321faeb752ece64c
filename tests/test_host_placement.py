"""Host placement (``state_device="cpu"``): the slow weights, the trajectory mean and an outer
optimizer's state in host memory, streamed through the parameters' device in chunks at each
outer step. On this CPU-only machine the "device" is the CPU too, but the streamed path runs
all the same (every chunk is copied into a new buffer, interpolated there and copied back), so
these tests check it against the path without host placement, bit for bit, with chunks small
enough to cut tensors into slices. The FSDP2 case (each rank's shard streamed) is in
tests/test_fsdp.py; the GPU check (pinned memory, no device bytes between outer steps) is in
benchmarks/gpu.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import metaopt
import metaopt.interpolation as interpolation
from metaopt.interpolation import Interpolator, _chunks

from _stacks import TASKS, Net, batch, loss_of


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 5 elements: every tensor of the model but the biases is cut into slices."""
    monkeypatch.setattr(interpolation, "STREAM_ELEMENTS", 5)


def _opt(kind: str, model: Net, state_device):
    adam = torch.optim.Adam(model.parameters(), lr=0.05)
    common = dict(tasks=TASKS, seed=0, allow_unused=True, state_device=state_device)
    if kind == "interpolation":
        return metaopt.SequentialReptile(adam, inner_steps=3, outer_lr=0.5, **common)
    if kind == "nesterov":
        return metaopt.SequentialReptile(
            adam,
            inner_steps=3,
            outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.7, momentum=0.9, nesterov=True),
            **common,
        )
    if kind == "batched":  # Reptile's trajectory mean
        return metaopt.Reptile(adam, inner_steps=2, outer_lr=0.5, tasks_per_outer_step=2, **common)
    raise KeyError(kind)


def _train(kind: str, state_device, dtype=torch.float64, steps: int = 13):
    model = Net(dtype=dtype)
    opt = _opt(kind, model, state_device)
    for s in range(steps):
        (t,) = opt.next_tasks()
        x, y = batch(s, t, dtype=dtype)
        loss_of(model, t, (x, y)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", ["interpolation", "nesterov", "batched"])
def test_host_placement_equals_the_state_beside_the_parameters(small_chunks, kind, dtype):
    ref_model, ref_opt = _train(kind, None, dtype)
    model, opt = _train(kind, "cpu", dtype)
    assert opt.outer_step_count == ref_opt.outer_step_count > 0
    assert all(g.offloaded for g in opt.engine._groups)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.slow_weights, ref_opt.slow_weights):
        assert torch.equal(a, b) and a.dtype == b.dtype
    for a, b in zip(_tensors(opt.state_dict()), _tensors(ref_opt.state_dict())):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), Net(dtype=dtype).parameters()))


def test_a_state_saved_with_host_placement_resumes_without_it_and_back(small_chunks):
    """The saved state is the same either way: a run moves between placements at a load."""
    _, ref_opt = _train("nesterov", None, steps=13)
    for first, second in (("cpu", None), (None, "cpu")):
        model, opt = _train("nesterov", first, steps=7)
        model2 = Net()
        model2.load_state_dict(model.state_dict())
        opt2 = _opt("nesterov", model2, second)
        opt2.load_state_dict(opt.state_dict())
        for s in range(7, 13):
            (t,) = opt2.next_tasks()
            loss_of(model2, t, batch(s, t)).backward()
            opt2.step()
            opt2.zero_grad()
        for a, b in zip(opt2.slow_weights, ref_opt.slow_weights):
            assert torch.equal(a, b)


def test_use_slow_weights_and_reset_under_host_placement(small_chunks):
    model, opt = _train("interpolation", "cpu", steps=5)  # mid-trajectory: θ ≠ φ
    theta = [p.detach().clone() for p in model.parameters()]
    with opt.use_slow_weights():
        for p, phi in zip(model.parameters(), opt.slow_weights):
            assert torch.equal(p, phi)
    for p, t in zip(model.parameters(), theta):
        assert torch.equal(p, t)
    opt.reset_slow_weights()
    for p, phi in zip(model.parameters(), opt.slow_weights):
        assert torch.equal(p, phi)


@pytest.mark.parametrize("bad", ["cuda", "meta", 3, "nowhere"])
def test_a_state_device_other_than_the_host_is_refused(bad):
    model = Net()
    with pytest.raises(ValueError, match="state_device"):
        _opt("interpolation", model, bad)


def test_host_placement_with_local_trajectories_is_refused():
    model = Net()
    with pytest.raises(ValueError, match="state_device.*local_trajectories"):
        metaopt.SequentialReptile(
            torch.optim.SGD(model.parameters(), lr=0.1),
            tasks=TASKS,
            state_device="cpu",
            local_trajectories=True,
        )


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 23), min_size=1, max_size=8),
    limit=st.integers(1, 9),
    strided=st.integers(0, 7),
)
def test_chunks_cover_every_element_once_in_order(sizes, limit, strided):
    """Property: the chunks visit each element of every column once, in order, aligned across
    the columns; a chunk holds at most ``limit`` elements unless it is one tensor that is not
    contiguous (never sliced)."""
    tensors = [torch.arange(float(n)) + 100 * i for i, n in enumerate(sizes)]
    if strided < len(sizes) and sizes[strided] > 1:  # one non-contiguous tensor, kept whole
        tensors[strided] = torch.arange(2.0 * sizes[strided])[::2] + 100 * strided
    twin = [t * -1 for t in tensors]
    chunks = _chunks([tensors, twin], limit)
    seen = torch.cat([p.reshape(-1) for c in chunks for p in c[0]] or [torch.zeros(0)])
    assert torch.equal(seen, torch.cat([t.reshape(-1) for t in tensors]))
    for first, second in chunks:
        assert [p.shape for p in first] == [p.shape for p in second]
        assert all(torch.equal(a, -b) for a, b in zip(first, second))
        n = sum(p.numel() for p in first)
        assert n <= limit or (len(first) == 1 and not first[0].is_contiguous())


def test_streamed_interpolation_writes_through_to_the_host_slices(small_chunks):
    """A tensor cut into slices: every slice of φ written back, θ restarted from all of φ."""
    theta = [torch.arange(12.0).reshape(3, 4) + 1, torch.ones(2)]
    engine = Interpolator(theta, state_device="cpu")
    assert engine.slow_buffers[0].device.type == "cpu"
    for t in theta:
        t.mul_(3.0)
    engine.interpolate(0.5)  # φ ← φ + 0.5 (3φ − φ) = 2φ; θ ← φ
    assert torch.equal(engine.slow[0], 2 * (torch.arange(12.0).reshape(3, 4) + 1))
    assert torch.equal(theta[0], engine.slow[0]) and torch.equal(theta[1], torch.full((2,), 2.0))


def _tensors(value):
    from _stacks import tensors_of

    return tensors_of(value)


def test_every_host_read_of_the_slow_weights_waits_for_the_device(monkeypatch):
    """On an accelerator the copies of φ back to the host are non-blocking: every read of φ on
    the host (the slow weights, the buffers, a state dict, a pickle, a re-layout) first waits
    for the device (``torch.accelerator.synchronize``, every stream; MPS has no current_stream).
    Simulated: the group's device is marked as an accelerator, and the wait recorded."""
    import pickle

    waits: list[torch.device] = []
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda device=None: waits.append(device))
    theta = [torch.ones(3)]
    engine = Interpolator(theta, state_device="cpu")
    engine._groups[0].device = torch.device("mps")
    reads = [
        lambda: engine.slow,
        lambda: engine.slow_buffers,
        lambda: engine.state_dict(),
        lambda: engine.pseudo_gradient(),
        lambda: pickle.dumps(engine),
    ]
    for i, read in enumerate(reads):
        before = len(waits)
        read()
        assert len(waits) > before and waits[-1] == torch.device("mps"), i
    beside = Interpolator([torch.ones(3)])  # no host placement: nothing to wait for
    beside._groups[0].device = torch.device("mps")
    n = len(waits)
    beside.state_dict()
    assert len(waits) == n
