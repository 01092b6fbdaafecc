"""Trace-time validation of static arguments, shared by every public function.

Static problems (shapes, names, ranges) raise ``ValueError`` while tracing, naming what was
seen and what was expected. Values that are traced are never checked: they follow the
documented conventions instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_float(value: Any) -> float | None:
  """Returns ``value`` as a Python float when it is known at trace time, else None."""
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


def check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
  if a.shape != b.shape:
    raise ValueError(
        f"Shape mismatch: {name_a} has shape {a.shape} and {name_b} has shape {b.shape}; "
        "expected equal shapes.")


def check_vocab(name: str, x: jax.Array) -> None:
  if x.ndim < 1:
    raise ValueError(f"{name} must have a vocabulary axis (shape [..., V]); got a scalar.")
  if x.shape[-1] == 0:
    raise ValueError(f"{name} has an empty vocabulary axis: shape {x.shape}; expected V >= 1.")


def check_float(name: str, x: jax.Array) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating array; got dtype {x.dtype}.")


def check_choice(name: str, value: Any, valid: Sequence[str]) -> None:
  if value not in valid:
    raise ValueError(f"Unknown {name} {value!r}; expected one of {', '.join(map(repr, valid))}.")


def check_open_unit(name: str, value: Any) -> float:
  """Checks a static level in (0, 1) and returns it as a float."""
  v = concrete_float(value)
  if v is None:
    raise ValueError(f"{name} must be a static Python number in (0, 1); got a traced value.")
  if not 0.0 < v < 1.0:
    raise ValueError(f"{name} must lie in the open interval (0, 1); got {v}.")
  return v


def check_closed_unit(name: str, value: Any) -> float:
  v = concrete_float(value)
  if v is None:
    raise ValueError(f"{name} must be a static Python number in [0, 1]; got a traced value.")
  if not 0.0 <= v <= 1.0:
    raise ValueError(f"{name} must lie in [0, 1]; got {v}.")
  return v


def check_positive_if_static(name: str, value: Any) -> float | None:
  """Checks ``value > 0`` when static; returns it as a float, or None when traced."""
  v = concrete_float(value)
  if v is not None and not v > 0.0:
    raise ValueError(f"{name} must be > 0; got {v}.")
  return v


def check_where(where: Any, shape: tuple[int, ...], what: str) -> jax.Array | None:
  """Validates a boolean mask that must broadcast to ``shape``; returns it as a bool array."""
  if where is None:
    return None
  where = jnp.asarray(where)
  if where.dtype != jnp.bool_:
    # An int or float 0/1 mask is the usual slip (a tokenizer's attention_mask): say how to fix
    # it rather than guess, since 0.5 or 2 would have no meaning as a mask.
    raise ValueError(
        f"where must be a boolean array; got dtype {where.dtype}. Pass a bool mask: for a 0/1 "
        "mask (e.g. an int attention_mask) use where=mask.astype(bool), or where=mask > 0.")
  try:
    np.broadcast_shapes(where.shape, shape)
  except ValueError:
    raise ValueError(
        f"where has shape {where.shape}, which does not broadcast to {what} shape {shape}.") from None
  if np.broadcast_shapes(where.shape, shape) != tuple(shape):
    raise ValueError(
        f"where has shape {where.shape}, which would enlarge {what} shape {shape}; "
        "expected a shape that broadcasts to it.")
  return jnp.broadcast_to(where, shape)


def normalize_axis(axis: int | None, ndim: int) -> int | None:
  if axis is None:
    return None
  if not isinstance(axis, (int, np.integer)):
    raise ValueError(f"axis must be an int or None; got {axis!r}.")
  if not -ndim <= axis < ndim:
    raise ValueError(f"axis {axis} is out of range for an array of rank {ndim}; "
                     f"expected {-ndim} <= axis < {ndim} or None.")
  return int(axis) % ndim


def compute_dtype(*xs: jax.Array) -> jnp.dtype:
  """float64 when every input is float64 (x64 enabled), else float32."""
  if all(x.dtype == jnp.float64 for x in xs):
    return jnp.dtype(jnp.float64)
  return jnp.dtype(jnp.float32)
