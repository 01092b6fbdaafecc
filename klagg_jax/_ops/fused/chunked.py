"""The ``"chunked"`` fused kernels: per-position (recomputing VJP) and the reduced scalar.

:func:`fused_rows` returns the per-position divergence ``[N]`` (any aggregator can follow); its
backward pass recomputes both sides' logits: 2 matmuls forward, 4 backward. :func:`fused_total`
returns ``sum_i div_i``: its forward pass forms each block's logit gradient right after the
divergence and turns it into ``d hidden`` rows and the ``d weight`` accumulation there, and the
backward pass only multiplies them by the incoming cotangent: 4 matmuls in all, the
distillation case (the design of Liger-Kernel's fused linear losses).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from klagg_jax import _checks
from klagg_jax._chunked import scan_row_chunks
from klagg_jax._ops.fused.base import FusedSpec, grad_block, student_block
from klagg_jax._ops.rows import hint_jvp, row_kernel


def _zero_grads_of(tree):
  return jax.tree.map(lambda _: None, tree)


def _forward(rows, consts, mask, spec: FusedSpec):
  weight, bias, ref_consts = consts
  a = student_block(rows[0], weight, bias, mask, spec)[0]
  return spec.block.forward(a, rows[1:], ref_consts, mask)


def _backward(rows, consts, mask, fresh, stats, g, spec: FusedSpec, carry):
  weight, bias, ref_consts = consts
  h = rows[0]
  a, slope = student_block(h, weight, bias, mask, spec)
  dz = jnp.where(mask[:, None], spec.block.backward(a, rows[1:], ref_consts, stats, mask) * slope,
                 0.0)
  d_h, d_w, d_b = grad_block(h, mask, fresh, dz, g, weight, spec)
  d_weight, d_bias = carry
  return (d_weight + d_w, None if d_bias is None else d_bias + d_b), [d_h] + [None] * len(rows[1:])


def _init(consts, spec: FusedSpec):
  weight, bias, _ = consts
  return (jnp.zeros(weight.shape, spec.accum_dtype),
          None if bias is None else jnp.zeros(bias.shape, spec.accum_dtype))


def _finish(carry, consts, spec: FusedSpec):
  weight, bias, ref_consts = consts
  d_weight, d_bias = carry
  return (d_weight.astype(weight.dtype), None if bias is None else d_bias.astype(bias.dtype),
          _zero_grads_of(ref_consts))


_rows = row_kernel(_forward, _backward, _init, _finish)


def fused_rows(hidden, weight, bias, ref_rows, ref_consts, mask, spec: FusedSpec) -> jax.Array:
  """Per-row divergence of the student logits ``hidden @ weight + bias`` from the reference
  described by ``spec.block`` with its row data ``ref_rows`` and constants ``ref_consts``."""
  return _rows((hidden, *ref_rows), (weight, bias, ref_consts), mask, spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _total(hidden, weight, bias, ref_rows, ref_consts, mask, spec: FusedSpec):
  def body(part, fresh, total):
    h_c, m_c, *r_c = part
    a = student_block(h_c, weight, bias, m_c, spec)[0]
    div, _ = spec.block.forward(a, tuple(r_c), ref_consts, m_c)
    return total + jnp.where(m_c & fresh, div, 0.0).sum(), []

  total, _ = scan_row_chunks(body, (hidden, mask, *ref_rows), spec.chunks,
                             jnp.zeros((), _checks.compute_dtype(hidden, weight)))
  return total


def _total_fwd(hidden, weight, bias, ref_rows, ref_consts, mask, spec):
  dtype = _checks.compute_dtype(hidden, weight)

  def body(part, fresh, carry):
    total, d_weight, d_bias = carry
    h_c, m_c, *r_c = part
    a, slope = student_block(h_c, weight, bias, m_c, spec)
    div, dz = spec.block.value_and_grad(a, tuple(r_c), ref_consts, m_c)
    dz = jnp.where(m_c[:, None], dz * slope, 0.0)
    d_h, d_w, d_b = grad_block(h_c, m_c, fresh, dz, None, weight, spec)
    total = total + jnp.where(m_c & fresh, div, 0.0).sum()
    d_bias = None if d_bias is None else d_bias + d_b
    return (total, d_weight + d_w, d_bias), [d_h.astype(hidden.dtype)]

  carry0 = (jnp.zeros((), dtype), *_init((weight, bias, ()), spec))
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


_total.defvjp(_total_fwd, _total_bwd)
fused_total = hint_jvp(_total)


def rows(hidden, weight, bias, ref_rows, ref_consts, mask, spec: FusedSpec, reduction):
  """The fused divergence: ``[N]`` for ``reduction=None``, else the sum over valid rows."""
  if reduction is None:
    return fused_rows(hidden, weight, bias, ref_rows, ref_consts, mask, spec)
  return fused_total(hidden, weight, bias, ref_rows, ref_consts, mask, spec)
