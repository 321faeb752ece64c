"""Every interpolation path against a float64 reference, on random shapes, dtypes and counts.

The paths: ``"auto"`` (a registered kernel for the device type, else foreach), ``"foreach"``,
``"reference"``, and a registered list kernel (``KERNEL`` below, registered for the CPU while
a test runs on the ``"kernel"`` path). For half types φ is a float32 master copy and the
interpolation uses the master fast weights θ + (φ − round(φ)), so the float64 reference is
φ + w·(θ − round(φ)) (which is φ + w·(θ − φ) for the other dtypes, where round(φ) = φ).
"""

from __future__ import annotations

import contextlib
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from metaopt.interpolation import Interpolator, interpolate_, register_kernel

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
HALF = (torch.bfloat16, torch.float16)
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}  # of φ, kept in float32 for half types
PATHS = ["auto", "foreach", "reference", "kernel"]

shapes = st.lists(st.lists(st.integers(1, 7), min_size=0, max_size=3).map(tuple), min_size=1, max_size=6)


def make(shapes_, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * scale + 0.5).to(dtype) for s in shapes_]


def relerr(a: torch.Tensor, b: torch.Tensor, *scale: torch.Tensor) -> float:
    """‖a − b‖ relative to the inputs' scale (the result itself can cancel to ~0)."""
    norm = max([float(b.norm())] + [float(x.double().norm()) for x in scale])
    return float((a.double() - b).norm()) / max(norm, 1e-30)


def list_kernel(dst, src, w, fast, copy_from):
    """A plain-torch kernel over lists of tensors, to the contract of ``register_kernel``."""
    KERNEL_CALLS.append(len(dst))
    for d, s in zip(dst, src):
        d.lerp_(s.to(d.dtype), w)
    if fast is not None:
        for f, c in zip(fast, copy_from):
            f.copy_(c)


KERNEL_CALLS: list[int] = []


@contextlib.contextmanager
def on_path(path):
    """The Interpolator ``method`` for ``path``, with the list kernel registered for "kernel"."""
    if path != "kernel":
        yield path
        return
    register_kernel("cpu", list_kernel)
    try:
        yield "auto"
    finally:
        register_kernel("cpu", None)


def move(fast, values):
    with torch.no_grad():
        for t, v in zip(fast, values):
            t.copy_(v)


