"""The teacher's top-k log-probs straight from its hidden states: no ``[N, V]`` logits.

:func:`fused_linear_topk_logprobs` returns what ``topk_logprobs(hidden @ weight + bias, k)``
returns. Rows are taken a block at a time; within a block the vocabulary is taken a tile at a
time, and each tile's logits are folded into three running per-row quantities:

* the top k so far, ``(values [C, k], indices [C, k])``, ordered by (value descending, index
  ascending), -0.0 equal to 0.0;
* the *evicted* mass, as ``(max, sum of exp(x - max))`` over every entry that has left the race:
  a tile's entries outside its own top k, and the entries its candidates push out of the running
  top k. Every vocabulary entry is either kept at the end or evicted exactly once, so at the end
  this is the log-sum-exp over the entries not kept: a sum of positive terms, exact where that
  mass is 1e-30 of the row's (a difference of two log-sum-exps would cancel to 0 there).

The normalizer is then ``logaddexp(lse(kept), lse(evicted))`` and the outputs are ``kept - lse``
and ``lse(evicted) - lse``.

Within a tile, the entries beaten by its k-th value ``x_k`` are found without a scatter: those
below ``x_k`` are all out, those above all in, and of those equal to ``x_k`` exactly
``count(x >= x_k) - k`` are out (ties have one value, so their mass is that count times
``exp(x_k)``). NaN compares False, so a NaN logit always lands in the evicted sum and makes the
row's outputs NaN.

Tiles interleave the vocabulary (tile t holds the entries ``c * n_tiles + t``), as the row blocks
of :mod:`klagg_jax._chunked` interleave positions: a vocabulary split over devices by GSPMD keeps
every tile split the same way, so no tile slices a sharded axis at a traced offset. Under
``shard_map`` each device folds its own vocabulary slice; the devices' ``[N, k]`` candidates and
evicted sums are then merged (only candidate-sized arrays cross devices).

Sizes: tiles of up to 4096 entries, and as many rows as keep one float32 ``[rows, tile]`` tile
within an eighth of the platform's fused-head block (:mod:`klagg_jax._config`; 256 rows on a
CPU), 64 rows at least. XLA:CPU can only slice a 16-bit weight after copying it whole, so there a
16-bit weight is not tiled: each block of rows takes the whole vocabulary, as the fused heads do.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from klagg_jax import _checks, _config, _sharding
from klagg_jax._chunked import chunking, plan_rows, scan_row_chunks
from klagg_jax._numerics import stable_shift
from klagg_jax._ops import registry, transform
from klagg_jax._ops.fused.api import (WEIGHT_LAYOUTS, check_linear, resolve_precision,
                                      static_temperature)
from klagg_jax._ops.fused.base import linear_logits
from klagg_jax._ops.topk.api import check_k
from klagg_jax._ops.topk.api import topk_logprobs as _topk_logprobs
from klagg_jax._ops.topk.base import _gather_columns, top_k_rows

# Widest vocabulary tile: the largest divisor of V up to this (a power-of-two multiple of the
# shards of any power-of-two vocabulary split); V with no divisor near it is taken whole.
_TILE = 4096

# "chunked": row blocks and vocabulary tiles folded into a running top-k (no [N, V] array);
# "xla": topk_logprobs of the materialized logits (differentiable).
IMPLEMENTATIONS = {"chunked": "tiles", "xla": "materialized"}
# A [rows, tile] float32 tile is held at most this fraction of the platform's fused-head block
# (the tile's logits, their exponentials and the two-level top-k's copies coexist).
_TILE_SHARE = 8
# Rows per block at least: each block's matmuls read the whole weight once.
_MIN_ROWS = 64


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static configuration of one call (hashable: a ``nondiff_argnums`` key)."""
  k: int
  vocab: int  # the global vocabulary size (indices are global; sentinels start here)
  inv_temperature: float
  softcap: float | None
  weight_layout: str
  precision: Any
  chunk_size: int | None  # the user's rows per block, validated
  max_tile: int  # widest vocabulary tile
  vocab_axis: Any = None  # mesh axes of a vocabulary split inside shard_map


def tile_width(vocab: int, max_tile: int) -> int:
  """Width of the vocabulary tiles for a (local) vocabulary of ``vocab`` entries."""
  width, interleaved = plan_rows(vocab, max_tile)
  return width if interleaved else vocab


# ------------------------------------------------------------------------------------------------
# Per-row folding of one tile into the running state.

