"""Tests of metaopt.jacobian: per-task gradients as the rows of one matrix."""

from __future__ import annotations

import doctest
import gc
import warnings
import weakref

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import metaopt.jacobian as jac_module
from metaopt.jacobian import (
    TaskJacobian,
    parameter_slices,
    reached_parameters,
    task_gradients,
    task_jacobian,
)

F64 = torch.float64


class TwoHeads(nn.Module):
    """Shared trunk, one head per task, and a parameter only task 0 uses."""

    def __init__(self, seed: int, width: int = 5, tasks: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(4, width), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(tasks))
        self.extra = nn.Parameter(torch.randn(2))

    def losses(self, x: Tensor) -> list[Tensor]:
        h = self.trunk(x)
        out = [(head(h) ** 2).mean() for head in self.heads]
        out[0] = out[0] + (self.extra**2).sum()
        return out


def _data(seed: int, n: int = 6) -> Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))


class _LossModule(nn.Module):
    """Wraps a TwoHeads so that torch.func.functional_call can swap its parameters."""

    def __init__(self, m: TwoHeads) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.m.losses(x)


def _reference(model: TwoHeads, x: Tensor, params: list[Tensor]) -> Tensor:
    """Independent oracle: torch.func.jacrev of the stacked losses w.r.t. the given params."""
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [f"m.{names[id(p)]}" for p in params]
    wrapper = _LossModule(model)

    def f(*ps: Tensor) -> Tensor:
        return torch.stack(
            torch.func.functional_call(wrapper, dict(zip(keys, ps, strict=True)), (x,), strict=False)
        )

    jac = torch.func.jacrev(f, argnums=tuple(range(len(params))))(*[p.detach() for p in params])
    T = len(model.heads)
    return torch.cat([j.reshape(T, -1) for j in jac], dim=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loop_batched_and_reference_agree(seed: int) -> None:
    model = TwoHeads(seed).double()
    x = _data(seed).double()
    params = list(model.parameters())
    ref = _reference(model, x, params)
    J_loop = task_gradients(model.losses(x), params, retain_graph=True)
    J_batched = task_gradients(model.losses(x), params, batched=True)
    torch.testing.assert_close(J_loop, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(J_batched, ref, rtol=1e-12, atol=1e-12)
    # a subset of the parameters, in another order
    sub = [params[-1], params[0]]
    torch.testing.assert_close(
        task_gradients(model.losses(x), sub, retain_graph=True),
        _reference(model, x, sub),
        rtol=1e-12,
        atol=1e-12,
    )
    assert all(p.grad is None for p in params), "task_gradients must not touch .grad"


@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 4), width=st.integers(1, 4))
def test_loop_equals_batched_equals_per_task_autograd(seed: int, T: int, width: int) -> None:
    model = TwoHeads(seed % 1000, width=width, tasks=T)
    x = _data(seed)
    params = list(model.parameters())
    naive = []
    for loss in model.losses(x):
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        naive.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )
    naive_J = torch.stack(naive)
    tj_loop = task_jacobian(model.losses(x), params, retain_graph=True)
    tj_batched = task_jacobian(model.losses(x), params, batched=True)
    torch.testing.assert_close(tj_loop.matrix, naive_J, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tj_batched.matrix, naive_J, rtol=1e-5, atol=1e-6)
    assert torch.equal(tj_loop.reached, tj_batched.reached)


def test_unreached_parameters_are_reported() -> None:
    model = TwoHeads(0)
    x = _data(0)
    params = list(model.parameters())
    # params: trunk.w, trunk.b, head0.w, head0.b, head1.w, head1.b, head2.w, head2.b, extra
    # in named_parameters order: trunk.0.weight, trunk.0.bias, heads.*, extra
    names = [n for n, _ in model.named_parameters()]
    tj = task_jacobian(model.losses(x), params, retain_graph=True)
    assert isinstance(tj, TaskJacobian)
    assert tj.reached.shape == (3, len(params)) and tj.reached.dtype == torch.bool
    for t in range(3):
        for k, name in enumerate(names):
            expected = (
                name.startswith("trunk") or name.startswith(f"heads.{t}.") or (name == "extra" and t == 0)
            )
            assert bool(tj.reached[t, k]) == expected, (t, name)
            block = tj.matrix[t, parameter_slices(params)[k]]
            if not expected:
                assert torch.equal(block, torch.zeros_like(block))
    assert torch.equal(reached_parameters(model.losses(x), params), tj.reached)
    assert torch.equal(task_jacobian(model.losses(x), params, batched=True).reached, tj.reached)


def test_reached_with_zero_gradient_is_still_reached() -> None:
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    v = torch.tensor([3.0], requires_grad=True)
    losses = [(w * 0.0).sum() + v.sum(), torch.relu(-w.abs()).sum()]  # w reached, gradient zero
    for batched in (False, True):
        tj = task_jacobian(losses, [w, v], retain_graph=True, batched=batched)
        assert tj.reached.tolist() == [[True, True], [True, False]]
        assert torch.equal(tj.matrix, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))


def test_constant_loss_and_non_leaf_params() -> None:
    a = torch.tensor([1.0, -2.0], requires_grad=True)
    b = a * 3  # a non-leaf "parameter" (e.g. a functional parameter view)
    losses = [torch.tensor(1.5), (b**2).sum(), a.sum()]
    for batched in (False, True):
        tj = task_jacobian(losses, [b, a], retain_graph=True, batched=batched)
        # losses[1] depends on a through b: both are reached, d/da = 3 * d/db
        assert tj.reached.tolist() == [[False, False], [True, True], [False, True]]
        expected = torch.tensor([[0.0, 0.0, 0.0, 0.0], [6.0, -12.0, 18.0, -36.0], [0.0, 0.0, 1.0, 1.0]])
        torch.testing.assert_close(tj.matrix, expected)


