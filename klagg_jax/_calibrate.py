"""Tools for choosing and watching the barrier: tau calibration, separation, gradient pressure.

They are built on the library's aggregators, so a tau or a ratio found here means exactly what
:func:`klagg_jax.kl_barrier` will compute with the same aggregator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from klagg_jax import _aggregate, _checks, _numerics, _scaling, _segments

SEPARATION_AGGS = ("mean", "rmse", "p95", "max", "soft_p95", "cvar95")


def _safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den for num, den >= 0, with x / 0 = inf for x > 0 and 0 / 0 = 0; NaN stays NaN."""
  zero = _numerics.is_zero(den)
  ratio = _numerics.safe_divide(num, den)
  return jnp.where(zero, jnp.where(_numerics.is_zero(num), 0.0, num * jnp.inf), ratio)


def _per_sequence(kl: jax.Array, how: str | _aggregate.Aggregator, mask: jax.Array | None,
                  seg: Any, max_segments: Any, **agg_kwargs: Any) -> tuple[jax.Array, jax.Array]:
  """(per-sequence aggregates, which of them have a valid position): one per row of ``kl``, or
  one per segment of each row with ``seg`` (then ``[..., max_segments]``)."""
  if seg is None:
    per_seq = _aggregate.aggregate(kl, how, where=mask, axis=-1, **agg_kwargs)
    return per_seq, (jnp.ones(kl.shape[:-1], bool) if mask is None else mask.any(-1))
  seg = _segments.check_segment_ids(seg, kl.shape, "kl")
  count = _segments.resolve_max_segments(seg, max_segments)
  seg0, valid = _segments.zero_based(seg, mask, count)
  per_seq = _aggregate.aggregate(kl, how, where=mask, axis=-1, segment_ids=seg,
                                 max_segments=count, **agg_kwargs)
  return per_seq, _segments.segment_any(valid, seg0, count)


def calibrate_tau(kl_pos: jax.typing.ArrayLike, *, agg: str | _aggregate.Aggregator,
                  where: jax.typing.ArrayLike | None = None, fire_rate: float = 0.05,
                  segment_ids: jax.typing.ArrayLike | None = None,
                  max_segments: int | None = None, **agg_kwargs: Any) -> jax.Array:
  r"""The tau at which a per-sequence barrier fires on about ``fire_rate`` of known-good sequences.

  .. math::

     \tau = Q_{1 - \mathrm{fire\_rate}}\big(\{\mathrm{agg}_t(\mathrm{kl}_{s,t}) :
       s \text{ a sequence with a valid position}\}\big)

  the linear-interpolation quantile (:func:`klagg_jax.quantile`) of the per-sequence aggregates that
  :func:`klagg_jax.kl_barrier` computes with ``axis=-1``. Of those n sequences, the fraction with
  aggregate > tau is (n - 1 - floor((1 - fire_rate) (n - 1))) / n when the aggregates are
  distinct: within 1/n of ``fire_rate`` (5 of 100 at the default 0.05).

  tau's scale is the aggregator's: rmse, p95 and max of the same KL differ by multiples (the
  coherent trait of ``python -m klagg_jax.diag`` has mean 0.018 and max 0.095), so recalibrate
  whenever ``agg`` changes. Measure the KL on sequences the barrier should leave alone: e.g. the
  completions of a checkpoint you accept as coherent, scored against the reference the barrier
  will use.

  Args:
    kl_pos: per-position KL of known-good sequences, ``[B, T]`` (or ``[..., T]``), e.g. from
      :func:`klagg_jax.kl_per_position` or :func:`klagg_jax.kl_estimate`.
    agg: aggregator name or callable, as for :func:`klagg_jax.aggregate`.
    where: optional bool mask broadcastable to ``kl_pos`` (e.g. completion tokens); sequences
      with no valid position are left out.
    fire_rate: static target fraction of sequences with aggregate > tau, in (0, 1).
    segment_ids: optional int ids broadcastable to ``kl_pos`` for packed rows (0 = padding,
      1..S = sequences): each non-empty segment counts as one sequence.
    max_segments: static int, the most segments a row holds; required under ``jit`` with
      ``segment_ids`` (see :func:`klagg_jax.aggregate`).
    **agg_kwargs: passed to the aggregator (e.g. ``temperature`` for ``"smooth_max"``).

  Returns:
    float32 scalar tau (0.0 when no sequence has a valid position). Works under ``jit``.

  Raises:
    ValueError: for ``fire_rate`` outside (0, 1), ``kl_pos`` without a position axis, or the
      errors of :func:`klagg_jax.aggregate` (bad ``segment_ids`` / ``max_segments`` included).

  Works on arrays that span several processes (a global ``jax.Array``), as any jitted
  computation does; with ``segment_ids`` there, pass ``max_segments``.

  Example:
    >>> tau = ka.calibrate_tau(ka.kl_per_position(logits, base_logits), agg="rmse", where=mask)
    >>> loss, metrics = ka.kl_barrier(logits, base_logits, where=mask, agg="rmse", tau=tau)
  """
  fire_rate = _checks.check_open_unit("fire_rate", fire_rate)
  kl_pos = jnp.asarray(kl_pos)
  if kl_pos.ndim < 1:
    raise ValueError(
        f"kl_pos must have a position axis (shape [..., T]); got shape {kl_pos.shape}.")
  mask = _checks.check_where(where, kl_pos.shape, "kl_pos")
  per_seq, seq_valid = _per_sequence(kl_pos, agg, mask, segment_ids, max_segments, **agg_kwargs)
  return _aggregate.quantile(per_seq, 1.0 - fire_rate, where=seq_valid, axis=None)


