"""The release configuration lists the intended wheels, and the version has one source."""
import os
import re
import subprocess
import sys

import pytest

import lstm_fast as lf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("platform, expected", [
    ("linux", {f"cp3{v}-manylinux_{a}" for v in (10, 11, 12, 13) for a in ("x86_64", "aarch64")}),
    ("macos", {f"cp3{v}-macosx_{a}" for v in (10, 11, 12, 13) for a in ("x86_64", "arm64")}),
    ("windows", {f"cp3{v}-win_amd64" for v in (10, 11, 12, 13)}),
])
def test_cibuildwheel_lists_the_intended_builds(platform, expected):
    pytest.importorskip("cibuildwheel")
    if not os.path.exists(os.path.join(ROOT, "pyproject.toml")):
        pytest.skip("needs the source tree")
    out = subprocess.run([sys.executable, "-m", "cibuildwheel", "--print-build-identifiers",
                          "--platform", platform], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert set(out.stdout.split()) == expected


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "pyproject.toml")),
                    reason="needs the source tree (not a test run against an installed wheel)")
def test_version_is_single_sourced():
    with open(os.path.join(ROOT, "lstm_fast", "_version.py")) as f:
        version = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)
    assert lf.__version__ == version
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert 'version = {attr = "lstm_fast._version.__version__"}' in f.read()
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        assert f"## {version}" in f.read()
