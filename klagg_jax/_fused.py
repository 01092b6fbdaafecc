"""Divergences fused with the LM head: logits = hidden @ weight (+ bias), made block by block.

The ``[N, V]`` logits exist neither in the forward nor in the backward pass: each block of rows
makes its ``[rows, V]`` logits, takes the divergence and/or its logit gradient, and turns that
into ``d hidden`` rows and a ``d weight`` / ``d bias`` accumulation. Two kernels share the block
math:

* :func:`fused_rows` returns the per-position divergence ``[N]`` (any aggregator can follow).
  Its backward pass recomputes both sides' logits: 2 matmuls forward, 4 backward.
* :func:`fused_total` returns ``scale * sum_i div_i``, a scalar (``reduction="mean"`` / ``"sum"``).
  Its forward pass forms each block's logit gradient right after the divergence and turns it into
  ``d hidden`` rows and the ``d weight`` accumulation there; the backward pass only multiplies
  them by the incoming cotangent: 4 matmuls in all, the distillation case (the design of
  Liger-Kernel's fused linear losses). Evaluated without a gradient, it does the 2 forward ones.

Matmul operands stay in the inputs' dtype (a 16-bit weight is never copied to float32: the
logit gradient is cast to the weight's dtype instead, as the peers do), with float32
accumulation (``preferred_element_type``) and the user's ``precision``. The reference side is
generic (a "block" object), so the full-logits reference here and the stored top-k teacher of
``_topk.py`` share both kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from klagg_jax import _checks, _config, _divergence, _sharding, _xla
from klagg_jax._chunked import Chunking, chunking, scan_row_chunks

WEIGHT_LAYOUTS = ("dv", "vd")
REDUCTIONS = (None, "mean", "sum")


class ReferenceBlock(Protocol):
  """The reference side of a fused divergence (hashable: part of a static spec)."""

  def forward(self, logits: jax.Array, ref_rows: tuple, ref_consts: tuple,
              mask: jax.Array) -> tuple[jax.Array, tuple]:
    """(divergence [C], per-row statistics) of student ``logits`` [C, V] (scaled, masked)."""

  def backward(self, logits: jax.Array, ref_rows: tuple, ref_consts: tuple, stats: tuple,
               mask: jax.Array) -> jax.Array:
    """d divergence / d logits, [C, V], from the statistics of :meth:`forward`."""

  def value_and_grad(self, logits: jax.Array, ref_rows: tuple, ref_consts: tuple,
                     mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(divergence [C], d divergence / d logits [C, V]), the reference side made once."""


@dataclasses.dataclass(frozen=True)
class FusedSpec:
  """Static configuration of one fused kernel call (hashable: a ``nondiff_argnums`` key)."""
  chunks: Chunking
  weight_layout: str  # "dv": weight is [D, V]; "vd": [V, D] (tied embedding)
  inv_temperature: float
  block: Any  # a ReferenceBlock
  precision: Any = None  # a jax.lax.Precision, or None for JAX's default
  accum_dtype: Any = jnp.float32  # dtype of the d weight / d bias accumulators


# ------------------------------------------------------------------------------------------------
# Block math.


def linear_logits(hidden: jax.Array, weight: jax.Array, bias: jax.Array | None, layout: str,
                  precision: Any = None) -> jax.Array:
  """hidden @ weight (+ bias) with float32 accumulation, for either weight layout."""
  contract = 0 if layout == "dv" else 1
  dtype = _checks.compute_dtype(hidden, weight)
  z = jax.lax.dot_general(hidden, weight, (((1,), (contract,)), ((), ())), precision=precision,
                          preferred_element_type=dtype)
  if bias is not None:
    z = z + bias.astype(dtype)[None, :]
  return z


def _student_block(h, weight, bias, mask, spec: FusedSpec):
  z = linear_logits(h, weight, bias, spec.weight_layout, spec.precision)
  if spec.inv_temperature != 1.0:
    z = z * jnp.asarray(spec.inv_temperature, z.dtype)
  return jnp.where(mask[:, None], z, 0.0)


