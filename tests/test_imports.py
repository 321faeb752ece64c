"""Importing metaopt loads torch, numpy and the standard library only: no optional extra (they
are imported where used), never `higher` or the PyPI `functorch` package."""

from __future__ import annotations

import subprocess
import sys


def test_import_pulls_no_optional_package():
    code = ("import sys, metaopt, metaopt.cli, metaopt.data; "
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    loaded = set(eval(out))
    for forbidden in ("higher", "functorch", "torchjd", "transformers", "accelerate", "matplotlib",
                      "learn2learn", "cvxpy", "quadprog"):
        assert forbidden not in loaded, forbidden
