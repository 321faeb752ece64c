"""The Triton outer-step kernel (metaopt/triton_kernel.py) run on the CPU by Triton's
interpreter, against a float64 reference on random data: every parameter dtype (float32,
float64, bfloat16, float16), odd sizes, empty and non-contiguous tensors, the fast tensors
rounded to nearest even exactly as torch's ``.to()`` rounds; and through the Interpolator (the
outer step, the trajectory mean, host placement's chunks) against the foreach path."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")
os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined
if os.environ["TRITON_INTERPRET"] != "1":
    pytest.skip("TRITON_INTERPRET is set to another value", allow_module_level=True)

import metaopt  # noqa: E402
from metaopt.interpolation import Interpolator, master_dtype, register_kernel  # noqa: E402
from metaopt.triton_kernel import BLOCK, outer_step  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _master(theta, phi):
    """θ's master form in float64: θ + (φ − round(φ)) for lower-precision θ (the kernel's
    ``forms_master``), θ itself otherwise."""
    if theta.dtype == phi.dtype:
        return theta.double()
    return theta.double() + (phi.double() - phi.to(theta.dtype).double())


def _random(shapes, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * scale + 0.25).to(dtype) for s in shapes]


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([0, 1, 3, 7, 129, BLOCK - 1, BLOCK + 5]), min_size=1, max_size=5),
    dtype=st.sampled_from(DTYPES),
    w=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_the_outer_step_against_float64(sizes, dtype, w, seed):
    """φ ← φ + w(θ̂ − φ) in the master dtype (θ̂: θ's master form), within its rounding of the
    float64 result; θ ← φ rounded exactly as torch's ``.to(dtype)``."""
    master = master_dtype(dtype)
    phi = _random([(n,) for n in sizes], master, seed)
    theta = _random([(n,) for n in sizes], dtype, seed + 1, scale=3.0)
    expected = [p.double() + w * (_master(t, p) - p.double()) for p, t in zip(phi, theta)]
    outer_step(phi, list(theta), w, theta, phi)
    tol = 1e-12 if master == torch.float64 else 2e-6
    for p, t, e in zip(phi, theta, expected):
        assert p.dtype == master and t.dtype == dtype
        assert torch.allclose(p.double(), e, rtol=tol, atol=tol)
        assert torch.equal(t, p.to(dtype))  # the rounding torch's .to() makes


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_trajectory_mean_and_a_copy_from_another_tensor(dtype):
    """``dst`` is the mean, ``copy_from`` the slow weights: θ ← φ, not the mean."""
    master = master_dtype(dtype)
    mean, phi = _random([(5,), (1030,)], master, 1), _random([(5,), (1030,)], master, 2)
    theta = _random([(5,), (1030,)], dtype, 3)
    expected = [m.double() + 0.5 * (_master(t, p) - m.double()) for m, t, p in zip(mean, theta, phi)]
    outer_step(mean, list(theta), 0.5, theta, phi)
    for m, t, p, e in zip(mean, theta, phi, expected):
        assert torch.allclose(m.double(), e, rtol=2e-6, atol=2e-6)
        assert torch.equal(t, p.to(dtype))


def test_without_fast_tensors_and_with_non_contiguous_ones():
    phi = _random([(4, 6)], torch.float32, 4)
    theta = _random([(6, 4)], torch.float32, 5)
    fast = [theta[0].t()]  # a transposed view: torch's foreach path, the same computation
    src = [fast[0].clone()]
    expected = phi[0].double() + 0.3 * (src[0].double() - phi[0].double())
    outer_step(phi, src, 0.3, fast, phi)
    assert torch.allclose(phi[0].double(), expected, rtol=2e-6, atol=2e-6)
    assert torch.equal(fast[0], phi[0])
    before = phi[0].clone()
    outer_step(phi, [torch.zeros_like(phi[0]) + 1.5], 1.0, None, phi)  # no fast tensors
    assert torch.equal(phi[0], torch.full_like(before, 1.5))


def test_bfloat16_rounds_to_nearest_even_at_the_ties():
    """Values halfway between two bfloat16 numbers: ties go to the even one, as in torch."""
    base = torch.tensor([1.0, 1.0078125, -3.0, 2.0**-100], dtype=torch.float32)
    ties = base + base.abs() * 2.0**-9  # half a bfloat16 ulp above each
    phi = [ties.clone()]
    theta = [torch.zeros(4, dtype=torch.bfloat16)]
    outer_step(phi, [ties.to(torch.bfloat16)], 0.0, theta, phi)
    assert torch.equal(theta[0], ties.to(torch.bfloat16))


@pytest.fixture
def kernel_on_cpu():
    register_kernel("cpu", outer_step)
    yield
    register_kernel("cpu", None)


@pytest.mark.parametrize("state_device", [None, "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequential_reptile_on_the_kernel_equals_the_foreach_path(
    kernel_on_cpu, dtype, state_device, monkeypatch
):
    """Whole runs with interpolation="auto" (the kernel, registered for the CPU) and
    "foreach": the same parameters and slow weights to the master dtype's rounding (the kernel's
    lerp rounds once; torch's lerp takes another form for weights over 0.5)."""
    import metaopt.interpolation as interpolation

    monkeypatch.setattr(interpolation, "STREAM_ELEMENTS", 7)  # host placement: small chunks

    def run(method):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2)).to(dtype)
        opt = metaopt.Reptile(
            torch.optim.SGD(model.parameters(), lr=0.05),
            tasks=["a", "b"],
            inner_steps=2,
            tasks_per_outer_step=2,
            outer_lr=0.4,
            interpolation=method,
            state_device=state_device,
        )
        g = torch.Generator().manual_seed(1)
        for _ in range(8):
            opt.next_tasks()
            model(torch.randn(4, 5, generator=g).to(dtype)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        return opt, [p.detach().clone() for p in model.parameters()]

    kernel_opt, kernel_params = run("auto")
    assert kernel_opt.engine.path() == ["kernel"]
    ref_opt, ref_params = run("foreach")
    assert kernel_opt.outer_step_count == ref_opt.outer_step_count == 2
    for a, b in zip(kernel_opt.slow_weights, ref_opt.slow_weights):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(kernel_params, ref_params):
        torch.testing.assert_close(
            a.float(), b.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6
        )


def test_an_interpolator_on_the_kernel_against_float64(kernel_on_cpu):
    theta = _random([(3, 4), (0,), (1100,)], torch.float16, 7)
    engine = Interpolator(theta)
    assert engine.path() == ["kernel"]
    phi0 = [v.clone() for v in engine.slow]
    for t in theta:
        t.add_(0.5)
    moved = [t.double() for t in theta]
    engine.interpolate(0.25)
    for p, p0, m, t in zip(engine.slow, phi0, moved, theta):
        assert torch.allclose(p.double(), p0.double() + 0.25 * (m - p0.double()), rtol=2e-6, atol=2e-6)
        assert torch.equal(t, p.to(torch.float16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_master_form_is_what_torch_forms_first(dtype):
    """The kernel forms θ + (φ − round(φ)) itself: the same slow weights as the foreach path,
    which forms it with torch before interpolating, to float32 rounding."""
    from metaopt.interpolation import interpolate_
    from metaopt.precision import master_form as torch_master

    phi = _random([(37,), (BLOCK + 3,)], torch.float32, 11)  # φ off bfloat16's grid
    theta = [(p + 0.1).to(dtype) for p in phi]
    ref_phi = [p.clone() for p in phi]
    interpolate_(ref_phi, torch_master(theta, ref_phi), 0.7, sync=False)
    outer_step(phi, list(theta), 0.7, theta, phi)
    for p, r, t in zip(phi, ref_phi, theta):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)
        assert not torch.equal(p.to(dtype).float(), p)  # the rounding error was there to keep
        assert torch.equal(t, p.to(dtype))


def test_the_launch_tables_are_reused_for_the_same_tensors():
    """A second outer step over the same tensors launches from the tables of the first (no
    rebuilding or uploading of one entry per block), and its result is still exact; other
    tensors get their own."""
    from metaopt import triton_kernel

    phi, theta, other = _random([(3 * BLOCK + 5,)] * 3, torch.float32, seed=11)
    triton_kernel._TABLES.clear()
    outer_step([phi], [theta], 0.5, [theta], [phi])  # φ ← (φ + θ)/2; θ ← φ
    (first,) = triton_kernel._TABLES.values()
    theta.add_(1.0)
    expected = phi.double() + 0.5 * (theta.double() - phi.double())
    outer_step([phi], [theta], 0.5, [theta], [phi])
    assert list(triton_kernel._TABLES.values()) == [first]
    torch.testing.assert_close(phi.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(theta, phi)
    outer_step([other], [theta], 0.5, None, [other])
    assert len(triton_kernel._TABLES) == 2