def test_shared_graph_needs_retain_graph() -> None:
    model = TwoHeads(0)
    x = _data(0)
    params = list(model.parameters())
    with pytest.raises(RuntimeError, match=r"losses\[1\].*retain_graph=True"):
        task_gradients(model.losses(x), params)
    losses = model.losses(x)
    task_gradients(losses, params, retain_graph=True)
    losses[0].backward()  # graph still there
    assert params[0].grad is not None


def test_disjoint_graphs_are_freed_task_by_task() -> None:
    x = _data(1)
    ws = [torch.randn(4, requires_grad=True) for _ in range(3)]
    released: list[bool] = []
    refs: list[weakref.ref[Tensor]] = []

    class Probe(torch.autograd.Function):
        """Saves a private tensor; its backward records whether task 0's saved tensor is gone."""

        @staticmethod
        def forward(ctx, inp: Tensor) -> Tensor:  # type: ignore[override]
            buf = inp * 2.0
            ctx.save_for_backward(buf)
            refs.append(weakref.ref(buf))
            return inp.clone()

        @staticmethod
        def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
            gc.collect()
            released.append(refs[0]() is None)
            return grad

    losses = [Probe.apply(torch.tanh(x @ w)).sum() for w in ws]
    J = task_gradients(losses, ws)
    assert J.shape == (3, 12)
    # when task 1 and task 2 ran their backward, task 0's saved tensor had been released
    assert released == [False, True, True]
    with pytest.raises(RuntimeError):
        losses[0].backward()  # task 0's graph is gone


def test_out_buffer_is_filled_in_place() -> None:
    model = TwoHeads(0)
    x = _data(0)
    params = list(model.parameters())
    P = sum(p.numel() for p in params)
    out = torch.full((3, P), float("nan"))
    ptr = out.data_ptr()
    for batched in (False, True):
        res = task_gradients(model.losses(x), params, out=out, retain_graph=True, batched=batched)
        assert res is out and out.data_ptr() == ptr
        assert torch.isfinite(out).all()  # unreached blocks were zeroed, not left as NaN
    out64 = torch.empty(3, P, dtype=F64)  # another dtype: values are cast on copy
    task_gradients(model.losses(x), params, out=out64, retain_graph=True)
    torch.testing.assert_close(out64.float(), out)
    with pytest.raises(ValueError, match=r"out must have shape \(T, P\)"):
        task_gradients(model.losses(x), params, out=torch.empty(3, P + 1))


def test_batched_falls_back_to_loop_with_a_warning() -> None:
    class NoVmap(torch.autograd.Function):
        @staticmethod
        def forward(ctx, inp: Tensor) -> Tensor:  # type: ignore[override]
            return inp * 3.0

        @staticmethod
        def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
            if grad.sum().item() > 1e30:  # data-dependent control flow: vmap cannot batch it
                raise AssertionError
            return grad * 3.0

    w = torch.randn(5, requires_grad=True)
    h = torch.randn(5, requires_grad=True)

    def losses() -> list[Tensor]:
        f = NoVmap.apply(torch.tanh(w))
        return [f.sum(), (f * h).sum(), (h**2).sum()]

    with pytest.warns(RuntimeWarning, match="falling back"):
        tj = task_jacobian(losses(), [w, h], batched=True, retain_graph=True)
    ref = task_jacobian(losses(), [w, h], retain_graph=True)
    torch.testing.assert_close(tj.matrix, ref.matrix)
    assert torch.equal(tj.reached, ref.reached)
    assert tj.reached.tolist() == [[True, False], [True, True], [False, True]]


def test_batched_does_not_warn_when_vmap_works() -> None:
    model = TwoHeads(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task_gradients(model.losses(_data(0)), list(model.parameters()), batched=True)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: task_gradients([], [p]), "losses is empty"),
        (lambda p: task_gradients([p.sum()], []), "params is empty"),
        (lambda p: task_gradients([p * 2], [p]), "scalar"),
        (lambda p: task_gradients([p.sum()], [p, p]), "twice"),
        (lambda p: task_gradients([p.sum()], [p.detach()]), "does not require grad"),
        (lambda p: task_gradients([p.sum()], [p], out=torch.empty(2, 3)), "out must have shape"),
    ],
    ids=["no-losses", "no-params", "non-scalar", "duplicate", "no-grad", "out-shape"],
)
def test_invalid_inputs(make, match: str) -> None:  # type: ignore[no-untyped-def]
    p = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        make(p)


def test_type_errors() -> None:
    p = torch.ones(3, requires_grad=True)
    with pytest.raises(TypeError, match="single tensor"):
        task_gradients([p.sum()], p)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sequence of scalar tensors"):
        task_gradients(p.sum(), [p])  # type: ignore[arg-type]


def test_dtype_promotion_and_generator_params() -> None:
    a = torch.ones(2, dtype=torch.float32, requires_grad=True)
    b = torch.ones(1, dtype=F64, requires_grad=True)
    J = task_gradients([(a * 2).sum() + (b * 3).sum()], iter([a, b]))  # any iterable of params
    assert J.dtype == F64
    assert J.tolist() == [[2.0, 2.0, 3.0]]


def test_docstring_examples() -> None:
    result = doctest.testmod(jac_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