def _grad_block(h, mask, fresh, dz, weight, spec: FusedSpec):
  """(d hidden rows [C, D], d weight and d bias contributions) of a block's logit gradient.

  ``dz`` is already scaled and zero on masked rows. Rows an earlier (overlapping) block has seen
  add nothing to the sums; masked rows' hidden states are zeroed so NaN padding cannot reach
  d weight through 0 * NaN.
  """
  dtype = _checks.compute_dtype(h, weight)
  op = jnp.promote_types(h.dtype, weight.dtype)  # matmul operands: no float32 copy of 16-bit ones
  dz_op = dz.astype(op)
  new = jnp.where(fresh[:, None], dz_op, jnp.zeros((), op))
  h_op = jnp.where(mask[:, None], h, jnp.zeros((), h.dtype)).astype(op)
  p, acc = spec.precision, spec.accum_dtype
  if spec.weight_layout == "dv":
    d_h = jax.lax.dot_general(dz_op, weight, (((1,), (1,)), ((), ())), precision=p,
                              preferred_element_type=dtype)
    d_w = jax.lax.dot_general(h_op, new, (((0,), (0,)), ((), ())), precision=p,
                              preferred_element_type=acc)
  else:
    d_h = jax.lax.dot_general(dz_op, weight, (((1,), (0,)), ((), ())), precision=p,
                              preferred_element_type=dtype)
    d_w = jax.lax.dot_general(new, h_op, (((0,), (0,)), ((), ())), precision=p,
                              preferred_element_type=acc)
  d_b = jnp.where(fresh[:, None], dz, 0.0).sum(0).astype(acc)
  return d_h, d_w, d_b


def _zero_grads_of(tree):
  return jax.tree.map(lambda _: None, tree)


# ------------------------------------------------------------------------------------------------
# Per-position kernel: [N] divergences; the backward recomputes (6 matmuls in all).


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def fused_rows(hidden, weight, bias, ref_rows, ref_consts, mask, spec: FusedSpec):
  """Per-row divergence of the student logits ``hidden @ weight + bias`` from the reference
  described by ``spec.block`` with its row data ``ref_rows`` and constants ``ref_consts``."""
  return _rows_fwd(hidden, weight, bias, ref_rows, ref_consts, mask, spec)[0]


def _rows_fwd(hidden, weight, bias, ref_rows, ref_consts, mask, spec):
  def body(part, fresh, carry):
    h_c, m_c, *r_c = part
    a = _student_block(h_c, weight, bias, m_c, spec)
    div, stats = spec.block.forward(a, tuple(r_c), ref_consts, m_c)
    return carry, [jnp.where(m_c, div, 0.0), *stats]

  _, outs = scan_row_chunks(body, (hidden, mask, *ref_rows), spec.chunks)
  return outs[0], (hidden, weight, bias, ref_rows, ref_consts, mask, tuple(outs[1:]))


def _rows_bwd(spec, residuals, g):
  hidden, weight, bias, ref_rows, ref_consts, mask, stats = residuals
  dtype = _checks.compute_dtype(hidden, weight)
  n_ref = len(ref_rows)
  scale = jnp.asarray(spec.inv_temperature, dtype)

  def body(part, fresh, carry):
    d_weight, d_bias = carry
    h_c, m_c, g_c = part[:3]
    r_c, st_c = tuple(part[3:3 + n_ref]), tuple(part[3 + n_ref:])
    a = _student_block(h_c, weight, bias, m_c, spec)
    dz = spec.block.backward(a, r_c, ref_consts, st_c, m_c)
    dz = jnp.where(m_c[:, None], dz * (g_c.astype(dtype) * scale)[:, None], 0.0)
    d_h, d_w, d_b = _grad_block(h_c, m_c, fresh, dz, weight, spec)
    d_bias = None if d_bias is None else d_bias + d_b
    return (d_weight + d_w, d_bias), [d_h.astype(hidden.dtype)]

  carry0 = (jnp.zeros(weight.shape, spec.accum_dtype),
            None if bias is None else jnp.zeros(bias.shape, spec.accum_dtype))
  (d_weight, d_bias), (d_hidden,) = scan_row_chunks(body, (hidden, mask, g, *ref_rows, *stats),
                                                    spec.chunks, carry0)
  d_bias = None if bias is None else d_bias.astype(bias.dtype)
  return (d_hidden, d_weight.astype(weight.dtype), d_bias, _zero_grads_of(ref_rows),
          _zero_grads_of(ref_consts), None)


fused_rows.defvjp(_rows_fwd, _rows_bwd)


# ------------------------------------------------------------------------------------------------
# Scalar kernel: scale * sum of the divergences, its gradient formed in the forward pass.


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def fused_total(hidden, weight, bias, ref_rows, ref_consts, mask, spec: FusedSpec):
  """``sum_i div_i`` over the valid rows, a scalar."""

  def body(part, fresh, total):
    h_c, m_c, *r_c = part
    a = _student_block(h_c, weight, bias, m_c, spec)
    div, _ = spec.block.forward(a, tuple(r_c), ref_consts, m_c)
    return total + jnp.where(m_c & fresh, div, 0.0).sum(), []

  total, _ = scan_row_chunks(body, (hidden, mask, *ref_rows), spec.chunks,
                             jnp.zeros((), _checks.compute_dtype(hidden, weight)))
  return total


