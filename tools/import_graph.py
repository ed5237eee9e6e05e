"""The import graph of the lstm_fast package, read from the sources with `ast` (no import runs).

    python tools/import_graph.py          # each module with the package modules it imports, by layer
    python tools/import_graph.py --check  # exit 1 (and name the circle) if the imports form a cycle

Imports inside functions count too: a lazy import that points back up is still a circle in the
design. Compiled modules (src/*.pyx) are the bottom layer.
"""
import ast
import sys
from pathlib import Path

PACKAGE = "lstm_fast"


def package_modules(root):
    """{module name: path} of the package's Python modules and its compiled modules (.pyx)."""
    root = Path(root)
    mods = {p.stem: p for p in (root / PACKAGE).glob("*.py")}
    mods.update({p.stem: p for p in (root / "src").glob("*.pyx")})
    return mods


def _targets(node, mods):
    if isinstance(node, ast.ImportFrom):
        if node.level == 0:
            parts = (node.module or "").split(".")
            if parts[0] != PACKAGE:
                return []
            base = parts[1] if len(parts) > 1 else None
        elif node.level == 1:
            base = node.module.split(".")[0] if node.module else None
        else:
            return []
        if base is not None:
            return [base]
        # `from . import a, b`: each name is a module of the package or a name of __init__
        return [a.name if a.name in mods else "__init__" for a in node.names]
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names
                if a.name.startswith(PACKAGE + ".") and len(a.name.split(".")) > 1]
    return []


def import_graph(root="."):
    """{module: sorted package modules it imports} for the Python modules of the package."""
    mods = package_modules(root)
    graph = {}
    for name, path in mods.items():
        if path.suffix != ".py":
            graph[name] = []
            continue
        tree = ast.parse(path.read_text(), str(path))
        found = set()
        for node in ast.walk(tree):
            found.update(t for t in _targets(node, mods) if t in mods and t != name)
        graph[name] = sorted(found)
    return graph


def find_cycle(graph):
    """A list of modules forming an import circle (first == last), or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def layers(graph):
    """{module: depth}: 0 for modules importing no package module, else 1 + the deepest import."""
    depth = {}

    def of(node):
        if node not in depth:
            depth[node] = 0   # guards a cycle (find_cycle reports it)
            depth[node] = 1 + max((of(n) for n in graph[node]), default=-1)
        return depth[node]

    for node in graph:
        of(node)
    return depth


def main(argv):
    root = Path(__file__).resolve().parent.parent
    graph = import_graph(root)
    cycle = find_cycle(graph)
    if "--check" in argv:
        if cycle:
            print("import circle: " + " -> ".join(cycle))
            return 1
        print(f"no import circle among {len(graph)} modules")
        return 0
    depth = layers(graph)
    for node in sorted(graph, key=lambda n: (depth[n], n)):
        print(f"{depth[node]:2d} {node:14s} <- {', '.join(graph[node]) or '-'}")
    if cycle:
        print("import circle: " + " -> ".join(cycle))
    return 1 if cycle else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