def set_off_grid(engine, seed):
    """For half types, put φ off θ's grid (as after outer steps), so round(φ) ≠ φ and the
    master fast weights matter; other dtypes keep φ = θ."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for s, f in zip(engine.slow, engine.fast):
            if f.dtype in HALF:
                s.add_(torch.randn(s.shape, generator=g, dtype=s.dtype) * 1e-2)
    engine.sync_fast()  # θ ← round(φ): where a trajectory starts


@pytest.mark.parametrize("path", PATHS)
@given(
    shapes_=shapes,
    dtype=st.sampled_from(DTYPES),
    weight=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_interpolate_matches_float64_reference(path, shapes_, dtype, weight, seed):
    fast = make(shapes_, dtype, seed)
    with on_path(path) as method:
        engine = Interpolator(fast, method=method)
        set_off_grid(engine, seed)
        phi64 = [s.double().clone() for s in engine.slow]
        start64 = [t.double().clone() for t in fast]  # round(φ)
        move(fast, make(shapes_, dtype, seed + 1))
        theta64 = [t.double().clone() for t in fast]
        KERNEL_CALLS.clear()
        engine.interpolate(weight)
    assert KERNEL_CALLS == ([len(fast)] if path == "kernel" else [])
    for f, s, a, r, b in zip(fast, engine.slow, phi64, start64, theta64):
        assert s.dtype == (torch.float32 if dtype in HALF else dtype)
        ref = a + weight * (b - r)
        assert relerr(s, ref, a, b) <= TOL[s.dtype]
        assert torch.equal(f, s.to(f.dtype))  # θ re-synced to φ (rounded once)


@given(
    shapes_=shapes,
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 10_000),
    path=st.sampled_from(PATHS),
)
def test_weight_zero_keeps_slow_and_weight_one_takes_fast(shapes_, dtype, seed, path):
    fast = make(shapes_, dtype, seed)
    with on_path(path) as method:
        engine = Interpolator(fast, method=method)
        phi = [s.clone() for s in engine.slow]
        move(fast, make(shapes_, dtype, seed + 7))
        engine.interpolate(0.0)
        for s, p, f in zip(engine.slow, phi, fast):
            assert torch.equal(s, p)
            assert torch.equal(f, p.to(f.dtype))
        moved = make(shapes_, dtype, seed + 9)
        move(fast, moved)
        engine.interpolate(1.0)
    for s, m, f in zip(engine.slow, moved, fast):
        assert torch.equal(s, m.to(s.dtype))
        assert torch.equal(f, m)


@given(
    shapes_=shapes,
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 10_000),
    weight=st.floats(0.0, 1.0),
    path=st.sampled_from(PATHS),
)
def test_unmoved_fast_weights_leave_slow_weights_unchanged(shapes_, dtype, seed, weight, path):
    """θ not moved since the re-sync (θ = round(φ)): φ does not move, whatever η, even for half
    types, where φ − round(φ) ≠ 0 (without master fast weights φ drifted onto θ's grid)."""
    fast = make(shapes_, dtype, seed)
    with on_path(path) as method:
        engine = Interpolator(fast, method=method)
        set_off_grid(engine, seed)
        phi = [s.clone() for s in engine.slow]
        for _ in range(3):
            engine.interpolate(weight)
    for s, p, f in zip(engine.slow, phi, fast):
        assert torch.equal(s, p)
        assert torch.equal(f, p.to(f.dtype))


def test_half_precision_keeps_float32_master():
    fast = make([(1000,)], torch.bfloat16, 0)
    engine = Interpolator(fast)
    assert engine.slow[0].dtype == torch.float32
    # many tiny steps that bf16 alone would round away accumulate in the master copy
    for _ in range(50):
        with torch.no_grad():
            fast[0].add_(0.01)
        engine.interpolate(0.01)  # φ moves by ~1e-4: below bf16's spacing, kept in float32
    start = make([(1000,)], torch.bfloat16, 0)[0].float()
    assert (engine.slow[0] - start).abs().min() > 0


@given(
    shapes_=shapes,
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 999),
    counts=st.integers(1, 4),
    weight=st.floats(0.0, 1.0),
    path=st.sampled_from(PATHS),
)
def test_accumulate_then_interpolate_is_mean_of_fast_weights(shapes_, dtype, seed, counts, weight, path):
    fast = make(shapes_, dtype, seed)
    with on_path(path) as method:
        engine = Interpolator(fast, method=method)
        set_off_grid(engine, seed)
        phi64 = [s.double().clone() for s in engine.slow]
        start = [t.clone() for t in fast]  # round(φ)
        ends = []
        for j in range(counts):
            moved = make(shapes_, dtype, seed + 100 + j)
            ends.append([m.double() for m in moved])
            move(fast, moved)
            engine.accumulate(j + 1)
            for t, s in zip(fast, start):  # θ reset to φ after each trajectory
                assert torch.equal(t, s)
        engine.interpolate_accumulated(weight)
    for i, (s, a, r) in enumerate(zip(engine.slow, phi64, start)):
        mean = sum(e[i] for e in ends) / counts
        ref = a + weight * (mean - r.double())
        assert relerr(s, ref, a, mean) <= TOL[s.dtype] * 10
        assert torch.equal(fast[i], s.to(fast[i].dtype))


def test_slow_weights_are_views_of_metaopts_own_buffers_never_the_models():
    """φ: one flat buffer per (device, dtype), views into it; θ: read and written in place,
    never re-pointed or packed, on every path and through every operation."""
    for path in PATHS:
        fast = [*make([(3, 4), (5,)], torch.float32, 1), *make([(2, 2)], torch.bfloat16, 2)]
        fast += make([(6,)], torch.float32, 3)
        ptrs = [t.data_ptr() for t in fast]
        with on_path(path) as method:
            engine = Interpolator(fast, method=method)
            buffers = engine.slow_buffers
            assert [b.dtype for b in buffers] == [torch.float32, torch.float32]  # bf16's master
            assert sum(b.numel() for b in buffers) == sum(t.numel() for t in fast)
            for t in fast:
                t.data.add_(1.0)
            engine.accumulate(1)
            engine.interpolate_accumulated(0.5)
            engine.interpolate(0.5)
            engine.refresh()
        owners = {b.untyped_storage().data_ptr() for b in engine.slow_buffers}
        assert [b.data_ptr() for b in engine.slow_buffers] == [b.data_ptr() for b in buffers]
        for s in engine.slow:
            assert s.untyped_storage().data_ptr() in owners
        models = {t.untyped_storage().data_ptr() for t in fast}
        assert not owners & models
        assert [t.data_ptr() for t in fast] == ptrs
        assert sorted(map(id, engine.fast)) == sorted(map(id, fast))  # the tensors themselves