def separation(kl_a: jax.typing.ArrayLike, kl_b: jax.typing.ArrayLike, *,
               aggs: Sequence[str | _aggregate.Aggregator] | Mapping[str, Any] = SEPARATION_AGGS,
               where_a: jax.typing.ArrayLike | None = None,
               where_b: jax.typing.ArrayLike | None = None,
               axis: int | None = None,
               segment_ids_a: jax.typing.ArrayLike | None = None,
               segment_ids_b: jax.typing.ArrayLike | None = None
               ) -> dict[str, dict[str, float]]:
  """Each aggregator's value on two groups of per-position KL, and their ratio b / a.

  ratio = agg(kl_b) / agg(kl_a): with ``a`` a coherent (acceptable) group and ``b`` an
  incoherent one, the aggregator with the largest ratio separates them best, and a tau between
  the two values fires on ``b`` only. ``separation(trait_kl, loop_kl)`` on the synthetic
  students of :mod:`klagg_jax.diag` (a coherent trait, and a 4-token loop in 60 positions) gives
  20.6 (mean), 57.7 (rmse), 77.0 (p95) and 85.4 (max): the table of ``python -m klagg_jax.diag``,
  on your own data.

  A host-side diagnostic: it returns Python floats, so call it outside ``jit`` (inside, use
  :func:`klagg_jax.aggregate` directly).

  Args:
    kl_a: per-position KL of the first (reference, e.g. coherent) group, any shape.
    kl_b: per-position KL of the second group, any shape (need not match ``kl_a``'s).
    aggs: aggregator names or callables (see :func:`klagg_jax.aggregate`), or a mapping from a
      label to one of them (e.g. ``{"smooth_max T=0.5": functools.partial(ka.smooth_max,
      temperature=0.5)}``). A callable is labelled by its ``__name__``.
    where_a: optional bool mask broadcastable to ``kl_a``.
    where_b: optional bool mask broadcastable to ``kl_b``.
    axis: ``None`` (default): one aggregate over every valid position of a group (token level,
      as in the table of ``python -m klagg_jax.diag``). ``-1`` (or the positive index of a
      group's last axis, e.g. 1 for ``[B, T]``): per-sequence aggregates, averaged over the
      group's sequences that have a valid position: the ``div`` that
      :func:`klagg_jax.kl_barrier` logs.
    segment_ids_a: optional int ids broadcastable to ``kl_a`` for packed rows (0 = padding,
      1..S = sequences): with ``axis=-1`` each non-empty segment counts as one sequence; with
      ``axis=None`` the ids only mask padding.
    segment_ids_b: the same for ``kl_b``.

  Returns:
    ``{label: {"a": float, "b": float, "ratio": float}}`` in the order of ``aggs``, Python
    floats; ``ratio`` is inf where ``a`` is 0 and ``b`` is not, and 0.0 where both are 0.

  Raises:
    ValueError: for an ``axis`` other than None or the last axis, an unknown aggregator, a bad
      mask or bad segment ids, a traced input (under ``jax.jit``, ``vmap`` or ``grad``: the
      result is Python floats), or an input that spans several processes (gather it first,
      e.g. with ``jax.experimental.multihost_utils.process_allgather``).

  Example:
    >>> for name, s in ka.separation(kl_good, kl_looping).items():
    ...   print(f"{name:>8} {s['a']:.3f} {s['b']:.3f} {s['ratio']:.1f}x")
  """
  inputs = (("kl_a", kl_a), ("kl_b", kl_b), ("where_a", where_a), ("where_b", where_b),
            ("segment_ids_a", segment_ids_a), ("segment_ids_b", segment_ids_b))
  for name, value in inputs:
    _segments.check_addressable("separation", name, value, "it returns Python floats")
    if isinstance(value, jax.core.Tracer):
      raise ValueError(
          f"separation returns Python floats, so it runs outside jax.jit / vmap / grad; got a "
          f"traced {name}. Call it on concrete arrays (e.g. after the step), or inside the "
          "transformed function compute the values with ka.aggregate(kl, how, where=..., "
          "axis=None) for each aggregator.")
  if isinstance(aggs, str) or callable(aggs):
    aggs = (aggs,)
  if not isinstance(aggs, Mapping):
    aggs = {(how if isinstance(how, str) else getattr(how, "__name__", repr(how))): how
            for how in aggs}

  def group(kl, where, seg):
    kl = jnp.asarray(kl)
    mask = _checks.check_where(where, kl.shape, "kl")
    if axis is not None and not (isinstance(axis, (int, np.integer)) and not isinstance(axis, bool)
                                 and axis in (-1, kl.ndim - 1)):
      raise ValueError(f"axis must be None (token level) or -1 (per sequence; {kl.ndim - 1}, the "
                       f"last axis of kl with shape {kl.shape}, means the same); got {axis!r}.")
    if axis is None or kl.ndim == 0:
      return lambda how: _aggregate.aggregate(kl, how, where=mask, axis=None, segment_ids=seg)
    count = None
    if seg is not None:  # eager: the number of segments is read from the ids
      count = _segments.resolve_max_segments(
          _segments.check_segment_ids(seg, kl.shape, "kl"), None)

    def over_sequences(how):
      per_seq, seq_valid = _per_sequence(kl, how, mask, seg, count)
      n_seq = jnp.maximum(seq_valid.sum(), 1).astype(jnp.float32)
      return jnp.where(seq_valid, per_seq, 0.0).sum() / n_seq

    return over_sequences

  agg_a, agg_b = group(kl_a, where_a, segment_ids_a), group(kl_b, where_b, segment_ids_b)
  rows = []
  for how in aggs.values():
    a, b = agg_a(how), agg_b(how)
    rows.append((a, b, _safe_ratio(b, a)))
  rows = jax.device_get(rows)  # one transfer; a list keeps the order of ``aggs``
  return {label: {"a": float(a), "b": float(b), "ratio": float(r)}
          for label, (a, b, r) in zip(aggs, rows)}


