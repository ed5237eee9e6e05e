"""The ```python blocks of docs/onnx.md and docs/files.md run as written (each on its own, in a
fresh namespace, in a temporary working directory). A block is skipped when a module it imports
is not installed (torch, onnx, safetensors...); lstm_fast itself must always import."""
import ast
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("docs/onnx.md", "docs/files.md")
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)

pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "docs")),
                                reason="needs the source tree")


def _blocks():
    """[(doc, first line of the code, code)] of every python block of DOCS."""
    found = []
    for doc in DOCS:
        path = os.path.join(ROOT, doc)
        if not os.path.exists(path):
            continue
        text = open(path, encoding="utf-8").read()
        for match in _FENCE.finditer(text):
            found.append((doc, text.count("\n", 0, match.start(1)) + 1, match.group(1)))
    return found


def _imports(code):
    """The top-level module names a block imports."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_docs_have_their_examples():
    per_doc = {doc: sum(b[0] == doc for b in _blocks()) for doc in DOCS}
    assert per_doc["docs/onnx.md"] >= 4 and per_doc["docs/files.md"] >= 4, per_doc
    assert _imports("import a.b, c\nfrom d.e import f\nfrom . import g\n") == {"a", "c", "d"}


@pytest.mark.parametrize("doc, line, code", _blocks(), ids=[f"{d}:{n}" for d, n, _ in _blocks()])
def test_doc_block_runs(doc, line, code, tmp_path, monkeypatch):
    missing = sorted(m for m in _imports(code) if m != "lstm_fast" and importlib.util.find_spec(m) is None)
    if missing:
        pytest.skip(f"{doc}:{line} imports {', '.join(missing)}, which is not installed")
    monkeypatch.chdir(tmp_path)
    # line numbers in tracebacks are those of the document
    exec(compile("\n" * (line - 1) + code, os.path.join(ROOT, doc), "exec"), {"__name__": "__doc_example__"})
