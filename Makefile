# Every target creates .venv when missing; nothing is installed outside it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test bench bench-quick experiment experiment-quick clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/activate
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/activate
	$(PIP) install --quiet -e ".[dev]"
	touch $@

$(VENV)/.installed-bench: pyproject.toml | $(VENV)/bin/activate
	$(PIP) install --quiet -e ".[dev,bench]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m klagg_jax.diag

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

bench: $(VENV)/.installed-bench
	$(PY) benchmarks/run.py

bench-quick: $(VENV)/.installed-bench
	$(PY) benchmarks/run.py --quick

experiment: $(VENV)/.installed-dev
	$(PY) -m experiments.loops.run

experiment-quick: $(VENV)/.installed-dev
	$(PY) -m experiments.loops.run --quick

clean:
	rm -rf $(VENV) .pytest_cache