def _total_fwd(hidden, weight, bias, ref_rows, ref_consts, mask, spec):
  dtype = _checks.compute_dtype(hidden, weight)
  grad_scale = jnp.asarray(spec.inv_temperature, dtype)

  def body(part, fresh, carry):
    total, d_weight, d_bias = carry
    h_c, m_c, *r_c = part
    a = _student_block(h_c, weight, bias, m_c, spec)
    div, dz = spec.block.value_and_grad(a, tuple(r_c), ref_consts, m_c)
    dz = jnp.where(m_c[:, None], dz * grad_scale, 0.0)
    d_h, d_w, d_b = _grad_block(h_c, m_c, fresh, dz, weight, spec)
    total = total + jnp.where(m_c & fresh, div, 0.0).sum()
    d_bias = None if d_bias is None else d_bias + d_b
    return (total, d_weight + d_w, d_bias), [d_h.astype(hidden.dtype)]

  carry0 = (jnp.zeros((), dtype), jnp.zeros(weight.shape, spec.accum_dtype),
            None if bias is None else jnp.zeros(bias.shape, spec.accum_dtype))
  (total, d_weight, d_bias), (d_hidden,) = scan_row_chunks(
      body, (hidden, mask, *ref_rows), spec.chunks, carry0)
  d_bias = None if bias is None else d_bias.astype(bias.dtype)
  grads = (d_hidden, d_weight.astype(weight.dtype), d_bias)
  return total, (grads, ref_rows, ref_consts)


def _total_bwd(spec, residuals, g):
  (d_hidden, d_weight, d_bias), ref_rows, ref_consts = residuals

  def times_g(x):
    return None if x is None else (x * g.astype(x.dtype)).astype(x.dtype)

  return (times_g(d_hidden), times_g(d_weight), times_g(d_bias), _zero_grads_of(ref_rows),
          _zero_grads_of(ref_consts), None)


fused_total.defvjp(_total_fwd, _total_bwd)


def apply(hidden, weight, bias, ref_rows, ref_consts, mask, spec: FusedSpec, *,
          reduction: str | None, implementation: str) -> jax.Array:
  """Runs a fused divergence on ``[N, D]`` rows: ``[N]`` for ``reduction=None``, else the sum.

  ``implementation="xla"`` materializes the student's logits and lets autodiff differentiate
  (the reference, and the forward-mode AD path); the reference block's own logits are made the
  same way from its row data.
  """
  if implementation == "xla":
    z = linear_logits(hidden, weight, bias, spec.weight_layout, spec.precision)
    if spec.inv_temperature != 1.0:
      z = z * jnp.asarray(spec.inv_temperature, z.dtype)
    z = jnp.where(mask[:, None], z, 0.0)
    div = spec.block.xla(z, ref_rows, ref_consts, mask)
    div = jnp.where(mask, div, 0.0)
    return div if reduction is None else div.sum()
  if reduction is None:
    return fused_rows(hidden, weight, bias, ref_rows, ref_consts, mask, spec)
  return fused_total(hidden, weight, bias, ref_rows, ref_consts, mask, spec)


# ------------------------------------------------------------------------------------------------
# The full-logits reference: ref_hidden @ ref_weight + ref_bias, also made per block.


@dataclasses.dataclass(frozen=True)
class LinearReference:
  """Reference logits from hidden states and an output projection (no gradient)."""
  spec: _divergence.Spec
  weight_layout: str
  precision: Any = None

  def _logits(self, ref_rows, ref_consts, mask):
    ref_weight, ref_bias = ref_consts
    z = linear_logits(ref_rows[0], ref_weight, ref_bias, self.weight_layout, self.precision)
    if self.spec.inv_temperature != 1.0:
      z = z * jnp.asarray(self.spec.inv_temperature, z.dtype)
    return jnp.where(mask[:, None], z, 0.0)

  def forward(self, logits, ref_rows, ref_consts, mask):
    return _divergence.block_forward(logits, self._logits(ref_rows, ref_consts, mask), self.spec)

  def backward(self, logits, ref_rows, ref_consts, stats, mask):
    b = self._logits(ref_rows, ref_consts, mask)
    return _divergence.block_backward(logits, b, stats, self.spec)[0]

  def value_and_grad(self, logits, ref_rows, ref_consts, mask):
    b = self._logits(ref_rows, ref_consts, mask)
    div, stats = _divergence.block_forward(logits, b, self.spec)
    return div, _divergence.block_backward(logits, b, stats, self.spec)[0]

  def xla(self, logits, ref_rows, ref_consts, mask):
    b = jax.lax.stop_gradient(self._logits(ref_rows, ref_consts, mask))
    spec = dataclasses.replace(self.spec, inv_temperature=1.0, ref_grad=False)
    return _xla.divergence_rows(logits, b, mask, spec)


# ------------------------------------------------------------------------------------------------
# Validation shared with the top-k variant.


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


