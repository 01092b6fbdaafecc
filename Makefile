# Every target creates .venv when missing; nothing is installed outside it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Errors only (-qq): at -q pip still prints a warning line per package for every index location
# it skips, screens of them on some machines' configurations.
PIP_INSTALL := $(PIP) install -qq --disable-pip-version-check

.PHONY: demo examples test dist dist-check bench bench-quick experiment experiment-quick clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/activate
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed-examples: pyproject.toml | $(VENV)/bin/activate
	$(PIP_INSTALL) -e ".[examples]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/activate
	$(PIP_INSTALL) -e ".[dev]"
	touch $@

$(VENV)/.installed-bench: pyproject.toml | $(VENV)/bin/activate
	$(PIP_INSTALL) -e ".[dev,bench]"
	touch $@

$(VENV)/.installed-build: | $(VENV)/bin/activate
	$(PIP_INSTALL) build
	touch $@

demo: $(VENV)/.installed
	$(PY) -m klagg_jax.diag

examples: $(VENV)/.installed-examples
	$(PY) examples/flax_nnx_heal.py
	$(PY) examples/fused_heal.py
	$(PY) examples/distill_topk.py

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

# sdist and wheel into dist/ (python -m build, in an isolated build environment).
dist: $(VENV)/.installed-build
	rm -rf dist
	$(PY) -m build --quiet --outdir dist .

# The artifacts' contents, then the wheel installed into a fresh venv outside the tree and run.
dist-check: dist
	$(PY) tools/check_dist.py --dist dist

bench: $(VENV)/.installed-bench
	$(PY) benchmarks/run.py

bench-quick: $(VENV)/.installed-bench
	$(PY) benchmarks/run.py --quick

experiment: $(VENV)/.installed-dev
	$(PY) -m experiments.loops.run

experiment-quick: $(VENV)/.installed-dev
	$(PY) -m experiments.loops.run --quick

clean:
	rm -rf $(VENV) .pytest_cache build dist