# (top-k values [C, k], their global indices [C, k], evicted max [C], evicted sum [C])
State = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def _initial_state(rows: int, k: int, vocab: int, dtype) -> State:
  """k sentinel entries at -inf with indices V, V + 1, ...: every real entry beats them."""
  return (jnp.full((rows, k), -jnp.inf, dtype),
          jnp.broadcast_to(vocab + jnp.arange(k, dtype=jnp.int32), (rows, k)),
          jnp.full((rows,), -jnp.inf, dtype), jnp.zeros((rows,), dtype))


def _add_mass(state_max: jax.Array, state_sum: jax.Array, new_max: jax.Array,
              new_sum_at: Any) -> tuple[jax.Array, jax.Array]:
  """Adds to a ``(max, sum exp(x - max))`` pair the terms ``new_sum_at(shift)`` = sum
  exp(x - shift) of new entries whose maximum is ``new_max``."""
  top = jnp.maximum(state_max, new_max)
  shift = stable_shift(top)
  # exp(-inf - shift) = 0 for an empty old sum, never 0 * exp(+large).
  old = jnp.where(state_max == -jnp.inf, 0.0, state_sum * jnp.exp(state_max - shift))
  return top, old + new_sum_at(shift)


def _merge(state: State, values: jax.Array, indices: jax.Array, k: int) -> State:
  """Merges candidates ``[C, m]`` into the running top k; the pushed-out entries are evicted."""
  run_v, run_i, ev_max, ev_sum = state
  return _select(jnp.concatenate([run_v, values], axis=1),
                 jnp.concatenate([run_i, indices], axis=1), ev_max, ev_sum, k)


def _select(pool_v: jax.Array, pool_i: jax.Array, ev_max: jax.Array, ev_sum: jax.Array,
            k: int) -> State:
  """The top k of a ``[C, m]`` pool (m > k) kept, the other m - k added to the evicted mass."""
  # Ascending by (-value, index): decreasing value, ties by lower index; NaN sorts last.
  neg, idx = jax.lax.sort((-pool_v, pool_i), dimension=1, num_keys=2)
  kept_v, kept_i, out = -neg[:, :k], idx[:, :k], -neg[:, k:]
  ev_max, ev_sum = _add_mass(ev_max, ev_sum, out[:, 0],
                             lambda s: jnp.exp(out - s[:, None]).sum(1))
  return kept_v, kept_i, ev_max, ev_sum


def _fold_tile(state: State, z: jax.Array, start: jax.Array | int, stride: int, k: int) -> State:
  """Folds a ``[C, W]`` tile of logits whose column c is the vocabulary entry start + c stride.

  (Indices are computed from the columns, never gathered from an index array: under GSPMD a
  gather from a vocabulary-split array would move it.)
  """
  width = z.shape[1]
  if k >= width:  # every entry is a candidate
    column = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)
    return _merge(state, z, start + column * stride, k)
  values, pos = top_k_rows(z, k)  # two levels: GSPMD keeps a vocabulary-split tile split
  # The smallest kept value, read by a reduction: a slice of the top-k output here would
  # make XLA:CPU sort the whole tile instead of calling its top-k routine (4x slower).
  kth = values.min(1, keepdims=True)
  beaten = ~(z >= kth)  # below the k-th value, or NaN
  tied_out = ((z >= kth).sum(1) - k).astype(z.dtype)  # entries equal to x_k left out
  out_max = jnp.where(tied_out > 0, kth[:, 0], jnp.where(beaten, z, -jnp.inf).max(1))

  def out_sum(shift):
    e = jnp.exp(z - shift[:, None])
    tied = tied_out * jnp.exp(kth[:, 0] - shift)
    return jnp.where(beaten, e, 0.0).sum(1) + jnp.where(tied_out > 0, tied, 0.0)

  run_v, run_i, ev_max, ev_sum = state
  ev_max, ev_sum = _add_mass(ev_max, ev_sum, out_max, out_sum)
  return _merge((run_v, run_i, ev_max, ev_sum), values, start + pos * stride, k)


