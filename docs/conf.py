"""Sphinx configuration for the metaopt documentation site.

Built offline with ``-W`` (warnings are errors) by ``tests/test_docs.py``; nothing here fetches
anything at build time, so intersphinx is deliberately absent.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import metaopt  # noqa: E402

project = "metaopt"
author = "the metaopt developers"
copyright = "2026, the metaopt developers"
release = metaopt.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"metaopt {release}"
# MathJax is loaded by the reader's browser; the build itself downloads nothing.
nitpicky = False
