"""Benchmark inputs made on the device with `jax.random`, for accelerators.

On a GPU, making a `[8192, 131072]` pair with numpy on one host core takes tens of seconds and
moving it over takes more; `jax.random` makes it in milliseconds where it is used. The
distributions are those of `_inputs.py` (which stays the host path: the CPU's peak-RSS probes
rebuild its exact numbers in a subprocess without JAX); the values differ, which is harmless since
only rows of one run are compared. PyTorch peers on the same device share these arrays through
DLPack, so every row of a case reads the same bytes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


@functools.partial(jax.jit, static_argnames=("n", "v", "dtype"))
def _logits_pair(key: jax.Array, n: int, v: int, dtype: str) -> tuple[jax.Array, jax.Array]:
  k1, k2 = jax.random.split(key)
  logits = 2.0 * jax.random.normal(k1, (n, v), jnp.float32)
  ref = logits + 1.5 * jax.random.normal(k2, (n, v), jnp.float32)
  return logits.astype(DTYPES[dtype]), ref.astype(DTYPES[dtype])


def logits_pair(n: int, v: int, dtype: str, seed: int = 0) -> dict[str, jax.Array]:
  """Student and reference logits `[n, v]` in `dtype` ("f32" or "bf16"), as in `_inputs`."""
  a, b = _logits_pair(jax.random.key(seed), n=n, v=v, dtype=dtype)
  return {"logits": jax.block_until_ready(a), "ref_logits": jax.block_until_ready(b)}


@functools.partial(jax.jit, static_argnames=("n", "v", "d", "dtype", "layout"))
def _hidden_pair(key: jax.Array, n: int, v: int, d: int, dtype: str,
                 layout: str) -> tuple[jax.Array, ...]:
  ks = jax.random.split(key, 4)
  scale = 2.0 / d**0.5
  wshape = (d, v) if layout == "dv" else (v, d)
  hidden = jax.random.normal(ks[0], (n, d), jnp.float32)
  weight = scale * jax.random.normal(ks[1], wshape, jnp.float32)
  ref_hidden = hidden + 0.5 * jax.random.normal(ks[2], (n, d), jnp.float32)
  ref_weight = weight + 0.5 * scale * jax.random.normal(ks[3], wshape, jnp.float32)
  return tuple(x.astype(DTYPES[dtype]) for x in (hidden, weight, ref_hidden, ref_weight))


def hidden_pair(n: int, v: int, d: int, dtype: str, seed: int = 0,
                layout: str = "dv") -> dict[str, jax.Array]:
  """Hidden states `[n, d]` and kernels (`[d, v]` for layout "dv", `[v, d]` for "vd"), as
  `_inputs.hidden_pair`.

  Raises:
    ValueError: an unknown layout.
  """
  if layout not in ("dv", "vd"):
    raise ValueError(f"layout must be 'dv' or 'vd', got {layout!r}")
  arrays = _hidden_pair(jax.random.key(seed), n=n, v=v, d=d, dtype=dtype, layout=layout)
  names = ("hidden", "weight", "ref_hidden", "ref_weight")
  return {k: jax.block_until_ready(x) for k, x in zip(names, arrays)}
