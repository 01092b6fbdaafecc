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
generic (a "block" object), so the full-logits reference and the stored top-k teacher share both
kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from klagg_jax import _checks
from klagg_jax._chunked import Chunking
from klagg_jax._numerics import is_zero
from klagg_jax._ops import transform
from klagg_jax._ops.divergence.base import Spec, block_backward, block_forward
from klagg_jax._ops.topk.base import (TopkSpec, prepare_teacher, topk_block_backward,
                                      topk_block_forward, topk_block_value_and_grad)


class ReferenceBlock(Protocol):
  """The reference side of a fused divergence (hashable: part of a static spec)."""

  def forward(self, logits: jax.Array, ref_rows: tuple, ref_consts: tuple,
              mask: jax.Array) -> tuple[jax.Array, tuple]:
    """(divergence [C], per-row statistics) of student ``logits`` [C, V] (transformed, masked)."""

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
  softcap: float | None = None  # the student's cap, before the temperature


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


def student_block(h, weight, bias, mask, spec: FusedSpec):
  """(the block's transformed student logits [C, V], d logits / d (h @ weight + bias))."""
  z = linear_logits(h, weight, bias, spec.weight_layout, spec.precision)
  return transform.apply(z, mask, spec.softcap, spec.inv_temperature, z.dtype)


def grad_block(h, mask, fresh, dz, g, weight, spec: FusedSpec):
  """(d hidden rows [C, D], d weight and d bias contributions) of a block's logit gradient.

  ``dz`` (float32, zero on masked rows) is d div / d (h @ weight + bias) per row, and ``g`` the
  ``[C]`` incoming gradient (None: 1). For a 16-bit weight the matmul operand is cast to its
  dtype: ``dz`` is scaled per row by g / max|g| first and the float32 results by max|g| after,
  so a small cotangent (a ``.mean()`` over many rows) cannot push the product into 16-bit
  subnormals. Rows an earlier (overlapping) block has seen add nothing to the sums; masked rows'
  hidden states are zeroed so NaN padding cannot reach d weight through 0 * NaN.
  """
  dtype = _checks.compute_dtype(h, weight)
  op = jnp.promote_types(h.dtype, weight.dtype)  # matmul operands: no float32 copy of 16-bit ones
  if g is None:
    top, rel = jnp.ones((), dtype), None
  else:
    g = jnp.where(mask, g.astype(dtype), 0.0)
    top = jnp.abs(g).max()
    rel = g / jnp.where(is_zero(top), jnp.ones_like(top), top)
  dz_rel = dz if rel is None else dz * rel[:, None]
  dz_op = dz_rel.astype(op)
  new = jnp.where(fresh[:, None], dz_op, jnp.zeros((), op))
  h_op = jnp.where(mask[:, None], h, jnp.zeros((), h.dtype)).astype(op)
  p, acc = spec.precision, spec.accum_dtype
  if spec.weight_layout == "dv":
    d_h = jax.lax.dot_general(dz_op, weight, (((1,), (1,)), ((), ())), precision=p,
                              preferred_element_type=dtype)
    d_w = jax.lax.dot_general(h_op, new, (((0,), (0,)), ((), ())), precision=p,
                              preferred_element_type=jnp.float32)
  else:
    d_h = jax.lax.dot_general(dz_op, weight, (((1,), (0,)), ((), ())), precision=p,
                              preferred_element_type=dtype)
    d_w = jax.lax.dot_general(new, h_op, (((0,), (0,)), ((), ())), precision=p,
                              preferred_element_type=jnp.float32)
  d_b = jnp.where(fresh[:, None], dz_rel, 0.0).sum(0)
  return d_h * top, (d_w * top).astype(acc), (d_b * top).astype(acc)


# ------------------------------------------------------------------------------------------------
# The reference sides.


@dataclasses.dataclass(frozen=True)
class LinearReference:
  """Reference logits from hidden states and an output projection (no gradient)."""
  spec: Spec
  weight_layout: str
  precision: Any = None

  def logits(self, ref_rows, ref_consts, mask):
    ref_weight, ref_bias = ref_consts
    z = linear_logits(ref_rows[0], ref_weight, ref_bias, self.weight_layout, self.precision)
    return transform.transform(z, mask, self.spec.ref_softcap, self.spec.inv_temperature,
                               z.dtype)

  def forward(self, logits, ref_rows, ref_consts, mask):
    return block_forward(logits, self.logits(ref_rows, ref_consts, mask), self.spec)

  def backward(self, logits, ref_rows, ref_consts, stats, mask):
    return block_backward(logits, self.logits(ref_rows, ref_consts, mask), stats, self.spec)[0]

  def value_and_grad(self, logits, ref_rows, ref_consts, mask):
    b = self.logits(ref_rows, ref_consts, mask)
    div, stats = block_forward(logits, b, self.spec)
    return div, block_backward(logits, b, stats, self.spec)[0]


@dataclasses.dataclass(frozen=True)
class TopkReference:
  """The stored top-k teacher: row data ``(log-probs [N, k], indices [N, k], tail [N])``."""
  spec: TopkSpec

  def _teacher(self, logits, ref_rows, mask):
    return prepare_teacher(*ref_rows, mask, self.spec.vocab, logits.dtype)

  def forward(self, logits, ref_rows, ref_consts, mask):
    return topk_block_forward(logits, self._teacher(logits, ref_rows, mask), self.spec.div)

  def backward(self, logits, ref_rows, ref_consts, stats, mask):
    return topk_block_backward(logits, self._teacher(logits, ref_rows, mask), stats,
                               self.spec.div)

  def value_and_grad(self, logits, ref_rows, ref_consts, mask):
    return topk_block_value_and_grad(logits, self._teacher(logits, ref_rows, mask),
                                     self.spec.div)
