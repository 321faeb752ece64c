"""The documentation site cannot rot: it builds with warnings as errors, and every Python code
block on every page runs, in order, in one namespace per page (as a reader would run them).

docs/recipes.md is run by tests/test_recipes.py, which also launches its multi-rank blocks.
A block that cannot run here (another library that does not install on this torch) is written
as a ``{code-block} python`` directive whose caption says why it is not run; nothing else may
hide code from this test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
RUN_ELSEWHERE = {"recipes.md"}
FENCE = re.compile(r"^(`{3,})([^\n`]*)\n(.*?)^\1\s*$", flags=re.S | re.M)
# fence languages a page may use: run (python), shown (shell, text), or Sphinx directives
SHOWN = {"sh", "bash", "console", "text", "toml", "ini"}
DIRECTIVES = {
    "{toctree}",
    "{eval-rst}",
    "{include}",
    "{code-block}",
    "{math}",
    "{note}",
    "{warning}",
    "{list-table}",
    "{image}",
    "{figure}",
}


def _blocks(page: Path) -> list[tuple[str, str]]:
    return [(m.group(2).strip(), m.group(3)) for m in FENCE.finditer(page.read_text())]


def _id(page: Path) -> str:
    return str(page.relative_to(DOCS))


def test_site_builds_with_warnings_as_errors(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            str(DOCS),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for page in PAGES:
        html = tmp_path / "html" / page.relative_to(DOCS).with_suffix(".html")
        assert html.exists(), f"{_id(page)} was not built (missing from every toctree?)"
    api = (tmp_path / "html" / "api.html").read_text()
    for name in ("SequentialReptile", "PCGrad", "Weighted", "save_checkpoint", "adapt"):
        assert f'id="metaopt.{name}' in api or f'id="metaopt.maml.{name}' in api, name


def test_every_fence_is_run_shown_or_a_directive():
    for page in PAGES:
        for lang, body in _blocks(page):
            head = lang.split()[0] if lang else ""
            assert head == "python" or head in SHOWN or head in DIRECTIVES, (
                f"{_id(page)}: a ```{lang} block is neither run, shown nor a known directive"
            )
            if head == "{code-block}":
                assert "python" not in lang or re.search(r":caption:.*not run here", body), (
                    f"{_id(page)}: a python code-block that is not run must say why in its caption"
                )


def _python(page: Path) -> list[str]:
    return [body for lang, body in _blocks(page) if lang == "python"]


@pytest.mark.parametrize("page", [p for p in PAGES if p.name not in RUN_ELSEWHERE and _python(p)], ids=_id)
def test_every_code_block_runs(page, tmp_path, monkeypatch):
    blocks = _python(page)
    monkeypatch.chdir(tmp_path)  # files a page writes go to a scratch directory
    monkeypatch.setenv("PYTHONHASHSEED", os.environ.get("PYTHONHASHSEED", "0"))
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{_id(page)}: block {i + 1}", "exec"), namespace)


ROOT = DOCS.parent
SOURCES = sorted(
    [
        *(ROOT / "metaopt").rglob("*.py"),
        *(ROOT / "benchmarks").rglob("*.py"),
        *(ROOT / "examples").glob("*.py"),
        ROOT / "README.md",
    ]
)


def test_docstrings_use_one_style():
    """Google style (``Args:``, ``Returns:``, ``Raises:``, ``Example:``), read by napoleon: no
    Sphinx field lists, which napoleon would pass through as a second style."""
    field = re.compile(r"^\s*:(param|type|returns?|rtype|raises?)\b", flags=re.M)
    for path in (ROOT / "metaopt").rglob("*.py"):
        hits = [m.group(0).strip() for m in field.finditer(path.read_text())]
        assert not hits, f"{path.relative_to(ROOT)}: Sphinx field lists {hits[:3]}"


def test_references_to_documents_resolve_in_the_repository():
    """Docstrings, scripts and the README cite pages that exist here, never a design document
    kept outside the repository."""
    cited = re.compile(r"\b(?:docs|benchmarks|examples)/[\w./-]*\.(?:md|py)\b")
    for path in SOURCES:
        text = path.read_text()
        assert "DESIGN.md" not in text, f"{path.relative_to(ROOT)} cites DESIGN.md (docs/design.md)"
        for ref in cited.findall(text):
            assert (ROOT / ref).exists(), f"{path.relative_to(ROOT)} cites {ref}, which is missing"
