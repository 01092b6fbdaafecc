"""Divergences fused with the LM head: logits = hidden @ weight (+ bias), made chunk by chunk.

The ``[N, V]`` logits exist neither in the forward nor in the backward pass: each chunk of rows
makes its ``[chunk, V]`` logits, takes the divergence (forward) or its logit gradient
(backward), and turns that into ``d hidden`` rows and a ``d weight`` / ``d bias`` accumulation.
``fused_rows`` is generic over the reference side (a "block" object), so the full-logits
reference here and the stored top-k teacher of ``_topk.py`` share one kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from klagg_jax import _checks, _divergence, _sharding
from klagg_jax._chunked import resolve_chunk_rows, scan_row_chunks

WEIGHT_LAYOUTS = ("dv", "vd")
# Rows per chunk aim at this many bytes of float32 [chunk, V] logits: more than the plain
# kernel's, since each chunk feeds matmuls that want many rows (on this project's 2-core CPU, the
# gradient at N=2048, V=32768, D=512 took 6.2 s with 64-row chunks and 3.0 s with 256).
_FUSED_BLOCK_BYTES = {"cpu": 1 << 25, "gpu": 1 << 27, "tpu": 1 << 27}


class ReferenceBlock(Protocol):
  """The reference side of a fused divergence (hashable: part of a static spec)."""

  def forward(self, logits: jax.Array, ref_rows: tuple, ref_consts: tuple,
              mask: jax.Array) -> tuple[jax.Array, tuple]:
    """(divergence [C], per-row statistics) of student ``logits`` [C, V] (scaled, masked)."""

  def backward(self, logits: jax.Array, ref_rows: tuple, ref_consts: tuple, stats: tuple,
               mask: jax.Array) -> jax.Array:
    """d divergence / d logits, [C, V]."""


@dataclasses.dataclass(frozen=True)
class FusedSpec:
  chunk: int
  weight_layout: str  # "dv": weight is [D, V]; "vd": [V, D] (tied embedding)
  inv_temperature: float
  block: Any  # a ReferenceBlock


def linear_logits(hidden: jax.Array, weight: jax.Array, bias: jax.Array | None,
                  layout: str) -> jax.Array:
  """hidden @ weight (+ bias) in float32 accumulation, for either weight layout."""
  contract = 0 if layout == "dv" else 1
  dtype = _checks.compute_dtype(hidden, weight)
  z = jax.lax.dot_general(hidden, weight, (((1,), (contract,)), ((), ())),
                          preferred_element_type=dtype)
  if bias is not None:
    z = z + bias.astype(dtype)[None, :]
  return z


def default_fused_chunk(n_rows: int, vocab: int) -> int:
  budget = _FUSED_BLOCK_BYTES.get(jax.default_backend(), _FUSED_BLOCK_BYTES["gpu"])
  return int(max(1, min(n_rows, budget // (4 * max(vocab, 1)))))


def _student_block(h, weight, bias, mask, spec: FusedSpec):
  z = linear_logits(h, weight, bias, spec.weight_layout)
  if spec.inv_temperature != 1.0:
    z = z * jnp.asarray(spec.inv_temperature, z.dtype)
  return jnp.where(mask[:, None], z, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def fused_rows(hidden, weight, bias, ref_rows, ref_consts, mask, spec: FusedSpec):
  """Per-row divergence of the student logits ``hidden @ weight + bias`` from the reference
  described by ``spec.block`` with its row data ``ref_rows`` and constants ``ref_consts``."""
  return _fused_fwd(hidden, weight, bias, ref_rows, ref_consts, mask, spec)[0]


def _fused_fwd(hidden, weight, bias, ref_rows, ref_consts, mask, spec):
  def body(part, fresh, carry):
    h_c, m_c, *r_c = part
    a = _student_block(h_c, weight, bias, m_c, spec)
    div, stats = spec.block.forward(a, tuple(r_c), ref_consts, m_c)
    return carry, [jnp.where(m_c, div, 0.0), *stats]

  _, outs = scan_row_chunks(body, (hidden, mask, *ref_rows), spec.chunk)
  return outs[0], (hidden, weight, bias, ref_rows, ref_consts, mask, tuple(outs[1:]))


def _fused_bwd(spec, residuals, g):
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
    # Rows already seen by an earlier (overlapping) chunk add nothing to the sums.
    dz_new = jnp.where(fresh[:, None], dz, 0.0)
    h32 = jnp.where(m_c[:, None], h_c.astype(dtype), 0.0)  # NaN padding must not reach d weight
    if spec.weight_layout == "dv":
      d_h = jax.lax.dot_general(dz, weight, (((1,), (1,)), ((), ())), preferred_element_type=dtype)
      d_weight = d_weight + jax.lax.dot_general(h32, dz_new, (((0,), (0,)), ((), ())))
    else:
      d_h = jax.lax.dot_general(dz, weight, (((1,), (0,)), ((), ())), preferred_element_type=dtype)
      d_weight = d_weight + jax.lax.dot_general(dz_new, h32, (((0,), (0,)), ((), ())))
    if d_bias is not None:
      d_bias = d_bias + dz_new.sum(0)
    return (d_weight, d_bias), [d_h.astype(hidden.dtype)]

  carry0 = (jnp.zeros(weight.shape, dtype), None if bias is None else jnp.zeros(bias.shape, dtype))
  (d_weight, d_bias), (d_hidden,) = scan_row_chunks(body, (hidden, mask, g, *ref_rows, *stats),
                                                    spec.chunk, carry0)
  d_bias = None if bias is None else d_bias.astype(bias.dtype)
  zeros_like_tree = lambda t: jax.tree.map(lambda _: None, t)
  return (d_hidden, d_weight.astype(weight.dtype), d_bias, zeros_like_tree(ref_rows),
          zeros_like_tree(ref_consts), None)


fused_rows.defvjp(_fused_fwd, _fused_bwd)


# ------------------------------------------------------------------------------------------------
# The full-logits reference: ref_hidden @ ref_weight + ref_bias, also made per chunk.


@dataclasses.dataclass(frozen=True)
class LinearReference:
  """Reference logits from hidden states and an output projection (no gradient)."""
  spec: _divergence.Spec
  weight_layout: str

  def _logits(self, ref_rows, ref_consts, mask):
    ref_weight, ref_bias = ref_consts
    z = linear_logits(ref_rows[0], ref_weight, ref_bias, self.weight_layout)
    if self.spec.inv_temperature != 1.0:
      z = z * jnp.asarray(self.spec.inv_temperature, z.dtype)
    return jnp.where(mask[:, None], z, 0.0)

  def forward(self, logits, ref_rows, ref_consts, mask):
    return _divergence.block_forward(logits, self._logits(ref_rows, ref_consts, mask), self.spec)

  def backward(self, logits, ref_rows, ref_consts, stats, mask):
    b = self._logits(ref_rows, ref_consts, mask)
    return _divergence.block_backward(logits, b, stats, self.spec)[0]


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


def fused_linear_kl(hidden: jax.typing.ArrayLike, weight: jax.typing.ArrayLike,
                    ref_hidden: jax.typing.ArrayLike, ref_weight: jax.typing.ArrayLike, *,
                    direction: str = "reverse", where: jax.typing.ArrayLike | None = None,
                    bias: jax.typing.ArrayLike | None = None,
                    ref_bias: jax.typing.ArrayLike | None = None, temperature: float = 1.0,
                    beta: float = 0.5, chunk_size: int | None = None,
                    weight_layout: str = "dv",
                    partition: _sharding.Partition | None = None) -> jax.Array:
  """Per-position divergence with logits = hidden @ weight + bias, never materializing ``[N, V]``.

  Same semantics as :func:`kl_per_position` applied to ``hidden @ weight + bias`` and
  ``ref_hidden @ ref_weight + ref_bias`` (``"reverse"``: KL(p || r), ``"forward"``: KL(r || p),
  ``"js"``: generalized Jensen-Shannon with ``beta``), but the logits are made ``chunk_size``
  rows at a time in the forward and again in the backward pass, where the gradients with respect
  to ``hidden``, ``weight`` and ``bias`` are formed chunk by chunk (the weight gradient
  accumulated). The reference side gets no gradient.

  Args:
    hidden: student hidden states ``[..., D]``.
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
    chunk_size: rows per chunk (per device when sharded); ``None`` lets the library choose.
    weight_layout: ``"dv"`` or ``"vd"``.
    partition: a :class:`klagg_jax.Partition`: ``batch_axis`` splits the first axis of
      ``hidden`` / ``ref_hidden``, ``vocab_axis`` the V axis of the weights and biases (a
      tensor-parallel LM head). Each device makes only its ``[rows, V / shards]`` logits blocks;
      the weight gradient stays vocabulary-sharded, the hidden gradient is summed over the
      vocabulary shards. ``None`` reads the layout off the inputs where JAX knows it
      (``Explicit`` mesh axes).

  Returns:
    float32 array of shape ``hidden.shape[:-1]`` (sharded over the batch axis when it is).

  Raises:
    ValueError: for mismatched shapes (naming both), an unknown direction or layout, beta
      outside [0, 1], a non-static or non-positive temperature, a bad ``where`` or chunk size.

  Example:
    >>> kl = ka.fused_linear_kl(h, params["lm_head"]["kernel"], h_ref, ref_kernel, where=mask)
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
  temp = _checks.check_positive_if_static("temperature", temperature)
  if temp is None:
    raise ValueError("fused_linear_kl needs a static temperature (a Python number); got a traced "
                     "value. Scale hidden or weight instead.")
  lead = hidden.shape[:-1]
  mask = _checks.check_where(where, lead, "positions (hidden.shape[:-1])")
  if math.prod(lead) == 0:
    return jnp.zeros(lead, jnp.float32)
  v_axis = 1 if weight_layout == "dv" else 0
  layout = _sharding.resolve(partition, lead, vocab, position_inputs=(hidden, ref_hidden, mask),
                             vocab_inputs=((weight, v_axis), (ref_weight, v_axis), (bias, 0),
                                           (ref_bias, 0)))
  kernel = functools.partial(_linear_rows, direction=direction, beta=beta, temp=temp,
                             chunk_size=chunk_size, weight_layout=weight_layout,
                             vocab_axis=None if layout is None else layout.vocab)
  args = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask)
  if layout is None:
    return kernel(*args)
  # Each device runs the kernel on its blocks. Its d hidden is partial over the vocabulary
  # shards and its d weight / d bias over the batch shards: casting those inputs to vary there
  # makes shard_map's transpose psum the partial gradients.
  w_spec, b_spec = layout.vocab_matrix(weight_layout), layout.vocab_vector()
  return _sharding.shard(kernel, layout, args,
                         (layout.rows(), w_spec, b_spec, layout.rows(), w_spec, b_spec,
                          layout.positions()),
                         vary=(layout.vocab_axes, layout.lead_axes, layout.lead_axes, (), (), (),
                               ()))


