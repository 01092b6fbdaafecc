"""Row-chunked loops: the one piece of machinery every memory-bounded kernel here reuses.

A kernel sees its inputs as ``[N, ...]`` rows (positions) and works on a block of rows at a time,
so its ``[rows, V]`` temporaries stay bounded while only per-row results (``[N]`` statistics, or
an ``[N, V]`` gradient that must exist anyway) are written. Blocks are taken from the inputs in
place: no padded or sliced copy of an ``[N, V]`` array is made (except the integer view of 16-bit
inputs on CPU, see :func:`_take_rows`).

**Interleaved blocks, so GSPMD keeps a sharded row axis sharded.** With ``C`` rows per block and
``K = N / C`` steps, step ``k`` takes the rows ``c K + k`` for ``c < C``: the inputs are viewed as
``[C, K, ...]`` (a free reshape) and the loop indexes the unsharded ``K`` axis. Every step touches
rows spread evenly over every shard of a batch-sharded row axis, so GSPMD partitions the loop
without moving a row; contiguous blocks (``dynamic_slice`` of the sharded axis at a traced offset)
can only be served by all-gathering the whole ``[N, V]`` operand, which is what the classic
``Mesh`` + ``jit`` user got before. ``C`` must divide ``N``: the plan takes the largest divisor
within the budget, preferring one whose cofactor ``K`` is odd (so ``C`` keeps every factor of 2
of ``N``, and any power-of-two device count that divides ``N`` divides ``C``). When ``N`` has no
divisor within a factor 8 of the budget (``N`` prime, say), the loop falls back to contiguous
blocks, the last shifted back to end at row ``N`` with its already-done rows flagged
``fresh=False`` (accumulations count each row once; per-row outputs are rewritten identically).

Block sizes come from :mod:`klagg_jax._config`, for the platform the computation is lowered on.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from klagg_jax import _config
from klagg_jax._sharding import match_varying


@dataclasses.dataclass(frozen=True)
class Chunking:
  """How many rows a kernel's blocks may hold: a forced count, or the platform's default.

  Attributes:
    rows: rows per block given by the user (``chunk_size``), or None for the platform default.
    vocab: the width of the ``[rows, V]`` blocks, for the default's byte budget.
    fused: use the fused (matmul-feeding) budget of :class:`klagg_jax._config.PlatformConfig`.
  """
  rows: int | None
  vocab: int
  fused: bool = False

  def max_rows(self, config: _config.PlatformConfig) -> int:
    return self.rows if self.rows is not None else config.rows(self.vocab, fused=self.fused)


def chunking(chunk_size: Any, vocab: int, *, fused: bool = False) -> Chunking:
  """Validates a user ``chunk_size`` (a positive int, or None for the device default)."""
  if chunk_size is None:
    return Chunking(None, vocab, fused)
  try:
    rows = operator.index(chunk_size)  # int, numpy integer; not bool, float or a tracer
  except TypeError:
    rows = None
  if isinstance(chunk_size, bool) or rows is None or rows < 1:
    raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}.")
  return Chunking(int(rows), vocab, fused)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A resolved loop: ``rows`` per block, interleaved or contiguous, 16-bit integer views or not."""
  rows: int
  interleaved: bool = True
  int_view: bool = False


