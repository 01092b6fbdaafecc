"""The ``"chunked"`` implementation: the block math over row blocks, with a recomputing VJP.

Where the config's ``whole_min_rows`` says so (many rows on a CPU), a KL without a soft-cap
first runs as one select-free expression over the whole ``[N, V]`` arrays (:func:`_whole`),
which XLA:CPU streams in one fused pass, as it does plain jax.numpy; its custom VJP recomputes
from the inputs, so nothing ``[N, V]`` is saved. It cannot express the library's conventions
(0 log 0, empty and masked rows with garbage), but wherever one of them matters its raw value
is NaN: then the call runs the block loop instead, value and gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from klagg_jax import _checks, _config
from klagg_jax._ops.divergence.base import Spec, block_backward, block_forward, prepare
from klagg_jax._ops.rows import hint_jvp, row_kernel


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


def _loop(a, b, mask, spec: Spec):
  return _rows((a, b), (), mask, spec)


# ------------------------------------------------------------------------------------------------
# The whole-array KL: no select and one output per expression, so that XLA:CPU fuses each into
# one streaming pass. An empty row's log-softmax is NaN here (-inf + inf), as is any term
# 0 * -inf: every case the conventions decide shows up as a NaN raw value.


def _scaled(x: jax.Array, spec: Spec, dtype) -> jax.Array:
  x = x.astype(dtype)
  return x if spec.inv_temperature == 1.0 else x * jnp.asarray(spec.inv_temperature, dtype)


def _log_softmax(x: jax.Array) -> jax.Array:
  top = jnp.maximum(jax.lax.stop_gradient(x.max(-1, keepdims=True)), jnp.finfo(x.dtype).min)
  s = x - top
  return s - jnp.log(jnp.exp(s).sum(-1, keepdims=True))


def _sides(a, b, spec: Spec, dtype):
  """(log p, log q) of KL(p || q): the student first for "reverse", the reference for "forward"."""
  la, lb = _log_softmax(_scaled(a, spec, dtype)), _log_softmax(_scaled(b, spec, dtype))
  return (la, lb) if spec.direction == "reverse" else (lb, la)


def _raw_kl(a, b, spec: Spec) -> jax.Array:
  lp, lq = _sides(a, b, spec, _checks.compute_dtype(a, b))
  return jnp.sum(jnp.exp(lp) * (lp - lq), -1)


def _raw_grads(a, b, w, spec: Spec):
  """(d / d a, d / d b) of sum_i w_i KL_i, the KL recomputed inside each expression.

  d/d log-p side: p (log p - log q - KL), the other side: q - p. Two expressions, one output
  each: a second output would split the fused pass. A NaN in a row of the second reaches its
  KL, so the first's row is NaN too. Unlike the block loop, a row the value's clamp holds at 0
  keeps this gradient (a rounding residue's: any factor computed from the KL, even select-free,
  splits XLA:CPU's fused pass); for identical rows it is exactly 0 all the same.
  """
  dtype = _checks.compute_dtype(a, b)

  def one(first: bool, a, b, w):
    lp, lq = _sides(a, b, spec, dtype)
    p = jnp.exp(lp)
    kl = jnp.sum(p * (lp - lq), -1, keepdims=True)
    scale = w.astype(dtype)[:, None] * spec.inv_temperature
    return scale * (p * ((lp - lq) - kl) if first else jnp.exp(lq) - p)

  reverse = spec.direction == "reverse"
  # Each expression recomputes from its own barrier: sharing subexpressions with the forward
  # pass's (when the value feeds g) or with each other would split them into [N, V] pieces.
  da = one(reverse, *jax.lax.optimization_barrier((a, b, w))).astype(a.dtype)
  if not spec.ref_grad:
    return da, None
  a, b, w, _ = jax.lax.optimization_barrier((a, b, w, da))  # after da, apart from it
  return da, one(not reverse, a, b, w).astype(b.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _whole(a, b, mask, spec: Spec):
  return _whole_fwd(a, b, mask, spec)[0]


def _whole_fwd(a, b, mask, spec: Spec):
  raw = _raw_kl(a, b, spec)
  kept = mask & (raw > 0)  # the rest: masked, or held at 0 by the clamp
  value = jax.lax.cond(jnp.any(jnp.isnan(raw)), lambda: _loop(a, b, mask, spec),
                       lambda: jnp.where(kept, raw, jnp.zeros_like(raw)))
  # Only the inputs are kept: under jax.grad the forward expression is then dead code.
  return value, (a, b, mask)


def _whole_bwd(spec: Spec, residuals, g):
  a, b, mask = residuals
  da, db = _raw_grads(a, b, jnp.where(mask, g, jnp.zeros_like(g)), spec)
  # Where the loop would differ, a whole row of the log-p side's gradient is not finite: its KL
  # is NaN (then so is every entry, p (log p - log q - KL)) or +inf (then every entry is -inf
  # or NaN), and it holds every NaN of the other side's row (see _raw_grads). Without it
  # (forward KL, reference gradient stopped), q - p is NaN by whole rows (a NaN log-normalizer).
  # So one column tells: reading the finished [N, V] gradient again would cost a tenth of the
  # pass that makes it, and testing it elementwise inside that pass would split it.
  first = db if spec.direction == "forward" and db is not None else da
  nan = ~jnp.all(jnp.isfinite(first[:, 0]))

  def loop():
    if spec.ref_grad:
      return jax.vjp(lambda x, y: _loop(x, y, mask, spec), a, b)[1](g)
    return jax.vjp(lambda x: _loop(x, b, mask, spec), a)[1](g) + (None,)

  da, db = jax.lax.cond(nan, loop, lambda: (da, db))
  return da, db, None


_whole.defvjp(_whole_fwd, _whole_bwd)
_whole_call = hint_jvp(_whole)


def _whole_fits(spec: Spec) -> bool:
  """The select-free expression covers plain KLs over the whole vocabulary, no block size given."""
  return (spec.direction in ("reverse", "forward") and spec.softcap is None
          and spec.ref_softcap is None and spec.vocab_axis is None and spec.chunks.rows is None)


def divergence_rows(a: jax.Array, b: jax.Array, mask: jax.Array, spec: Spec) -> jax.Array:
  """Per-row divergence of ``[N, V]`` logits ``a`` (student) from ``b`` (reference); ``[N]``.

  ``a`` and ``b`` in their own dtype (upcast per block), ``mask`` ``[N]`` bool; the transform of
  ``spec`` (soft-caps, temperature) is applied per block and chained in the backward pass.
  """
  if not _whole_fits(spec):
    return _loop(a, b, mask, spec)
  return _config.whole_or_blocked(a.shape[0], lambda *xs: _whole_call(*xs, spec),
                                  lambda *xs: _loop(*xs, spec), a, b, mask)
