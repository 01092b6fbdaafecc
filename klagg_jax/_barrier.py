"""The KL barrier: per-position divergence -> aggregate over positions -> hinge -> one scalar.

The one module that joins the divergences and the aggregators.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from klagg_jax import _aggregate, _checks, _segments, _sharding
from klagg_jax._ops import compiled
from klagg_jax._ops.divergence import api as _divergence

HINGES = ("relu", "squared", "softplus")


def hinge(div: jax.typing.ArrayLike, tau: float | jax.Array, kind: str = "relu", *,
          sharpness: float = 10.0) -> jax.Array:
  """Penalty for exceeding a threshold: relu(div - tau), its square, or a softplus.

  ``"relu"``: max(div - tau, 0) (gradient 0 at div = tau, as ``jax.nn.relu``);
  ``"squared"``: max(div - tau, 0)^2;
  ``"softplus"``: softplus(s (div - tau)) / s, smooth, tending to relu as the sharpness s grows.

  Args:
    div: aggregated divergences, any shape.
    tau: threshold (may be traced, e.g. scheduled).
    kind: ``"relu"``, ``"squared"`` or ``"softplus"``.
    sharpness: s > 0 for ``"softplus"``.

  Returns:
    float32 array of ``div``'s shape.

  Raises:
    ValueError: for an unknown ``kind`` or a static ``sharpness <= 0``.
  """
  _checks.check_choice("hinge", kind, HINGES)
  _checks.check_positive_if_static("sharpness", sharpness)
  div = jnp.asarray(div)
  excess = div.astype(_checks.compute_dtype(div)) - tau
  if kind == "relu":
    return jax.nn.relu(excess)
  if kind == "squared":
    return jnp.square(jax.nn.relu(excess))
  return jax.nn.softplus(sharpness * excess) / sharpness


@compiled.compiled(checked_when_concrete=("segment_ids",))
def kl_barrier(logits: jax.typing.ArrayLike, ref_logits: jax.typing.ArrayLike, *,
               where: jax.typing.ArrayLike | None = None, direction: str = "reverse",
               agg: str | _aggregate.Aggregator = "rmse", tau: float | jax.Array = 0.5,
               lam: float | jax.Array = 1.0, axis: int | None = -1, hinge: str = "relu",
               stop_ref_grad: bool = True, temperature: float | jax.Array = 1.0,
               beta: float = 0.5, chunk_size: int | None = None,
               agg_kwargs: dict[str, Any] | None = None,
               hinge_kwargs: dict[str, Any] | None = None,
               partition: _sharding.Partition | None = None,
               implementation: str | None = None, softcap: float | None = None,
               ref_softcap: float | None = None,
               segment_ids: jax.typing.ArrayLike | None = None,
               max_segments: int | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""Hinge penalty on an outlier-aware aggregate of the per-position divergence.

  .. math::

     \mathrm{loss} = \frac{\lambda}{|S|} \sum_{s \in S}
       \mathrm{hinge}\big(\mathrm{agg}_t(\mathrm{div}_{s,t}) - \tau\big)

  per sequence s by default (``axis=-1``), S the sequences that have any valid position, so
  one looping sequence among many is not diluted by a token-level mean; ``axis=None`` takes one
  aggregate over every valid token. With packed rows (``segment_ids``) each segment of a row is
  a sequence: the result equals that of the same sequences unpacked, one per row, and padded
  with ``where``.

  Args:
    logits: student logits ``[..., T, V]`` (e.g. ``[B, T, V]``).
    ref_logits: reference logits, same shape.
    where: optional bool ``[..., T]`` marking the positions to hold (e.g. completion tokens).
    direction: ``"reverse"`` (KL(student || ref)), ``"forward"`` or ``"js"``.
    agg: aggregator name (``"mean"``, ``"rmse"``, ``"max"``, ``"p95"``, ``"soft_p95"``,
      ``"cvar95"``, ``"smooth_max"``, ...) or callable; see :func:`klagg_jax.aggregate`.
    tau: hinge threshold, in the aggregate's units.
    lam: weight of the penalty.
    axis: ``-1`` per sequence, ``None`` over all tokens. The positive index of the position
      axis (``logits.ndim - 2``, e.g. 1 for ``[B, T, V]``) means -1 too.
    hinge: ``"relu"``, ``"squared"`` or ``"softplus"``.
    stop_ref_grad: if True (default) no gradient reaches ``ref_logits`` (and none is computed).
    temperature: softmax temperature of both distributions.
    beta: reference weight of the ``"js"`` direction.
    chunk_size: positions per kernel chunk (``None``: the library chooses).
    agg_kwargs: extra keyword arguments for the aggregator (e.g. ``{"temperature": 0.5}``).
    hinge_kwargs: extra keyword arguments for :func:`hinge` (e.g. ``{"sharpness": 5.0}``).
    partition: a :class:`klagg_jax.Partition` for batch- and vocabulary-sharded logits (see
      :func:`kl_per_position`); the aggregation then sees only ``[..., T]`` per-position values.
    implementation: the per-position kernel: ``None``/``"chunked"`` (memory-bounded custom VJP)
      or ``"xla"`` (plain composition; supports forward-mode AD). See :func:`kl_per_position`.
    segment_ids: optional int ``[..., T]`` for packed rows (the MaxText / tunix / Levanter
      convention): 0 marks padding, 1..S the sequences of a row. Padding positions are masked
      (exactly zero gradient, whatever their logits hold). With ``axis=-1`` each segment is
      hinged on its own and the metrics average over the non-empty segments; with
      ``axis=None`` the ids only mask padding. A callable ``agg`` receives ``segment_ids`` and
      ``max_segments`` as keywords.
    max_segments: static int >= 1, the most segments a row holds (required under ``jit`` with
      ``segment_ids`` and ``axis=-1``; eager calls may omit it). Concrete ids above it raise;
      traced ones are ignored as padding.
    softcap: None or a static cap c > 0 on the student's logits, c tanh(z / c) before the
      temperature; ref_softcap: the reference's (None: ``softcap``; ``float("inf")``: uncapped).
      See :func:`kl_per_position`.

  Returns:
    ``(loss, metrics)``: ``loss`` a float32 scalar; ``metrics`` float32 scalars without gradient:
    ``div`` (the aggregate, averaged over valid sequences, or non-empty segments),
    ``kl_mean``, ``kl_rmse``, ``kl_p95``, ``kl_max`` (aggregated the same way, whatever ``agg``
    is), ``fired`` (fraction of valid sequences with div > tau) and ``n_positions`` (valid
    positions). Under x64 with float64 inputs, loss and metrics are float64. A NaN divergence
    at a valid position makes the loss and ``div``, ``kl_mean``, ``kl_rmse``, ``kl_p95``,
    ``kl_max`` NaN (a diverged student never reads as a quiet barrier); an empty position axis
    (``[B, 0, V]``) or an all-False ``where`` gives a loss of 0 with zero gradient and zero
    metrics.

  Raises:
    ValueError: for bad shapes or names (see :func:`kl_per_position`, :func:`aggregate`), an
      ``axis`` other than -1, ``logits.ndim - 2`` or None, logits without a position axis, or
      bad ``segment_ids`` / ``max_segments`` (non-integer ids, a shape that does not broadcast
      to ``logits.shape[:-1]``, concrete ids outside 0..max_segments, or no ``max_segments``
      for traced ids with ``axis=-1``).

  Example:
    >>> loss, metrics = ka.kl_barrier(logits, base_logits, where=mask, agg="rmse", tau=0.5)
  """
  logits = jnp.asarray(logits)
  if logits.ndim < 2:
    raise ValueError(f"logits must have shape [..., T, V] with a position axis; got {logits.shape}.")
  axis = _position_axis(axis, logits.shape)
  aggregator = _aggregate.resolve(agg)
  agg_kwargs = dict(agg_kwargs or {})
  segments = None
  if segment_ids is not None:
    # Padding joins the mask before the kernel, so its logits never reach a value or gradient.
    where, segments = _pack(where, segment_ids, max_segments, logits.shape[:-1], axis)
  elif max_segments is not None:
    raise ValueError("max_segments was given without segment_ids; pass both, or neither.")
  kl = _divergence.per_position(logits, ref_logits, direction=direction, where=where,
                                temperature=temperature, beta=beta, chunk_size=chunk_size,
                                ref_grad=not stop_ref_grad, partition=partition,
                                implementation=implementation, softcap=softcap,
                                ref_softcap=ref_softcap)
  mask = _checks.check_where(where, kl.shape, "positions (logits.shape[:-1])")
  mask = jnp.ones(kl.shape, bool) if mask is None else mask
  return _from_divergence(kl, mask, aggregator, tau=tau, lam=lam, axis=axis, hinge=hinge,
                          agg_kwargs=agg_kwargs, hinge_kwargs=hinge_kwargs, segments=segments)