def _divisors(n: int) -> list[int]:
  small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
  return sorted(set(small + [n // d for d in small]))


def _twos(n: int) -> int:
  """The exponent of 2 in n."""
  return (n & -n).bit_length() - 1


def plan_rows(n: int, max_rows: int) -> tuple[int, bool]:
  """(rows per block, interleaved) for ``n`` rows and a budget of ``max_rows`` per block."""
  max_rows = max(1, min(max_rows, n))
  if max_rows == n:
    return n, True
  fitting = [d for d in _divisors(n) if d <= max_rows]
  best = fitting[-1]
  keeps_twos = [d for d in fitting if _twos(d) == _twos(n) and 2 * d >= best]
  if keeps_twos:
    best = keeps_twos[-1]
  if 8 * best < max_rows:  # no divisor near the budget: contiguous blocks of the full budget
    return max_rows, False
  return best, True


def make_plan(n: int, chunks: Chunking, config: _config.PlatformConfig,
              has_16bit: bool) -> Plan:
  rows, interleaved = plan_rows(n, chunks.max_rows(config))
  return Plan(rows, interleaved, int_view=config.int_view_16bit and has_16bit and rows < n)


def _is_16bit_float(dtype: Any) -> bool:
  dtype = jnp.dtype(dtype)
  return dtype.itemsize == 2 and jnp.issubdtype(dtype, jnp.floating)


def _take_rows(x: jax.Array, k: jax.Array, interleaved: bool, rows: int, int_view: bool):
  """Block ``k`` of ``x``: ``x[:, k]`` of the ``[C, K, ...]`` view, or ``x[k:k + rows]``.

  XLA:CPU has no native 16-bit-float slicing: it upcasts the whole operand to float32 and
  hoists that out of the loop (a 4-byte copy of the input). Slicing a same-width integer view
  costs a 2-byte copy instead; other backends slice bf16/f16 natively and take no view.
  """
  view = int_view and _is_16bit_float(x.dtype)
  src = jax.lax.bitcast_convert_type(x, jnp.uint16) if view else x
  if interleaved:
    part = jax.lax.dynamic_index_in_dim(src, k, axis=1, keepdims=False)
  else:
    part = jax.lax.dynamic_slice_in_dim(src, k, rows, axis=0)
  return jax.lax.bitcast_convert_type(part, x.dtype) if view else part


def _storage_dtype(dtype: Any, int_view: bool) -> jnp.dtype:
  """The dtype an ``[N, ...]`` output buffer is kept in while blocks are written into it.

  XLA:CPU updates a 16-bit-float buffer by converting all of it to float32 and back, on every
  block (quadratic in N); a same-width integer buffer is updated in place.
  """
  dtype = jnp.dtype(dtype)
  return jnp.dtype(jnp.uint16) if int_view and _is_16bit_float(dtype) else dtype


RowBody = Callable[[Sequence[jax.Array], jax.Array, Any], tuple[Any, Sequence[jax.Array]]]


def scan_row_chunks(body: RowBody, rows: Sequence[jax.Array], chunks: Chunking | int,
                    carry: Any = None) -> tuple[Any, list[jax.Array]]:
  """Applies ``body`` to blocks of rows and stitches its per-row outputs.

  Args:
    body: ``body(block_rows, fresh, carry) -> (carry, row_outputs)``; ``block_rows`` are the
      inputs restricted to one block ``[C, ...]`` (which rows, and in which order, is the
      plan's business: the body must treat rows independently), ``fresh`` a ``[C]`` bool marking
      rows not seen by an earlier block, ``row_outputs`` a sequence of ``[C, ...]`` arrays.
    rows: inputs sharing the leading dimension N.
    chunks: a :class:`Chunking`, or an int: at most that many rows per block.
    carry: a pytree threaded through the blocks (accumulators), or None.

  Returns:
    ``(carry, outputs)`` with every output of shape ``[N, ...]``, row i the body's output for
    input row i.
  """
  rows = tuple(rows)
  n = rows[0].shape[0]
  if isinstance(chunks, int):
    chunks = Chunking(chunks, 1)
  # Outputs in a 16-bit dtype (gradients) always come with an input of that dtype.
  has_16bit = any(_is_16bit_float(r.dtype) for r in rows)
  plan = functools.partial(make_plan, n, chunks, has_16bit=has_16bit)
  return _config.per_platform(plan, functools.partial(_scan, body), rows, carry)


def _scan(body: RowBody, plan: Plan, rows: tuple[jax.Array, ...],
          carry: Any) -> tuple[Any, list[jax.Array]]:
  n = rows[0].shape[0]
  if plan.rows >= n:
    carry, outs = body(rows, jnp.ones((n,), bool), carry)
    return carry, list(outs)
  chunk = plan.rows
  if plan.interleaved:
    steps = n // chunk
    srcs = [r.reshape((chunk, steps) + r.shape[1:]) for r in rows]
    all_fresh = jnp.ones((chunk,), bool)

    def take(i):
      return [_take_rows(r, i, True, chunk, plan.int_view) for r in srcs], all_fresh

    def put(buffer, part, i):
      return jax.lax.dynamic_update_index_in_dim(buffer, part, i, axis=1)
  else:
    steps = math.ceil(n / chunk)
    offsets = jnp.arange(chunk)
    srcs = rows

    def start_of(i):
      return jnp.minimum(i * chunk, n - chunk)

    def take(i):
      start = start_of(i)
      return ([_take_rows(r, start, False, chunk, plan.int_view) for r in srcs],
              start + offsets >= i * chunk)

    def put(buffer, part, i):
      return jax.lax.dynamic_update_slice_in_dim(buffer, part, start_of(i), axis=0)

  part0, fresh0 = take(0)
  carry_shapes, out_shapes = jax.eval_shape(body, part0, fresh0, carry)
  storage = [_storage_dtype(s.dtype, plan.int_view) for s in out_shapes]
  lead = (chunk, steps) if plan.interleaved else (n,)
  # Inside shard_map, start the loop state varying over the mesh axes the body makes it vary
  # over (the loop's carry type must not change); a no-op elsewhere.
  outs0 = [match_varying(jnp.zeros(lead + s.shape[1:], st), s)
           for s, st in zip(out_shapes, storage)]
  carry = jax.tree.map(match_varying, carry, carry_shapes)

  def step(i, state):
    carry, outs = state
    part, fresh = take(i)
    carry, row_outs = body(part, fresh, carry)
    outs = [put(o, _store(r.astype(s.dtype), o.dtype), i)
            for o, r, s in zip(outs, row_outs, out_shapes)]
    return carry, outs

  carry, outs = jax.lax.fori_loop(0, steps, step, (carry, outs0))
  outs = [o if o.dtype == s.dtype else jax.lax.bitcast_convert_type(o, s.dtype)
          for o, s in zip(outs, out_shapes)]
  return carry, [o.reshape((n,) + o.shape[2:]) if plan.interleaved else o for o in outs]


def _store(rows: jax.Array, storage: jnp.dtype) -> jax.Array:
  if rows.dtype == storage:
    return rows
  return jax.lax.bitcast_convert_type(rows, storage)
