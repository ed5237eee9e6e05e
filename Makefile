# Every target sets up what it needs: a virtualenv in the checkout (.venv), the pinned build and
# test dependencies, and lstm_fast built in place. Only Python 3 and a C compiler are assumed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Two install stamps: the light one (build + run-time + demo extras) for demo/build/info, the test
# stack (torch, keras, dask, onnxruntime, ...) only for the targets that need it.
BASE   := $(VENV)/.installed-base
STAMP  := $(VENV)/.installed
BUILT  := $(VENV)/.built
SOURCES := $(wildcard src/*.pyx src/*.pxd src/*.h lstm_fast/*.py) setup.py pyproject.toml
PYTEST_ARGS ?=

.PHONY: demo test test-isa build test-deps docs bench asv-quick info wheel-check sanitize clean

$(BASE): requirements/build.txt requirements/demo.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/build.txt -r requirements/demo.txt "threadpoolctl>=3.1"
	touch $(BASE)

$(STAMP): $(BASE) requirements/test.txt
	$(PY) -m pip install --quiet -r requirements/test.txt
	touch $(STAMP)

# Rebuilds only when a source changed (the stamp is newer than every source otherwise).
$(BUILT): $(BASE) $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(BUILT)

build: $(BUILT)

test-deps: $(STAMP)

demo: build
	$(PY) -m lstm_fast demo

test: build test-deps
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# The HTML documentation (user guide, API reference from the docstrings) in docs/_build/html;
# every Sphinx warning is an error, so a docstring or page that stops matching fails CI.
docs: build test-deps
	$(PY) -m pip install --quiet -r requirements/docs.txt
	rm -rf docs/_build docs/generated
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "documentation: docs/_build/html/index.html"
# The forward, training and gate tests again on the lower kernel paths (LSTM_FAST_ISA caps the
# path: AVX2 + FMA, then generic BLAS), about a minute each; tests/test_cpu.py in `test` runs every
# path this CPU has in one process
ISA_TESTS ?= tests/test_forward.py tests/test_io.py tests/test_training.py tests/test_gate_math.py tests/test_precision.py
test-isa: build test-deps
	LSTM_FAST_ISA=avx2 $(PY) -m pytest -q $(PYTEST_ARGS) $(ISA_TESTS)
	LSTM_FAST_ISA=generic $(PY) -m pytest -q $(PYTEST_ARGS) $(ISA_TESTS)

info: build
	$(PY) -m lstm_fast info

bench: build test-deps
	$(PY) -m pip install --quiet -r requirements/bench.txt
	$(PY) -m lstm_fast bench --compare --out docs/bench.md --plot docs/bench.png

# One quick pass of every asv benchmark against the installed build, so they cannot rot.
asv-quick: build test-deps
	$(PY) -m pip install --quiet -r requirements/bench.txt
	cd asv_bench && ../$(PY) -m asv machine --yes > /dev/null && \
		../$(PY) -m asv run --python=same --quick --show-stderr

# sdist + wheel, auditwheel repair, install in fresh virtualenvs, tests against the wheel
wheel-check:
	PYTHON=$(PYTHON) bash tools/wheel_check.sh

# The extension built with AddressSanitizer + UBSan in build/sanitize, and the tests run under it
sanitize: $(STAMP)
	bash tools/sanitize.sh

clean:
	rm -rf build dist *.egg-info src/*.c src/*.html lstm_fast/*.so $(VENV) docs/_build docs/generated
