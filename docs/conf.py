"""Sphinx configuration for the kvmstate documentation.

Build (no network needed; warnings are errors):

    python3 -m sphinx -W --keep-going -b html docs docs/_build/html

Pages are Markdown (MyST-Parser); the API reference is autodoc over the
package's own reST docstrings; byte maps, field tables and the command's help
are generated from the code by ``_ext/kvmstate_abi.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))  # this checkout's kvmstate, not an installed one

import kvmstate  # noqa: E402  (after the path is set)

project = "kvmstate"
author = "the kvmstate authors"
copyright = "the kvmstate authors"
release = kvmstate.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "kvmstate_abi",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]

# No intersphinx: the build must not reach the network.
myst_heading_anchors = 3
myst_enable_extensions = ["deflist"]

autodoc_default_options = {
    "members": True,
    "undoc-members": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
# Defaults as their values (``max_entries=256``), not the private constant they
# are spelled with in the source.
autodoc_preserve_defaults = False
autoclass_content = "both"
# The modules use `from __future__ import annotations`; names like ``array[int]``
# or ctypes' private types stay strings rather than failing to resolve.
# Not the buffer aliases of kvmstate.nested either: left unevaluated they show by
# name and link to their entry; mapped here, Sphinx 9 prints TypeAliasForwardRef(...).
autodoc_type_aliases: dict[str, str] = {}

html_theme = "alabaster"
html_title = f"kvmstate {release}"
html_static_path = ["_static"]
html_css_files = ["kvmstate.css"]  # the layout at 1280 px and on a phone: see the file
templates_path = ["_templates"]
html_theme_options = {
    "description": "KVM vCPU and nested virtualization state from Python",
    "fixed_sidebar": True,
    # Alabaster switches to its one-column layout below page_width; kvmstate.css
    # repeats this number in its media query.
    "page_width": "1240px",
    "sidebar_width": "220px",
    # basic.css caps the text column at 800 px, which cut long code lines at 1280 px.
    "body_max_width": "none",
    "body_min_width": "0",
}
html_sidebars = {
    "**": ["about.html", "searchfield.html", "kvmstate-navigation.html", "relations.html"]
}

# The engineers' test guide, when it is in the tree, joins the table of contents.
_TESTING = DOCS / "testing.md"


def _source_read(app: Any, docname: str, source: list[str]) -> None:
    if docname != "index" or not _TESTING.exists():
        return
    text = source[0]
    text = text.replace("\nquirks\n", "\nquirks\ntesting\n", 1)
    text = text.replace(
        "<!-- testing-guide -->",
        "How the test suite runs, on the host and in the emulated guests: "
        "[the testing guide](testing.md).",
    )
    source[0] = text


def setup(app: Any) -> None:
    app.connect("source-read", _source_read)
