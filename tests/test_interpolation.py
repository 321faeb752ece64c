"""Every interpolation path against a float64 reference, on random shapes, dtypes and counts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from metaopt.functional import pack_parameters
from metaopt.interpolation import Interpolator, interpolate_, register_kernel

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}

shapes = st.lists(st.lists(st.integers(1, 7), min_size=0, max_size=3).map(tuple), min_size=1, max_size=6)


def make(shapes_, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * scale + 0.5).to(dtype) for s in shapes_]


def relerr(a: torch.Tensor, b: torch.Tensor, *scale: torch.Tensor) -> float:
    """‖a − b‖ relative to the inputs' scale (the result itself can cancel to ~0)."""
    norm = max([float(b.norm())] + [float(x.double().norm()) for x in scale])
    return float((a.double() - b).norm()) / max(norm, 1e-30)


@pytest.mark.parametrize("method", ["flat", "foreach", "reference"])
@given(
    shapes_=shapes,
    dtype=st.sampled_from(DTYPES),
    weight=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
    block=st.sampled_from([None, 1, 5, 64]),
)
def test_interpolate_matches_float64_reference(method, shapes_, dtype, weight, seed, block):
    fast = make(shapes_, dtype, seed)
    if method == "flat":
        pack_parameters(fast)
    engine = Interpolator(fast, method=method, block_size=block)
    phi64 = [t.double().clone() for t in fast]
    moved = make(shapes_, dtype, seed + 1)
    with torch.no_grad():
        for t, m in zip(fast, moved):
            t.copy_(m)
    theta64 = [t.double().clone() for t in fast]
    engine.interpolate(weight)
    for f, s, a, b in zip(fast, engine.slow, phi64, theta64):
        ref = a + weight * (b - a)
        # φ is kept in float32 for half types: compare it at float32 accuracy
        tol = TOL[s.dtype] if s.dtype != torch.float32 else 1e-6
        assert relerr(s, ref, a, b) <= tol
        assert torch.equal(f, s.to(f.dtype))  # θ re-synced to φ (rounded once)


@given(
    shapes_=shapes,
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 10_000),
    method=st.sampled_from(["flat", "foreach", "reference"]),
)
def test_weight_zero_keeps_slow_and_weight_one_takes_fast(shapes_, dtype, seed, method):
    fast = make(shapes_, dtype, seed)
    if method == "flat":
        pack_parameters(fast)
    engine = Interpolator(fast, method=method)
    phi = [s.clone() for s in engine.slow]
    with torch.no_grad():
        for t, m in zip(fast, make(shapes_, dtype, seed + 7)):
            t.copy_(m)
    engine.interpolate(0.0)
    for s, p, f in zip(engine.slow, phi, fast):
        assert torch.equal(s, p)
        assert torch.equal(f, p.to(f.dtype))
    moved = make(shapes_, dtype, seed + 9)
    with torch.no_grad():
        for t, m in zip(fast, moved):
            t.copy_(m)
    engine.interpolate(1.0)
    for s, m, f in zip(engine.slow, moved, fast):
        assert torch.equal(s, m.to(s.dtype))
        assert torch.equal(f, m)


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
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 999),
    counts=st.integers(1, 4),
    weight=st.floats(0.0, 1.0),
)
def test_accumulate_then_interpolate_is_mean_of_fast_weights(shapes_, dtype, seed, counts, weight):
    fast = make(shapes_, dtype, seed)
    pack_parameters(fast)
    engine = Interpolator(fast, block_size=3)
    phi64 = [t.double().clone() for t in fast]
    ends = []
    for j in range(counts):
        moved = make(shapes_, dtype, seed + 100 + j)
        ends.append([m.double() for m in moved])
        with torch.no_grad():
            for t, m in zip(fast, moved):
                t.copy_(m)
        engine.accumulate(j + 1)
        for t, a in zip(fast, phi64):  # θ reset to φ after each trajectory
            assert torch.equal(t.double(), a)
    engine.interpolate_accumulated(weight)
    for i, (s, a) in enumerate(zip(engine.slow, phi64)):
        mean = sum(e[i] for e in ends) / counts
        assert relerr(s, a + weight * (mean - a), a, mean) <= TOL[dtype] * 10


def test_functional_interpolate_both_methods_agree():
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


def test_registered_kernel_is_used_for_packed_parameters_and_checked():
    calls = []

    def kernel(dst, src, w, fast, copy_from):
        calls.append(dst.numel())
        dst.lerp_(src.to(dst.dtype), w)
        if fast is not None:
            fast.copy_(copy_from)

    fast = make([(4, 3), (7,)], torch.float32, 3)
    pack_parameters(fast)
    register_kernel("cpu", kernel)
    try:
        engine = Interpolator(fast)
        assert engine.path() == ["kernel"]
        ref = [t.double().clone() for t in fast]
        with torch.no_grad():
            for t in fast:
                t.mul_(2)
        engine.interpolate(0.5)
        assert calls == [19]
        for s, r in zip(engine.slow, ref):
            torch.testing.assert_close(s.double(), r * 1.5)
    finally:
        register_kernel("cpu", None)
    assert Interpolator(fast).path() == ["flat"]


def test_bad_inputs():
    with pytest.raises(ValueError, match="method"):
        Interpolator([torch.ones(2)], method="fast")
    with pytest.raises(ValueError, match="no tensors"):
        Interpolator([])
    with pytest.raises(ValueError, match="floating point"):
        Interpolator([torch.ones(2, dtype=torch.int64)])
    with pytest.raises(ValueError, match="packed"):
        Interpolator([torch.ones(2), torch.ones(3)], method="flat")
    engine = Interpolator([torch.ones(2)])
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            engine.interpolate(bad)
    with pytest.raises(ValueError, match="shape"):
        interpolate_([torch.ones(2)], [torch.ones(3)], 0.5)
