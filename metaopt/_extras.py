"""The optional extras and how to install one: the one table of which distributions each extra
brings (``pyproject.toml`` declares them with their versions), and the hint that errors give.

``metaopt-torch`` is not on a package index, so a hint names the distributions themselves, and
where metaopt runs from a checkout, the command that installs the extra from it.

>>> install_hint("peft").startswith("pip install peft")
True
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["EXTRAS", "install_hint"]

EXTRAS: dict[str, tuple[str, ...]] = {
    "bench": ("torchjd", "matplotlib", "tqdm"),
    "hf": ("transformers", "accelerate"),
    "peft": ("peft",),
    "deepspeed": ("deepspeed",),
    "triton": ("triton",),
    "test": ("pytest", "hypothesis", "mypy", "ruff"),
}


def install_hint(extra: str) -> str:
    """``pip install <the extra's distributions>``, and from a checkout of metaopt the command
    that installs the extra with its pinned versions (``-c constraints.txt``)."""
    hint = f"pip install {' '.join(EXTRAS[extra])}"
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "constraints.txt").is_file():
        hint += f" (from this checkout: pip install -c {root / 'constraints.txt'} -e '{root}[{extra}]')"
    return hint