def _pack(where: Any, segment_ids: Any, max_segments: Any, shape: tuple[int, ...],
          axis: int | None) -> tuple[jax.Array, tuple[jax.Array, int] | None]:
  """(``where`` with padding and out-of-range ids masked out; (ids, max_segments) or None).

  With ``axis=None`` the ids only mask padding, and no segments are returned.
  """
  what = "positions (logits.shape[:-1])"
  seg = _segments.check_segment_ids(segment_ids, shape, what)
  mask = _checks.check_where(where, shape, what)
  if axis is None:
    _segments.check_concrete_nonnegative(seg)
    in_row, segments = seg > 0, None
  else:
    count = _segments.resolve_max_segments(seg, max_segments)
    in_row, segments = (seg >= 1) & (seg <= count), (seg, count)
  return (in_row if mask is None else mask & in_row), segments


def _position_axis(axis: Any, shape: tuple[int, ...]) -> int | None:
  """-1 or None; the positive index of the position axis of ``[..., T, V]`` logits means -1."""
  last = len(shape) - 2
  if axis is None:
    return None
  if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) and axis in (-1, last):
    return -1
  raise ValueError(
      f"axis must be -1 (per sequence; {last}, the position axis of logits with shape "
      f"{tuple(shape)}, means the same) or None (all tokens); got {axis!r}.")


