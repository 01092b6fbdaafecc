"""The fused LM heads' public entry points: validation, transform, sharding, dispatch.

:data:`IMPLEMENTATIONS` names the implementations, each
``rows(hidden, weight, bias, ref_rows, ref_consts, mask, spec, reduction)``, for
:mod:`klagg_jax._ops.registry`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from klagg_jax import _checks, _sharding
from klagg_jax._chunked import chunking
from klagg_jax._ops import compiled, registry, transform
from klagg_jax._ops.divergence.base import Spec, resolve_direction
from klagg_jax._ops.fused import chunked, pallas, xla
from klagg_jax._ops.fused.base import FusedSpec, LinearReference, TopkReference
from klagg_jax._ops.topk import api as topk_api
from klagg_jax._ops.topk.base import TopkSpec

WEIGHT_LAYOUTS = ("dv", "vd")
REDUCTIONS = (None, "mean", "sum")
IMPLEMENTATIONS = {"chunked": chunked.rows, "pallas": pallas.rows, "xla": xla.rows}


def _vocab_of(name: str, weight: jax.Array, layout: str) -> tuple[int, int]:
  """(D, V) of a weight in ``layout``, validating its rank."""
  if weight.ndim != 2:
    raise ValueError(f"{name} must be 2-D ([D, V] for weight_layout='dv', [V, D] for 'vd'); "
                     f"got shape {weight.shape}.")
  return weight.shape if layout == "dv" else weight.shape[::-1]


def check_linear(hidden, weight, bias, layout, prefix=""):
  """Validates hidden [..., D], weight and bias [V]; returns V."""
  _checks.check_float(f"{prefix}hidden", hidden)
  _checks.check_float(f"{prefix}weight", weight)
  d, v = _vocab_of(f"{prefix}weight", weight, layout)
  if hidden.ndim < 1 or hidden.shape[-1] != d:
    raise ValueError(f"{prefix}hidden has shape {hidden.shape} but {prefix}weight has shape "
                     f"{weight.shape} (layout {layout!r}): expected {prefix}hidden [..., {d}].")
  if v == 0:
    raise ValueError(f"{prefix}weight has an empty vocabulary axis: shape {weight.shape}.")
  if bias is not None and jnp.shape(bias) != (v,):
    raise ValueError(f"{prefix}bias has shape {jnp.shape(bias)}; expected ({v},) to match "
                     f"{prefix}weight {weight.shape}.")
  return v


def resolve_precision(precision: Any) -> Any:
  """None, a ``jax.lax.Precision``, or its name (case-insensitive) -> None or a Precision."""
  if precision is None or isinstance(precision, jax.lax.Precision):
    return precision
  if isinstance(precision, str):
    for attempt in (lambda: jax.lax.Precision[precision.upper()],
                    lambda: jax.lax.Precision(precision.lower())):
      try:
        return attempt()
      except (KeyError, ValueError):
        pass
  names = ", ".join(repr(p.name.lower()) for p in jax.lax.Precision)
  raise ValueError(f"precision must be None, a jax.lax.Precision or one of {names}; "
                   f"got {precision!r}.")


def resolve_accum_dtype(accum_dtype: Any) -> jnp.dtype:
  try:
    dtype = jnp.dtype(accum_dtype)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"accum_dtype must be a floating dtype (float32, bfloat16, ...); "
                     f"got {accum_dtype!r}.")
  return dtype


def check_reduction(reduction: Any) -> str | None:
  if reduction not in REDUCTIONS:
    raise ValueError(f"Unknown reduction {reduction!r}; expected None, 'mean' or 'sum'.")
  return reduction


def static_temperature(temperature: Any, what: str) -> float:
  temp = _checks.check_positive_if_static("temperature", temperature)
  if temp is None:
    raise ValueError(f"{what} needs a static temperature (a Python number); got a traced "
                     "value. Scale hidden or weight instead.")
  return temp


def finish(out: jax.Array, reduction: str | None, mask: jax.Array | None, n: int,
           layout: _sharding.Layout | None) -> jax.Array:
  """The public result from the kernel's: per position as is, the sum as is, or the mean.

  The mean divides by the number of valid positions over the whole mesh (inside a user's
  ``shard_map``, the local count summed over the batch's mesh axes), and takes no gradient
  through that count.
  """
  if reduction != "mean":
    return out
  count = jnp.asarray(n, jnp.float32) if mask is None else mask.sum().astype(jnp.float32)
  if layout is not None and layout.manual and layout.lead_axes:
    count = jax.lax.psum(count, layout.lead_axes)
  return out / jax.lax.stop_gradient(jnp.maximum(count, 1.0)).astype(out.dtype)


def empty_result(lead: tuple[int, ...], reduction: str | None, dtype) -> jax.Array:
  """What a fused function returns for zero positions."""
  return jnp.zeros(lead if reduction is None else (), dtype)


def run(kernel, layout: _sharding.Layout | None, hidden, weight, bias, ref_args, ref_specs,
        mask, weight_layout: str, reduction: str | None) -> jax.Array:
  """``kernel(hidden, weight, bias, *ref_args, mask)``, on each device's blocks when sharded.

  The one sharding rule of the fused heads: each device runs the kernel on its blocks. Its
  d hidden is partial over the vocabulary shards and its d weight / d bias over the batch
  shards: casting those inputs to vary there makes shard_map's transpose psum the partial
  gradients. A reduced result is summed over the devices' positions.
  """
  args = (hidden, weight, bias, *ref_args, mask)
  if layout is None:
    return kernel(*args)
  w_spec, b_spec = layout.vocab_matrix(weight_layout), layout.vocab_vector()
  specs = (layout.rows(), w_spec, b_spec, *ref_specs(layout), layout.positions())
  vary = (layout.vocab_axes, layout.lead_axes, layout.lead_axes) + ((),) * (len(ref_args) + 1)
  return _sharding.shard(kernel, layout, args, specs, vary=vary,
                         reduce_scalar=reduction is not None)



# ------------------------------------------------------------------------------------------------
# Public API.


@compiled.compiled
def fused_linear_kl(hidden: jax.typing.ArrayLike, weight: jax.typing.ArrayLike,
                    ref_hidden: jax.typing.ArrayLike, ref_weight: jax.typing.ArrayLike, *,
                    direction: str = "reverse", where: jax.typing.ArrayLike | None = None,
                    bias: jax.typing.ArrayLike | None = None,
                    ref_bias: jax.typing.ArrayLike | None = None, temperature: float = 1.0,
                    beta: float = 0.5, chunk_size: int | None = None,
                    weight_layout: str = "dv", reduction: str | None = None,
                    accum_dtype: Any = jnp.float32, precision: Any = None,
                    partition: _sharding.Partition | None = None,
                    implementation: str | Sequence[str] | None = None,
                    softcap: float | None = None, ref_softcap: float | None = None) -> jax.Array:
  r"""Divergence with logits = hidden @ weight + bias, never materializing ``[N, V]`` logits.

  Same semantics as :func:`kl_per_position` applied to z = ``hidden @ weight + bias`` and
  z_ref = ``ref_hidden @ ref_weight + ref_bias`` (``"reverse"``: KL(p || r), ``"forward"``:
  KL(r || p), ``"js"``: beta KL(r || m) + (1 - beta) KL(p || m), m = (1 - beta) p + beta r, with
  p = softmax(s(z) / T), r = softmax(s_ref(z_ref) / T), s the soft-cap), but the logits are made ``chunk_size`` rows at a
  time and the gradients with respect to ``hidden``, ``weight`` and ``bias`` are formed block by
  block (the weight gradient accumulated in ``accum_dtype``). The reference side gets no gradient.

  ``reduction=None`` returns the per-position divergence (for any aggregator or barrier); its
  backward pass recomputes both sides' logits (6 matmuls in all). ``reduction="mean"`` (over
  valid positions) or ``"sum"`` returns one scalar whose gradient is formed during the forward
  pass and only scaled in the backward pass: 4 matmuls, the distillation case.

  A NaN in a valid position's hidden state (or anything that makes its logits NaN) gives NaN
  there (and in the reduced scalar); masked positions give exactly 0 and a zero gradient.

  Args:
    hidden: student hidden states ``[..., D]``, any float dtype.
    weight: student output projection, ``[D, V]`` (Flax ``Dense`` kernel) or ``[V, D]`` (tied
      embedding, with ``weight_layout="vd"``).
    ref_hidden: reference hidden states ``[..., D_ref]`` (same leading shape as ``hidden``).
    ref_weight: reference projection in the same layout, with the same V.
    direction: ``"reverse"``, ``"forward"`` or ``"js"``.
    where: optional bool ``[...]`` of positions to keep (masked: exactly 0, zero gradient).
    bias: optional student bias ``[V]``.
    ref_bias: optional reference bias ``[V]``.
    temperature: static T > 0 dividing both logits.
    beta: reference weight of ``"js"``, static in [0, 1].
    chunk_size: at most this many rows per block (per device when sharded); ``None`` lets the
      library choose for the platform (matmul-sized blocks).
    weight_layout: ``"dv"`` or ``"vd"``.
    reduction: ``None`` (per position), ``"mean"`` (over valid positions) or ``"sum"``.
    accum_dtype: dtype of the ``d weight`` / ``d bias`` accumulators (float32 by default; the
      weights' dtype halves that memory at a rounding cost).
    precision: a ``jax.lax.Precision`` or its name (``"highest"``, ...) for every matmul; None
      follows JAX's default (``jax_default_matmul_precision``: float32 matmuls are TF32 on recent
      NVIDIA GPUs unless asked otherwise).
    partition: a :class:`klagg_jax.Partition`: ``batch_axis`` splits the first axis of
      ``hidden`` / ``ref_hidden``, ``vocab_axis`` the V axis of the weights and biases (a
      tensor-parallel LM head), run as a ``shard_map``. Not needed on a classic ``Mesh`` under
      ``jit`` (GSPMD partitions the kernel) or on ``Explicit`` axes (read off the inputs).
    implementation: ``None`` (the library's choice), ``"chunked"``, ``"pallas"`` (opt-in: the
      chunked loops with a hand-written block step between the matmuls, Triton on GPU, Mosaic
      on TPU, Pallas' interpreter elsewhere, where it is a slow correctness mode; float32
      arithmetic, so float64 inputs raise ``NotImplementedError``), or ``"xla"`` (materializes
      the logits; supports forward-mode AD), or a sequence of them tried in order (one that
      cannot run here is skipped).
    softcap: None, or a static cap c > 0 on the student's logits, c tanh(z / c), applied inside
      each block before the temperature, with its gradient (``-inf`` stays ``-inf``).
    ref_softcap: the reference's cap; None (default) takes ``softcap``;
      ``ref_softcap=float("inf")`` leaves the reference uncapped.

  Returns:
    float32 array of shape ``hidden.shape[:-1]`` for ``reduction=None``, else a float32 scalar
    (float64 for float64 inputs with x64 on).

  Raises:
    ValueError: for mismatched shapes (naming both), an unknown direction, layout, reduction or
      implementation, beta outside [0, 1], a non-static or non-positive temperature, a bad
      ``where``, ``chunk_size``, ``accum_dtype`` or ``precision``.
    NotImplementedError: when no implementation named in ``implementation`` can run the call
      (``"pallas"`` alone with float64 inputs), with each one's reason.

  .. math::

     z = h W + b, \qquad p = \mathrm{softmax}(c \tanh(z / c) / T)

  Example:
    >>> kl = ka.fused_linear_kl(h, params["lm_head"]["kernel"], h_ref, ref_kernel, where=mask)
    >>> loss = ka.fused_linear_kl(h, w, h_t, w_t, direction="js", reduction="mean")  # distill
  """
  hidden, weight = jnp.asarray(hidden), jnp.asarray(weight)
  ref_hidden, ref_weight = jnp.asarray(ref_hidden), jnp.asarray(ref_weight)
  bias = None if bias is None else jnp.asarray(bias)
  ref_bias = None if ref_bias is None else jnp.asarray(ref_bias)
  _checks.check_choice("weight_layout", weight_layout, WEIGHT_LAYOUTS)
  vocab = check_linear(hidden, weight, bias, weight_layout)
  ref_vocab = check_linear(ref_hidden, ref_weight, ref_bias, weight_layout, prefix="ref_")
  if ref_vocab != vocab:
    raise ValueError(f"Vocabulary mismatch: weight {weight.shape} has V = {vocab} but ref_weight "
                     f"{ref_weight.shape} has V = {ref_vocab}.")
  if hidden.shape[:-1] != ref_hidden.shape[:-1]:
    raise ValueError(f"Shape mismatch: hidden {hidden.shape} and ref_hidden {ref_hidden.shape} "
                     "must share their leading (position) shape.")
  direction, beta = resolve_direction(direction, beta)
  temp = static_temperature(temperature, "fused_linear_kl")
  cap, ref_cap = transform.resolve_caps(softcap, ref_softcap)
  reduction = check_reduction(reduction)
  config = dict(chunks=chunking(chunk_size, vocab, fused=True),
                accum_dtype=resolve_accum_dtype(accum_dtype),
                precision=resolve_precision(precision),
                implementation=registry.names("fused_linear_kl", implementation, IMPLEMENTATIONS))
  lead = hidden.shape[:-1]
  n = math.prod(lead)
  mask = _checks.check_where(where, lead, "positions (hidden.shape[:-1])")
  if n == 0:
    return empty_result(lead, reduction, _checks.compute_dtype(hidden, weight))
  v_axis = 1 if weight_layout == "dv" else 0
  layout = _sharding.resolve(partition, lead, vocab, position_inputs=(hidden, ref_hidden, mask),
                             vocab_inputs=((weight, v_axis), (ref_weight, v_axis), (bias, 0),
                                           (ref_bias, 0)))
  kernel = functools.partial(_linear_rows, direction=direction, beta=beta, temp=temp,
                             caps=(cap, ref_cap), weight_layout=weight_layout,
                             reduction=reduction,
                             vocab_axis=None if layout is None else layout.vocab, **config)

  def ref_specs(layout):
    return (layout.rows(), layout.vocab_matrix(weight_layout), layout.vocab_vector())

  out = run(kernel, layout, hidden, weight, bias, (ref_hidden, ref_weight, ref_bias), ref_specs,
            mask, weight_layout, reduction)
  return finish(out, reduction, mask, n, layout)


def _linear_rows(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, *,
                 direction, beta, temp, caps, chunks, weight_layout, reduction, accum_dtype,
                 precision, implementation, vocab_axis):
  """The fused kernel on (per-device) blocks; ``vocab_axis`` as in the divergence ``Spec``."""
  lead = hidden.shape[:-1]
  n = math.prod(lead)
  mask = transform.rows_mask(mask, n)
  div_spec = Spec(direction=direction, beta=beta, inv_temperature=1.0 / temp, chunks=chunks,
                  ref_grad=False, vocab_axis=vocab_axis, softcap=caps[0], ref_softcap=caps[1])
  spec = FusedSpec(chunks=chunks, weight_layout=weight_layout, inv_temperature=1.0 / temp,
                   block=LinearReference(div_spec, weight_layout, precision),
                   precision=precision, accum_dtype=accum_dtype, softcap=caps[0])
  ref_rows = (jax.lax.stop_gradient(ref_hidden.reshape(n, -1)),)
  ref_consts = jax.lax.stop_gradient((ref_weight, ref_bias))
  out = registry.call("fused", implementation, IMPLEMENTATIONS, hidden.reshape(n, -1), weight,
                      bias, ref_rows, ref_consts, mask, static=(spec, reduction))
  return out if reduction is not None else out.reshape(lead)




def fused_linear_kl_topk(hidden: jax.typing.ArrayLike, weight: jax.typing.ArrayLike,
                         ref_logprobs: jax.typing.ArrayLike, ref_indices: jax.typing.ArrayLike,
                         ref_tail: jax.typing.ArrayLike | None = None, *,
                         bias: jax.typing.ArrayLike | None = None, weight_layout: str = "dv",
                         direction: str = "forward", where: jax.typing.ArrayLike | None = None,
                         temperature: float = 1.0, beta: float = 0.5,
                         chunk_size: int | None = None, reduction: str | None = None,
                         accum_dtype: Any = jnp.float32, precision: Any = None,
                         partition: _sharding.Partition | None = None,
                         implementation: str | Sequence[str] | None = None,
                         softcap: float | None = None) -> jax.Array:
  r""":func:`kl_topk` of the logits ``hidden @ weight + bias``, never materializing them.

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
    implementation: ``None`` / ``"chunked"``, or ``"xla"`` (materializes the logits), or a
      sequence of them tried in order (one that cannot run here is skipped). ``"pallas"`` has
      no kernel for the top-k block math and raises ``NotImplementedError``.
    softcap: None, or a static cap c > 0 on the student's logits, c tanh(z / c), applied inside
      each block before the temperature, with its gradient (``-inf`` stays ``-inf``).

  Returns:
    float32 array of shape ``hidden.shape[:-1]``, or a scalar for a ``reduction``.

  Raises:
    ValueError: for mismatched shapes (naming them), k outside [1, V], non-integer or (where
      static) out-of-range or repeated indices, an unknown direction or layout, beta outside
      [0, 1], a traced or non-positive temperature, a bad ``where`` or ``chunk_size``.
    NotImplementedError: when no implementation named in ``implementation`` can run the call
      (``"pallas"`` alone), with each one's reason.

  .. math::

     \mathrm{KL}(R \,\|\, P), \qquad P = \text{coarsen}(\mathrm{softmax}(s(h W + b) / T))

  Example:
    >>> kl = ka.fused_linear_kl_topk(h, params["lm_head"]["kernel"], lp, idx, ref_tail=tail)
  """
  hidden, weight = jnp.asarray(hidden), jnp.asarray(weight)
  bias = None if bias is None else jnp.asarray(bias)
  _checks.check_choice("weight_layout", weight_layout, WEIGHT_LAYOUTS)
  vocab = check_linear(hidden, weight, bias, weight_layout)
  topk_api.check_indices_if_static(hidden.shape[:-1], vocab, ref_indices, where)
  return _fused_linear_kl_topk(
      hidden, weight, ref_logprobs, ref_indices, ref_tail, bias=bias, weight_layout=weight_layout,
      direction=direction, where=where, temperature=temperature, beta=beta,
      chunk_size=chunk_size, reduction=reduction, accum_dtype=accum_dtype, precision=precision,
      partition=partition, implementation=implementation, softcap=softcap)


@compiled.compiled
def _fused_linear_kl_topk(hidden, weight, ref_logprobs, ref_indices, ref_tail, *, bias,
                          weight_layout, direction, where, temperature, beta, chunk_size,
                          reduction, accum_dtype, precision, partition, implementation, softcap):
  """:func:`fused_linear_kl_topk` past the checks that need concrete values."""
  hidden, weight = jnp.asarray(hidden), jnp.asarray(weight)
  bias = None if bias is None else jnp.asarray(bias)
  vocab = check_linear(hidden, weight, bias, weight_layout)
  lead = hidden.shape[:-1]
  lp, idx, tail, mask = topk_api.teacher_rows(lead, vocab, ref_logprobs, ref_indices, ref_tail,
                                              where)
  spec, _ = topk_api.make_spec(direction, beta,
                               static_temperature(temperature, "fused_linear_kl_topk"),
                               chunking(chunk_size, vocab, fused=True), softcap)
  reduction = check_reduction(reduction)
  config = dict(accum_dtype=resolve_accum_dtype(accum_dtype),
                precision=resolve_precision(precision),
                impl=registry.names("fused_linear_kl_topk", implementation, IMPLEMENTATIONS))
  n = math.prod(lead)
  if n == 0:
    return empty_result(lead, reduction, _checks.compute_dtype(hidden, weight))
  v_axis = 1 if weight_layout == "dv" else 0
  layout = _sharding.resolve(partition, lead, vocab,
                             position_inputs=(hidden, lp, idx, tail, mask),
                             vocab_inputs=((weight, v_axis), (bias, 0)))
  kernel = functools.partial(_fused_topk_local, spec=spec, vocab=vocab,
                             weight_layout=weight_layout, reduction=reduction,
                             vocab_axis=None if layout is None else layout.vocab, **config)

  def ref_specs(layout):
    return (layout.rows(), layout.rows(), layout.positions())

  out = run(kernel, layout, hidden, weight, bias, (lp, idx, tail), ref_specs, mask,
            weight_layout, reduction)
  return finish(out, reduction, mask, n, layout)


def _fused_topk_local(hidden, weight, bias, lp, idx, tail, mask, *, spec, vocab, weight_layout,
                      reduction, accum_dtype, precision, impl, vocab_axis):
  """:func:`fused_linear_kl_topk` on (per-device) blocks."""
  lead = hidden.shape[:-1]
  n, k = math.prod(lead), lp.shape[-1]
  spec = dataclasses.replace(spec, vocab_axis=vocab_axis)
  fused_spec = FusedSpec(chunks=spec.chunks, weight_layout=weight_layout,
                         inv_temperature=spec.inv_temperature,
                         block=TopkReference(TopkSpec(spec, vocab)), precision=precision,
                         accum_dtype=accum_dtype, softcap=spec.softcap)
  mask = transform.rows_mask(mask, n)
  ref_rows = (lp.reshape(n, k), idx.reshape(n, k), tail.reshape(n))
  out = registry.call("fused", impl, IMPLEMENTATIONS, hidden.reshape(n, -1), weight, bias,
                      ref_rows, (), mask, static=(fused_spec, reduction))
  return out if reduction is not None else out.reshape(lead)
