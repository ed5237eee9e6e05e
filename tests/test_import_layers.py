"""The package's imports form layers (issue 17): kernels, then _core, then training / files / the
ONNX machinery, then the model classes, then the public modules on top. Read with `ast` by
tools/import_graph.py, so a lazy import inside a function that points back up fails here too."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# the layers are a property of the sources: tests run against an installed wheel (make
# wheel-check) have no tools/ or src/ beside them
pytestmark = pytest.mark.skipif(not (ROOT / "tools" / "import_graph.py").is_file()
                                or not (ROOT / "src").is_dir(),
                                reason="not a source checkout: tools/import_graph.py or src/ missing")


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_package_imports_form_no_circle():
    tool = _tool()
    graph = tool.import_graph(ROOT)
    assert {"_core", "_lstm", "_io", "_train", "onnx", "_onnx_graph", "_forward"} <= set(graph)
    assert tool.find_cycle(graph) is None, " -> ".join(tool.find_cycle(graph))


def test_the_layers_are_in_order():
    tool = _tool()
    graph = tool.import_graph(ROOT)
    depth = tool.layers(graph)
    for kernel in ("_forward", "_backward", "_step", "_threading"):
        assert depth[kernel] == 0
    assert depth["_forward"] < depth["_core"]
    for middle in ("_train", "_io", "_onnx_graph"):
        assert depth[middle] < depth["_lstm"], middle
        assert "_lstm" not in graph[middle] and "onnx" not in graph[middle], middle
    for top in ("onnx", "_fit"):
        assert depth["_lstm"] < depth[top], top
    assert "_lstm" not in graph["nn"]


def test_the_tool_finds_a_circle():
    tool = _tool()
    assert tool.find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert tool.find_cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) is None


def test_the_command_line_check_passes():
    import subprocess
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "import_graph.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no import circle" in done.stdout