def _from_divergence(kl: jax.Array, mask: jax.Array, aggregator: _aggregate.Aggregator, *,
                     tau: float | jax.Array, lam: float | jax.Array, axis: int | None,
                     hinge: str, agg_kwargs: dict[str, Any],
                     hinge_kwargs: dict[str, Any] | None,
                     segments: tuple[jax.Array, int] | None = None
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The barrier's second half, from per-position divergences ``kl`` ``[..., T]`` and a bool mask.

  Everything is in ``kl``'s dtype (float32, or float64 under x64 with float64 inputs). A NaN at
  a valid position reaches the loss and every aggregate metric (``fired`` counts it as not
  fired); an empty position axis or selection gives a loss of 0 and zero metrics. With
  ``segments`` (ids ``[..., T]``, max_segments) every aggregate is per segment, ``[..., S]``.
  """
  dtype = kl.dtype
  if segments is None:
    by_rows = {}
    seq_valid = mask.any(-1) if axis == -1 else mask.any()
  else:
    seg, count = segments
    by_rows = {"segment_ids": seg, "max_segments": count}
    seq_valid = _segments.segment_any(mask, _segments.zero_based(seg, mask, count)[0], count)
  div = _aggregate.aggregate(kl, aggregator, where=mask, axis=axis, **by_rows, **agg_kwargs)
  n_seq = jnp.maximum(seq_valid.sum(), 1).astype(dtype)

  def over_sequences(v):
    return jnp.where(seq_valid, v, 0.0).sum() / n_seq

  penalty = hinge_fn(div, tau, hinge, **(hinge_kwargs or {}))
  loss = (lam * over_sequences(penalty)).astype(dtype)

  kl_ng, div_ng = jax.lax.stop_gradient(kl), jax.lax.stop_gradient(div)
  watch = {"kl_mean": "mean", "kl_rmse": "rmse", "kl_p95": "p95", "kl_max": "max"}
  metrics = {"div": over_sequences(div_ng)}
  for name, how in watch.items():
    metrics[name] = over_sequences(
        _aggregate.aggregate(kl_ng, how, where=mask, axis=axis, **by_rows))
  metrics["fired"] = over_sequences((div_ng > tau).astype(dtype))
  metrics["n_positions"] = mask.sum().astype(dtype)
  metrics = {k: jax.lax.stop_gradient(v.astype(dtype)) for k, v in metrics.items()}
  return loss, metrics


hinge_fn = hinge
