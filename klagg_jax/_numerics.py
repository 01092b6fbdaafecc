"""The one rule for "empty" versus "non-finite", shared by every kernel and aggregator.

Empty means *no mass* or *no entry*: a row whose entries are all ``-inf`` (its maximum is
``-inf``), a probability or sum that is exactly 0, a count of 0. Those follow the documented
conventions (0 log 0 = 0, an empty selection gives 0). Everything else passes through the
arithmetic untouched, NaN included, so a NaN at a valid position surfaces as NaN.

Emptiness is therefore tested by *equality* (``m == -inf``, ``s == 0``), never by
``isfinite(m)`` or ``s > 0``: NaN fails both of those, so they silently turn a NaN into "empty"
(the bug that made a diverged student read as KL 0). Write such tests only through these
helpers.

Masked positions are a different matter: they are replaced by harmless values *before* any
arithmetic (``jnp.where(mask, x, 0)``), so their garbage, NaN included, never reaches a value or
a gradient. That is done where the mask is known, not here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def is_empty_row(row_max: jax.Array) -> jax.Array:
  """True where a row's maximum is ``-inf``: every entry is ``-inf`` (NaN rows are not empty)."""
  return row_max == -jnp.inf


def is_zero(s: jax.Array) -> jax.Array:
  """True where a mass, sum or count is exactly 0 (NaN is not zero)."""
  return s == 0


def stable_shift(row_max: jax.Array) -> jax.Array:
  """The shift that stabilizes ``exp(x - shift)``: the row maximum, or 0 for an empty row.

  An all ``-inf`` row then gives ``exp(-inf) = 0`` everywhere instead of ``exp(NaN)``; a row
  holding NaN keeps its NaN maximum, so the NaN reaches every result that reads the row. Pass the
  maximum gradient-stopped (the shift cancels mathematically).
  """
  return jnp.where(is_empty_row(row_max), jnp.zeros_like(row_max), row_max)


def where_mass(mass: jax.Array, value: jax.Array) -> jax.Array:
  """``value`` where ``mass != 0``, else 0: the 0 log 0 = 0 convention, letting NaN through.

  Use it around terms ``mass * f(...)`` whose ``f`` is undefined (``-inf - -inf``) exactly where
  the mass is 0.
  """
  return jnp.where(is_zero(mass), jnp.zeros_like(value), value)


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` where ``den != 0``; ``num / 1`` where ``den == 0`` (the caller selects away)."""
  return num / jnp.where(is_zero(den), jnp.ones_like(den), den)


def safe_sqrt(s: jax.Array) -> jax.Array:
  """sqrt(s) with value 0 and gradient 0 at ``s <= 0``; NaN stays NaN.

  The subgradient convention of optax's ``safe_root_mean_squares``: the ``where`` is inside the
  square root as well as outside, so the gradient at 0 is 0 rather than inf * 0 = NaN.
  """
  flat = s <= 0  # False for NaN: sqrt(NaN) = NaN passes through
  return jnp.where(flat, jnp.zeros_like(s), jnp.sqrt(jnp.where(flat, jnp.ones_like(s), s)))


def propagate_nan(value: jax.Array, *sources: jax.Array) -> jax.Array:
  """``value``, or NaN wherever any of ``sources`` (same shape) is NaN.

  A kernel's conventions select between cases (an empty student row gives 0, an empty reference
  row +inf); applied to its per-row statistics last, this keeps any of those selections from
  turning a NaN in either input row into a number.
  """
  bad = jnp.zeros(value.shape, bool)
  for s in sources:
    bad = bad | jnp.isnan(s)
  return jnp.where(bad, jnp.full_like(value, jnp.nan), value)


def safe_log(s: jax.Array) -> jax.Array:
  """log(s) with value -inf and gradient 0 (not inf * 0 = NaN) at ``s == 0``; NaN stays NaN."""
  zero = is_zero(s)
  return jnp.where(zero, jnp.full_like(s, -jnp.inf), jnp.log(jnp.where(zero, jnp.ones_like(s), s)))
