"""Row-chunked loops: the one piece of machinery every memory-bounded kernel here reuses.

A kernel sees its inputs as ``[N, ...]`` rows (positions) and works on ``chunk`` rows at a
time, so its ``[chunk, V]`` temporaries stay small (cache-sized on CPU) while only per-row
results (``[N]`` statistics, or an ``[N, V]`` gradient that must exist anyway) are written.
Chunks are taken with ``dynamic_slice`` from the inputs in place: no padded or sliced copy of
an ``[N, V]`` array is made (except the integer view of 16-bit inputs on CPU, see
``_slice_rows``). When ``chunk`` does not divide N the last chunk is shifted
back to end at row N; its rows already done are flagged ``fresh=False`` so accumulations
(e.g. a weight gradient) count each row once, and per-row outputs are rewritten identically.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from klagg_jax._sharding import match_varying

# Bytes of one float32 [chunk, V] block the default chunking aims at, per backend: on CPU a
# block that stays in the L2 cache across the kernel's passes; on accelerators large enough to
# fill the device, still far below an [N, V] array.
_BLOCK_BYTES = {"cpu": 1 << 21, "gpu": 1 << 26, "tpu": 1 << 26}


def default_chunk_rows(n_rows: int, vocab: int) -> int:
  """The library's chunk size for ``n_rows`` positions over a vocabulary of ``vocab`` entries."""
  budget = _BLOCK_BYTES.get(jax.default_backend(), _BLOCK_BYTES["gpu"])
  return int(max(1, min(n_rows, budget // (4 * max(vocab, 1)))))


def resolve_chunk_rows(chunk_size: int | None, n_rows: int, vocab: int) -> int:
  """Validates a user ``chunk_size`` (or picks one) and clips it to ``[1, n_rows]``."""
  if chunk_size is None:
    return default_chunk_rows(n_rows, vocab)
  try:
    rows = operator.index(chunk_size)  # int, numpy integer; not bool, float or a tracer
  except TypeError:
    rows = None
  if isinstance(chunk_size, bool) or rows is None or rows < 1:
    raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}.")
  return max(1, min(rows, n_rows))


def _slice_rows(x: jax.Array, start: jax.Array, size: int) -> jax.Array:
  """``x[start:start + size]`` along the first axis.

  XLA:CPU has no native 16-bit-float slicing: it upcasts the whole ``[N, V]`` operand to float32
  and hoists that out of the loop (a 4-byte copy of the input). Slicing a same-width integer view
  there costs a 2-byte copy instead. Other backends slice bf16/f16 natively and take no view.
  """
  if x.dtype.itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating) and _on_cpu():
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16)
    part = jax.lax.dynamic_slice_in_dim(bits, start, size, axis=0)
    return jax.lax.bitcast_convert_type(part, x.dtype)
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=0)


def _storage_dtype(dtype) -> jnp.dtype:
  """The dtype an ``[N, ...]`` output buffer is kept in while chunks are written into it.

  XLA:CPU updates a 16-bit-float buffer by converting all of it to float32 and back, on every
  chunk (quadratic in N); a same-width integer buffer is updated in place.
  """
  dtype = jnp.dtype(dtype)
  if dtype.itemsize == 2 and jnp.issubdtype(dtype, jnp.floating) and _on_cpu():
    return jnp.dtype(jnp.uint16)
  return dtype


def _store(rows: jax.Array, storage: jnp.dtype) -> jax.Array:
  if rows.dtype == storage:
    return rows
  return jax.lax.bitcast_convert_type(rows, storage)


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


RowBody = Callable[[Sequence[jax.Array], jax.Array, Any], tuple[Any, Sequence[jax.Array]]]


def scan_row_chunks(body: RowBody, rows: Sequence[jax.Array], chunk: int,
                    carry: Any = None) -> tuple[Any, list[jax.Array]]:
  """Applies ``body`` to consecutive chunks of rows and stitches its per-row outputs.

  Args:
    body: ``body(chunk_rows, fresh, carry) -> (carry, row_outputs)``; ``chunk_rows`` are the
      inputs sliced to ``[chunk, ...]``, ``fresh`` a ``[chunk]`` bool marking rows not seen by an
      earlier chunk, ``row_outputs`` a sequence of ``[chunk, ...]`` arrays.
    rows: inputs sharing the leading dimension N.
    chunk: rows per chunk, in ``[1, N]``.
    carry: a pytree threaded through the chunks (accumulators), or None.

  Returns:
    ``(carry, outputs)`` with every output of shape ``[N, ...]``.
  """
  n = rows[0].shape[0]
  if chunk >= n:
    carry, outs = body(rows, jnp.ones((n,), bool), carry)
    return carry, list(outs)
  n_chunks = math.ceil(n / chunk)
  offsets = jnp.arange(chunk)

  def take(i):
    start = jnp.minimum(i * chunk, n - chunk)
    part = [_slice_rows(r, start, chunk) for r in rows]
    return start, part, start + offsets >= i * chunk

  _, part0, fresh0 = take(0)
  carry_shapes, out_shapes = jax.eval_shape(body, part0, fresh0, carry)
  # Inside shard_map, start the loop state varying over the mesh axes the body makes it vary
  # over (the loop's carry type must not change); a no-op elsewhere.
  storage = [_storage_dtype(s.dtype) for s in out_shapes]
  outs0 = [match_varying(jnp.zeros((n,) + s.shape[1:], st), s)
           for s, st in zip(out_shapes, storage)]
  carry = jax.tree.map(match_varying, carry, carry_shapes)

  def step(i, state):
    carry, outs = state
    start, part, fresh = take(i)
    carry, row_outs = body(part, fresh, carry)
    outs = [jax.lax.dynamic_update_slice_in_dim(o, _store(r.astype(s.dtype), o.dtype), start, 0)
            for o, r, s in zip(outs, row_outs, out_shapes)]
    return carry, outs

  carry, outs = jax.lax.fori_loop(0, n_chunks, step, (carry, outs0))
  return carry, [o if o.dtype == s.dtype else jax.lax.bitcast_convert_type(o, s.dtype)
                 for o, s in zip(outs, out_shapes)]
