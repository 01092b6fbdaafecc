"""Distillation from a stored teacher: top-k log-probs with a tail bucket.

A pipeline that cannot store the teacher's ``[N, V]`` logits stores, per position, the teacher's
k largest log-probs, their vocabulary indices and the log of the mass outside them
(:func:`topk_logprobs`). :func:`kl_topk` then coarsens both distributions onto k + 1 categories,
the k stored entries and one tail bucket holding the rest of each distribution's mass, and takes
the divergence of the coarsened pair: a true divergence (>= 0, 0 iff the coarsened distributions
agree) and, by the data processing inequality, a lower bound of the full-vocabulary one.

The block math (:func:`topk_block_forward`, :func:`topk_block_backward`) works on a ``[chunk, V]``
block of scaled student logits and the chunk's ``[chunk, k]`` teacher data. It builds the k + 1
cell "logits" of both sides (the student's stored logits and the log-sum-exp of its logits outside
them; the teacher's stored log-probs and tail), hands them to the full-vocabulary block math of
:mod:`klagg_jax._divergence`, and maps the cells' gradient back onto the vocabulary: a stored
entry takes its cell's gradient, an entry outside takes the tail cell's gradient times its share
of the student's tail mass. The chunk loop and its custom VJP reuse :mod:`klagg_jax._chunked`;
the fused (hidden-state) kernel reuses the same two block functions.

Conventions (pinned by tests): 0 log 0 = 0, so empty tail buckets (k = V) and ``-inf`` entries
count 0; masked rows are replaced by harmless values before any arithmetic, so they give exactly
0 and a gradient of exactly 0 whatever garbage they hold (NaN log-probs, indices out of range);
the teacher's k + 1 masses are renormalized to sum to 1 (a no-op up to rounding for what
:func:`topk_logprobs` stores; it keeps the divergence >= 0 when they were stored rounded, e.g. in
bfloat16); no gradient flows into the teacher's data.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from klagg_jax import _checks, _config, _fused, _sharding, _xla
from klagg_jax._chunked import Chunking, chunking, scan_row_chunks
from klagg_jax._divergence import (Spec, block_backward, block_forward,
                                   divide_by_traced_temperature, log_normalizer, log_probs,
                                   prepare_block, resolve_direction, vsum)
from klagg_jax._numerics import is_empty_row, stable_shift

Teacher = tuple[jax.Array, jax.Array, jax.Array]  # (log-probs [C, k], indices [C, k], tail [C])


# ------------------------------------------------------------------------------------------------
# Block math on a [chunk, V] block of (prepared) student logits and the chunk's teacher data.
# With ``spec.vocab_axis`` set (inside shard_map) the block is this device's slice of the
# vocabulary, [chunk, V / shards]; the teacher's indices are global, so each device handles
# the stored entries that fall in its slice and the per-row sums are psum-ed over the axis.


def _local_indices(x: jax.Array, idx: jax.Array, axis_name: str | None):
  """(indices into this device's vocabulary slice, whether each falls in it)."""
  if axis_name is None:
    return idx, jnp.ones(idx.shape, bool)
  local = idx - jax.lax.axis_index(axis_name) * x.shape[-1]
  return local, (local >= 0) & (local < x.shape[-1])


# Per-row gathers and scatters are written as vmaps over rows: XLA then sees the row axis as a
# batch dimension of the gather/scatter, which GSPMD keeps sharded (an explicit row-index iota
# is an ordinary index that it can only serve by gathering the operand).


def _stored_mask(x: jax.Array, local: jax.Array, here: jax.Array) -> jax.Array:
  """Boolean ``[C, V]``, True at the entries each row's teacher stored (of this slice)."""
  spot = jnp.where(here, local, x.shape[-1])  # entries of other slices fall off the end
  return _scatter_rows(jnp.zeros(x.shape, bool), spot, jnp.ones(spot.shape, bool), "set")


def _scatter_rows(base: jax.Array, spot: jax.Array, values: jax.Array, how: str) -> jax.Array:
  """``base[c, spot[c, j]] (how)= values[c, j]`` per row; out-of-range spots are dropped."""
  def one(row, s, v):
    ref = row.at[s]
    return ref.set(v, mode="drop") if how == "set" else ref.add(v, mode="drop")
  return jax.vmap(one)(base, spot, values)


def _kept(x: jax.Array, local: jax.Array, here: jax.Array, axis_name: str | None) -> jax.Array:
  """The student's logits at the stored entries, ``[C, k]``."""
  got = jax.vmap(lambda row, i: row.at[i].get(mode="promise_in_bounds"))(
      x, jnp.where(here, local, 0))
  if axis_name is None:
    return got
  return jax.lax.psum(jnp.where(here, got, 0.0), axis_name)


def _cells(kept: jax.Array, teacher: Teacher,
           outside_lse: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The k + 1 cell log-probs of the student and cell logits of the teacher (stored, then tail).

  The student's cells are normalized here (shifted by their log-sum-exp, which is the row's)
  so that both sides are log-probabilities of like size: the block math then subtracts nearly
  equal numbers of size |log p|, not of size |logits|, and a student equal to the teacher gives
  a divergence at the float32 rounding of the log-probs. The block math is invariant to that
  shift, so its gradient with respect to the shifted cells is the one with respect to the cells.
  """
  lp, _, tail = teacher
  a = jnp.concatenate([kept, outside_lse[:, None]], axis=-1)
  a = log_probs(a, log_normalizer(a))
  return a, jnp.concatenate([lp, tail[:, None]], axis=-1)


def _cell_spec(spec: Spec) -> Spec:
  """The k + 1 cells are whole on every device: their block math reduces over no mesh axis."""
  return spec if spec.vocab_axis is None else dataclasses.replace(spec, vocab_axis=None)


def topk_block_forward(x: jax.Array, teacher: Teacher, spec: Spec) -> tuple[jax.Array, tuple]:
  """Coarsened divergence of student rows from the stored teacher, with its backward's statistics.

  Args:
    x: ``[C, V]`` student logits (this device's vocabulary slice when ``spec.vocab_axis`` is
      set), already upcast, scaled by 1 / T and cleaned of masked rows
      (:func:`klagg_jax._divergence.prepare_block`).
    teacher: ``(log-probs [C, k], indices [C, k] int32 in [0, V), tail [C])`` as made by
      :func:`prepare_teacher`.
    spec: the divergence's static configuration.

  Returns:
    ``(div [C], stats)``: ``stats`` is a tuple of ``[C]`` arrays for :func:`topk_block_backward`:
    the log-sum-exp of the student's logits outside the stored entries, then the statistics of
    the k + 1 cell divergence.
  """
  return _forward(x, teacher, spec, _stored_view(x, teacher, spec))


def _stored_view(x: jax.Array, teacher: Teacher, spec: Spec) -> tuple:
  """(local indices, in this slice, stored mask [C, V], the student's stored logits [C, k])."""
  local, here = _local_indices(x, teacher[1], spec.vocab_axis)
  return local, here, _stored_mask(x, local, here), _kept(x, local, here, spec.vocab_axis)


def _forward(x, teacher, spec, view):
  _, _, stored, kept = view
  outside_lse = log_normalizer(jnp.where(stored, -jnp.inf, x), spec.vocab_axis)
  div, stats = block_forward(*_cells(kept, teacher, outside_lse), _cell_spec(spec))
  return div, (outside_lse, *stats)


def topk_block_backward(x: jax.Array, teacher: Teacher, stats: tuple, spec: Spec) -> jax.Array:
  """d div / d x, ``[C, V]``, recomputed from the ``stats`` of :func:`topk_block_forward`.

  A stored entry gets its cell's gradient; an entry outside gets the tail cell's gradient times
  exp(x_v - lse_outside), its share of the student's tail mass (0 when the tail is empty).
  """
  return _backward(x, teacher, stats, spec, _stored_view(x, teacher, spec))


def _backward(x, teacher, stats, spec, view):
  local, here, stored, kept = view
  outside_lse, *cell_stats = stats
  a, b = _cells(kept, teacher, outside_lse)
  da, _ = block_backward(a, b, cell_stats, _cell_spec(spec))
  no_tail = is_empty_row(outside_lse)[:, None]
  share = jnp.where(stored | no_tail, 0.0, jnp.exp(x - stable_shift(outside_lse)[:, None]))
  spot = jnp.where(here, local, x.shape[-1])
  return _scatter_rows(da[:, -1:] * share, spot, da[:, :-1], "add")


def topk_block_value_and_grad(x: jax.Array, teacher: Teacher,
                              spec: Spec) -> tuple[jax.Array, jax.Array]:
  """(div [C], d div / d x [C, V]) in one pass (the fused scalar kernel's forward)."""
  view = _stored_view(x, teacher, spec)  # the stored entries' scatter and gather, made once
  div, stats = _forward(x, teacher, spec, view)
  return div, _backward(x, teacher, stats, spec, view)


def _top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """``jax.lax.top_k`` along the last axis, written so GSPMD keeps the other axes sharded.

  Shardy has no sharding rule for XLA's ``TopK`` and gathers a batch-sharded operand whole
  (measured on 8 simulated devices: every row block all-gathered). It has one for
  ``ApproxTopK``, which XLA lowers, off TPU and at ``recall_target=1``, to that same exact
  ``TopK`` after partitioning (the same values, indices and tie order, lower index first, and
  the same speed on CPU: tested). On TPU ``ApproxTopK`` is approximate, so TPU takes
  ``lax.top_k``. For k = 1 XLA rewrites ``ApproxTopK`` to an arg-max that breaks ties by the
  higher index, so k = 1 is a max and a first-occurrence argmax here.
  """
  if k == 1:
    return x.max(-1, keepdims=True), jnp.argmax(x, axis=-1, keepdims=True).astype(jnp.int32)
  return jax.lax.platform_dependent(
      x, tpu=lambda x: jax.lax.top_k(x, k),
      default=lambda x: jax.lax.approx_max_k(x, k, recall_target=1.0))


_TOP_K_GROUPS = 64  # vocabulary groups of the two-level top-k (a multiple of any power-of-2 split)


def top_k_rows(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The k largest entries of each row of ``[C, V]`` and their indices, ties by lower index.

  Two levels: the vocabulary is viewed as ``G`` contiguous groups (``[C, G, V / G]``, a free
  reshape; ``G`` a power of two dividing V), each group keeps its own top k, and the ``G k``
  candidates are reduced to the final k. Exact, and when GSPMD has split the vocabulary over
  devices (a power-of-two count dividing ``G``), every group lives on one device: only the
  candidates cross devices, never the logits.
  """
  c, v = x.shape
  groups = _TOP_K_GROUPS
  while groups > 1 and (v % groups or v // groups < k or groups * k >= v):
    groups //= 2
  if groups == 1:
    return _top_k(x, k)
  width = v // groups
  values, index = _top_k(x.reshape(c, groups, width), k)
  index = index + (jnp.arange(groups, dtype=index.dtype) * width)[None, :, None]
  values, pos = _top_k(values.reshape(c, groups * k), k)
  return values, jax.vmap(lambda row, p: row[p])(index.reshape(c, groups * k), pos)


def _gather_columns(x: jax.Array, axis_name: Any) -> jax.Array:
  """``[C, m]`` per device -> ``[C, shards * m]``, every device's block side by side.

  Written as a psum of zero-padded blocks rather than an all-gather so that the result is typed
  as the same on every device (shard_map's replication check; the sums add zeros only).
  """
  shards = jax.lax.psum(1, axis_name)
  blocks = jnp.zeros((x.shape[0], shards, x.shape[1]), x.dtype)
  blocks = jax.lax.dynamic_update_index_in_dim(blocks, x, jax.lax.axis_index(axis_name), axis=1)
  return jax.lax.psum(blocks, axis_name).reshape(x.shape[0], shards * x.shape[1])


def teacher_tail(ref_logprobs: jax.Array) -> jax.Array:
  """log(1 - sum_j exp(lp_j)) without cancellation near 0; -inf where the stored mass is >= 1."""
  k = ref_logprobs.shape[-1]
  lse = log_normalizer(ref_logprobs.reshape(-1, k)).reshape(ref_logprobs.shape[:-1])
  return jnp.log(-jnp.expm1(jnp.minimum(lse, 0.0)))


def prepare_teacher(lp: jax.Array, idx: jax.Array, tail: jax.Array, mask: jax.Array, vocab: int,
                    dtype) -> Teacher:
  """Upcasts one chunk of teacher data; masked rows get harmless values (NaN padding included).

  Indices of valid rows are clipped into [0, V) (out-of-range traced values cannot be checked
  under jit; clipping keeps every gather and scatter in bounds); masked rows get the indices
  0..k-1, log-probs 0 and a -inf tail.
  """
  k = lp.shape[-1]
  lp = jnp.where(mask[:, None], lp.astype(dtype), 0.0)
  idx = jnp.where(mask[:, None], jnp.clip(idx.astype(jnp.int32), 0, vocab - 1),
                  jnp.arange(k, dtype=jnp.int32))
  tail = jnp.where(mask, tail.astype(dtype), -jnp.inf)
  return lp, idx, tail


# ------------------------------------------------------------------------------------------------
# The chunked kernel with its custom VJP (gradient into the student's logits only).


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def topk_rows(a: jax.Array, lp: jax.Array, idx: jax.Array, tail: jax.Array, mask: jax.Array,
              spec: Spec, vocab: int) -> jax.Array:
  """Per-row coarsened divergence of student logits ``a`` [N, V] from teacher data [N, k].

  ``vocab`` is the global vocabulary size (``a`` holds a slice of it when ``spec.vocab_axis``).
  """
  return _rows_fwd(a, lp, idx, tail, mask, spec, vocab)[0]


def _rows_fwd(a, lp, idx, tail, mask, spec, vocab):
  dtype = _checks.compute_dtype(a, lp, tail)

  def body(part, fresh, carry):
    a_c, lp_c, idx_c, tail_c, m_c = part
    div, stats = topk_block_forward(prepare_block(a_c, m_c, spec, dtype),
                                    prepare_teacher(lp_c, idx_c, tail_c, m_c, vocab, dtype), spec)
    return carry, [jnp.where(m_c, div, 0.0), *stats]

  _, outs = scan_row_chunks(body, (a, lp, idx, tail, mask), spec.chunks)
  return outs[0], (a, lp, idx, tail, mask, tuple(outs[1:]))


def _rows_bwd(spec, vocab, residuals, g):
  a, lp, idx, tail, mask, stats = residuals
  dtype = _checks.compute_dtype(a, lp, tail)
  scale = jnp.asarray(spec.inv_temperature, dtype)

  def body(part, fresh, carry):
    a_c, lp_c, idx_c, tail_c, m_c, g_c, *st = part
    dx = topk_block_backward(prepare_block(a_c, m_c, spec, dtype),
                             prepare_teacher(lp_c, idx_c, tail_c, m_c, vocab, dtype), st, spec)
    w = jnp.where(m_c, g_c.astype(dtype) * scale, 0.0)[:, None]
    return carry, [jnp.where(m_c[:, None], w * dx, 0.0).astype(a.dtype)]

  _, grads = scan_row_chunks(body, (a, lp, idx, tail, mask, g, *stats), spec.chunks)
  return grads[0], None, None, None, None


topk_rows.defvjp(_rows_fwd, _rows_bwd)


# ------------------------------------------------------------------------------------------------
# Validation shared by kl_topk and the fused variant.


def _concrete(x: Any) -> np.ndarray | None:
  """``x`` as a numpy array when its values are known at trace time, else None."""
  try:
    return np.asarray(x)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
    return None


def check_k(k: Any, vocab: int, what: str) -> int:
  """Checks that ``k`` is an int in [1, V]."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise ValueError(f"{what} must be a Python int in [1, V] = [1, {vocab}]; got {k!r}.")
  if not 1 <= k <= vocab:
    raise ValueError(f"{what} must lie in [1, V] = [1, {vocab}]; got {k}.")
  return int(k)


def teacher_rows(lead: tuple[int, ...], vocab: int, ref_logprobs: Any, ref_indices: Any,
                 ref_tail: Any, where: Any) -> tuple[jax.Array, jax.Array, jax.Array,
                                                     jax.Array | None]:
  """Validates the stored teacher against the student's positions ``lead`` and vocabulary ``V``.

  Returns:
    ``(ref_logprobs [*lead, k], ref_indices [*lead, k] int32, tail [*lead], mask [*lead] | None)``
    with the teacher's tail computed from the log-probs when ``ref_tail`` is None, and both tails
    -inf (empty) when k = V. No gradient flows into any of them.

  Raises:
    ValueError: for a shape, dtype or range problem, naming the argument and what was seen.
  """
  lp, idx = jnp.asarray(ref_logprobs), jnp.asarray(ref_indices)
  _checks.check_float("ref_logprobs", lp)
  if lp.ndim < 1 or lp.shape[:-1] != lead:
    raise ValueError(
        f"Shape mismatch: ref_logprobs has shape {lp.shape}; expected {lead + ('k',)} "
        f"(the student's positions {lead} and k stored entries).")
  k = lp.shape[-1]
  check_k(k, vocab, "The number of stored entries k (ref_logprobs.shape[-1])")
  if not jnp.issubdtype(idx.dtype, jnp.integer):
    raise ValueError(f"ref_indices must be an integer array; got dtype {idx.dtype}.")
  if idx.shape != lp.shape:
    raise ValueError(f"Shape mismatch: ref_indices has shape {idx.shape} and ref_logprobs has "
                     f"shape {lp.shape}; expected equal shapes.")
  mask = _checks.check_where(where, lead, "positions (logits.shape[:-1])")
  _check_indices_if_static(idx, mask, vocab)
  if ref_tail is None:
    tail = teacher_tail(jax.lax.stop_gradient(lp).astype(_checks.compute_dtype(lp)))
  else:
    tail = jnp.asarray(ref_tail)
    _checks.check_float("ref_tail", tail)
    if tail.shape != lead:
      raise ValueError(f"Shape mismatch: ref_tail has shape {tail.shape}; expected the "
                       f"student's positions {lead}.")
  if k == vocab:  # both tail buckets are empty: they count 0 (and no rounding residue remains)
    tail = jnp.full(lead, -jnp.inf, tail.dtype)
  return (jax.lax.stop_gradient(lp), idx.astype(jnp.int32), jax.lax.stop_gradient(tail), mask)


def _check_indices_if_static(idx: jax.Array, mask: jax.Array | None, vocab: int) -> None:
  """Range and uniqueness of the indices of valid positions, when both are known at trace time."""
  values = _concrete(idx)
  keep = None if mask is None else _concrete(mask)
  if values is None or (mask is not None and keep is None) or values.size == 0:
    return
  values = values.reshape(-1, values.shape[-1])
  if keep is not None:
    values = values[keep.reshape(-1)]
  if values.size == 0:
    return
  lo, hi = int(values.min()), int(values.max())
  if lo < 0 or hi >= vocab:
    bad = lo if lo < 0 else hi
    raise ValueError(f"ref_indices holds {bad}, outside the vocabulary [0, V) = [0, {vocab}); "
                     "expected every index of a valid position in range.")
  ordered = np.sort(values, axis=-1)
  repeated = np.nonzero((ordered[:, 1:] == ordered[:, :-1]).any(-1))[0]
  if repeated.size:
    row = ordered[repeated[0]]
    dup = row[1:][row[1:] == row[:-1]][0]
    raise ValueError(f"ref_indices repeats index {int(dup)} within one position; expected k "
                     "distinct vocabulary indices per position.")


def _spec(direction, beta, temperature, chunks: Chunking) -> tuple[Spec, float | None]:
  direction, beta = resolve_direction(direction, beta)
  temp = _checks.check_positive_if_static("temperature", temperature)
  spec = Spec(direction=direction, beta=beta, inv_temperature=1.0 if temp is None else 1.0 / temp,
              chunks=chunks, ref_grad=False)
  return spec, temp


# ------------------------------------------------------------------------------------------------
# The plain (implementation="xla") composition of kl_topk, differentiated by JAX.


def xla_topk_rows(a: jax.Array, lp: jax.Array, idx: jax.Array, tail: jax.Array,
                  mask: jax.Array, spec: Spec, vocab: int) -> jax.Array:
  """:func:`topk_rows` as one differentiable composition (no custom VJP, no loop)."""
  dtype = _checks.compute_dtype(a, lp, tail)
  x = prepare_block(a, mask, spec, dtype)
  return _xla_cells_divergence(x, prepare_teacher(lp, idx, tail, mask, vocab, dtype), mask, spec)


def _xla_cells_divergence(x: jax.Array, teacher: Teacher, mask: jax.Array, spec: Spec):
  local, here = _local_indices(x, teacher[1], spec.vocab_axis)
  outside = jnp.where(_stored_mask(x, local, here), -jnp.inf, x)
  a, b = _cells(_kept(x, local, here, spec.vocab_axis),
                teacher, log_normalizer(outside, spec.vocab_axis))
  cell_spec = dataclasses.replace(_cell_spec(spec), inv_temperature=1.0)
  return _xla.divergence_rows(a, b, mask, cell_spec)


# ------------------------------------------------------------------------------------------------
# Public API.


def topk_logprobs(ref_logits: jax.typing.ArrayLike, k: int, *,
                  temperature: float | jax.Array = 1.0, chunk_size: int | None = None,
                  partition: _sharding.Partition | None = None,
                  implementation: str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """What to store of a teacher per position: its top-k log-probs, their indices, its tail.

  With r = softmax(ref_logits / T): the k largest log r_v sorted by decreasing probability (ties
  by lower index), their vocabulary indices, and tail = log sum_{v not kept} r_v, computed as a
  log-sum-exp over the entries not kept, so it is exact where that mass is tiny (1e-30, where
  1 - sum exp(logprobs) rounds to 0 in float32) and -inf when k = V. Computed chunk by chunk in
  float32: nothing ``[N, V]`` beyond the input is held.

  Args:
    ref_logits: teacher logits ``[..., V]``, any float dtype.
    k: entries kept per position, a Python int in [1, V].
    temperature: T > 0 dividing the logits (store at the temperature you distill at).
    chunk_size: at most this many positions per block; ``None`` lets the library choose.
    partition: a :class:`klagg_jax.Partition` (batch and vocabulary mesh axes) to run each
      device's blocks in a ``shard_map``; a split vocabulary merges the devices' top-k
      candidates (k per row and device), never the logits. Not needed under GSPMD or on
      ``Explicit`` axes (see :func:`kl_per_position`).
    implementation: ``None`` / ``"chunked"`` (blocks of rows) or ``"xla"`` (one block).

  Returns:
    ``(logprobs [..., k] float32, indices [..., k] int32, tail [...] float32)`` (float64 values
    for float64 input with x64 enabled); feed them to :func:`kl_topk` as ``ref_logprobs``,
    ``ref_indices`` and ``ref_tail``.

  Raises:
    ValueError: for a non-float input, V == 0, k not an int in [1, V], a static temperature <= 0.

  Example:
    >>> logprobs, indices, tail = ka.topk_logprobs(teacher_logits, 32)  # store these
    >>> loss = ka.kl_topk(student_logits, logprobs, indices, ref_tail=tail).mean()
  """
  x = jnp.asarray(ref_logits)
  _checks.check_float("ref_logits", x)
  _checks.check_vocab("ref_logits", x)
  lead, vocab = x.shape[:-1], x.shape[-1]
  k = check_k(k, vocab, "k")
  temp = _checks.check_positive_if_static("temperature", temperature)
  impl = _config.implementation(implementation)
  chunks = chunking(chunk_size, vocab)
  dtype = _checks.compute_dtype(x)
  n = math.prod(lead)
  if n == 0:
    return (jnp.zeros(lead + (k,), dtype), jnp.zeros(lead + (k,), jnp.int32),
            jnp.zeros(lead, dtype))
  layout = _sharding.resolve(partition, lead, vocab, position_inputs=(x,),
                             vocab_inputs=((x, -1),))
  t = None if temp is not None else jnp.asarray(temperature)
  kernel = functools.partial(_topk_logprobs_local, k=k, inv_t=None if temp is None else 1.0 / temp,
                             chunks=chunks, impl=impl, dtype=dtype, vocab=vocab,
                             vocab_axis=None if layout is None else layout.vocab)
  if layout is None:
    return kernel(x, t)
  return _sharding.shard(kernel, layout, (x, t), (layout.logits(), layout.scalar()),
                         out_specs=(layout.rows(), layout.rows(), layout.positions()))


def _topk_logprobs_local(x, temperature, *, k, inv_t, chunks, impl, dtype, vocab, vocab_axis):
  """:func:`topk_logprobs` on (per-device) blocks; a sharded vocabulary merges per-device top-k."""
  lead, width = x.shape[:-1], x.shape[-1]
  n = math.prod(lead)

  def body(part, fresh, carry):
    x_c = part[0].astype(dtype)
    x_c = x_c * jnp.asarray(inv_t, dtype) if inv_t is not None else x_c / temperature
    lse = log_normalizer(x_c, vocab_axis)
    values, indices = top_k_rows(x_c, min(k, width))
    if vocab_axis is not None:  # merge the shards' candidates: [C, k] per shard, not logits
      indices = indices + jax.lax.axis_index(vocab_axis) * width
      values, indices = (_gather_columns(t, vocab_axis) for t in (values, indices))
      values, pos = jax.lax.top_k(values, k)
      indices = jnp.take_along_axis(indices, pos, axis=1)
    local, here = _local_indices(x_c, indices, vocab_axis)
    outside = log_normalizer(jnp.where(_stored_mask(x_c, local, here), -jnp.inf, x_c),
                             vocab_axis)
    shift = stable_shift(lse)
    return carry, [values - shift[:, None], indices.astype(jnp.int32), outside - shift]

  if impl == "xla":
    chunks = Chunking(n, vocab)  # one block: the plain composition
  _, (values, indices, tail) = scan_row_chunks(body, (x.reshape(n, width),), chunks)
  return values.reshape(lead + (k,)), indices.reshape(lead + (k,)), tail.reshape(lead)


def kl_topk(logits: jax.typing.ArrayLike, ref_logprobs: jax.typing.ArrayLike,
            ref_indices: jax.typing.ArrayLike, ref_tail: jax.typing.ArrayLike | None = None, *,
            direction: str = "forward", where: jax.typing.ArrayLike | None = None,
            temperature: float | jax.Array = 1.0, beta: float = 0.5,
            chunk_size: int | None = None, partition: _sharding.Partition | None = None,
            implementation: str | None = None) -> jax.Array:
  """Divergence between the student and a stored top-k teacher, both coarsened to k + 1 cells.

  With p = softmax(logits / T) and the teacher's stored log-probs lr_j at indices i_j: the cells
  are the k stored entries and one tail bucket, P = (p_{i_1}, ..., p_{i_k}, sum_{v not stored} p_v)
  and R = (e^{lr_1}, ..., e^{lr_k}, e^{ref_tail}), R renormalized to sum 1; then
  ``"forward"`` (default): KL(R || P) = sum_c R_c (log R_c - log P_c), the usual distillation loss;
  ``"reverse"``: KL(P || R); ``"js"``: beta KL(R || M) + (1 - beta) KL(P || M),
  M = (1 - beta) P + beta R (beta = 0 is exactly KL(R || P), beta = 1 exactly KL(P || R)).

  A true divergence (>= 0, 0 iff P = R), a lower bound of the full-vocabulary divergence (data
  processing inequality), equal to it when k = V (empty tail buckets count 0) and, forward, when
  the teacher's tail mass is 0. The student's tail is a log-sum-exp over the entries not stored;
  the teacher's is ``ref_tail`` when given (pass the one :func:`topk_logprobs` returns: it stays
  exact where the mass is 1e-30), else log(-expm1(logsumexp(ref_logprobs))). The temperature
  divides the student's logits only: store the teacher at the temperature you distill at. Computed
  chunk by chunk in float32 with a custom VJP that recomputes: only the student's logits and their
  gradient are ever ``[N, V]``. Gradient flows into ``logits`` only.

  Args:
    logits: student logits ``[..., V]``, any float dtype.
    ref_logprobs: the teacher's stored log-probs ``[..., k]``, 1 <= k <= V, any float dtype.
    ref_indices: their vocabulary indices ``[..., k]``, integers in [0, V), distinct per position
      (checked when known at trace time; out-of-range traced values are clipped).
    ref_tail: optional log of the teacher's mass outside the stored entries ``[...]`` (may be
      passed positionally: ``kl_topk(logits, *topk_logprobs(teacher_logits, k))``).
    direction: ``"forward"``, ``"reverse"`` or ``"js"``.
    where: optional bool ``[...]``: False positions give exactly 0 and a zero gradient, even
      where their logits, log-probs, indices or tails are garbage (NaN, inf, out of range).
    temperature: T > 0 dividing the student's logits; may be traced (then differentiable).
    beta: weight of the teacher in ``"js"``, a static number in [0, 1].
    chunk_size: at most this many positions per block; ``None`` lets the library choose.
    partition: a :class:`klagg_jax.Partition` for a ``shard_map`` over batch and vocabulary
      (the teacher's arrays follow the batch); not needed under GSPMD or on ``Explicit`` axes.
    implementation: ``None`` / ``"chunked"`` (custom VJP) or ``"xla"`` (the plain composition,
      differentiated by JAX: supports forward-mode AD).

  Returns:
    float32 array of shape ``logits.shape[:-1]`` (float64 for float64 inputs with x64 on).

  Raises:
    ValueError: for a shape mismatch between the student's positions and the teacher's arrays,
      k outside [1, V], non-integer or (where static) out-of-range or repeated indices, V == 0,
      an unknown direction, beta outside [0, 1], a static temperature <= 0, a bad ``where`` or
      ``chunk_size``.

  Example:
    >>> lp, idx, tail = ka.topk_logprobs(teacher_logits, 32)        # offline, stored
    >>> kl = ka.kl_topk(student_logits, lp, idx, ref_tail=tail, where=mask)  # [B, T]
    >>> loss = ka.mean(kl, where=mask).mean()                         # per sequence, then batch

  References:
    Hinton, Vinyals and Dean, "Distilling the knowledge in a neural network" (2015); Agarwal et
    al., "On-policy distillation of language models" (generalized JSD, 2024).
  """
  logits = jnp.asarray(logits)
  _checks.check_float("logits", logits)
  _checks.check_vocab("logits", logits)
  lead, vocab = logits.shape[:-1], logits.shape[-1]
  lp, idx, tail, mask = teacher_rows(lead, vocab, ref_logprobs, ref_indices, ref_tail, where)
  spec, temp = _spec(direction, beta, temperature, chunking(chunk_size, vocab))
  impl = _config.implementation(implementation)
  dtype = _checks.compute_dtype(logits, lp, tail)
  if math.prod(lead) == 0:
    return jnp.zeros(lead, dtype)
  layout = _sharding.resolve(partition, lead, vocab,
                             position_inputs=(logits, lp, idx, tail, mask),
                             vocab_inputs=((logits, -1),))
  t = None if temp is not None else jnp.asarray(temperature)
  kernel = functools.partial(_kl_topk_local, spec=spec, impl=impl, dtype=dtype, vocab=vocab,
                             vocab_axis=None if layout is None else layout.vocab)
  args = (logits, lp, idx, tail, mask, t)
  if layout is None:
    return kernel(*args)
  return _sharding.shard(kernel, layout, args,
                         (layout.logits(), layout.rows(), layout.rows(), layout.positions(),
                          layout.positions(), layout.scalar()))


def _kl_topk_local(logits, lp, idx, tail, mask, temperature, *, spec, impl, dtype, vocab,
                   vocab_axis):
  """:func:`kl_topk` on (per-device) blocks."""
  lead, width = logits.shape[:-1], logits.shape[-1]
  n, k = math.prod(lead), lp.shape[-1]
  a = logits.reshape(n, width)
  mask = jnp.ones((n,), bool) if mask is None else mask.reshape(n)
  if temperature is not None:  # traced: scale outside the kernel so autodiff sees it
    a = divide_by_traced_temperature(a, mask, temperature, dtype)
  spec = dataclasses.replace(spec, vocab_axis=vocab_axis)
  rows = xla_topk_rows if impl == "xla" else topk_rows
  out = rows(a, lp.reshape(n, k), idx.reshape(n, k), tail.reshape(n), mask, spec, vocab)
  return out.reshape(lead)


# ------------------------------------------------------------------------------------------------
# Fused with the LM head: the student's logits are made per block by klagg_jax._fused.


@dataclasses.dataclass(frozen=True)
class TopkReference:
  """The stored top-k teacher as the reference side of :mod:`klagg_jax._fused`'s kernels.

  Row data: ``(log-probs [N, k], indices [N, k], tail [N])``; no constants. ``vocab`` is the
  global vocabulary size.
  """
  spec: Spec
  vocab: int

  def _teacher(self, logits, ref_rows, mask):
    return prepare_teacher(*ref_rows, mask, self.vocab, logits.dtype)

  def forward(self, logits, ref_rows, ref_consts, mask):
    return topk_block_forward(logits, self._teacher(logits, ref_rows, mask), self.spec)

  def backward(self, logits, ref_rows, ref_consts, stats, mask):
    return topk_block_backward(logits, self._teacher(logits, ref_rows, mask), stats, self.spec)

  def value_and_grad(self, logits, ref_rows, ref_consts, mask):
    return topk_block_value_and_grad(logits, self._teacher(logits, ref_rows, mask), self.spec)

  def xla(self, logits, ref_rows, ref_consts, mask):
    return _xla_cells_divergence(logits, self._teacher(logits, ref_rows, mask), mask, self.spec)


def fused_linear_kl_topk(hidden: jax.typing.ArrayLike, weight: jax.typing.ArrayLike,
                         ref_logprobs: jax.typing.ArrayLike, ref_indices: jax.typing.ArrayLike,
                         ref_tail: jax.typing.ArrayLike | None = None, *,
                         bias: jax.typing.ArrayLike | None = None, weight_layout: str = "dv",
                         direction: str = "forward", where: jax.typing.ArrayLike | None = None,
                         temperature: float = 1.0, beta: float = 0.5,
                         chunk_size: int | None = None, reduction: str | None = None,
                         accum_dtype: Any = jnp.float32, precision: Any = None,
                         partition: _sharding.Partition | None = None,
                         implementation: str | None = None) -> jax.Array:
  """:func:`kl_topk` of the logits ``hidden @ weight + bias``, never materializing them.

  Same value as ``kl_topk(hidden @ weight + bias, ref_logprobs, ref_indices, ...)``: both
  distributions coarsened onto the k stored entries and one tail bucket, ``"forward"`` (default)
  KL(R || P), ``"reverse"`` KL(P || R), ``"js"`` beta KL(R || M) + (1 - beta) KL(P || M). The
  ``[N, V]`` logits are made ``chunk_size`` rows at a time in the forward and again in the
  backward pass, where the gradients with respect to ``hidden``, ``weight`` and ``bias`` are
  formed chunk by chunk (the weight gradient accumulated); the teacher's data get no gradient.

  Args:
    hidden: student hidden states ``[..., D]``, any float dtype.
    weight: student output projection, ``[D, V]`` (Flax ``Dense`` kernel) or ``[V, D]`` (tied
      embedding, with ``weight_layout="vd"``).
    ref_logprobs: the teacher's stored log-probs ``[..., k]``, 1 <= k <= V.
    ref_indices: their vocabulary indices ``[..., k]``, integers in [0, V), distinct per position.
    ref_tail: optional log of the teacher's mass outside the stored entries ``[...]``.
    bias: optional student bias ``[V]``.
    weight_layout: ``"dv"`` or ``"vd"``.
    direction: ``"forward"``, ``"reverse"`` or ``"js"``.
    where: optional bool ``[...]`` of positions to keep (masked: exactly 0, zero gradient).
    temperature: static T > 0 dividing the student's logits.
    beta: weight of the teacher in ``"js"``, static in [0, 1].
    chunk_size: at most this many rows per block; ``None`` lets the library choose.
    reduction: ``None`` (per position, 6 matmuls), ``"mean"`` (over valid positions) or
      ``"sum"``: a scalar whose gradient is formed in the forward pass (4 matmuls).
    accum_dtype: dtype of the ``d weight`` / ``d bias`` accumulators (float32 by default).
    precision: a ``jax.lax.Precision`` or its name for every matmul; None follows JAX's default.
    partition: a :class:`klagg_jax.Partition` (``vocab_axis`` splits the weight's V axis) for a
      ``shard_map``; not needed under GSPMD or on ``Explicit`` axes.
    implementation: ``None`` / ``"chunked"``, or ``"xla"`` (materializes the logits).

  Returns:
    float32 array of shape ``hidden.shape[:-1]``, or a scalar for a ``reduction``.

  Raises:
    ValueError: for mismatched shapes (naming them), k outside [1, V], non-integer or (where
      static) out-of-range or repeated indices, an unknown direction or layout, beta outside
      [0, 1], a traced or non-positive temperature, a bad ``where`` or ``chunk_size``.

  Example:
    >>> kl = ka.fused_linear_kl_topk(h, params["lm_head"]["kernel"], lp, idx, ref_tail=tail)
  """
  hidden, weight = jnp.asarray(hidden), jnp.asarray(weight)
  bias = None if bias is None else jnp.asarray(bias)
  _checks.check_choice("weight_layout", weight_layout, _fused.WEIGHT_LAYOUTS)
  vocab = _fused.check_linear(hidden, weight, bias, weight_layout)
  lead = hidden.shape[:-1]
  lp, idx, tail, mask = teacher_rows(lead, vocab, ref_logprobs, ref_indices, ref_tail, where)
  spec, _ = _spec(direction, beta, _fused.static_temperature(temperature, "fused_linear_kl_topk"),
                  chunking(chunk_size, vocab, fused=True))
  reduction = _fused.check_reduction(reduction)
  config = dict(accum_dtype=_fused.resolve_accum_dtype(accum_dtype),
                precision=_fused.resolve_precision(precision),
                impl=_config.implementation(implementation))
  n = math.prod(lead)
  if n == 0:
    return _fused.empty_result(lead, reduction, _checks.compute_dtype(hidden, weight))
  v_axis = 1 if weight_layout == "dv" else 0
  layout = _sharding.resolve(partition, lead, vocab,
                             position_inputs=(hidden, lp, idx, tail, mask),
                             vocab_inputs=((weight, v_axis), (bias, 0)))
  kernel = functools.partial(_fused_topk_local, spec=spec, vocab=vocab,
                             weight_layout=weight_layout, reduction=reduction,
                             vocab_axis=None if layout is None else layout.vocab, **config)
  args = (hidden, weight, bias, lp, idx, tail, mask)
  specs = vary = None
  if layout is not None:  # as fused_linear_kl: partial gradients psum-ed by shard_map's transpose
    w_spec, b_spec = layout.vocab_matrix(weight_layout), layout.vocab_vector()
    specs = (layout.rows(), w_spec, b_spec, layout.rows(), layout.rows(), layout.positions(),
             layout.positions())
    vary = (layout.vocab_axes, layout.lead_axes, layout.lead_axes, (), (), (), ())
  out = _fused.run(kernel, layout, args, specs, vary, reduction)
  return _fused.finish(out, reduction, mask, n, layout)


def _fused_topk_local(hidden, weight, bias, lp, idx, tail, mask, *, spec, vocab, weight_layout,
                      reduction, accum_dtype, precision, impl, vocab_axis):
  """:func:`fused_linear_kl_topk` on (per-device) blocks."""
  lead = hidden.shape[:-1]
  n, k = math.prod(lead), lp.shape[-1]
  spec = dataclasses.replace(spec, vocab_axis=vocab_axis)
  fused_spec = _fused.FusedSpec(chunks=spec.chunks, weight_layout=weight_layout,
                                inv_temperature=spec.inv_temperature,
                                block=TopkReference(spec, vocab), precision=precision,
                                accum_dtype=accum_dtype)
  mask = jnp.ones((n,), bool) if mask is None else mask.reshape(n)
  ref_rows = (lp.reshape(n, k), idx.reshape(n, k), tail.reshape(n))
  out = _fused.apply(hidden.reshape(n, -1), weight, bias, ref_rows, (), mask, fused_spec,
                     reduction=reduction, implementation=impl)
  return out if reduction is not None else out.reshape(lead)
