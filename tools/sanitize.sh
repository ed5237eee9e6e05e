#!/usr/bin/env bash
# Build the extension with AddressSanitizer + UndefinedBehaviorSanitizer (and Cython's bounds
# checks) in a copy of the tracked sources under build/sanitize, then run the test suite there
# with the sanitizer runtimes preloaded into Python. Any invalid access or UB aborts the run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY="${PY:-$ROOT/.venv/bin/python}"
OUT=build/sanitize
rm -rf "$OUT" && mkdir -p "$OUT"
git ls-files src lstm_fast tests examples docs setup.py pyproject.toml README.md CHANGELOG.md | xargs -I{} cp --parents {} "$OUT"
cd "$OUT"
LSTM_FAST_SANITIZE=address,undefined LSTM_FAST_DEBUG=1 "$PY" setup.py -q build_ext --inplace
ASAN_LIB=$(gcc -print-file-name=libasan.so)
UBSAN_LIB=$(gcc -print-file-name=libubsan.so)
# Deselected: the leak tests and the RSS checks of per-thread work buffers and of step plans
# (AddressSanitizer keeps freed memory in its quarantine, 256 MB by default, so RSS grows whatever
# we free), keras, dask.
# detect_leaks=0: CPython's own allocations at exit are not ours to judge (the leak test covers ours);
# allocator_may_return_null=1: a test asks numpy for an 8 TB array and expects MemoryError
LD_PRELOAD="$ASAN_LIB $UBSAN_LIB" \
ASAN_OPTIONS=detect_leaks=0,abort_on_error=1,halt_on_error=1,allocator_may_return_null=1 \
UBSAN_OPTIONS=halt_on_error=1,print_stacktrace=1 \
    "$PY" -c "import lstm_fast, sys; assert lstm_fast.__file__.startswith('$ROOT/$OUT'), lstm_fast.__file__; print('sanitized build:', lstm_fast.__file__)"
LD_PRELOAD="$ASAN_LIB $UBSAN_LIB" \
ASAN_OPTIONS=detect_leaks=0,abort_on_error=1,halt_on_error=1,allocator_may_return_null=1 \
UBSAN_OPTIONS=halt_on_error=1,print_stacktrace=1 \
    "$PY" -m pytest -q -p no:cacheprovider tests \
    -k "not leaks and not freed_with_their_thread and not step_plans_free_what_they_hold and not keras and not dask" "$@"
