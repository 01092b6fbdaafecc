"""The ``"xla"`` implementation: the textbook formulas on whole ``[N, V]`` arrays.

Left to XLA to fuse and to JAX's autodiff to differentiate: the path for forward-mode AD
(``jax.jvp``, ``jax.jacfwd``, Hessian-vector products), which the chunked kernel's custom VJP
does not support. Its backward pass holds ``[N, V]`` float32 residuals. Written from the math
alone (nothing of the chunked kernel's block math), so tests of either against the float64
truth are independent. The library's conventions are kept differentiable by the "double where"
(make the input of an undefined branch safe inside, select outside; JAX FAQ, "gradients
contain NaN where using where").

From the config's ``whole_min_rows`` up (many rows on a CPU), a KL over the whole vocabulary
without a soft-cap first runs as :func:`_streamed_kl`: the same formulas with no select, which
XLA:CPU compiles, as it does plain jax.numpy, into one fused pass over the rows (a select splits
that pass into one loop per reduction: 3-4x the time). The conventions cannot be written
without selects, but wherever one of them decides a row its select-free value is NaN or
``+inf``; those rows take the exact formulas above, value and derivatives. A custom JVP (so
forward mode, reverse mode and Hessians all work) forms the tangent as ``sum_v c_v t_v`` with
``c = d KL / d logits`` from whichever formulas made the row.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from klagg_jax import _checks, _config
from jax.custom_derivatives import SymbolicZero

from klagg_jax._ops import transform


def _vsum(x: jax.Array, axis_name: str | None) -> jax.Array:
  s = x.sum(-1)
  return jax.lax.psum(s, axis_name) if axis_name else s


def _log_softmax(x: jax.Array, axis_name: str | None) -> jax.Array:
  """log softmax per row; an all ``-inf`` row stays all ``-inf`` (its shift is 0, not NaN)."""
  top = x.max(-1)
  top = jax.lax.stop_gradient(jax.lax.pmax(top, axis_name) if axis_name else top)
  top = jnp.where(top == -jnp.inf, 0.0, top)
  total = _vsum(jnp.exp(x - top[:, None]), axis_name)
  empty = total == 0
  lse = top + jnp.log(jnp.where(empty, 1.0, total))
  return x - lse[:, None]


def _kl(lp: jax.Array, lq: jax.Array, axis_name: str | None) -> jax.Array:
  """sum_v p_v (log p_v - log q_v); entries with p_v = 0 count 0, with a zero gradient."""
  p = jnp.exp(lp)
  none = p == 0
  diff = jnp.where(none, 0.0, lp - jnp.where(none, 0.0, lq))
  return _vsum(p * diff, axis_name)


def _log_mix(delta: jax.Array, w: float) -> jax.Array:
  """log((1 - w) + w e^delta) for a static w in (0, 1): 0 exactly at delta = 0.

  Near 0 (delta < 1 and the log1p argument above -1/2) as log1p(w expm1(delta)), which keeps
  tiny results (w = 1e-7) relative-accurate; elsewhere as a log-sum-exp of the two terms with
  their logs taken in float64 (so w within float32 rounding of 1 keeps 1 - w exact).
  """
  far = jnp.logaddexp(math.log1p(-w), math.log(w) + delta)
  t = w * jnp.expm1(jnp.minimum(delta, 1.0))
  near_zone = (delta < 1.0) & (t > -0.5)
  near = jnp.log1p(jnp.where(near_zone, t, 0.0))
  return jnp.where(near_zone, near, far)


def _kl_to_mix(lp: jax.Array, lr: jax.Array, w: float, axis_name: str | None) -> jax.Array:
  """KL(p || (1 - w) p + w r) = -sum_v p_v log((1 - w) + w r_v / p_v)."""
  p = jnp.exp(lp)
  none = p == 0
  delta = jnp.where(none, 0.0, lr - jnp.where(none, 0.0, lp))
  return _vsum(jnp.where(none, 0.0, -p * _log_mix(delta, w)), axis_name)


def _exact_rows(a: jax.Array, b: jax.Array, mask: jax.Array, spec) -> jax.Array:
  dtype = _checks.compute_dtype(a, b)
  x = transform.transform(a, mask, spec.softcap, spec.inv_temperature, dtype)
  y = transform.transform(b, mask, spec.ref_softcap, spec.inv_temperature, dtype)
  if not spec.ref_grad:
    y = jax.lax.stop_gradient(y)
  axis = spec.vocab_axis
  lp, lr = _log_softmax(x, axis), _log_softmax(y, axis)
  if spec.direction == "reverse":
    div = _kl(lp, lr, axis)
  elif spec.direction == "forward":
    div = _kl(lr, lp, axis)
  else:
    beta = spec.beta
    div = beta * _kl_to_mix(lr, lp, 1.0 - beta, axis) + (1.0 - beta) * _kl_to_mix(lp, lr, beta, axis)
  # A NaN or +inf in either row is NaN, even where the other row has no mass to read it with.
  poisoned = _vsum((jnp.isnan(x) | (x == jnp.inf) | jnp.isnan(y) | (y == jnp.inf)), axis) > 0
  div = jnp.where(poisoned, jnp.nan, div)
  # Never negative: a rounding residue at or below 0 is the minimum (zero gradient); NaN passes.
  div = jnp.where(div <= 0, jnp.zeros_like(div), div)
  return jnp.where(mask, div, 0.0)


# ------------------------------------------------------------------------------------------------
# The select-free KL. An empty row's log-softmax is NaN here (-inf + inf), as is a term
# 0 * -inf, a NaN or a +inf anywhere in a row: every case the conventions decide.


def _streamed_log_softmax(x: jax.Array) -> jax.Array:
  top = jnp.maximum(jax.lax.stop_gradient(x.max(-1, keepdims=True)), jnp.finfo(x.dtype).min)
  return x - (top + jnp.log(jnp.exp(x - top).sum(-1, keepdims=True)))


def _streamed_sides(a, b, spec):
  """(log p, log q) of KL(p || q) as the spec orients it, and whether ``a`` is the p side."""
  dtype = _checks.compute_dtype(a, b)
  la = _streamed_log_softmax(a.astype(dtype) * spec.inv_temperature)
  lb = _streamed_log_softmax(b.astype(dtype) * spec.inv_temperature)
  return (la, lb, True) if spec.direction == "reverse" else (lb, la, False)


def _streamed_kl(a, b, spec):
  lp, lq, _ = _streamed_sides(a, b, spec)
  return jnp.sum(jnp.exp(lp) * (lp - lq), -1)


def _row_ok(raw: jax.Array) -> jax.Array:
  """Rows no convention decides: their select-free value is neither NaN nor ``+inf``."""
  return ~(jnp.isnan(raw) | (raw == jnp.inf))


def _per_row(ok: jax.Array, streamed, exact):
  """``streamed()`` when every row is ok, else ``exact()`` on the rows that are not.

  Per row, so a row's result never depends on another row's content: a NaN in one row leaves
  every other row's value and gradient bit for bit as they were.
  """
  def mixed():
    return jax.tree.map(lambda s, e: jnp.where(ok.reshape(ok.shape + (1,) * (s.ndim - 1)), s, e),
                        streamed(), exact())

  return jax.lax.cond(jnp.all(ok), streamed, mixed)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _streamed_rows(a, b, mask, spec):
  raw = _streamed_kl(a, b, spec)
  return _per_row(_row_ok(raw), lambda: jnp.where(mask & (raw > 0), raw, 0.0),
                  lambda: _exact_rows(a, b, mask, spec))


@functools.partial(_streamed_rows.defjvp, symbolic_zeros=True)
def _streamed_rows_jvp(spec, primals, tangents):
  """Tangent ``sum_v c_v t_v`` per row (rows are independent), ``c`` the value's gradient.

  Select-free, ``c`` is ``p (log p - log q - KL)`` on the p side and ``q - p`` on the other,
  times 1/T, on the rows the value keeps (0 elsewhere); on the rows a convention decides, the
  exact formulas' gradient. ``c`` is made as a value, not under JAX's linearization of the
  branches: differentiating through ``lax.cond`` would keep every residual of both.
  """
  a, b, mask = primals
  want = [not isinstance(t, SymbolicZero) for t in tangents[:2]]
  if not spec.ref_grad:
    want[1] = False
  raw = _streamed_kl(a, b, spec)
  kept = mask & (raw > 0)

  def streamed():
    lp, lq, a_is_p = _streamed_sides(a, b, spec)
    keep = jnp.where(kept, spec.inv_temperature, 0.0).astype(lp.dtype)[:, None]
    p = jnp.exp(lp)
    c_p, c_q = keep * p * ((lp - lq) - raw[:, None]), keep * (jnp.exp(lq) - p)
    c = (c_p, c_q) if a_is_p else (c_q, c_p)
    return jnp.where(kept, raw, 0.0), [c[i] if want[i] else None for i in range(2)]

  def exact():
    value, pull = jax.vjp(lambda x, y: _exact_rows(x, y, mask, spec), a, b)
    grads = pull(jnp.ones_like(value))
    return value, [grads[i].astype(value.dtype) if want[i] else None for i in range(2)]

  ok = _row_ok(raw)
  value, coeffs = _per_row(ok, streamed, exact)
  tangent = jnp.zeros_like(value)
  for c, t in zip(coeffs, tangents[:2]):
    if c is not None:
      tangent = tangent + jnp.sum(c * t.astype(c.dtype), -1)
  # A row the value holds at 0 (masked, or clamped) has tangent 0 even along a NaN tangent.
  return value, jnp.where(mask & (kept | ~ok), tangent, 0.0)


def _streams(spec) -> bool:
  return (spec.direction in ("reverse", "forward") and spec.softcap is None
          and spec.ref_softcap is None and spec.vocab_axis is None)


def divergence_rows(a: jax.Array, b: jax.Array, mask: jax.Array, spec) -> jax.Array:
  """Per-row divergence of ``[N, V]`` logits ``a`` (student) from ``b`` (reference); ``[N]``.

  The same contract as the chunked kernel's ``divergence_rows``; ``spec.chunks`` is ignored
  and ``spec.ref_grad`` False stops the gradient into ``b``. The select-free KL runs where the
  platform's config says the compiler streams it (``whole_min_rows``).
  """
  if not spec.ref_grad:
    b = jax.lax.stop_gradient(b)
  if not _streams(spec):
    return _exact_rows(a, b, mask, spec)
  return _config.whole_or_blocked(a.shape[0], lambda *xs: _streamed_rows(*xs, spec),
                                  lambda *xs: _exact_rows(*xs, spec), a, b, mask)
