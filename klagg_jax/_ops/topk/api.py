"""Top-k distillation's public entry points: validation, transform, dispatch.

:func:`topk_logprobs` stores what a teacher's pass keeps; :func:`kl_topk` distills a student
from it. :data:`IMPLEMENTATIONS` (``rows(a, lp, idx, tail, mask, spec) -> [N]``) and
:data:`LOGPROBS_IMPLEMENTATIONS` (``rows(x, k, spec) -> (values, indices, tail)``) name the
implementations for :mod:`klagg_jax._ops.registry`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from klagg_jax import _checks, _sharding
from klagg_jax._chunked import Chunking, chunking
from klagg_jax._ops import compiled, registry, transform
from klagg_jax._ops.divergence.base import Spec, resolve_direction
from klagg_jax._ops.topk import chunked, xla
from klagg_jax._ops.topk.base import TopkSpec, teacher_tail

IMPLEMENTATIONS = {"chunked": chunked.topk_rows, "xla": xla.topk_rows}
LOGPROBS_IMPLEMENTATIONS = {"chunked": chunked.logprobs_rows, "xla": xla.logprobs_rows}


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


def check_indices_if_static(lead: tuple[int, ...], vocab: int, ref_indices: Any,
                            where: Any) -> None:
  """:func:`_check_indices_if_static` before any ``jit``, where the values are still concrete."""
  idx = jnp.asarray(ref_indices)
  if (not jnp.issubdtype(idx.dtype, jnp.integer) or idx.shape[:-1] != tuple(lead)
      or not 1 <= idx.shape[-1] <= vocab):
    return  # teacher_rows says what is wrong
  _check_indices_if_static(idx, _checks.check_where(where, lead, "positions (logits.shape[:-1])"),
                           vocab)


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


def make_spec(direction, beta, temperature, chunks: Chunking,
              softcap: float | None) -> tuple[Spec, float | None]:
  """The divergence spec of the cells (no gradient into the teacher) and the static T or None."""
  direction, beta = resolve_direction(direction, beta)
  temp = _checks.check_positive_if_static("temperature", temperature)
  spec = Spec(direction=direction, beta=beta, inv_temperature=1.0 if temp is None else 1.0 / temp,
              chunks=chunks, ref_grad=False, softcap=transform.check_softcap("softcap", softcap))
  return spec, temp


@compiled.compiled
def topk_logprobs(ref_logits: jax.typing.ArrayLike, k: int, *,
                  temperature: float | jax.Array = 1.0, chunk_size: int | None = None,
                  partition: _sharding.Partition | None = None,
                  implementation: str | Sequence[str] | None = None,
                  softcap: float | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""What to store of a teacher per position: its top-k log-probs, their indices, its tail.

  With r = softmax(s(ref_logits) / T), s the soft-cap (see ``softcap``): the k largest log r_v
  sorted by decreasing probability (ties by lower index; ``-0.0`` ties with ``0.0``), their vocabulary indices, and tail = log sum_{v not kept} r_v, computed as a
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
    implementation: ``None`` / ``"chunked"`` (blocks of rows) or ``"xla"`` (one block), or a
      sequence of them tried in order.
    softcap: None, or a static cap c > 0: the teacher's logits become c tanh(z / c) before the
      temperature (``-inf`` stays ``-inf``).

  Returns:
    ``(logprobs [..., k] float32, indices [..., k] int32, tail [...] float32)`` (float64 values
    for float64 input with x64 enabled); feed them to :func:`kl_topk` as ``ref_logprobs``,
    ``ref_indices`` and ``ref_tail``.

  Raises:
    ValueError: for a non-float input, V == 0, k not an int in [1, V], a static temperature <= 0.

  .. math::

     \mathrm{tail} = \log \sum_{v \notin \mathrm{top}_k} r_v

  Example:
    >>> logprobs, indices, tail = ka.topk_logprobs(teacher_logits, 32)  # store these
    >>> loss = ka.kl_topk(student_logits, logprobs, indices, ref_tail=tail).mean()
  """
  x = jnp.asarray(ref_logits)
  _checks.check_float("ref_logits", x)
  _checks.check_vocab("ref_logits", x)
  lead, vocab = x.shape[:-1], x.shape[-1]
  k = check_k(k, vocab, "k")
  spec, temp = make_spec("reverse", 0.5, temperature, chunking(chunk_size, vocab), softcap)
  impl = registry.names("topk_logprobs", implementation, LOGPROBS_IMPLEMENTATIONS)
  dtype = _checks.compute_dtype(x)
  n = math.prod(lead)
  if n == 0:
    return (jnp.zeros(lead + (k,), dtype), jnp.zeros(lead + (k,), jnp.int32),
            jnp.zeros(lead, dtype))
  layout = _sharding.resolve(partition, lead, vocab, position_inputs=(x,),
                             vocab_inputs=((x, -1),))
  t = None if temp is not None else jnp.asarray(temperature)
  kernel = functools.partial(_topk_logprobs_local, k=k, spec=spec, impl=impl,
                             vocab_axis=None if layout is None else layout.vocab)
  if layout is None:
    return kernel(x, t)
  return _sharding.shard(kernel, layout, (x, t), (layout.logits(), layout.scalar()),
                         out_specs=(layout.rows(), layout.rows(), layout.positions()))


