"""The ``"chunked"`` implementation: the block math over row blocks, with a recomputing VJP."""

from __future__ import annotations

import jax

from klagg_jax import _checks
from klagg_jax._ops.divergence.base import Spec, block_backward, block_forward, prepare
from klagg_jax._ops.rows import row_kernel


def _forward(rows, consts, mask, spec: Spec):
  a, b = rows
  dtype = _checks.compute_dtype(a, b)
  return block_forward(prepare(a, mask, spec, dtype)[0],
                       prepare(b, mask, spec, dtype, ref=True)[0], spec)


def _backward(rows, consts, mask, fresh, stats, g, spec: Spec, carry):
  a, b = rows
  dtype = _checks.compute_dtype(a, b)
  x, x_slope = prepare(a, mask, spec, dtype)
  y, y_slope = prepare(b, mask, spec, dtype, ref=True)
  da, db = block_backward(x, y, stats, spec)
  w = g.astype(dtype)[:, None]
  return carry, [w * x_slope * da, w * y_slope * db if spec.ref_grad else None]


_rows = row_kernel(_forward, _backward)


def divergence_rows(a: jax.Array, b: jax.Array, mask: jax.Array, spec: Spec) -> jax.Array:
  """Per-row divergence of ``[N, V]`` logits ``a`` (student) from ``b`` (reference); ``[N]``.

  ``a`` and ``b`` in their own dtype (upcast per block), ``mask`` ``[N]`` bool; the transform of
  ``spec`` (soft-caps, temperature) is applied per block and chained in the backward pass.
  """
  return _rows((a, b), (), mask, spec)