def _linear_rows(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, *, direction,
                 beta, temp, chunk_size, weight_layout, vocab_axis):
  """The fused kernel on (per-device) blocks; ``vocab_axis`` as in :class:`_divergence.Spec`."""
  lead = hidden.shape[:-1]
  n = math.prod(lead)
  vocab = _vocab_of("weight", weight, weight_layout)[1]
  mask = jnp.ones((n,), bool) if mask is None else mask.reshape(n)
  chunk = (default_fused_chunk(n, vocab) if chunk_size is None
           else resolve_chunk_rows(chunk_size, n, vocab))
  div_spec = _divergence.Spec(direction=direction, beta=beta, inv_temperature=1.0 / temp,
                              chunk=chunk, ref_grad=False, vocab_axis=vocab_axis)
  spec = FusedSpec(chunk=chunk, weight_layout=weight_layout, inv_temperature=1.0 / temp,
                   block=LinearReference(div_spec, weight_layout))
  ref_rows = (jax.lax.stop_gradient(ref_hidden.reshape(n, -1)),)
  ref_consts = jax.lax.stop_gradient((ref_weight, ref_bias))
  out = fused_rows(hidden.reshape(n, -1), weight, bias, ref_rows, ref_consts, mask, spec)
  return out.reshape(lead)
