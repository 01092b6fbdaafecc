"""Test configuration: strict JAX promotion rules, so silent rank/dtype promotion is a bug."""

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

DTYPES = ("float32", "bfloat16", "float16")


@pytest.fixture
def rng():
  return np.random.default_rng(0)
