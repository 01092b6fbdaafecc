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
:mod:`klagg_jax._ops.divergence.base`, and maps the cells' gradient back onto the vocabulary: a stored
entry takes its cell's gradient, an entry outside takes the tail cell's gradient times its share
of the student's tail mass. The chunked kernel and the fused (hidden-state) kernel reuse the same two block functions.

Conventions (pinned by tests): 0 log 0 = 0, so empty tail buckets (k = V) and ``-inf`` entries
count 0; masked rows are replaced by harmless values before any arithmetic, so they give exactly
0 and a gradient of exactly 0 whatever garbage they hold (NaN log-probs, indices out of range);
the teacher's k + 1 masses are renormalized to sum to 1 (a no-op up to rounding for what
:func:`topk_logprobs` stores; it keeps the divergence >= 0 when they were stored rounded, e.g. in
bfloat16); no gradient flows into the teacher's data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from klagg_jax._numerics import is_empty_row, stable_shift
from klagg_jax._ops.divergence.base import (Spec, block_backward, block_forward, log_normalizer,
                                            log_probs)

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
      (:func:`klagg_jax._ops.divergence.base.prepare`).
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


@dataclasses.dataclass(frozen=True)
class TopkSpec:
  """Static configuration of the top-k kernel: the divergence's spec and the global V."""
  div: Spec
  vocab: int

  @property
  def chunks(self):
    return self.div.chunks


def logprobs_block(x: jax.Array, k: int, vocab_axis: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(top-k log-probs [C, k], their global indices [C, k] int32, tail [C]) of transformed rows.

  ``-0.0`` counts as ``0.0`` (ties by lower index, whatever the zero's sign).
  """
  x = jnp.where(x == 0, jnp.zeros((), x.dtype), x)
  width = x.shape[-1]
  lse = log_normalizer(x, vocab_axis)
  values, indices = top_k_rows(x, min(k, width))
  if vocab_axis is not None:  # merge the shards' candidates: [C, k] per shard, not logits
    indices = indices + jax.lax.axis_index(vocab_axis) * width
    values, indices = (_gather_columns(t, vocab_axis) for t in (values, indices))
    values, pos = jax.lax.top_k(values, k)
    indices = jnp.take_along_axis(indices, pos, axis=1)
  local, here = _local_indices(x, indices, vocab_axis)
  outside = log_normalizer(jnp.where(_stored_mask(x, local, here), -jnp.inf, x), vocab_axis)
  shift = stable_shift(lse)
  return values - shift[:, None], indices.astype(jnp.int32), outside - shift
