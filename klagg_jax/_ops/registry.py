"""Choosing an op's implementation: ``implementation=`` on every public kernel function.

``implementation`` is None, a name, or a sequence of names tried in order. An implementation
that cannot run on what is known at trace time (dtype, shape, sharding, a platform the caller
names) raises ``NotImplementedError`` and the next one is tried; when none can run, the
reasons are reported together. None takes the per-platform order of the one config
(:func:`klagg_jax._config.implementations`); where those orders differ between platforms, each
platform's chain is staged with ``jax.lax.platform_dependent``, so the choice follows the
platform the program is lowered for. An implementation whose choice depends on the lowering
platform beyond that makes it inside, the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from klagg_jax import _config

Implementation = Callable[..., Any]


def names(op: str, implementation: Any, implementations: Mapping[str, Implementation]
          ) -> tuple[str, ...] | None:
  """Validates ``implementation=``: the names to try in order, or None for the config's order.

  Raises:
    ValueError: for an unknown name (listing the valid ones), an empty sequence, or anything
      that is not None, a string or a sequence of strings.
  """
  if implementation is None:
    return None
  chosen = (implementation,) if isinstance(implementation, str) else implementation
  valid = ", ".join(map(repr, implementations))
  if not isinstance(chosen, Sequence) or not chosen:
    raise ValueError(f"implementation of {op} must be None, a name or a non-empty sequence of "
                     f"names among {valid}; got {implementation!r}.")
  for name in chosen:
    if name not in implementations:
      raise ValueError(f"Unknown implementation {name!r} of {op}; expected None or one of "
                       f"{valid} (or a sequence of them, tried in order).")
  return tuple(chosen)


def _chain(op: str, implementations: Mapping[str, Implementation], static: tuple,
           order: tuple[str, ...], *args: Any) -> Any:
  reasons = []
  for name in order:
    try:
      return implementations[name](*args, *static)
    except NotImplementedError as e:
      reasons.append(f"{name!r}: {e}")
  raise NotImplementedError(f"No implementation of {op} can run here: {'; '.join(reasons)}.")


def call(op: str, implementation: tuple[str, ...] | None,
         implementations: Mapping[str, Implementation], *args: Any, static: tuple = ()) -> Any:
  """Runs the first implementation of ``op`` that can: ``impl(*args, *static)``.

  Args:
    op: the op's name in the config and in messages.
    implementation: what :func:`names` returned.
    implementations: the op's implementations by name.
    *args: the implementations' array arguments (pytrees; None for an absent one).
    static: trailing hashable arguments (the op's spec).

  Returns:
    What the chosen implementation returns.

  Raises:
    NotImplementedError: when no implementation in the order can run, with each one's reason.
  """
  run = functools.partial(_chain, op, implementations, tuple(static))
  if implementation is not None:
    return run(implementation, *args)
  order = functools.partial(_config.implementations, op, available=tuple(implementations))
  return _config.per_platform(order, run, *args)
