"""Type information: `mypy --strict` passes on an example that uses the public API."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mypy_strict_on_the_example():
    pytest.importorskip("mypy")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-incremental",
         os.path.join(ROOT, "examples", "typed_usage.py")],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_example_runs():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "typed_usage.py")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "step output (4, 16)" in result.stdout