def run(kernel, layout, args, specs, vary, reduction) -> jax.Array:
  """``kernel(*args)``, or :func:`klagg_jax._sharding.shard` of it (summed over the devices'
  positions for a reduced result)."""
  if layout is None:
    return kernel(*args)
  return _sharding.shard(kernel, layout, args, specs, vary=vary,
                         reduce_scalar=reduction is not None)


# ------------------------------------------------------------------------------------------------
# Public API.


def fused_linear_kl(hidden: jax.typing.ArrayLike, weight: jax.typing.ArrayLike,
                    ref_hidden: jax.typing.ArrayLike, ref_weight: jax.typing.ArrayLike, *,
                    direction: str = "reverse", where: jax.typing.ArrayLike | None = None,
                    bias: jax.typing.ArrayLike | None = None,
                    ref_bias: jax.typing.ArrayLike | None = None, temperature: float = 1.0,
                    beta: float = 0.5, chunk_size: int | None = None,
                    weight_layout: str = "dv", reduction: str | None = None,
                    accum_dtype: Any = jnp.float32, precision: Any = None,
                    partition: _sharding.Partition | None = None,
                    implementation: str | None = None) -> jax.Array:
  """Divergence with logits = hidden @ weight + bias, never materializing ``[N, V]`` logits.

  Same semantics as :func:`kl_per_position` applied to z = ``hidden @ weight + bias`` and
  z_ref = ``ref_hidden @ ref_weight + ref_bias`` (``"reverse"``: KL(p || r), ``"forward"``:
  KL(r || p), ``"js"``: beta KL(r || m) + (1 - beta) KL(p || m), m = (1 - beta) p + beta r, with
  p = softmax(z / T), r = softmax(z_ref / T)), but the logits are made ``chunk_size`` rows at a
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
    implementation: ``None`` (``"chunked"``), ``"chunked"``, or ``"xla"`` (materializes the
      logits; supports forward-mode AD).

  Returns:
    float32 array of shape ``hidden.shape[:-1]`` for ``reduction=None``, else a float32 scalar
    (float64 for float64 inputs with x64 on).

  Raises:
    ValueError: for mismatched shapes (naming both), an unknown direction, layout, reduction or
      implementation, beta outside [0, 1], a non-static or non-positive temperature, a bad
      ``where``, ``chunk_size``, ``accum_dtype`` or ``precision``.

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
  direction, beta = _divergence.resolve_direction(direction, beta)
  temp = static_temperature(temperature, "fused_linear_kl")
  reduction = check_reduction(reduction)
  config = dict(chunks=chunking(chunk_size, vocab, fused=True),
                accum_dtype=resolve_accum_dtype(accum_dtype),
                precision=resolve_precision(precision),
                implementation=_config.implementation(implementation))
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
                             weight_layout=weight_layout, reduction=reduction,
                             vocab_axis=None if layout is None else layout.vocab, **config)
  args = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask)
  specs = vary = None
  if layout is not None:
    # Each device runs the kernel on its blocks. Its d hidden is partial over the vocabulary
    # shards and its d weight / d bias over the batch shards: casting those inputs to vary
    # there makes shard_map's transpose psum the partial gradients.
    w_spec, b_spec = layout.vocab_matrix(weight_layout), layout.vocab_vector()
    specs = (layout.rows(), w_spec, b_spec, layout.rows(), w_spec, b_spec, layout.positions())
    vary = (layout.vocab_axes, layout.lead_axes, layout.lead_axes, (), (), (), ())
  out = run(kernel, layout, args, specs, vary, reduction)
  return finish(out, reduction, mask, n, layout)


def _linear_rows(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, *,
                 direction, beta, temp, chunks, weight_layout, reduction, accum_dtype, precision,
                 implementation, vocab_axis):
  """The fused kernel on (per-device) blocks; ``vocab_axis`` as in :class:`_divergence.Spec`."""
  lead = hidden.shape[:-1]
  n = math.prod(lead)
  mask = jnp.ones((n,), bool) if mask is None else mask.reshape(n)
  div_spec = _divergence.Spec(direction=direction, beta=beta, inv_temperature=1.0 / temp,
                              chunks=chunks, ref_grad=False, vocab_axis=vocab_axis)
  spec = FusedSpec(chunks=chunks, weight_layout=weight_layout, inv_temperature=1.0 / temp,
                   block=LinearReference(div_spec, weight_layout, precision),
                   precision=precision, accum_dtype=accum_dtype)
  ref_rows = (jax.lax.stop_gradient(ref_hidden.reshape(n, -1)),)
  ref_consts = jax.lax.stop_gradient((ref_weight, ref_bias))
  out = apply(hidden.reshape(n, -1), weight, bias, ref_rows, ref_consts, mask, spec,
              reduction=reduction, implementation=implementation)
  return out if reduction is not None else out.reshape(lead)
