"""metaopt.Weighted: any Gramian weighting through metaopt's interface, checked against TorchJD's
own aggregators on the same Jacobian (an independent oracle: TorchJD computes ``w @ J`` from
J itself). The torch-style recipe, accumulation, GradScaler, clipping, compile and DDP run for
``Weighted(UPGradWeighting())`` and ``SequentialReptile(Weighted(MGDAWeighting()))`` in the
shared training-stack tests (tests/_stacks.py)."""

from __future__ import annotations

import pytest
import torch

import metaopt

A = pytest.importorskip("torchjd.aggregation")

TASKS = ["a", "b", "c"]


def _setup():
    torch.manual_seed(0)
    enc = torch.nn.Linear(4, 6).double()
    g = torch.Generator().manual_seed(1)
    x = {t: torch.randn(8, 4, generator=g, dtype=torch.float64) for t in TASKS}

    def losses():
        return {t: ((enc(x[t]) * (i + 1) - i).pow(2).mean() * (1 + i)) for i, t in enumerate(TASKS)}

    return enc, losses


def _jacobian(enc, losses):
    return torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, list(enc.parameters()))])
            for v in losses().values()
        ]
    )


def _pairs():
    """(name, weighting, aggregator) for the weightings whose solvers are installed (the bench
    extra installs them all: quadprog for UPGrad and DualProj, cvxpy for CAGrad)."""
    makers = [
        ("UPGrad", lambda: (A.UPGradWeighting(), A.UPGrad())),
        ("MGDA", lambda: (A.MGDAWeighting(), A.MGDA())),
        ("DualProj", lambda: (A.DualProjWeighting(), A.DualProj())),
        ("IMTLG", lambda: (A.IMTLGWeighting(), A.IMTLG())),
        ("AlignedMTL", lambda: (A.AlignedMTLWeighting(), A.AlignedMTL())),
        ("CAGrad", lambda: (A.CAGradWeighting(c=0.5), A.CAGrad(c=0.5))),
    ]
    out = []
    for name, make in makers:
        try:
            out.append((name, *make()))
        except ImportError:
            pass
    return out


@pytest.mark.parametrize("recipe", ["torch", "one_loop"])
@pytest.mark.parametrize("name, weighting, aggregator", _pairs(), ids=[p[0] for p in _pairs()])
def test_the_update_is_torchjds_aggregation_of_the_same_jacobian(name, weighting, aggregator, recipe):
    enc, losses = _setup()
    J = _jacobian(enc, losses)
    before = [p.detach().clone() for p in enc.parameters()]
    opt = metaopt.Weighted(torch.optim.SGD(enc.parameters(), lr=1.0), weighting=weighting, tasks=TASKS)
    expected = aggregator(J)
    if recipe == "torch":
        opt.backward(losses())
        got = torch.cat([p.grad.reshape(-1) for p in enc.parameters()])
        report = opt.step()
    else:
        report = opt.step(losses())
        got = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, enc.parameters())])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(report.weights.to(J.dtype) @ J, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda: A.ExcessMTLWeighting(),
        lambda: A.MoDoWeighting(),
        lambda: A.SDMGradWeighting(),
        lambda: A.MeanWeighting(),
    ],
    ids=["ExcessMTL", "MoDo", "SDMGrad", "Mean"],
)
def test_jacobian_weightings_are_refused(make):
    enc, _ = _setup()
    with pytest.raises(TypeError, match="reads the Jacobian itself, not its Gramian"):
        metaopt.Weighted(torch.optim.SGD(enc.parameters(), lr=0.1), weighting=make(), tasks=TASKS)


def test_stateful_and_non_callable_weightings_are_refused():
    enc, _ = _setup()
    with pytest.raises(TypeError, match="keeps state between calls"):
        metaopt.Weighted(torch.optim.SGD(enc.parameters(), lr=0.1), weighting=A.PCDWeighting(), tasks=TASKS)
    with pytest.raises(TypeError, match="must be a callable"):
        metaopt.Weighted(torch.optim.SGD(enc.parameters(), lr=0.1), weighting=3, tasks=TASKS)


def test_weights_of_the_wrong_shape_are_refused_with_nothing_moved():
    enc, losses = _setup()
    opt = metaopt.Weighted(
        torch.optim.SGD(enc.parameters(), lr=0.1),
        weighting=lambda G: torch.ones(2, dtype=G.dtype),
        tasks=TASKS,
    )
    before = [p.detach().clone() for p in enc.parameters()]
    with pytest.raises(ValueError, match=r"expected 3 weights"):
        opt.step(losses())
    assert all(torch.equal(a, b) for a, b in zip(before, enc.parameters()))
    assert opt.step_count == 0


def test_random_weightings_draw_from_the_optimizers_generator():
    """TorchJD's PCGradWeighting draws from the global RNG: inside Weighted it draws from a
    global RNG seeded by the optimizer's generator, so equal seeds give equal runs, other seeds
    other runs, and the caller's global RNG does not move."""

    def run(seed, weighting=None):
        enc, losses = _setup()
        opt = metaopt.Weighted(
            torch.optim.SGD(enc.parameters(), lr=0.1),
            weighting=weighting or (lambda G: torch.rand(3, dtype=G.dtype)),
            tasks=TASKS,
            seed=seed,
        )
        torch.manual_seed(123)
        weights = [opt.step(losses()).weights.clone() for _ in range(6)]
        assert torch.equal(torch.get_rng_state(), torch.manual_seed(123).get_state())
        return weights

    same, again, other = run(0), run(0), run(1)
    assert all(torch.equal(a, b) for a, b in zip(same, again))
    assert not all(torch.equal(a, b) for a, b in zip(same, other))
    torchjd = run(0, A.PCGradWeighting())
    assert all(torch.equal(a, b) for a, b in zip(torchjd, run(0, A.PCGradWeighting())))


def test_random_weightings_never_reseed_the_cuda_generators(monkeypatch):
    """fork_rng(devices=[]) restores only the CPU generator, so Weighted must reseed only that
    one: torch.manual_seed would also reseed every CUDA generator, for good (checked without a
    GPU by recording the call torch.manual_seed makes)."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    torch.manual_seed(7)
    assert reseeded == [7]  # the recorder sees what torch.manual_seed does
    enc, losses = _setup()  # seeds the model's initialisation
    opt = metaopt.Weighted(
        torch.optim.SGD(enc.parameters(), lr=0.1),
        weighting=lambda G: torch.rand(3, dtype=G.dtype),
        tasks=TASKS,
    )
    reseeded.clear()
    state = torch.get_rng_state()
    weights = [opt.step(losses()).weights for _ in range(3)]
    assert reseeded == []
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(weights[0], weights[1])  # the weighting did draw


def test_one_call_per_backward_never_a_batch():
    calls = []

    def weighting(G):
        calls.append(tuple(G.shape))
        return torch.ones(G.shape[0], dtype=G.dtype)

    enc, losses = _setup()
    opt = metaopt.Weighted(torch.optim.SGD(enc.parameters(), lr=0.1), weighting=weighting, tasks=TASKS)
    opt.step(losses())
    assert calls == [(3, 3)]
