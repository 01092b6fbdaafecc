# Every target creates .venv when missing; nothing is installed outside it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Errors only (-qq): at -q pip still prints a warning line per package for every index location
# it skips, screens of them on some machines' configurations.
PIP_INSTALL := $(PIP) install -qq --disable-pip-version-check

.PHONY: demo examples test docs dist dist-check bench bench-quick bench-gpu bench-gpu-dry pallas-sweep gpu-wheels experiment experiment-quick experiment-test clean

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

$(VENV)/.installed-docs: pyproject.toml | $(VENV)/bin/activate
	$(PIP_INSTALL) -e ".[docs]"
	touch $@

$(VENV)/.installed-build: | $(VENV)/bin/activate
	$(PIP_INSTALL) build
	touch $@

demo: $(VENV)/.installed
	$(PY) -m klagg_jax.diag

examples: $(VENV)/.installed-examples
	$(PY) examples/flax_nnx_heal.py
	$(PY) examples/fused_heal.py
	$(PY) examples/gemma_packed_heal.py
	$(PY) examples/distill_topk.py

# One pytest worker per core (pytest-xdist): the suite is compile-bound and XLA compiles on one
# thread, so 2 cores halve its wall time. The study's tests compute more than they compile, so
# they run apart, at XLA's default optimization level (conftest.py), in one process beside the
# library's (most of their time is two end-to-end runs, which would leave a worker idle); their
# output follows the library's, and the target fails if either fails.
test: $(VENV)/.installed-dev
	@log=$$(mktemp); \
	KLAGG_TEST_XLA_OPT=default $(PY) -m pytest -q -n 0 experiments/loops/tests >$$log 2>&1 & \
	study=$$!; \
	$(PY) -m pytest -q -n auto tests benchmarks/tests; lib=$$?; \
	wait $$study; st=$$?; \
	echo "--- experiments/loops/tests"; cat $$log; rm -f $$log; \
	test $$lib -eq 0 && test $$st -eq 0

# The HTML site into docs/_build/html (open index.html): the guide pages and the API reference
# from the docstrings. Any warning fails the build; --keep-going lists them all first.
docs: $(VENV)/.installed-docs
	$(PY) -m sphinx -b html -W --keep-going -q docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

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

# On a lent GPU machine (no network, its own python3 with jax, torch, pytest): no venv is made.
# The Pallas tile sweep, then the benchmark (its "pallas" rows on the sweep's best tiles), then
# the tests. Results in benchmarks/out/gpu-check/ (or $$OUT). See BENCHMARKS.md, "On a GPU".
bench-gpu:
	bash benchmarks/gpu_check.sh

# The Pallas divergence kernel's tile sweep alone (a GPU, under 3 minutes).
pallas-sweep:
	$(PYTHON) benchmarks/pallas_sweep.py --out benchmarks/out

# The same steps at tiny sizes on this CPU, in under a minute.
bench-gpu-dry: $(VENV)/.installed-dev
	PYTHON=$(abspath $(PY)) bash benchmarks/gpu_check.sh --dry-run

# Here, before lending: Liger-Kernel's wheel (pure Python) into .whl/, which bench-gpu installs there.
LIGER_VERSION ?= 0.8.5
gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl liger-kernel==$(LIGER_VERSION)

# The loops study (experiments/loops/EXPERIMENTS.md). Every finished student is saved under
# the output folder's units/, so rerunning the same target resumes an interrupted run.
experiment: $(VENV)/.installed-dev
	$(PY) -m experiments.loops.run

experiment-quick: $(VENV)/.installed-dev
	$(PY) -m experiments.loops.run --quick

experiment-test: $(VENV)/.installed-dev
	$(PY) -m pytest -q -n 0 experiments/loops/tests

clean:
	rm -rf $(VENV) .pytest_cache build dist docs/_build