def _finish(state: State, vocab: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(log-probs, indices, tail) of the folded rows."""
  kept_v, kept_i, ev_max, ev_sum = state
  kept_lse = jax.nn.logsumexp(kept_v, axis=1) if kept_v.shape[1] else -jnp.inf
  ev_lse = jnp.where(ev_sum == 0, -jnp.inf, stable_shift(ev_max) + jnp.log(ev_sum))
  lse = jnp.logaddexp(kept_lse, ev_lse)
  shift = stable_shift(lse)
  # Sentinels survive only in a row that holds NaN (every real entry beats them): in range.
  return kept_v - shift[:, None], jnp.minimum(kept_i, vocab - 1), ev_lse - shift


# ------------------------------------------------------------------------------------------------
# The kernel on (per-device) blocks.


def _cap_and_scale(z: jax.Array, cfg: _Config) -> jax.Array:
  z = transform.transform(z, None, cfg.softcap, cfg.inv_temperature, z.dtype)
  return jnp.where(z == 0, jnp.zeros((), z.dtype), z)  # -0.0 ties with 0.0


def _is_16bit_float(x: jax.Array) -> bool:
  return x.dtype.itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating)


def _tile_of(x: jax.Array, t: jax.Array, axis: int) -> jax.Array:
  """``x[..., t]`` along ``axis`` of the interleaved view; 16-bit floats through an integer
  view (XLA:CPU would otherwise copy the whole operand to float32 to slice it)."""
  if not _is_16bit_float(x):
    return jax.lax.dynamic_index_in_dim(x, t, axis, keepdims=False)
  part = jax.lax.dynamic_index_in_dim(jax.lax.bitcast_convert_type(x, jnp.uint16), t, axis,
                                      keepdims=False)
  return jax.lax.bitcast_convert_type(part, x.dtype)


def _fold_rows(h: jax.Array, weight: jax.Array, bias: jax.Array | None, offset: jax.Array | int,
               tile: int, cfg: _Config) -> State:
  """The state after folding this device's vocabulary slice, in tiles of ``tile`` entries,
  into the rows ``h`` ``[C, D]``."""
  width = weight.shape[1] if cfg.weight_layout == "dv" else weight.shape[0]
  dtype = _checks.compute_dtype(h, weight)
  state = _initial_state(h.shape[0], cfg.k, cfg.vocab, dtype)
  n_tiles = width // tile

  def logits(w, b):
    return _cap_and_scale(linear_logits(h, w, b, cfg.weight_layout, cfg.precision), cfg)

  if n_tiles == 1:
    return _fold_tile(state, logits(weight, bias), offset, 1, cfg.k)
  # Tile t holds the entries c * n_tiles + t: a free reshape, then an index along n_tiles.
  if cfg.weight_layout == "dv":
    w_view, w_axis = weight.reshape(weight.shape[0], tile, n_tiles), 2
  else:
    w_view, w_axis = weight.reshape(tile, n_tiles, weight.shape[1]), 1
  b_view = None if bias is None else bias.reshape(tile, n_tiles)

  def step(t, state):
    b = None if b_view is None else _tile_of(b_view, t, 1)
    z = logits(_tile_of(w_view, t, w_axis), b)
    return _fold_tile(state, z, offset + t, n_tiles, cfg.k)

  state = jax.tree.map(_sharding.match_varying, state,
                       jax.eval_shape(step, jnp.int32(0), state))
  return jax.lax.fori_loop(0, n_tiles, step, state)


def _merge_shards(state: State, axis_name: Any, k: int) -> State:
  """Merges the devices' states over a split vocabulary: ``[C, k]`` candidates cross, not logits.

  Each device's k kept entries are gathered (``[C, shards * k]``); the best k of them are kept
  and the rest join the devices' evicted sums (``[C]`` all-reduces). A device whose slice holds
  fewer than k entries sends sentinels (-inf, indices >= V), which every real entry beats.
  """
  run_v, run_i, ev_max, ev_sum = state
  top = jax.lax.pmax(ev_max, axis_name)
  local = jnp.where(ev_max == -jnp.inf, 0.0, ev_sum * jnp.exp(ev_max - stable_shift(top)))
  values, indices = (_gather_columns(x, axis_name) for x in (run_v, run_i))
  return _select(values, indices, top, jax.lax.psum(local, axis_name), k)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Vocabulary tile width and rows per block, for one platform."""
  tile: int
  rows: int


def _plan(config: _config.PlatformConfig, *, width: int, weight_16bit: bool,
          cfg: _Config) -> _Plan:
  # XLA:CPU slices a 16-bit array only after copying all of it (to float32, or to an integer
  # view): a weight-sized temporary. There a 16-bit weight is taken whole, in blocks of rows.
  whole = weight_16bit and config.int_view_16bit
  tile = width if whole else tile_width(width, cfg.max_tile)
  rows = cfg.chunk_size or max(_MIN_ROWS, config.fused_block_bytes // (_TILE_SHARE * 4 * tile))
  return _Plan(tile, rows)


def _local(hidden, weight, bias, *, cfg: _Config):
  """:func:`fused_linear_topk_logprobs` on (per-device) blocks."""
  width = weight.shape[1] if cfg.weight_layout == "dv" else weight.shape[0]
  plan = functools.partial(_plan, width=width, weight_16bit=_is_16bit_float(weight), cfg=cfg)
  return _config.per_platform(plan, functools.partial(_run, cfg=cfg), hidden, weight, bias)


def _run(plan: _Plan, hidden, weight, bias, *, cfg: _Config):
  lead, k = hidden.shape[:-1], cfg.k
  n = math.prod(lead)
  width = weight.shape[1] if cfg.weight_layout == "dv" else weight.shape[0]
  offset = 0 if cfg.vocab_axis is None else jax.lax.axis_index(cfg.vocab_axis) * width

  def body(part, fresh, carry):
    state = _fold_rows(part[0], weight, bias, offset, plan.tile, cfg)
    if cfg.vocab_axis is not None:
      state = _merge_shards(state, cfg.vocab_axis, k)
    return carry, list(_finish(state, cfg.vocab))

  _, (values, indices, tail) = scan_row_chunks(body, (hidden.reshape(n, -1),), plan.rows)
  return values.reshape(lead + (k,)), indices.reshape(lead + (k,)), tail.reshape(lead)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _forward_only(hidden, weight, bias, cfg):
  return _local(hidden, weight, bias, cfg=cfg)


def _no_gradient(hidden, weight, bias, cfg):
  raise ValueError(
      "fused_linear_topk_logprobs has no gradient with implementation='chunked' (it computes a "
      "teacher's stored targets). Wrap its inputs in jax.lax.stop_gradient, or pass "
      "implementation='xla' to differentiate the plain composition.")


def _unreachable(cfg, residuals, g):  # the forward rule raises first
  raise AssertionError("unreachable")


_forward_only.defvjp(_no_gradient, _unreachable)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _compiled(hidden, weight, bias, *, cfg):
  """One compiled program per configuration, eager calls included (inlined under ``jit``)."""
  return _forward_only(hidden, weight, bias, cfg)


# ------------------------------------------------------------------------------------------------
# Public API.


def fused_linear_topk_logprobs(
    hidden: jax.typing.ArrayLike, weight: jax.typing.ArrayLike, k: int, *,
    bias: jax.typing.ArrayLike | None = None, temperature: float = 1.0,
    softcap: float | None = None, weight_layout: str = "dv", chunk_size: int | None = None,
    precision: Any = None, partition: _sharding.Partition | None = None,
    implementation: str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A teacher's top-k log-probs, indices and tail straight from its hidden states.

  Returns what ``topk_logprobs(hidden @ weight + bias, k, temperature=T)`` returns, without the
  ``[N, V]`` logits. With z = ``hidden @ weight + bias``, optionally soft-capped,

  .. math::

     \\tilde z_v = \\frac{c \\tanh(z_v / c)}{T}, \\qquad
     \\log r_v = \\tilde z_v - \\log \\sum_u e^{\\tilde z_u},

  the outputs are the k largest :math:`\\log r_v` sorted by decreasing value (ties by lower
  index; -0.0 ties with 0.0), their indices :math:`S`, and the log of the mass outside them,

  .. math::

     \\mathrm{tail} = \\log \\sum_{v \\notin S} r_v,

  a log-sum-exp over the entries not kept (exact where that mass is 1e-30; -inf when k = V).

  Rows are processed ``chunk_size`` at a time and, within a block, the vocabulary a tile at a
  time: each tile's candidates merge into a running top k, and the entries they push out (or
  that never make a tile's top k) are summed into the tail's log-sum-exp, so nothing
  ``[N, V]`` is ever held. The matmuls keep the inputs' dtype with float32 accumulation; the
  rest is float32.

  Args:
    hidden: the teacher's hidden states ``[..., D]``, any float dtype.
    weight: its output projection, ``[D, V]`` (``weight_layout="dv"``, a Flax ``Dense``
      kernel) or ``[V, D]`` (``"vd"``, a tied embedding).
    k: entries kept per position, a Python int in [1, V].
    bias: optional ``[V]`` bias (a ``-inf`` entry masks that vocabulary entry).
    temperature: static T > 0 dividing the (capped) logits: store the teacher at the temperature
      you distill at.
    softcap: None, or a static cap c > 0 applied as ``c * tanh(z / c)`` before the temperature
      (Gemma's final-logit soft-capping); a ``-inf`` logit stays ``-inf``.
    weight_layout: ``"dv"`` or ``"vd"``.
    chunk_size: at most this many rows per block; ``None`` lets the library choose.
    precision: a ``jax.lax.Precision`` or its name for the matmuls; None follows JAX's default.
    partition: a :class:`klagg_jax.Partition`: ``batch_axis`` splits the first axis of
      ``hidden``, ``vocab_axis`` the V axis of ``weight`` and ``bias`` (each device folds its
      slice; the devices' ``[N, k]`` candidates are merged, never logits). Not needed on a
      classic ``Mesh`` under ``jit`` (GSPMD partitions the kernel) or on ``Explicit`` axes.
    implementation: ``None`` / ``"chunked"`` (tiles, no gradient), or ``"xla"``: the plain
      composition ``topk_logprobs(hidden @ weight + bias, k)``, which holds the logits and is
      differentiable.

  Returns:
    ``(logprobs [..., k] float32, indices [..., k] int32, tail [...] float32)`` (float64 values
    for float64 inputs with x64 on), ready for :func:`kl_topk`'s ``ref_logprobs``,
    ``ref_indices`` and ``ref_tail``. A NaN logit gives NaN log-probs and tail for its row.

  Raises:
    ValueError: for a shape mismatch between ``hidden``, ``weight`` and ``bias`` (naming them),
      an unknown layout or implementation, k not an int in [1, V], a traced or non-positive
      temperature, a softcap that is not a positive number, a bad ``chunk_size`` or
      ``precision``; and when differentiated with ``implementation="chunked"``.

  Example:
    >>> h = teacher.hidden_states(tokens)                       # [B, T, D]
    >>> lp, idx, tail = ka.fused_linear_topk_logprobs(h, teacher_head_kernel, 32)
    >>> loss = ka.kl_topk(student_logits, lp, idx, tail).mean()
  """
  hidden, weight = jnp.asarray(hidden), jnp.asarray(weight)
  bias = None if bias is None else jnp.asarray(bias)
  _checks.check_choice("weight_layout", weight_layout, WEIGHT_LAYOUTS)
  vocab = check_linear(hidden, weight, bias, weight_layout)
  k = check_k(k, vocab, "k")
  temp = static_temperature(temperature, "fused_linear_topk_logprobs")
  cap = transform.check_softcap("softcap", softcap)
  # Both implementations run on every input, so the first named is the one that runs.
  impl = (registry.names("fused_linear_topk_logprobs", implementation, IMPLEMENTATIONS)
          or ("chunked",))[0]
  precision = resolve_precision(precision)
  chunks = chunking(chunk_size, vocab, fused=True)
  lead = hidden.shape[:-1]
  dtype = _checks.compute_dtype(hidden, weight)
  if math.prod(lead) == 0:
    return (jnp.zeros(lead + (k,), dtype), jnp.zeros(lead + (k,), jnp.int32),
            jnp.zeros(lead, dtype))
  if impl == "xla":
    z = linear_logits(hidden.reshape(-1, hidden.shape[-1]), weight, bias, weight_layout,
                      precision)
    z = transform.transform(z, None, cap, 1.0, z.dtype)
    z = jnp.where(z == 0, jnp.zeros((), z.dtype), z)  # -0.0 ties with 0.0
    return _topk_logprobs(z.reshape(lead + (vocab,)), k, temperature=temp, partition=partition,
                          implementation="xla")
  v_axis = 1 if weight_layout == "dv" else 0
  layout = _sharding.resolve(partition, lead, vocab, position_inputs=(hidden,),
                             vocab_inputs=((weight, v_axis), (bias, 0)))
  cfg = _Config(k=k, vocab=vocab, inv_temperature=1.0 / temp, softcap=cap,
                weight_layout=weight_layout, precision=precision, chunk_size=chunks.rows,
                max_tile=_TILE,
                vocab_axis=None if layout is None else layout.vocab)

  kernel = functools.partial(_compiled, cfg=cfg)

  if layout is None:
    return kernel(hidden, weight, bias)
  return _sharding.shard(kernel, layout, (hidden, weight, bias),
                         (layout.rows(), layout.vocab_matrix(weight_layout),
                          layout.vocab_vector()),
                         out_specs=(layout.rows(), layout.rows(), layout.positions()))

