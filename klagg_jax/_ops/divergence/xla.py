"""The ``"xla"`` implementation: the textbook formulas on whole ``[N, V]`` arrays.

Left to XLA to fuse and to JAX's autodiff to differentiate: the path for forward-mode AD
(``jax.jvp``, ``jax.jacfwd``, Hessian-vector products), which the chunked kernel's custom VJP
does not support. Its backward pass holds ``[N, V]`` float32 residuals. Written from the math
alone (nothing of the chunked kernel's block math), so tests of either against the float64
truth are independent. The library's conventions are kept differentiable by the "double where"
(make the input of an undefined branch safe inside, select outside; JAX FAQ, "gradients
contain NaN where using where").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from klagg_jax import _checks
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


def divergence_rows(a: jax.Array, b: jax.Array, mask: jax.Array, spec) -> jax.Array:
  """Per-row divergence of ``[N, V]`` logits ``a`` (student) from ``b`` (reference); ``[N]``.

  The same contract as the chunked kernel's ``divergence_rows``; ``spec.chunks`` is ignored
  and ``spec.ref_grad`` False stops the gradient into ``b``.
  """
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
