"""Small shared test utilities."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def to_f64(x) -> np.ndarray:
  """Exact float64 copy of an array of any float dtype (bf16 included)."""
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


@contextlib.contextmanager
def x64():
  with jax.enable_x64(True):
    yield


def random_logits(rng, shape, scale=2.0, dtype=np.float32):
  return (scale * rng.standard_normal(shape)).astype(dtype)


# Kernel-side cases of issue 13 that fail until the kernel half of the fix (NaN through
# kl_per_position / fused / top-k, owned by the lead) is merged. Strict: once the fix lands they
# XPASS and fail, so the marker must then be deleted from every test that carries it.
PENDING_KERNEL_FIX = pytest.mark.xfail(
    strict=True, reason="issue 13, kernel half: a NaN logit at a valid position is hidden")
