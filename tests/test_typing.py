"""The library is typed (it ships py.typed): mypy must pass on metaopt/."""

from __future__ import annotations

from pathlib import Path

import pytest

api = pytest.importorskip("mypy.api")

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_passes_on_the_library(tmp_path):
    out, err, status = api.run(
        [
            str(ROOT / "metaopt"),
            "--ignore-missing-imports",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
        ]
    )
    assert status == 0, out + err
