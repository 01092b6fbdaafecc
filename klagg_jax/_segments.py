"""Packed rows: several sequences in one row, told apart by integer segment ids.

The convention of MaxText, tunix and Levanter: ``segment_ids[..., t]`` is 0 at padding and
1..S at the positions of the row's sequences. Sequence k of a row goes to output column k - 1.

Also the guard of the host-side tools against arrays that span processes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

GATHER_HINT = ("gather it onto every process first, e.g. "
               "jax.experimental.multihost_utils.process_allgather(x, tiled=True)")


def spans_processes(x: Any) -> bool:
  """True for a concrete array with shards on other processes (not fully addressable here).

  Such an array cannot be read back to this host. Traced values and anything without an
  ``is_fully_addressable`` attribute (numpy arrays, Python numbers) are False.
  """
  if isinstance(x, jax.core.Tracer):
    return False
  return getattr(x, "is_fully_addressable", True) is False


def check_addressable(fn: str, name: str, x: Any, what: str = "") -> None:
  """Raises a ValueError naming the way out when ``x`` spans processes."""
  if spans_processes(x):
    raise ValueError(
        f"{fn}: {name} spans several processes (it is not fully addressable from this one), "
        f"and {what or 'this function reads it back to the host'}; {GATHER_HINT}.")


def check_segment_ids(segment_ids: Any, shape: tuple[int, ...], what: str) -> jax.Array:
  """Validates integer segment ids that broadcast to ``shape``; returns them broadcast, int32.

  Concrete ids come back as a numpy array, so that they stay concrete (and checkable) even as
  constants of a function being traced; traced ids and ids that span processes as jax arrays.
  """
  concrete = not isinstance(segment_ids, jax.core.Tracer) and not spans_processes(segment_ids)
  seg = np.asarray(jax.device_get(segment_ids)) if concrete else jnp.asarray(segment_ids)
  if not jnp.issubdtype(seg.dtype, jnp.integer):
    raise ValueError(
        f"segment_ids must be an integer array (0 = padding, 1..S = sequences); got dtype "
        f"{seg.dtype}. Pass e.g. segment_ids.astype(jnp.int32).")
  try:
    full = np.broadcast_shapes(seg.shape, tuple(shape))
  except ValueError:
    full = None
  if full != tuple(shape):
    raise ValueError(
        f"segment_ids has shape {seg.shape}, which does not broadcast to {what} shape "
        f"{tuple(shape)}; expected the positions' shape.")
  if concrete:
    return np.broadcast_to(seg, shape).astype(np.int32)
  return jnp.broadcast_to(seg, shape).astype(jnp.int32)


def _static_count(max_segments: Any) -> int:
  if isinstance(max_segments, bool) or not isinstance(max_segments, (int, np.integer)):
    raise ValueError(f"max_segments must be a static Python int >= 1; got {max_segments!r}.")
  if max_segments < 1:
    raise ValueError(f"max_segments must be >= 1; got {max_segments}.")
  return int(max_segments)


def resolve_max_segments(seg: jax.Array, max_segments: Any) -> int:
  """The static number of output columns, checking concrete ids against it.

  Concrete ids (eager calls) must lie in 0..max_segments; without ``max_segments`` their
  largest value (at least 1) is used. Traced ids (under ``jit``, ``vmap``) need
  ``max_segments``; ids outside 1..max_segments then count as padding.
  """
  count = None if max_segments is None else _static_count(max_segments)
  if isinstance(seg, jax.core.Tracer) or spans_processes(seg):
    if count is None:
      raise ValueError(
          "max_segments is required when segment_ids are traced (under jax.jit, vmap or a "
          "scan) or span several processes: the output has one column per segment, and its "
          "length must be static. Pass max_segments=<int>, the most sequences a row can hold.")
    return count
  if seg.size == 0:
    return 1 if count is None else count
  ids = np.asarray(jax.device_get(seg))
  lo, hi = int(ids.min()), int(ids.max())
  if lo < 0:
    raise ValueError(f"segment_ids must be >= 0 (0 = padding, 1..S = sequences); got {lo}.")
  if count is None:
    return max(hi, 1)
  if hi > count:
    raise ValueError(
        f"segment_ids holds id {hi}, above max_segments={count}; ids must lie in "
        f"0..max_segments (under jit, larger ids would be ignored as padding).")
  return count


def check_concrete_nonnegative(seg: jax.Array) -> None:
  """For token-level use (ids only mark padding): concrete ids must be >= 0."""
  if isinstance(seg, jax.core.Tracer) or spans_processes(seg) or seg.size == 0:
    return
  lo = int(np.asarray(jax.device_get(seg)).min())
  if lo < 0:
    raise ValueError(f"segment_ids must be >= 0 (0 = padding, 1..S = sequences); got {lo}.")


def scatter(v: jax.Array, seg: jax.Array, count: int, op: str, init: float) -> jax.Array:
  """``[..., count]``: ``op`` ("add" or "max") of ``v`` ``[..., T]`` over each segment's positions.

  ``seg`` holds 0-based ids, ``count`` at positions in no segment (zero_based). One scatter
  per row into count + 1 buckets (the last one dropped): O(T) work and memory whatever
  ``count`` is, where a one-hot ``[..., count, T]`` mask costs ``count`` times both.
  """
  def row(u, i):
    acc = jnp.full((count + 1,), init, u.dtype)
    return (acc.at[i].add(u) if op == "add" else acc.at[i].max(u))[:-1]

  for _ in range(v.ndim - 1):
    row = jax.vmap(row)
  return row(v, seg)


def zero_based(seg: jax.Array, mask: jax.Array | None, count: int) -> tuple[jax.Array, jax.Array]:
  """(ids in 0..count-1, with ``count`` for positions in no segment; the valid-position mask).

  A position is valid where ``mask`` holds and its id lies in 1..count.
  """
  valid = (seg >= 1) & (seg <= count)
  if mask is not None:
    valid = valid & mask
  return jnp.where(valid, seg - 1, count), valid


def segment_any(valid: jax.Array, seg0: jax.Array, count: int) -> jax.Array:
  """``[..., count]``: whether each segment has a valid position (``seg0`` from zero_based)."""
  return scatter(valid.astype(jnp.int32), seg0, count, "add", 0) > 0
