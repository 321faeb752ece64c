"""The ``metaopt`` command (``python -m metaopt``): info, and the checkout's toy script."""

from __future__ import annotations

import subprocess
import sys

import pytest

from metaopt import cli


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "metaopt", *args], capture_output=True, text=True, timeout=120
    )


def test_info_reports_versions_paths_backends_and_extras():
    import torch

    report = cli.info()
    assert report["torch"] == torch.__version__
    assert report["interpolation paths"].startswith("foreach, reference;")  # "flat" is gone
    assert ("gloo" in report["torch.distributed"]) == torch.distributed.is_gloo_available()
    assert report["cuda"] == "not available" or "device(s)" in report["cuda"]
    out = _run("info")
    assert out.returncode == 0, out.stderr
    for key in (
        "metaopt",
        "torch",
        "cuda",
        "triton",
        "interpolation paths",
        "torch.distributed",
        "extra [bench]",
    ):
        assert any(line.startswith(key) for line in out.stdout.splitlines()), out.stdout


def test_the_toy_runs_through_the_command(tmp_path):
    pytest.importorskip("matplotlib")
    out = _run("toy", "--steps", "20", "--out", str(tmp_path / "toy.png"))
    assert out.returncode == 0, out.stderr
    assert "Sequential Reptile" in out.stdout and (tmp_path / "toy.png").exists()


def test_bad_commands_are_refused():
    assert _run("nonsense").returncode == 2
    assert _run("info", "--extra").returncode == 2


def test_scripts_outside_a_checkout_have_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(cli.metaopt, "__file__", str(tmp_path / "site" / "metaopt" / "__init__.py"))
    with pytest.raises(SystemExit, match="part of the source checkout"):
        cli.main(["toy"])
