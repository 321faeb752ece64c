"""The examples run (short versions), so they cannot silently rot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_and_swap_methods_run(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import quickstart
    import swap_methods

    quickstart.main(steps=120)
    swap_methods.main(examples=40 * 32)
    out = capsys.readouterr().out
    assert "outer  6" in out
    for name in ("mtl", "pcgrad", "gradvac", "gradnorm", "reptile", "sequential_reptile"):
        assert f"\n{name} " in "\n" + out
    sys.modules.pop("quickstart", None)
    sys.modules.pop("swap_methods", None)


def test_resume_example_continues_bit_for_bit(capsys, monkeypatch):
    """The README's checkpoint recipe (examples/resume.py): crash, rebuild, resume, identical."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import resume

    assert resume.main(steps=30, crash_at=12) is True
    sys.modules.pop("resume", None)
    assert "resumed from the checkpoint of step 10" in capsys.readouterr().out


def test_toy_benchmark_draws_every_method(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(EXAMPLES.parent / "benchmarks"))
    import toy

    toy.main(["--steps", "40", "--out", str(tmp_path / "toy.png")])
    sys.modules.pop("toy", None)
    out = capsys.readouterr().out
    assert (tmp_path / "toy.png").stat().st_size > 10_000
    for name in ("MTL (sum)", "Sequential Reptile", "Reptile", "PCGrad", "GradVac", "GradNorm"):
        assert name in out