def test_plain_pickle_keeps_the_slow_weights_views_of_their_buffer():
    fast = make([(3, 4), (5,)], torch.float32, 4)
    engine = pickle.loads(pickle.dumps(Interpolator(fast)))
    (buffer,) = engine.slow_buffers
    for s in engine.slow:
        assert s.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    with torch.no_grad():
        buffer.fill_(2.0)
    assert all(bool((s == 2.0).all()) for s in engine.slow)


def test_functional_interpolate_both_methods_agree_with_float64():
    a = make([(3, 4), (5,)], torch.float32, 1)
    b = make([(3, 4), (5,)], torch.float32, 2)
    results = []
    for method in ("foreach", "reference"):
        slow = [t.clone() for t in a]
        fast = [t.clone() for t in b]
        interpolate_(slow, fast, 0.3, method=method)
        results.append(slow + fast)
    for x, y in zip(*results):
        torch.testing.assert_close(x, y)
    for s, x, y in zip(results[0], a, b):
        assert relerr(s, x.double() + 0.3 * (y.double() - x.double()), x, y) <= 1e-6


def test_registered_list_kernel_is_used_on_auto_and_checked_against_the_reference():
    """A kernel over lists of tensors registered for the device type is what "auto" runs, for
    every operation; its results match the reference path bit for bit, and float64."""
    shapes_ = [(4, 3), (7,), ()]

    def run(method):
        fast = [*make(shapes_, torch.float32, 3), *make(shapes_, torch.bfloat16, 4)]
        engine = Interpolator(fast, method=method)
        set_off_grid(engine, 5)
        phi64 = [s.double().clone() for s in engine.slow]
        start64 = [t.double().clone() for t in fast]
        move(fast, [t * 2 for t in fast])
        theta64 = [t.double().clone() for t in fast]
        engine.interpolate(0.3)
        out = [s.clone() for s in engine.slow]
        move(fast, [t + 1 for t in fast])
        engine.accumulate(1)
        move(fast, [t - 1 for t in fast])
        engine.accumulate(2)
        engine.interpolate_accumulated(0.5)
        return engine, fast, out, phi64, start64, theta64, [s.clone() for s in engine.slow]

    register_kernel("cpu", list_kernel)
    try:
        KERNEL_CALLS.clear()
        engine, fast, first, phi64, start64, theta64, last = run("auto")
        assert engine.path() == ["kernel", "kernel"]
        # per (device, dtype) group: interpolate, accumulate twice, interpolate_accumulated
        assert KERNEL_CALLS == [3, 3] * 4
    finally:
        register_kernel("cpu", None)
    assert Interpolator([torch.zeros(2)]).path() == ["foreach"]
    _, ref_fast, ref_first, *_, ref_last = run("reference")
    for x, y in zip([*first, *last, *fast], [*ref_first, *ref_last, *ref_fast]):
        assert torch.equal(x, y)
    for s, a, r, b in zip(first, phi64, start64, theta64):
        assert relerr(s, a + 0.3 * (b - r), a, b) <= 1e-6


def test_bad_inputs():
    with pytest.raises(ValueError, match="method"):
        Interpolator([torch.ones(2)], method="fast")
    with pytest.raises(ValueError, match="'flat' is gone"):
        Interpolator([torch.ones(2)], method="flat")
    for removed in ({"pack": True}, {"block_size": 4}):
        with pytest.raises(TypeError):
            Interpolator([torch.ones(2)], **removed)
    with pytest.raises(ValueError, match="floating point"):
        Interpolator([torch.ones(2, dtype=torch.int64)])
    engine = Interpolator([torch.ones(2)])
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            engine.interpolate(bad)
    with pytest.raises(ValueError, match="shape"):
        interpolate_([torch.ones(2)], [torch.ones(3)], 0.5)
