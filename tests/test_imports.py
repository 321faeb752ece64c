"""Importing metaopt loads torch, numpy and the standard library only: no optional extra (they
are imported where used), never `higher` or the PyPI `functorch` package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# what metaopt must never import on its own: the extras, the oracles, the packages other
# libraries would pull in, and the PyPI functorch
OPTIONAL = (
    "torchjd",
    "higher",
    "functorch",
    "learn2learn",
    "cvxpy",
    "transformers",
    "accelerate",
    "peft",
    "matplotlib",
    "tqdm",
    "babel",
    "qpsolvers",
    "quadprog",
    "triton",
    "deepspeed",
    "hypothesis",
)


def test_import_pulls_no_optional_package():
    """What torch itself imports when it is installed (tqdm) is not metaopt's doing: the check
    is on the packages that importing metaopt adds."""
    code = (
        "import sys, torch; before = {m.split('.')[0] for m in sys.modules}; "
        "import metaopt, metaopt.cli, metaopt.data; "
        "print(sorted({m.split('.')[0] for m in sys.modules} - before))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    added = set(eval(out))
    assert "metaopt" in added
    for forbidden in OPTIONAL:
        assert forbidden not in added, forbidden


def _without_optional(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter where every optional package is unimportable
    (``sys.modules[name] = None`` makes ``import name`` raise ModuleNotFoundError)."""
    block = "import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in OPTIONAL)
    return subprocess.run(
        [sys.executable, "-c", block + code, *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def test_every_method_works_without_any_optional_package():
    code = """
import torch, metaopt
from metaopt import maml
torch.manual_seed(0)
tasks = ["a", "b"]
makers = [lambda o, trunk: metaopt.MTL(o, tasks=tasks),
          lambda o, trunk: metaopt.PCGrad(o, tasks=tasks),
          lambda o, trunk: metaopt.GradVac(o, tasks=tasks),
          lambda o, trunk: metaopt.Weighted(o, tasks=tasks,
                                            weighting=lambda G: torch.ones(len(G), dtype=G.dtype)),
          lambda o, trunk: metaopt.GradNorm(metaopt.MTL(o, tasks=tasks),
                                            layer=list(trunk.parameters())),
          lambda o, trunk: metaopt.SequentialReptile(o, tasks=tasks, inner_steps=2,
                                                     allow_unused=True),
          lambda o, trunk: metaopt.Reptile(o, tasks=tasks, inner_steps=2, allow_unused=True)]
x = torch.randn(8, 4)
for make in makers:
    trunk = torch.nn.Linear(4, 4)
    heads = torch.nn.ModuleDict({t: torch.nn.Linear(4, 1) for t in tasks})
    params = [*trunk.parameters(), *heads.parameters()]
    opt = make(torch.optim.SGD(params, lr=0.1), trunk)
    before = [p.detach().clone() for p in params]
    for _ in range(2):
        opt.step({t: heads[t](trunk(x).tanh()).pow(2).mean() for t in opt.next_tasks()})
    assert any(not torch.equal(a, p) for a, p in zip(before, params)), type(opt).__name__
net = torch.nn.Linear(2, 1)
x_s, y_s, x_q, y_q = torch.randn(5, 2), torch.randn(5, 1), torch.randn(5, 2), torch.randn(5, 1)
loss = maml.meta_loss(net, [(x_s, y_s, x_q, y_q)], lambda out, y: (out - y).pow(2).mean(),
                      inner=maml.SGD(lr=0.1))
loss.backward()
assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0
print("ok", len(makers))
"""
    out = _without_optional(code)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split() == ["ok", "7"]


@pytest.mark.parametrize(
    ("argv", "missing", "extra"),
    [
        (["toy", "--steps", "2"], "matplotlib", "bench"),
        (["benchmark", "--help"], "tqdm", "bench"),
    ],
)
def test_the_command_names_the_extra_a_script_needs(argv, missing, extra):
    out = _without_optional("from metaopt.cli import main; raise SystemExit(main(sys.argv[1:]))", *argv)
    assert out.returncode != 0
    # the distributions themselves (metaopt-torch is on no index), and the checkout's extra
    assert missing in out.stderr and "pip install torchjd matplotlib tqdm" in out.stderr, out.stderr
    assert f"-e '{ROOT}[{extra}]'" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr


def test_the_hf_example_names_its_extra():
    out = _without_optional("import runpy; runpy.run_path('examples/hf_trainer.py', run_name='__main__')")
    assert out.returncode == 1
    assert "pip install transformers accelerate" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert f"-e '{ROOT}[hf]'" in out.stderr, out.stderr
