"""Every ```python block of README.md and of the user guide (docs/guide/*.md, docs/index.md, docs/design.md,
docs/performance.md, docs/development.md) runs as written, so the documentation cannot drift
from the code.

Each block runs on its own, in a fresh namespace, with a temporary directory as its working
directory (files the examples write land there): blocks of numpy and lstm_fast in this process,
blocks that import a peer (torch, Keras, ONNX...) or set environment variables (KERAS_BACKEND)
in a fresh interpreter each. A block that imports torch, keras,
onnx, onnxruntime, dask, safetensors, matplotlib or tqdm is skipped when that package is not
installed. A block whose first line is ``# not run`` is only compiled (syntax checked).
"""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

import lstm_fast as lf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDE = os.path.join(ROOT, "docs", "guide")
DOCS = (["README.md"]
        + [os.path.join("docs", "guide", f)
           for f in (sorted(os.listdir(GUIDE)) if os.path.isdir(GUIDE) else []) if f.endswith(".md")]
        + [os.path.join("docs", f) for f in ("index.md", "design.md", "performance.md", "development.md")])
OPTIONAL = ("torch", "keras", "onnx", "onnxruntime", "dask", "distributed", "safetensors",
            "matplotlib", "tqdm")
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "README.md")),
                                reason="needs the source tree (not a run against an installed wheel)")


def _blocks():
    cases = []
    for doc in DOCS:
        path = os.path.join(ROOT, doc)
        if not os.path.exists(path):
            continue
        text = open(path, encoding="utf-8").read()
        for k, match in enumerate(FENCE.finditer(text)):
            line = text.count("\n", 0, match.start()) + 2
            cases.append(pytest.param(doc, line, match.group(1), id=f"{doc}:{line}"))
    return cases


def _needs(code):
    mods = set(re.findall(r"^\s*(?:import|from)\s+([A-Za-z_][A-Za-z0-9_]*)", code, re.M))
    return sorted(m for m in mods if m in OPTIONAL)


def test_the_collector_finds_the_readme_blocks():
    readme = [c for c in _blocks() if c.values[0] == "README.md"]
    assert len(readme) >= 6, "README.md lost its runnable examples"
    text = "\n".join(c.values[2] for c in readme)
    # the ONNX example writes the file before it loads it
    assert text.index('m.to_onnx("model.onnx")') < text.index('lf.onnx.load("model.onnx")')


@pytest.mark.parametrize("doc, line, code", _blocks())
def test_code_block_runs(doc, line, code, tmp_path, monkeypatch):
    if code.lstrip().startswith("# not run"):
        compile(code, f"{doc}:{line}", "exec")
        return
    missing = [m for m in _needs(code) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{doc}:{line} needs {', '.join(missing)}")
    if not _needs(code) and "os.environ" not in code:
        # plain numpy + lstm_fast: in this process (fast), in a fresh namespace, cwd tmp_path
        monkeypatch.chdir(tmp_path)
        exec(compile("\n" * (line - 1) + code, os.path.join(ROOT, doc), "exec"), {"__name__": "__main__"})
        return
    # peers (torch, Keras, ONNX...) and environment settings: a fresh interpreter each
    script = tmp_path / "block.py"
    # line numbers of tracebacks point into the document
    script.write_text("\n" * (line - 1) + code, encoding="utf-8")
    # the lstm_fast this test process imported (a checkout's, or an installed wheel's)
    here = os.path.dirname(os.path.dirname(os.path.abspath(lf.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    env.setdefault("MPLBACKEND", "Agg")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"the python block at {doc}:{line} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


# pages other helpers of this round write; until they are merged a link to them may dangle
PENDING = set()


@pytest.mark.parametrize("doc", [d for d in DOCS if d == "README.md" or d.startswith("docs")])
def test_relative_links_resolve(doc):
    path = os.path.join(ROOT, doc)
    if not os.path.exists(path):
        pytest.skip(f"{doc} is absent")
    text = FENCE.sub("", open(path, encoding="utf-8").read())
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        rel = os.path.normpath(os.path.join(os.path.dirname(doc), target.split("#")[0]))
        if not os.path.exists(os.path.join(ROOT, rel)) and rel not in PENDING:
            broken.append(target)
    assert not broken, f"{doc} links to missing files: {broken}"