def _global_norm(tree: Any) -> jax.Array:
  """sqrt(sum of squares) over every leaf, in float32, scaled by the largest |entry| first so
  that neither tiny (1e-30) nor huge (1e38) gradients underflow or overflow when squared; the
  division by that scale is exact in its power of two (``_scaling.divide``). An infinite entry
  gives inf, a NaN NaN. Integer leaves (whose cotangents are ``float0``) count as 0."""
  leaves = [jnp.asarray(x).astype(jnp.float32) for x in jax.tree_util.tree_leaves(tree)
            if x.dtype != jax.dtypes.float0]
  if not leaves:
    return jnp.zeros((), jnp.float32)
  top = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0.0) for x in leaves]))
  flat = _numerics.is_zero(top)  # a NaN gradient is not "no gradient": it reaches the norm
  infinite = top == jnp.inf
  scale = jnp.where(flat | infinite, 1.0, top)
  total = sum(jnp.sum(jnp.square(_scaling.divide(jnp.where(infinite, 0.0, x), scale)))
              for x in leaves)
  return jnp.where(infinite, jnp.inf, jnp.where(flat, 0.0, scale * jnp.sqrt(total)))


def grad_pressure(loss_a: Callable[..., jax.Array], loss_b: Callable[..., jax.Array],
                  params: Any, *args: Any) -> jax.Array:
  """Ratio of gradient norms ||grad loss_a|| / ||grad loss_b|| with respect to a params pytree.

  ||g|| is the global L2 norm over every leaf (as ``optax.global_norm``). With ``loss_a`` the
  barrier and ``loss_b`` the SFT loss (g_bar / g_nll): >> 1 the barrier fights the fine-tuning,
  ~ 1 they are balanced, 0 the barrier is inert (it has not fired). Both losses
  share one forward pass. When ||grad loss_b|| is 0 the result is inf if ||grad loss_a|| > 0,
  else 0.0 (both inert). A NaN in either gradient gives NaN (never a quiet 0: "inert"); an
  infinite entry makes its norm inf. Gradients up to float32's limit (1e38) give the exact
  ratio, not 0 or inf.
  Works under ``jit``.

  Args:
    loss_a: ``loss_a(params, *args)`` -> scalar, the numerator's loss (e.g. the barrier).
    loss_b: ``loss_b(params, *args)`` -> scalar, the denominator's loss (e.g. the NLL).
    params: a pytree of arrays, differentiated (e.g. an ``nnx.State``); integer leaves (step
      counters) count as zero gradient.
    *args: further arguments of both losses (e.g. the batch), not differentiated.

  Returns:
    float32 scalar, >= 0 (inf as above).

  Raises:
    ValueError: if a loss does not return a scalar.

  Example:
    >>> nll = lambda p, batch: nll_loss(p, batch)
    >>> bar = lambda p, batch: ka.kl_barrier(apply(p, batch), ref_logits, where=mask)[0]
    >>> pressure = ka.grad_pressure(bar, nll, params, batch)  # log it beside the losses
  """
  def both(p):
    out = (loss_a(p, *args), loss_b(p, *args))
    for name, value in zip(("loss_a", "loss_b"), out):
      if jnp.shape(value) != ():
        raise ValueError(f"{name} must return a scalar; got shape {jnp.shape(value)}.")
    return out

  (a, b), vjp = jax.vjp(both, params)
  # Both gradients from one batched backward pass: cotangents (1, 0) and (0, 1).
  basis = (jnp.array([1, 0], a.dtype), jnp.array([0, 1], b.dtype))
  (grads,) = jax.vmap(vjp)(basis)
  norms = tuple(_global_norm(jax.tree_util.tree_map(lambda g, i=i: g[i], grads)) for i in (0, 1))

  def apart(_):
    # The batched pass multiplies one loss's infinite gradient by the other's zero cotangent
    # (0 * inf = NaN); a NaN norm is recomputed from each loss alone, which keeps inf as inf
    # and a genuine NaN as NaN. A rare path: lax.cond runs it only then.
    return tuple(_global_norm(jax.grad(lambda p, f=f: f(p, *args), allow_int=True)(params))
                 for f in (loss_a, loss_b))

  norms = jax.lax.cond(jnp.isnan(norms[0]) | jnp.isnan(norms[1]), apart, lambda _: norms, None)
  return _safe_ratio(*norms)
