"""The Triton Gramian kernel (metaopt/triton_gramian.py) run on the CPU by Triton's
interpreter, against ``J Jᵀ`` computed in float64 from the same entries: random rows of any
range (every entry within about 5e-7 of the product of the two rows' norms), float32 and half
inputs, odd sizes, column slices, the extremes of float32's range, non-finite entries, exact
cancellation of antiparallel rows; and PCGrad and GradVac through it against the float64
path."""

from __future__ import annotations

import importlib
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
from metaopt import triton_gramian  # noqa: E402
from metaopt.aggregation import gramian  # noqa: E402

gramian_module = importlib.import_module("metaopt.aggregation.gramian")  # not the function
from metaopt.triton_gramian import MAX_TASKS, gramian_float64, supports  # noqa: E402

TOLERANCE = 1e-6  # of the product of the two rows' norms (the issue's bound; the kernel's is ~5e-7)


def _check(G: torch.Tensor, J: torch.Tensor) -> None:
    exact = J.double() @ J.double().T
    norms = exact.diagonal().sqrt()
    bound = TOLERANCE * norms[:, None] * norms[None, :]
    assert G.dtype == torch.float64 and G.shape == exact.shape
    assert bool(((G - exact).abs() <= bound).all()), float(((G - exact).abs() - bound).max())


def _rows(T: int, P: int, dtype: torch.dtype, exponents: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(T, P, generator=g, dtype=torch.float64) + 0.1
    J *= torch.tensor([10.0**e for e in exponents[:T]] + [1.0] * (T - len(exponents)), dtype=torch.float64)[
        :, None
    ]
    return J.to(dtype)


@settings(max_examples=30, deadline=None)
@given(
    T=st.sampled_from([1, 2, 3, 8, 9, 17, MAX_TASKS]),
    P=st.sampled_from([0, 1, 5, 15, 16, 17, 129, 1000]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    exponents=st.lists(st.integers(-30, 30), max_size=MAX_TASKS),
    seed=st.integers(0, 2**16),
)
def test_the_gramian_against_float64(T, P, dtype, exponents, seed):
    if dtype != torch.float32:  # half's range: rows of 1e-3 to 1e3
        exponents = [e // 10 for e in exponents]
    J = _rows(T, P, dtype, exponents, seed)
    _check(gramian_float64(J), J)


def test_many_tiles_per_program(monkeypatch):
    """Each program walks several tiles when the tiles outnumber the programs."""
    monkeypatch.setattr(triton_gramian, "PROGRAMS", 3)
    J = _rows(5, 4000, torch.float32, [3, -3, 0, 10, -10], seed=1)
    _check(gramian_float64(J), J)


def test_the_extremes_of_float32():
    """Entries near float32's largest and smallest numbers: finite, accurate, as the float64
    path (their squares are not float32 numbers)."""
    J = _rows(5, 300, torch.float32, [30, -30, 0, 0, 0], seed=2)
    J[2, 7] = 3.0e38
    J[3] = torch.full((300,), 1e-40)  # subnormal
    J[4, :] = 0.0
    J[4, 3] = 1e-45
    G = gramian_float64(J)
    assert bool(G.isfinite().all())
    _check(G, J)


def test_antiparallel_rows_cancel_exactly():
    J = _rows(3, 777, torch.float32, [0, 5, 5], seed=3)
    J[2] = -J[1]
    G = gramian_float64(J)
    assert G[1, 2] == -G[1, 1] and G[2, 2] == G[1, 1]


def test_non_finite_entries_give_a_non_finite_diagonal():
    for bad in (float("inf"), float("-inf"), float("nan")):
        J = _rows(3, 200, torch.float32, [0, 0, 0], seed=4)
        J[1, 50] = bad
        diagonal = gramian_float64(J).diagonal()
        assert diagonal[[0, 2]].isfinite().all() and not diagonal[1].isfinite()


def test_column_slices_and_determinism():
    wide = _rows(4, 1000, torch.float32, [1, 2, 3, 4], seed=5)
    J = wide[:, 123:877]
    assert supports(J) and not J.is_contiguous()
    G = gramian_float64(J)
    _check(G, J)
    assert torch.equal(G, gramian_float64(J))  # no atomics: the same bits each time


def test_what_it_does_not_take():
    assert not supports(torch.ones(MAX_TASKS + 1, 4))
    assert not supports(torch.ones(2, 3, 4))
    assert not supports(torch.ones(3, 4, dtype=torch.float64))
    assert not supports(torch.ones(4, 3).T)
    with pytest.raises(ValueError, match="at most 32 rows"):
        gramian_float64(torch.ones(MAX_TASKS + 1, 4))


def test_gramian_takes_it_where_registered(monkeypatch):
    """Registered for CPU tensors here, as gramian() registers it for CUDA: taken for float64
    Gramians of float32 rows, and for nothing else."""
    calls = []

    def spy(J: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(J.shape))
        return gramian_float64(J)

    monkeypatch.setitem(gramian_module._FLOAT64_KERNELS, "cpu", (spy, supports))
    J = _rows(6, 500, torch.float32, [0, 1, 2, 3, 4, 5], seed=6)
    G = gramian(J, dtype=torch.float64)
    assert calls == [(6, 500)]
    _check(G, J)
    assert torch.equal(G, G.T)  # made symmetric, as every Gramian
    gramian(J)  # float32 in, float32 out: one matrix product
    gramian(J.double(), dtype=torch.float64)
    gramian(_rows(MAX_TASKS + 1, 10, torch.float32, [], seed=7), dtype=torch.float64)
    assert calls == [(6, 500)]


@pytest.mark.parametrize("cls", [metaopt.PCGrad, metaopt.GradVac])
def test_surgery_through_the_kernel_equals_the_float64_path(cls, monkeypatch):
    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        enc, heads = torch.nn.Linear(6, 16), torch.nn.ModuleList(torch.nn.Linear(16, 1) for _ in range(4))
        params = [*enc.parameters(), *heads.parameters()]
        opt = cls(torch.optim.SGD(params, lr=0.1), tasks=["a", "b", "c", "d"], seed=1)
        for s in range(4):
            x = torch.randn(8, 6, generator=torch.Generator().manual_seed(s))
            opt.step({t: (heads[k](torch.tanh(enc(x))) - k).pow(2).mean() for k, t in enumerate(opt.tasks)})
        return [p.detach().clone() for p in params]

    reference = run()
    calls = []

    def spy(J: torch.Tensor) -> torch.Tensor:
        calls.append(J.shape)
        return gramian_float64(J)

    monkeypatch.setitem(gramian_module._FLOAT64_KERNELS, "cpu", (spy, supports))
    through_kernel = run()
    assert len(calls) >= 4  # every step's Gramian
    for a, b in zip(reference, through_kernel):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
