"""The API reference (docs/api.rst, built by `make docs` with autosummary) lists every public
name of lstm_fast, lstm_fast.onnx, lstm_fast.optim, lstm_fast.nn and lstm_fast.dask: a name
added to a module's public API without a line in the reference fails here. Public names are a
module's ``__all__`` where it has one, else its non-underscore names defined in that module (the
rule of tests/test_immutability.py's walk)."""
import inspect
import os
import re

import pytest

import lstm_fast as lf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API = os.path.join(ROOT, "docs", "api.rst")
MODULES = [lf, lf.onnx, lf.optim, lf.nn, lf.dask]

pytestmark = pytest.mark.skipif(not os.path.exists(API),
                                reason="needs the source tree (not a run against an installed wheel)")


def _public(mod):
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [n for n in dir(mod) if not n.startswith("_")
                 and getattr(getattr(mod, n), "__module__", None) == mod.__name__]
    return sorted(names)


def _documented():
    """Fully qualified names the reference documents: autosummary entries under each
    currentmodule, automodule / data / module targets."""
    names, current = set(), None
    in_summary = False
    for line in open(API, encoding="utf-8"):
        m = re.match(r"\.\. (currentmodule|automodule|module):: (\S+)", line)
        if m:
            if m.group(1) == "currentmodule":
                current = m.group(2)
            names.add(m.group(2))
            in_summary = False
            continue
        m = re.match(r"\.\. (?:data|autodata|autofunction|autoclass):: (\S+)", line)
        if m:
            target = m.group(1)
            names.add(target if "." in target and target.startswith("lstm_fast") else f"{current}.{target}")
            in_summary = False
            continue
        if line.startswith(".. autosummary::"):
            in_summary = True
            continue
        if in_summary:
            entry = line.strip()
            if not entry or entry.startswith(":"):
                continue
            if not line.startswith("   "):
                in_summary = False
                continue
            names.add(entry if entry.startswith("lstm_fast.") else f"{current}.{entry}")
    return names


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.__name__)
def test_every_public_name_is_in_the_api_reference(mod):
    documented = _documented()
    missing = []
    for name in _public(mod):
        obj = getattr(mod, name)
        qual = obj.__name__ if inspect.ismodule(obj) else f"{mod.__name__}.{name}"
        if qual not in documented:
            missing.append(qual)
    assert not missing, f"public names missing from docs/api.rst: {missing}"


def test_the_reference_names_only_what_exists():
    for qual in sorted(_documented()):
        parts = qual.split(".")
        obj = lf
        for part in parts[1:]:
            assert hasattr(obj, part), f"docs/api.rst documents {qual}, which does not exist"
            obj = getattr(obj, part)


def test_every_guide_page_is_in_a_toctree():
    text = open(os.path.join(ROOT, "docs", "guide", "index.md"), encoding="utf-8").read()
    for page in os.listdir(os.path.join(ROOT, "docs", "guide")):
        if page.endswith(".md") and page != "index.md":
            assert re.search(rf"^{re.escape(page[:-3])}$", text, re.M), f"docs/guide/{page} is in no toctree"
