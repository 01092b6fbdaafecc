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

from klagg_jax import _checks, _fused
from klagg_jax._chunked import resolve_chunk_rows, scan_row_chunks
from klagg_jax._divergence import (Spec, block_backward, block_forward,
                                   divide_by_traced_temperature, log_normalizer, prepare_block,
                                   resolve_direction)

Teacher = tuple[jax.Array, jax.Array, jax.Array]  # (log-probs [C, k], indices [C, k], tail [C])


# ------------------------------------------------------------------------------------------------
# Block math on a [chunk, V] block of (prepared) student logits and the chunk's teacher data.


def _stored_mask(x: jax.Array, idx: jax.Array) -> jax.Array:
  """Boolean ``[C, V]``, True at the entries each row's teacher stored."""
  rows = jnp.arange(x.shape[0])[:, None]
  return jnp.zeros(x.shape, bool).at[rows, idx].set(True, mode="promise_in_bounds")


def _cells(x: jax.Array, teacher: Teacher, outside_lse: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The k + 1 cell log-probs of the student and cell logits of the teacher (stored, then tail).

  The student's cells are normalized here (shifted by their log-sum-exp, which is the row's)
  so that both sides are log-probabilities of like size: the block math then subtracts nearly
  equal numbers of size |log p|, not of size |logits|, and a student equal to the teacher gives
  a divergence at the float32 rounding of the log-probs. The block math is invariant to that
  shift, so its gradient with respect to the shifted cells is the one with respect to the cells.
  """
  lp, idx, tail = teacher
  kept = jnp.take_along_axis(x, idx, axis=-1, mode="promise_in_bounds")
  a = jnp.concatenate([kept, outside_lse[:, None]], axis=-1)
  lse = log_normalizer(a)
  a = a - jnp.where(jnp.isfinite(lse), lse, 0.0)[:, None]
  return a, jnp.concatenate([lp, tail[:, None]], axis=-1)


def topk_block_forward(x: jax.Array, teacher: Teacher, spec: Spec) -> tuple[jax.Array, tuple]:
  """Coarsened divergence of student rows from the stored teacher, with its backward's statistics.

  Args:
    x: ``[C, V]`` student logits, already upcast, scaled by 1 / T and cleaned of masked rows
      (:func:`klagg_jax._divergence.prepare_block`).
    teacher: ``(log-probs [C, k], indices [C, k] int32 in [0, V), tail [C])`` as made by
      :func:`prepare_teacher`.
    spec: the divergence's static configuration (``spec.vocab_axis`` must be None).

  Returns:
    ``(div [C], stats)``: ``stats`` is a tuple of ``[C]`` arrays for :func:`topk_block_backward`:
    the log-sum-exp of the student's logits outside the stored entries, then the statistics of
    the k + 1 cell divergence.
  """
  outside_lse = log_normalizer(jnp.where(_stored_mask(x, teacher[1]), -jnp.inf, x))
  a, b = _cells(x, teacher, outside_lse)
  div, stats = block_forward(a, b, spec)
  return div, (outside_lse, *stats)


def topk_block_backward(x: jax.Array, teacher: Teacher, stats: tuple, spec: Spec) -> jax.Array:
  """d div / d x, ``[C, V]``, recomputed from the ``stats`` of :func:`topk_block_forward`.

  A stored entry gets its cell's gradient; an entry outside gets the tail cell's gradient times
  exp(x_v - lse_outside), its share of the student's tail mass (0 when the tail is empty).
  """
  outside_lse, *cell_stats = stats
  stored = _stored_mask(x, teacher[1])
  a, b = _cells(x, teacher, outside_lse)
  da, _ = block_backward(a, b, cell_stats, spec)
  has_tail = (outside_lse > -jnp.inf)[:, None]
  shift = jnp.where(has_tail, outside_lse[:, None], 0.0)
  share = jnp.where(stored | ~has_tail, 0.0, jnp.exp(x - shift))
  rows = jnp.arange(x.shape[0])[:, None]
  return (da[:, -1:] * share).at[rows, teacher[1]].add(da[:, :-1], mode="promise_in_bounds")


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def topk_rows(a: jax.Array, lp: jax.Array, idx: jax.Array, tail: jax.Array, mask: jax.Array,
              spec: Spec) -> jax.Array:
  """Per-row coarsened divergence of student logits ``a`` [N, V] from teacher data [N, k]."""
  return _rows_fwd(a, lp, idx, tail, mask, spec)[0]


def _rows_fwd(a, lp, idx, tail, mask, spec):
  dtype = _checks.compute_dtype(a, lp, tail)
  vocab = a.shape[-1]

  def body(part, fresh, carry):
    a_c, lp_c, idx_c, tail_c, m_c = part
    div, stats = topk_block_forward(prepare_block(a_c, m_c, spec, dtype),
                                    prepare_teacher(lp_c, idx_c, tail_c, m_c, vocab, dtype), spec)
    return carry, [jnp.where(m_c, div, 0.0), *stats]

  _, outs = scan_row_chunks(body, (a, lp, idx, tail, mask), spec.chunk)
  return outs[0], (a, lp, idx, tail, mask, tuple(outs[1:]))


def _rows_bwd(spec, residuals, g):
  a, lp, idx, tail, mask, stats = residuals
  dtype = _checks.compute_dtype(a, lp, tail)
  vocab = a.shape[-1]
  scale = jnp.asarray(spec.inv_temperature, dtype)

  def body(part, fresh, carry):
    a_c, lp_c, idx_c, tail_c, m_c, g_c, *st = part
    dx = topk_block_backward(prepare_block(a_c, m_c, spec, dtype),
                             prepare_teacher(lp_c, idx_c, tail_c, m_c, vocab, dtype), st, spec)
    w = jnp.where(m_c, g_c.astype(dtype) * scale, 0.0)[:, None]
    return carry, [jnp.where(m_c[:, None], w * dx, 0.0).astype(a.dtype)]

  _, grads = scan_row_chunks(body, (a, lp, idx, tail, mask, g, *stats), spec.chunk)
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


def _setup(direction, beta, temperature, chunk_size, n, vocab) -> tuple[Spec | None, float | None]:
  direction, beta = resolve_direction(direction, beta)
  temp = _checks.check_positive_if_static("temperature", temperature)
  chunk = resolve_chunk_rows(chunk_size, max(n, 1), vocab)
  spec = Spec(direction=direction, beta=beta, inv_temperature=1.0 if temp is None else 1.0 / temp,
              chunk=chunk, ref_grad=False)
  return spec, temp


# ------------------------------------------------------------------------------------------------
# Public API.


def topk_logprobs(ref_logits: jax.typing.ArrayLike, k: int, *,
                  temperature: float | jax.Array = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
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
  dtype = _checks.compute_dtype(x)
  n = math.prod(lead)
  if n == 0:
    return (jnp.zeros(lead + (k,), dtype), jnp.zeros(lead + (k,), jnp.int32),
            jnp.zeros(lead, dtype))
  inv_t = None if temp is None else 1.0 / temp

  def body(part, fresh, carry):
    x_c = part[0].astype(dtype)
    x_c = x_c * jnp.asarray(inv_t, dtype) if inv_t is not None else x_c / temperature
    lse = log_normalizer(x_c)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)[:, None]
    values, indices = jax.lax.top_k(x_c, k)
    outside = log_normalizer(jnp.where(_stored_mask(x_c, indices), -jnp.inf, x_c))
    return carry, [values - lse, indices.astype(jnp.int32), outside - lse[:, 0]]

  chunk = resolve_chunk_rows(None, n, vocab)
  _, (values, indices, tail) = scan_row_chunks(body, (x.reshape(n, vocab),), chunk)
  return values.reshape(lead + (k,)), indices.reshape(lead + (k,)), tail.reshape(lead)


def kl_topk(logits: jax.typing.ArrayLike, ref_logprobs: jax.typing.ArrayLike,
            ref_indices: jax.typing.ArrayLike, *, ref_tail: jax.typing.ArrayLike | None = None,
            direction: str = "forward", where: jax.typing.ArrayLike | None = None,
            temperature: float | jax.Array = 1.0, beta: float = 0.5,
            chunk_size: int | None = None) -> jax.Array:
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
    ref_tail: optional log of the teacher's mass outside the stored entries ``[...]``.
    direction: ``"forward"``, ``"reverse"`` or ``"js"``.
    where: optional bool ``[...]``: False positions give exactly 0 and a zero gradient, even
      where their logits, log-probs, indices or tails are garbage (NaN, inf, out of range).
    temperature: T > 0 dividing the student's logits; may be traced (then differentiable).
    beta: weight of the teacher in ``"js"``, a static number in [0, 1].
    chunk_size: positions per chunk; ``None`` lets the library choose (memory-bounded).

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
  n = math.prod(lead)
  spec, temp = _setup(direction, beta, temperature, chunk_size, n, vocab)
  dtype = _checks.compute_dtype(logits, lp, tail)
  if n == 0:
    return jnp.zeros(lead, dtype)
  a = logits.reshape(n, vocab)
  k = lp.shape[-1]
  mask = jnp.ones((n,), bool) if mask is None else mask.reshape(n)
  if temp is None:  # traced temperature: scale outside the kernel so autodiff sees it
    a = divide_by_traced_temperature(a, mask, temperature, dtype)
  out = topk_rows(a, lp.reshape(n, k), idx.reshape(n, k), tail.reshape(n), mask, spec)
  return out.reshape(lead)


# ------------------------------------------------------------------------------------------------
# Fused with the LM head: the student's logits are made per chunk by klagg_jax._fused.


@dataclasses.dataclass(frozen=True)
class TopkReference:
  """The stored top-k teacher as the reference side of :func:`klagg_jax._fused.fused_rows`.

  Row data: ``(log-probs [N, k], indices [N, k], tail [N])``; no constants.
  """
  spec: Spec
  vocab: int

  def forward(self, logits, ref_rows, ref_consts, mask):
    teacher = prepare_teacher(*ref_rows, mask, self.vocab, logits.dtype)
    return topk_block_forward(logits, teacher, self.spec)

  def backward(self, logits, ref_rows, ref_consts, stats, mask):
    teacher = prepare_teacher(*ref_rows, mask, self.vocab, logits.dtype)
    return topk_block_backward(logits, teacher, stats, self.spec)


def fused_linear_kl_topk(hidden: jax.typing.ArrayLike, weight: jax.typing.ArrayLike,
                         ref_logprobs: jax.typing.ArrayLike, ref_indices: jax.typing.ArrayLike, *,
                         ref_tail: jax.typing.ArrayLike | None = None,
                         bias: jax.typing.ArrayLike | None = None, weight_layout: str = "dv",
                         direction: str = "forward", where: jax.typing.ArrayLike | None = None,
                         temperature: float = 1.0, beta: float = 0.5,
                         chunk_size: int | None = None) -> jax.Array:
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
    chunk_size: rows per chunk; ``None`` lets the library choose.

  Returns:
    float32 array of shape ``hidden.shape[:-1]``.

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
  n = math.prod(lead)
  spec, temp = _setup(direction, beta, temperature, chunk_size, n, vocab)
  if temp is None:
    raise ValueError("fused_linear_kl_topk needs a static temperature (a Python number); got a "
                     "traced value. Scale hidden or weight instead.")
  if n == 0:
    return jnp.zeros(lead, _checks.compute_dtype(hidden, weight))
  chunk = (_fused.default_fused_chunk(n, vocab) if chunk_size is None else spec.chunk)
  spec = dataclasses.replace(spec, chunk=chunk)
  fused_spec = _fused.FusedSpec(chunk=chunk, weight_layout=weight_layout,
                                inv_temperature=spec.inv_temperature,
                                block=TopkReference(spec, vocab))
  k = lp.shape[-1]
  mask = jnp.ones((n,), bool) if mask is None else mask.reshape(n)
  ref_rows = (lp.reshape(n, k), idx.reshape(n, k), tail.reshape(n))
  out = _fused.fused_rows(hidden.reshape(n, -1), weight, bias, ref_rows, (), mask, fused_spec)
  return out.reshape(lead)
