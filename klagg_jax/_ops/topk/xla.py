"""The ``"xla"`` implementations: top-k distillation as one differentiable composition.

The student's full log-softmax, its stored entries gathered and its tail a log-sum-exp over the
rest, then the divergence of the k + 1 cells by the plain divergence composition. Written from
the math (nothing of the chunked kernel's block math); the teacher's data are cleaned by the
same :func:`~klagg_jax._ops.topk.base.prepare_teacher` (masked rows, index clipping), and the
top-k selection of :func:`logprobs_rows` is the one rule of :func:`~klagg_jax._ops.topk.base.top_k_rows`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from klagg_jax import _checks
from klagg_jax._ops import transform
from klagg_jax._ops.divergence import xla as divergence_xla
from klagg_jax._ops.topk.base import TopkSpec, logprobs_block, prepare_teacher


def _logsumexp(x: jax.Array, axis_name) -> jax.Array:
  """log sum_v exp(x_v) per row; -inf (with a zero gradient) for an all -inf row."""
  top = x.max(-1)
  top = jax.lax.stop_gradient(jax.lax.pmax(top, axis_name) if axis_name else top)
  top = jnp.where(top == -jnp.inf, 0.0, top)
  total = jnp.exp(x - top[:, None]).sum(-1)
  total = jax.lax.psum(total, axis_name) if axis_name else total
  empty = total == 0
  return jnp.where(empty, -jnp.inf, top + jnp.log(jnp.where(empty, 1.0, total)))


def topk_rows(a: jax.Array, lp: jax.Array, idx: jax.Array, tail: jax.Array, mask: jax.Array,
              spec: TopkSpec) -> jax.Array:
  """The chunked ``topk_rows`` contract as one composition (no custom VJP, no loop)."""
  dtype = _checks.compute_dtype(a, lp, tail)
  div = spec.div
  x = transform.transform(a, mask, div.softcap, div.inv_temperature, dtype)
  lp, idx, tail = prepare_teacher(lp, idx, tail, mask, spec.vocab, dtype)
  n, width = x.shape
  axis = div.vocab_axis
  local = idx if axis is None else idx - jax.lax.axis_index(axis) * width
  here = (local >= 0) & (local < width)
  lsm = x - _logsumexp(x, axis)[:, None]
  got = jnp.take_along_axis(lsm, jnp.where(here, local, 0), axis=1)
  got = jnp.where(here, got, 0.0)
  if axis is not None:
    got = jax.lax.psum(got, axis)
  rows = jnp.arange(n)[:, None]
  stored = jnp.zeros((n, width), bool).at[rows, jnp.where(here, local, width)].set(
      True, mode="drop")
  student_tail = _logsumexp(jnp.where(stored, -jnp.inf, lsm), axis)
  cells = jnp.concatenate([got, student_tail[:, None]], axis=-1)
  teacher = jnp.concatenate([lp, tail[:, None]], axis=-1)
  cell_spec = dataclasses.replace(div, inv_temperature=1.0, vocab_axis=None, softcap=None,
                                  ref_softcap=None, ref_grad=False)
  return divergence_xla.divergence_rows(cells, teacher, mask, cell_spec)


def logprobs_rows(x: jax.Array, k: int, spec) -> tuple[jax.Array, jax.Array, jax.Array]:
  """:func:`klagg_jax._ops.topk.base.logprobs_block` on all rows at once."""
  y = transform.transform(x, None, spec.softcap, spec.inv_temperature, _checks.compute_dtype(x))
  return logprobs_block(y, k, spec.vocab_axis)
