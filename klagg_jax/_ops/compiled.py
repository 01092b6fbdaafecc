"""The public functions (kernels, barrier, aggregators) run as one cached ``jax.jit`` program.

Called eagerly, a public function would otherwise trace its whole kernel on every call
(hundreds of milliseconds); under an eager ``jax.grad`` or ``jax.jvp`` (no ``jit`` around it),
JAX would run its forward and backward passes one primitive at a time, compiling each. The
wrapper jits it with every argument that is not an array static (names, numbers, ``None``, a
:class:`klagg_jax.Partition`; a concrete array scalar is unwrapped into a number), so repeated
calls with the same options and shapes trace once, and a differentiated call runs compiled
programs. Inside a user's ``jit`` the nested ``jit`` is inlined; traced values (a traced
temperature included) stay arguments.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from klagg_jax._ops.rows import hint_jvp


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


@functools.lru_cache(maxsize=None)
def _jitted(fn: Callable, static: tuple[str, ...]) -> Callable:
  # A jvp of the jitted call differentiates its traced program outside ``fn``: the forward-mode
  # hint of the custom-VJP kernels must be given here too.
  return hint_jvp(jax.jit(fn, static_argnames=static))


def compiled(fn: Callable | None = None, *, checked_when_concrete: tuple[str, ...] = (),
             data: tuple[str, ...] = ()) -> Callable:
  """Wraps ``fn`` (arguments by name) to run as a cached ``jax.jit``, its options static.

  Args:
    fn: the public function.
    checked_when_concrete: arguments whose concrete values ``fn`` reads (segment ids: their
      count, their range); given a concrete array there, ``fn`` runs as written.
    data: arguments that are data even as 0-d arrays (never unwrapped into static numbers).

  Returns:
    The wrapped function (a decorator when ``fn`` is None).
  """
  if fn is None:
    return functools.partial(compiled, checked_when_concrete=checked_when_concrete, data=data)
  signature = inspect.signature(fn)

  @functools.wraps(fn)
  def wrapper(*args: Any, **kwargs: Any) -> Any:
    bound = signature.bind(*args, **kwargs)
    dynamic, static = {}, {}
    for name, value in bound.arguments.items():
      if (name in checked_when_concrete and value is not None
          and not isinstance(value, jax.core.Tracer)):
        return fn(*args, **kwargs)
      if (_is_array(value) and np.ndim(value) == 0 and name not in data
          and not isinstance(value, jax.core.Tracer)):
        # A concrete scalar (a temperature, a numpy chunk size) is static, as it is unwrapped.
        value = np.asarray(value).item()
      (dynamic if _is_array(value) or isinstance(value, jax.core.Tracer) else static)[name] = value
    try:
      hash(tuple(static.values()))
    except TypeError:  # an unhashable option (a list of names): run as written
      return fn(*args, **kwargs)
    return _jitted(fn, tuple(sorted(static)))(**dynamic, **static)

  return wrapper
