"""Arithmetic that stays finite and exact across float32's whole range.

Two hazards meet values near the ends of the range. A reciprocal of a huge number (1 / 1e38) is
subnormal, and XLA rewrites ``x / c`` as ``x * (1 / c)``, so on a backend that flushes subnormals
to zero the quotient reads 0. And ``t * expm1(d / t)`` for a huge ``t`` forms ``d / t`` below the
smallest normal number. Here divisions go through an exact power-of-two rescaling whose
reciprocal is normal, and tiny quotients are never formed where a series does without them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Below this |u|, expm1(u) and log1p(u) are summed as series of four terms: the first omitted
# term is u^4 / 120 (or u^4 / 5) relative, under float64's rounding.
_SERIES_BELOW = 1e-4


def _bit_layout(dtype) -> tuple[jnp.dtype, int, int]:
  """(integer dtype of the same width, mantissa bits, exponent bias) of a float dtype."""
  info = jnp.finfo(dtype)
  return jnp.dtype(f"int{info.bits}"), int(info.nmant), int(info.maxexp) - 1


def _pow2(k: jax.Array, dtype) -> jax.Array:
  """2^k, exactly, for integer k within the normal range of ``dtype``."""
  itype, nmant, bias = _bit_layout(dtype)
  return jax.lax.bitcast_convert_type((k.astype(itype) + bias) << nmant, dtype)


def divide(x: jax.Array, s: jax.Array) -> jax.Array:
  """x / s for s > 0 (broadcast against x), accurate for every normal s.

  s = m 2^k with m in [1, 2): x 2^-k is exact, and 1 / (s 2^-k) lies in (1/4, 1], so no
  reciprocal is subnormal. k is clamped so that both 2^k and 2^-k are normal.
  """
  dtype = s.dtype
  itype, nmant, bias = _bit_layout(dtype)
  bits = jax.lax.bitcast_convert_type(s, itype)
  k = ((bits >> nmant) & (2 * bias + 1)) - bias
  k = jnp.clip(k, 2 - bias, bias - 1)
  inv = _pow2(-k, dtype)
  return (x * inv) / (s * inv)


def scaled_expm1(d: jax.Array, t: jax.Array | float) -> jax.Array:
  """t expm1(d / t) for t > 0, correct when d / t underflows (huge t): the series
  d (1 + u / 2 + u^2 / 6 + u^3 / 24) with u = d / t, whose derivative is about e^u."""
  u = d / t
  small = jnp.abs(u) < _SERIES_BELOW  # False for NaN: NaN takes the exp branch and stays NaN
  us, ds = jnp.where(small, u, 0.0), jnp.where(small, d, 0.0)
  series = ds * (1.0 + us * (0.5 + us * (1.0 / 6.0 + us / 24.0)))
  return jnp.where(small, series, t * jnp.expm1(jnp.where(small, -1.0, u)))


def scaled_log1p(a: jax.Array, t: jax.Array | float) -> jax.Array:
  """t log1p(a / t) for t > 0 and a >= -t, correct when a / t underflows: the series
  a (1 - m / 2 + m^2 / 3 - m^3 / 4) with m = a / t."""
  m = a / t
  small = jnp.abs(m) < _SERIES_BELOW
  ms, as_ = jnp.where(small, m, 0.0), jnp.where(small, a, 0.0)
  series = as_ * (1.0 - ms * (0.5 - ms * (1.0 / 3.0 - ms / 4.0)))
  return jnp.where(small, series, t * jnp.log1p(jnp.where(small, -0.5, m)))
