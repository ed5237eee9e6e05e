"""Sphinx configuration: MyST Markdown pages, numpydoc docstrings, an autosummary API reference.

Built by `make docs` (sphinx-build -W --keep-going: every warning fails the build, so a
docstring that stops parsing, or a page that links to nothing, fails CI).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)          # the checkout's lstm_fast (built in place by `make build`)

import lstm_fast  # noqa: E402

project = "lstm_fast"
author = "lstm_fast developers"
copyright = "lstm_fast developers, BSD-3-Clause"
version = release = lstm_fast.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "numpydoc",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "**/.ipynb_checkpoints",
                    "bench.md"]   # the table `bench --out` writes; performance.md quotes it

# --- MyST: GitHub-style heading anchors, so links such as design.md#memory work on GitHub and here
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# --- API reference
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True, "inherited-members": False, "show-inheritance": True}
autodoc_typehints = "none"        # the signatures and numpydoc's Parameters say it once
numpydoc_show_class_members = False   # the class template lists members itself
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
# every documented public object has a docstring (GL08), whose Parameters name real ones (PR02)
numpydoc_validation_checks = {"GL08", "PR02"}

intersphinx_mapping = {}          # no network at build time: nothing fetched

html_theme = "alabaster"
html_static_path = []
html_title = f"lstm_fast {release}"
html_theme_options = {"description": "Fast, exact LSTM inference and training on CPU",
                      "fixed_sidebar": True}
# Pages written by several people in Markdown: a skipped heading level is not an error
suppress_warnings = ["myst.header"]
