"""`import lstm_fast` from a source checkout without the compiled extension raises an ImportError
that says the extension is not built and how to build it (issue 17), not a circular-import
message from a half-initialised package."""
import os
import shutil
import subprocess
import sys

import pytest

import lstm_fast

PKG = os.path.dirname(os.path.abspath(lstm_fast.__file__))

# an installed editable lstm_fast (make build) would supply the missing modules from elsewhere:
# drop its import hook, as in a fresh clone where nothing is installed
IMPORT = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]
import lstm_fast
"""


def _copy(tmp_path, keep_extensions):
    dest = tmp_path / "checkout" / "lstm_fast"
    shutil.copytree(PKG, dest, ignore=shutil.ignore_patterns("__pycache__", *(() if keep_extensions else
                                                                            ("*.so", "*.pyd"))))
    # a wheel repaired by auditwheel keeps the libraries it vendors (libgomp) in lstm_fast.libs
    # beside the package, and its extensions find them by a relative rpath
    vendored = os.path.join(os.path.dirname(PKG), "lstm_fast.libs")
    if keep_extensions and os.path.isdir(vendored):
        shutil.copytree(vendored, dest.parent / "lstm_fast.libs")
    return dest


def _import(cwd):
    return subprocess.run([sys.executable, "-c", IMPORT], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_unbuilt_checkout_says_how_to_build(tmp_path):
    dest = _copy(tmp_path, keep_extensions=False)
    assert not [f for f in os.listdir(dest) if f.endswith((".so", ".pyd"))]
    proc = _import(dest.parent)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: lstm_fast's compiled extension is not built"), proc.stderr
    assert "make build" in last and "pip install -e ." in last
    assert "circular import" not in proc.stderr and "partially initialized" not in proc.stderr


def test_broken_extension_is_told_apart(tmp_path):
    dest = _copy(tmp_path, keep_extensions=True)
    built = [f for f in os.listdir(dest) if f.startswith("_threading.") and f.endswith((".so", ".pyd"))]
    if not built:
        pytest.skip("lstm_fast is not imported from a directory with its extension files")
    (dest / built[0]).write_bytes(b"not a shared library")
    proc = _import(dest.parent)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "lstm_fast._threading" in last and "does not import" in last and "make build" in last, proc.stderr


def test_built_copy_imports(tmp_path):
    dest = _copy(tmp_path, keep_extensions=True)
    if not [f for f in os.listdir(dest) if f.endswith((".so", ".pyd"))]:
        pytest.skip("lstm_fast is not imported from a directory with its extension files")
    proc = subprocess.run([sys.executable, "-c", IMPORT + "print(lstm_fast.__file__)"],
                          cwd=dest.parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(dest / "__init__.py")
