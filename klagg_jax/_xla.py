"""The ``implementation="xla"`` paths: plain differentiable jax.numpy compositions.

Each is the textbook formula on whole ``[N, V]`` arrays, left to XLA to fuse and to JAX's
autodiff to differentiate: the reference the chunked kernels are tested against, and the path
for forward-mode AD (``jax.jvp``, ``jax.jacfwd``, Hessian-vector products), which the chunked
kernels' custom VJPs do not support. Their backward pass holds ``[N, V]`` float32 residuals.

The conventions are the library's, kept differentiable by the "double where" (make the input of
an undefined branch safe inside, select outside; JAX FAQ, "gradients contain NaN where using
where"): masked rows are zeroed before any arithmetic, 0 log 0 = 0 at ``-inf`` entries, an all
``-inf`` row is empty, and a NaN at a valid position reaches the result (klagg_jax._numerics).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from klagg_jax import _checks, _divergence
from klagg_jax._numerics import is_zero

# ------------------------------------------------------------------------------------------------
# Divergences between two [N, V] logits arrays.


def _log_softmax(x: jax.Array, axis_name: str | None) -> jax.Array:
  return _divergence.log_probs(x, _divergence.log_normalizer(x, axis_name))


def _kl(lp: jax.Array, lq: jax.Array, axis_name: str | None) -> jax.Array:
  """sum_v p_v (log p_v - log q_v), 0 log 0 = 0 with a zero gradient there."""
  p = jnp.exp(lp)
  empty = is_zero(p)
  diff = jnp.where(empty, 0.0, lp - jnp.where(empty, 0.0, lq))
  return _divergence.vsum(p * diff, axis_name)


def _log_mix(lp: jax.Array, lr: jax.Array, beta: float) -> jax.Array:
  """log((1 - beta) p + beta r); -inf with a zero gradient where both vanish (logaddexp's
  gradient at (-inf, -inf) is NaN, which a zero cotangent does not cancel)."""
  none = (lp == -jnp.inf) & (lr == -jnp.inf)
  safe = lambda t: jnp.where(none, 0.0, t)
  mixed = jnp.logaddexp(math.log1p(-beta) + safe(lp), math.log(beta) + safe(lr))
  return jnp.where(none, -jnp.inf, mixed)


def divergence_rows(a: jax.Array, b: jax.Array, mask: jax.Array,
                    spec: _divergence.Spec) -> jax.Array:
  """Per-row divergence of ``[N, V]`` logits ``a`` from ``b``, as :func:`_divergence.divergence_rows`.

  ``spec.chunks`` is ignored; ``spec.ref_grad`` False stops the gradient into ``b``.
  """
  dtype = _checks.compute_dtype(a, b)
  x = _divergence.prepare_block(a, mask, spec, dtype)
  y = _divergence.prepare_block(b, mask, spec, dtype)
  if not spec.ref_grad:
    y = jax.lax.stop_gradient(y)
  lp, lr = _log_softmax(x, spec.vocab_axis), _log_softmax(y, spec.vocab_axis)
  if spec.direction == "reverse":
    div = _kl(lp, lr, spec.vocab_axis)
  elif spec.direction == "forward":
    div = _kl(lr, lp, spec.vocab_axis)
  else:
    beta = spec.beta
    lm = _log_mix(lp, lr, beta)
    div = beta * _kl(lr, lm, spec.vocab_axis) + (1.0 - beta) * _kl(lp, lm, spec.vocab_axis)
  return jnp.where(mask, div, 0.0)
