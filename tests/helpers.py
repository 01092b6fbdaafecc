"""Small shared test utilities."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np


def to_f64(x) -> np.ndarray:
  """Exact float64 copy of an array of any float dtype (bf16 included)."""
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


@contextlib.contextmanager
def x64():
  with jax.enable_x64(True):
    yield


def random_logits(rng, shape, scale=2.0, dtype=np.float32):
  return (scale * rng.standard_normal(shape)).astype(dtype)
