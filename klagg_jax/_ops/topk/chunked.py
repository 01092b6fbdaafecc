"""The ``"chunked"`` implementations: the top-k block math over row blocks."""

from __future__ import annotations

import jax

from klagg_jax import _checks
from klagg_jax._chunked import scan_row_chunks
from klagg_jax._ops.divergence.base import prepare
from klagg_jax._ops.rows import row_kernel
from klagg_jax._ops.topk.base import (TopkSpec, logprobs_block, prepare_teacher,
                                      topk_block_backward, topk_block_forward)


def _teacher(rows, mask, spec: TopkSpec, dtype):
  return prepare_teacher(*rows[1:], mask, spec.vocab, dtype)


def _forward(rows, consts, mask, spec: TopkSpec):
  dtype = _checks.compute_dtype(rows[0], rows[1], rows[3])
  x = prepare(rows[0], mask, spec.div, dtype)[0]
  return topk_block_forward(x, _teacher(rows, mask, spec, dtype), spec.div)


def _backward(rows, consts, mask, fresh, stats, g, spec: TopkSpec, carry):
  dtype = _checks.compute_dtype(rows[0], rows[1], rows[3])
  x, slope = prepare(rows[0], mask, spec.div, dtype)
  dx = topk_block_backward(x, _teacher(rows, mask, spec, dtype), stats, spec.div)
  return carry, [g.astype(dtype)[:, None] * slope * dx, None, None, None]


_rows = row_kernel(_forward, _backward)


def topk_rows(a: jax.Array, lp: jax.Array, idx: jax.Array, tail: jax.Array, mask: jax.Array,
              spec: TopkSpec) -> jax.Array:
  """Per-row coarsened divergence of student logits ``a`` [N, V] from teacher data [N, k].

  ``spec.vocab`` is the global vocabulary size (``a`` holds a slice of it when the spec's
  ``vocab_axis`` is set). Gradient into ``a`` only.
  """
  return _rows((a, lp, idx, tail), (), mask, spec)


def logprobs_rows(x: jax.Array, k: int, spec) -> tuple[jax.Array, jax.Array, jax.Array]:
  """:func:`klagg_jax._ops.topk.base.logprobs_block` over row blocks of ``[N, V]`` logits."""
  dtype = _checks.compute_dtype(x)

  def body(part, fresh, carry):
    y = prepare(part[0], None, spec, dtype)[0]
    return carry, list(logprobs_block(y, k, spec.vocab_axis))

  _, outs = scan_row_chunks(body, (x,), spec.chunks)
  return tuple(outs)


