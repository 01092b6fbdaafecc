"""The one logit transform of every kernel: soft-cap, then temperature, then the mask.

``z -> cap * tanh(z / cap) / T`` (the cap omitted when None), with two conventions: a ``-inf``
logit stays ``-inf`` (a masked vocabulary entry stays masked; ``tanh`` alone would turn it into
``-cap``), and masked rows are replaced by zeros before any arithmetic, so their garbage (NaN
included) reaches neither a value nor a gradient. The chunked kernels apply it per block and
chain its derivative by hand (:func:`apply` returns the slope); the plain compositions and a
traced temperature use the same function under JAX's autodiff.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from klagg_jax import _checks


def check_softcap(name: str, value: Any) -> float | None:
  """Validates a static soft-cap: None or ``inf`` (no cap), else a number > 0."""
  if value is None:
    return None
  v = None if isinstance(value, (str, bool)) else _checks.concrete_float(value)
  if v is None:
    raise ValueError(f"{name} must be None or a static Python number > 0; got {value!r}.")
  if not v > 0.0:
    raise ValueError(f"{name} must be > 0 (or None for no cap); got {v}.")
  return None if math.isinf(v) else v


def resolve_caps(softcap: Any, ref_softcap: Any) -> tuple[float | None, float | None]:
  """(student cap, reference cap): the reference follows the student unless given."""
  cap = check_softcap("softcap", softcap)
  if ref_softcap is None:
    return cap, cap
  return cap, check_softcap("ref_softcap", ref_softcap)


def apply(x: jax.Array, mask: jax.Array | None, cap: float | None, inv_temperature: Any,
          dtype: Any) -> tuple[jax.Array, Any]:
  """(transformed ``x`` in ``dtype``, d transformed / d x): a scalar, or ``[..., V]`` with a cap.

  ``inv_temperature`` may be a Python number or a traced scalar. The slope is 0 at ``-inf``
  entries and on masked rows.
  """
  x = x.astype(dtype)
  if mask is not None:
    x = jnp.where(mask[:, None], x, 0.0)
  scale = (jnp.asarray(inv_temperature, dtype) if not isinstance(inv_temperature, (int, float))
           else None if inv_temperature == 1.0 else jnp.asarray(inv_temperature, dtype))
  if cap is None:
    slope = 1.0 if scale is None else scale
    return (x if scale is None else x * scale), slope
  banned = x == -jnp.inf  # by equality: NaN is capped (and stays NaN)
  y = jnp.where(banned, -jnp.inf, cap * jnp.tanh(jnp.where(banned, 0.0, x) / cap))
  if scale is not None:
    y = y * scale
  # The slope is read off y (tanh' = 1 - tanh^2), so no second [rows, V] array stays live
  # between a kernel's forward and backward halves.
  unit = 1.0 / cap if scale is None else 1.0 / cap / scale
  t = jnp.where(y == -jnp.inf, 0.0, y) * unit
  slope = jnp.where(y == -jnp.inf, 0.0, 1.0 - t * t)
  return y, (slope if scale is None else slope * scale)


def transform(x: jax.Array, mask: jax.Array | None, cap: float | None, inv_temperature: Any,
              dtype: Any) -> jax.Array:
  """:func:`apply` without the slope (for compositions differentiated by JAX)."""
  return apply(x, mask, cap, inv_temperature, dtype)[0]


def outside(x: jax.Array, mask: jax.Array, cap: float | None, temperature: jax.Array,
            dtype: Any) -> jax.Array:
  """The transform for a traced temperature, applied before a kernel so autodiff sees ``T``.

  Costs a ``dtype`` copy of ``x``. -inf entries are kept out of the quotient, so the
  temperature's gradient sees no ``0 * inf``.
  """
  y = transform(x, mask, cap, 1.0, dtype)
  banned = y == -jnp.inf
  return jnp.where(banned, -jnp.inf, jnp.where(banned, 0.0, y) / temperature)


def rows_mask(mask: jax.Array | None, n: int) -> jax.Array:
  """The ``[n]`` row mask of a kernel: every row valid when the caller gave none."""
  return jnp.ones((n,), bool) if mask is None else mask.reshape(n)
