"""Small shared test utilities."""

import contextlib
import math

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


def cap64(z, cap):
  """The soft-cap c tanh(z / c) in jax.numpy, -inf kept (differentiable: double where)."""
  return jnp.where(z == -jnp.inf, -jnp.inf, cap * jnp.tanh(jnp.where(z == -jnp.inf, 0.0, z) / cap))


def plain64(a, b, direction, beta=0.5):
  """A float64 jax.numpy composition of the definition (its own, for reference gradients)."""
  lp, lr = jax.nn.log_softmax(a), jax.nn.log_softmax(b)
  def kl(x, y):
    px = jnp.exp(x)
    none = px == 0  # 0 log 0 = 0, by the double where (no 0 * inf in either branch)
    return jnp.where(none, 0.0, px * (jnp.where(none, 0.0, x) - jnp.where(none, 0.0, y))).sum(-1)
  if direction == "reverse":
    return kl(lp, lr)
  if direction == "forward":
    return kl(lr, lp)
  both = (lp == -jnp.inf) & (lr == -jnp.inf)  # logaddexp's gradient at (-inf, -inf) is NaN
  lm = jnp.logaddexp(math.log1p(-beta) + jnp.where(both, 0.0, lp),
                     math.log(beta) + jnp.where(both, 0.0, lr))
  lm = jnp.where(both, -jnp.inf, lm)
  return beta * kl(lr, lm) + (1 - beta) * kl(lp, lm)


@contextlib.contextmanager
def cuda_target():
  """A context for exporting Pallas' Triton kernels for CUDA from a machine without a GPU.

  Newer JAX (0.12) asks the local device which GPU it compiles a Triton kernel for, and a CPU
  host has none; there the target is pinned to an H100 for the duration (the kernel's text does
  not depend on it; a GPU compiles it again for its own card). JAX 0.10 asks nothing: no-op.
  """
  try:
    from jax._src.pallas.triton import gpu_info  # noqa: PLC0415 -- only newer JAX has it
  except ImportError:
    yield
    return
  original = gpu_info.get_gpu_info
  gpu_info.get_gpu_info = lambda: gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100)
  try:
    yield
  finally:
    gpu_info.get_gpu_info = original


# What a registered implementation cannot run, per op. Such a call must raise
# NotImplementedError (so a sequence of implementations falls through to the next); an
# implementation not listed for a feature must run every case with it. A new implementation is
# tested by registering it, and listed here only for what it refuses.
REFUSES = {"divergence": {"pallas": frozenset({"float64", "softcap"})},
           "fused": {"pallas": frozenset({"float64", "topk"})}}

# Implementations with forward-mode AD; the custom-VJP ones raise TypeError naming "xla".
FORWARD_MODE = frozenset({"xla"})


def refuses(op: str, impl: str, feature: str) -> bool:
  return feature in REFUSES.get(op, {}).get(impl, ())


def refused(op: str, impl: str, feature: str, call) -> bool:
  """True (after checking that ``call()`` raises NotImplementedError) where ``impl`` lacks
  ``feature``."""
  if not refuses(op, impl, feature):
    return False
  with pytest.raises(NotImplementedError):
    call()
  return True


def impl_cases(implementations, *chunk_sizes):
  """(implementation, chunk_size) pairs: every implementation once with the default blocks, and
  the row-block loop ("chunked", the one that reads chunk_size) at each extra size too."""
  names = sorted(implementations)
  extra = [("chunked", c) for c in chunk_sizes if "chunked" in names]
  return [(name, None) for name in names] + extra
