"""The one custom-VJP scaffold of the chunked kernels: per-row results over blocks of rows.

An op gives its block math; :func:`row_kernel` runs it over :func:`klagg_jax._chunked.scan_row_chunks`
blocks under a ``jax.custom_vjp`` whose backward pass recomputes each block from per-row
statistics saved by the forward pass, so no ``[N, V]`` temporary outlives a block. Row inputs
(``[N, ...]``) are cut into blocks; constants (an LM head's weight) are passed whole, and their
gradients accumulate across blocks in the loop's carry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from klagg_jax._chunked import scan_row_chunks

JVP_HINT = ("Forward-mode AD (jax.jvp, jax.jacfwd) does not pass through the memory-bounded "
            "kernels' custom VJP; call with implementation=\"xla\" (the plain composition, which "
            "supports it) for this computation.")


def row_kernel(forward: Callable, backward: Callable, init: Callable | None = None,
               finish: Callable | None = None) -> Callable:
  """Builds ``op(rows, consts, mask, spec) -> [N]`` with a recomputing custom VJP.

  Args:
    forward: ``forward(rows, consts, mask, spec) -> (value [C], stats)`` on one block: ``rows``
      the block of every row input, ``mask`` its ``[C]`` bool, ``stats`` a sequence of ``[C]``
      arrays for the backward pass. Masked rows' values are zeroed here.
    backward: ``backward(rows, consts, mask, fresh, stats, g, spec, carry) -> (carry, grads)``:
      ``g`` the ``[C]`` cotangent, ``grads`` one entry per row input (an array or None),
      ``carry`` the constants' gradient accumulators (rows that are not ``fresh`` were already
      counted by an earlier block).
    init: ``init(consts, spec) -> carry``, the accumulators' start (None: no carry).
    finish: ``finish(carry, consts, spec) -> constant cotangents`` (None: no gradient).

  Returns:
    The op. A ``jax.jvp`` through it raises ``TypeError`` naming ``implementation="xla"``.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
  def op(rows, consts, mask, spec):
    return op_fwd(rows, consts, mask, spec)[0]

  def op_fwd(rows, consts, mask, spec):
    def body(part, fresh, carry):
      div, stats = forward(tuple(part[1:]), consts, part[0], spec)
      return carry, [jnp.where(part[0], div, 0.0), *stats]

    _, outs = scan_row_chunks(body, (mask, *rows), spec.chunks)
    return outs[0], (rows, consts, mask, tuple(outs[1:]))

  def op_bwd(spec, residuals, g):
    rows, consts, mask, stats = residuals
    n_rows = len(rows)
    kept: list[int] = []

    def body(part, fresh, carry):
      m_c, g_c = part[0], part[1]
      r_c, st_c = tuple(part[2:2 + n_rows]), tuple(part[2 + n_rows:])
      g_c = jnp.where(m_c, g_c, 0.0)
      carry, grads = backward(r_c, consts, m_c, fresh, st_c, g_c, spec, carry)
      kept[:] = [i for i, d in enumerate(grads) if d is not None]
      return carry, [jnp.where(m_c.reshape((-1,) + (1,) * (grads[i].ndim - 1)), grads[i],
                               jnp.zeros((), grads[i].dtype)).astype(rows[i].dtype)
                     for i in kept]

    carry0 = None if init is None else init(consts, spec)
    carry, outs = scan_row_chunks(body, (mask, g, *rows, *stats), spec.chunks, carry0)
    row_grads = [None] * n_rows
    for i, d in zip(kept, outs):
      row_grads[i] = d
    const_grads = (jax.tree.map(lambda _: None, consts) if finish is None
                   else finish(carry, consts, spec))
    return tuple(row_grads), const_grads, None

  op.defvjp(op_fwd, op_bwd)
  call = hint_jvp(op)
  return lambda rows, consts, mask, spec: call(tuple(rows), consts, mask, spec)


def hint_jvp(op: Callable) -> Callable:
  """``op`` (a custom-VJP function) whose forward-mode AD error names the way out."""

  @functools.wraps(op)
  def call(*args: Any, **kwargs: Any) -> Any:
    try:
      return op(*args, **kwargs)
    except TypeError as e:
      if "forward-mode" in str(e):
        raise TypeError(JVP_HINT) from e
      raise

  return call
