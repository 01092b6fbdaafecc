"""Eager calls of the public kernel functions run one cached ``jax.jit`` program.

Called outside any JAX transformation, a public function would otherwise trace its whole
kernel on every call (hundreds of milliseconds). The wrapper jits it with every argument that
is not an array static (names, numbers, ``None``, a :class:`klagg_jax.Partition`), so repeated
calls with the same options and shapes trace once. Inside a transformation (``jit``, ``grad``,
``vmap``), the function runs as written.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import numpy as np



def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


@functools.lru_cache(maxsize=None)
def _jitted(fn: Callable, static: tuple[str, ...]) -> Callable:
  return jax.jit(fn, static_argnames=static)


def jit_when_eager(fn: Callable) -> Callable:
  """Wraps ``fn`` (arguments by name) to run as a cached ``jax.jit`` when called eagerly."""
  signature = inspect.signature(fn)

  @functools.wraps(fn)
  def wrapper(*args: Any, **kwargs: Any) -> Any:
    bound = signature.bind(*args, **kwargs)
    values = bound.arguments
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(list(values.values()))):
      return fn(*args, **kwargs)
    dynamic, static = {}, {}
    for name, value in values.items():
      if _is_array(value) and np.ndim(value) == 0:
        # A concrete scalar (a temperature, a numpy chunk size) is static, as it is unwrapped.
        value = np.asarray(value).item()
      (dynamic if _is_array(value) else static)[name] = value
    try:
      hash(tuple(static.values()))
    except TypeError:  # an unhashable option (a list of names): run as written
      return fn(*args, **kwargs)
    return _jitted(fn, tuple(sorted(static)))(**dynamic, **static)

  return wrapper