def _topk_logprobs_local(x, temperature, *, k, spec, impl, vocab_axis):
  """:func:`topk_logprobs` on (per-device) blocks; a sharded vocabulary merges per-device top-k."""
  lead, width = x.shape[:-1], x.shape[-1]
  n = math.prod(lead)
  x = x.reshape(n, width)
  if temperature is not None:  # traced: transform outside the loop
    x = transform.outside(x, None, spec.softcap, temperature, _checks.compute_dtype(x))
    spec = dataclasses.replace(spec, softcap=None)
  spec = dataclasses.replace(spec, vocab_axis=vocab_axis)
  values, indices, tail = registry.call("topk", impl, LOGPROBS_IMPLEMENTATIONS, x,
                                        static=(k, spec))
  return values.reshape(lead + (k,)), indices.reshape(lead + (k,)), tail.reshape(lead)


def kl_topk(logits: jax.typing.ArrayLike, ref_logprobs: jax.typing.ArrayLike,
            ref_indices: jax.typing.ArrayLike, ref_tail: jax.typing.ArrayLike | None = None, *,
            direction: str = "forward", where: jax.typing.ArrayLike | None = None,
            temperature: float | jax.Array = 1.0, beta: float = 0.5,
            chunk_size: int | None = None, partition: _sharding.Partition | None = None,
            implementation: str | Sequence[str] | None = None,
            softcap: float | None = None) -> jax.Array:
  r"""Divergence between the student and a stored top-k teacher, both coarsened to k + 1 cells.

  With p = softmax(s(logits) / T) (s the soft-cap, see ``softcap``) and the teacher's stored log-probs lr_j at indices i_j: the cells
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
      differentiated by JAX: supports forward-mode AD), or a sequence tried in order.
    softcap: None, or a static cap c > 0 on the student's logits, c tanh(z / c), applied per
      block before the temperature (``-inf`` stays ``-inf``). The teacher's stored data are
      taken as they are: cap the teacher's logits when storing them
      (``topk_logprobs(..., softcap=c)``).

  Returns:
    float32 array of shape ``logits.shape[:-1]`` (float64 for float64 inputs with x64 on).

  Raises:
    ValueError: for a shape mismatch between the student's positions and the teacher's arrays,
      k outside [1, V], non-integer or (where static) out-of-range or repeated indices, V == 0,
      an unknown direction, beta outside [0, 1], a static temperature <= 0, a bad ``where`` or
      ``chunk_size``.

  .. math::

     \mathrm{KL}(R \,\|\, P) = \sum_{c=1}^{k+1} R_c (\log R_c - \log P_c)

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
  check_indices_if_static(logits.shape[:-1], logits.shape[-1], ref_indices, where)
  return _kl_topk(logits, ref_logprobs, ref_indices, ref_tail, direction=direction, where=where,
                  temperature=temperature, beta=beta, chunk_size=chunk_size,
                  partition=partition, implementation=implementation, softcap=softcap)


@compiled.compiled
def _kl_topk(logits, ref_logprobs, ref_indices, ref_tail, *, direction, where, temperature, beta,
             chunk_size, partition, implementation, softcap):
  """:func:`kl_topk` past the checks that need concrete values."""
  logits = jnp.asarray(logits)
  lead, vocab = logits.shape[:-1], logits.shape[-1]
  lp, idx, tail, mask = teacher_rows(lead, vocab, ref_logprobs, ref_indices, ref_tail, where)
  spec, temp = make_spec(direction, beta, temperature, chunking(chunk_size, vocab), softcap)
  impl = registry.names("kl_topk", implementation, IMPLEMENTATIONS)
  dtype = _checks.compute_dtype(logits, lp, tail)
  if math.prod(lead) == 0:
    return jnp.zeros(lead, dtype)
  layout = _sharding.resolve(partition, lead, vocab,
                             position_inputs=(logits, lp, idx, tail, mask),
                             vocab_inputs=((logits, -1),))
  t = None if temp is not None else jnp.asarray(temperature)
  kernel = functools.partial(_kl_topk_local, spec=TopkSpec(spec, vocab), impl=impl, dtype=dtype,
                             vocab_axis=None if layout is None else layout.vocab)
  args = (logits, lp, idx, tail, mask, t)
  if layout is None:
    return kernel(*args)
  return _sharding.shard(kernel, layout, args,
                         (layout.logits(), layout.rows(), layout.rows(), layout.positions(),
                          layout.positions(), layout.scalar()))


def _kl_topk_local(logits, lp, idx, tail, mask, temperature, *, spec: TopkSpec, impl, dtype,
                   vocab_axis):
  """:func:`kl_topk` on (per-device) blocks."""
  lead, width = logits.shape[:-1], logits.shape[-1]
  n, k = math.prod(lead), lp.shape[-1]
  a = logits.reshape(n, width)
  mask = transform.rows_mask(mask, n)
  div = dataclasses.replace(spec.div, vocab_axis=vocab_axis)
  if temperature is not None:  # traced: transform outside the kernel so autodiff sees it
    a = transform.outside(a, mask, div.softcap, temperature, dtype)
    div = dataclasses.replace(div, softcap=None)
  out = registry.call("topk", impl, IMPLEMENTATIONS, a, lp.reshape(n, k), idx.reshape(n, k),
                      tail.reshape(n), mask, static=(dataclasses.replace(spec, div=div),))
  return out.reshape(lead)
