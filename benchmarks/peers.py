"""JAX peers and hardware floors that klagg_jax is measured against.

Every peer computes klagg's default direction, reverse KL(student || ref) per position:

    KL(p || r) = sum_v p(v) (log p(v) - log r(v)),  p = softmax(logits), r = softmax(ref_logits),

upcasting bf16/f16 inputs to float32 first (as klagg does), so all rows compute the same numbers.
The numpy and PyTorch peers live in `peers_host.py`, which must not import JAX.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

F32 = jnp.float32
TAU = 0.5  # the barrier threshold used by every barrier row (klagg's default)


def jnp_kl(logits: jax.Array, ref_logits: jax.Array) -> jax.Array:
  """The plain composition: log_softmax twice, exp, multiply, sum. `[..., V] -> [...]` float32."""
  logp = jax.nn.log_softmax(logits.astype(F32), axis=-1)
  logr = jax.nn.log_softmax(ref_logits.astype(F32), axis=-1)
  return jnp.sum(jnp.exp(logp) * (logp - logr), axis=-1)


def optax_kl(logits: jax.Array, ref_logits: jax.Array) -> jax.Array:
  """`optax.losses.kl_divergence_with_log_targets` over `log_softmax`, in klagg's direction.

  optax computes `sum(exp(log_targets) * (log_targets - log_predictions))`, which is
  KL(targets || predictions): the student goes in as the *target*, the reference as the
  *prediction*.
  """
  logp = jax.nn.log_softmax(logits.astype(F32), axis=-1)
  logr = jax.nn.log_softmax(ref_logits.astype(F32), axis=-1)
  return optax.losses.kl_divergence_with_log_targets(logr, logp)


def jnp_truncated_topk_kl(logits: jax.Array, ref_logprobs: jax.Array,
                          ref_indices: jax.Array) -> jax.Array:
  """What peers do with a stored teacher top-k: forward KL truncated to the k stored entries.

  sum_{i in top-k} r_i (log r_i - log p_i), clamped at 0 (truncation can go negative).
  """
  logp = jax.nn.log_softmax(logits.astype(F32), axis=-1)
  logp_k = jnp.take_along_axis(logp, ref_indices, axis=-1)
  kl = jnp.sum(jnp.exp(ref_logprobs) * (ref_logprobs - logp_k), axis=-1)
  return jnp.maximum(kl, 0.0)


def jnp_js(logits: jax.Array, ref_logits: jax.Array, beta: float) -> jax.Array:
  """Generalized Jensen-Shannon per position, `[..., V] -> [...]` float32, 0 < beta < 1.

  m = (1 - beta) p + beta r, JS_beta = beta KL(r || m) + (1 - beta) KL(p || m), p the student:
  TRL's and Liger-Kernel's convention, klagg's `direction="js"`.
  """
  logq = jax.nn.log_softmax(logits.astype(F32), axis=-1)
  logr = jax.nn.log_softmax(ref_logits.astype(F32), axis=-1)
  logm = jnp.logaddexp(logq + jnp.log1p(-beta), logr + jnp.log(beta))
  return (beta * jnp.sum(jnp.exp(logr) * (logr - logm), axis=-1)
          + (1 - beta) * jnp.sum(jnp.exp(logq) * (logq - logm), axis=-1))


def logits_vd(hidden: jax.Array, weight: jax.Array) -> jax.Array:
  """`hidden @ weight.T` for a `[V, D]` weight, accumulated and returned in float32."""
  return jnp.matmul(hidden, weight.T, preferred_element_type=F32)


def fused_js_materialized(hidden: jax.Array, weight: jax.Array, ref_hidden: jax.Array,
                          ref_weight: jax.Array, beta: float) -> jax.Array:
  """Mean JSD over positions with the `[N, V]` logits materialized; weights `[V, D]`."""
  ref = jax.lax.stop_gradient(logits_vd(ref_hidden, ref_weight))
  return jnp.mean(jnp_js(logits_vd(hidden, weight), ref, beta))


def rmse(kl: jax.Array) -> jax.Array:
  """Root mean square over the last axis (every position valid)."""
  return jnp.sqrt(jnp.mean(jnp.square(kl), axis=-1))


def p95(kl: jax.Array) -> jax.Array:
  """95th percentile over the last axis, linear interpolation (numpy's default)."""
  return jnp.quantile(kl, 0.95, axis=-1)


PEER_AGGS: dict[str, Callable[[jax.Array], jax.Array]] = {"rmse": rmse, "p95": p95}


def barrier_loss(kl_fn: Callable, agg: Callable, t: int) -> Callable:
  """Per-sequence barrier built from a peer: `mean_b relu(agg_t(kl[b, t]) - TAU)`.

  Inputs are `[N, V]` logits viewed as `[N // t, t, V]` sequences; the reference gets no gradient.
  """

  def loss(logits: jax.Array, ref_logits: jax.Array) -> jax.Array:
    n, v = logits.shape
    ref = jax.lax.stop_gradient(ref_logits)
    kl = kl_fn(logits.reshape(n // t, t, v), ref.reshape(n // t, t, v))
    return jnp.mean(jax.nn.relu(agg(kl) - TAU))

  return loss


def exp_floor(a: jax.Array, b: jax.Array) -> jax.Array:
  """Compute floor: one pass of exp over both inputs, summed (float32)."""
  return jnp.sum(jnp.exp(a.astype(F32))) + jnp.sum(jnp.exp(b.astype(F32)))


def read_floor(a: jax.Array, b: jax.Array) -> jax.Array:
  """Memory floor: one read of both inputs (a float32 sum each)."""
  return jnp.sum(a, dtype=F32) + jnp.sum(b, dtype=F32)


def matmul_floor(hidden: jax.Array, weight: jax.Array, ref_hidden: jax.Array,
                 ref_weight: jax.Array) -> jax.Array:
  """Floor of the fused workload: the two forward logits matmuls (summed to one scalar)."""
  return jnp.sum(hidden @ weight, dtype=F32) + jnp.sum(ref_hidden @ ref_weight, dtype=F32)


def matmul_floor_vd(hidden: jax.Array, weight: jax.Array, ref_hidden: jax.Array,
                    ref_weight: jax.Array) -> jax.Array:
  """`matmul_floor` for `[V, D]` weights, float32 logits (as the materialized JSD rows have)."""
  return jnp.sum(logits_vd(hidden, weight)) + jnp.sum(logits_vd(ref_hidden, ref_weight))
