"""Test configuration shared by every suite (the library's tests, the benchmark harness's and the
experiment's): strict JAX promotion rules, exact float32 matmuls, CPU-only markers.

* XLA:CPU's LLVM backend at -O0: the suite compiles far more than it computes.

* 8 CPU devices, so that sharded layouts are tested in the test process.
* Silent rank promotion is a bug: it raises.
* Float32 matmuls are pinned to full precision. On recent NVIDIA GPUs JAX's default runs them in
  TF32 (about 3e-4 relative), which the tests' 1e-5 comparisons against numpy matmuls would
  (rightly) reject; the library itself follows whatever the user sets, and `precision=` on the
  fused kernels is tested separately.
* ``@pytest.mark.cpu_only``: tests of XLA:CPU behaviour (the 16-bit integer views, CPU block
  budgets measured against CPU memory) skip on other backends, saying why.
"""

import os

# The suite is compile-bound (hundreds of small programs, each run a few times): LLVM at -O0
# compiles XLA:CPU programs about 30 % faster, and nothing here times what it runs. Set before
# JAX starts its backend; an opt level the caller chose wins.
# The study's tests (experiments/loops/tests) compute more than they compile: `make test` runs
# them in a pytest of their own with KLAGG_TEST_XLA_OPT=default, which keeps XLA's default level.
if ("--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")
    and os.environ.get("KLAGG_TEST_XLA_OPT") != "default"):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# 8 CPU devices, set once before any backend use: the sharding tests run in-process on a 2 x 4
# mesh; every other test runs on the first device, as it would on one.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

def pytest_configure(config):
  config.addinivalue_line("markers", "cpu_only: tests of XLA:CPU behaviour; skipped elsewhere")


def pytest_collection_modifyitems(config, items):
  backend = jax.default_backend()
  if backend == "cpu":
    return
  skip = pytest.mark.skip(reason=f"XLA:CPU behaviour (integer views, CPU block budgets); "
                                 f"this run is on {backend}")
  for item in items:
    if "cpu_only" in item.keywords:
      item.add_marker(skip)


@pytest.fixture
def rng():
  return np.random.default_rng(0)
