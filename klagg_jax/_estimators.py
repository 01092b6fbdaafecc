"""Per-token KL estimators from the log-probabilities of sampled tokens (no full vocabulary).

RLHF loops often keep only log p(y_t) and log r(y_t) of the tokens y_t ~ p they sampled. With
the log ratio d = log r(y) - log p(y), Schulman's estimators of KL(p || r) are
k1 = -d (unbiased, high variance, negative half the time), k2 = d^2 / 2 (biased, low variance)
and k3 = e^d - d - 1 (unbiased, >= 0, low variance). k3's exponential overflows in float32 for
d > 88 (the inf losses and NaN gradients reported by verl, TRL and OpenRLHF users), so here the
log ratio is clipped before any estimator sees it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from klagg_jax import _checks, _numerics
from klagg_jax._ops import compiled

ESTIMATORS = ("k1", "k2", "k3")

# Below this |d|, k3 = e^d - d - 1 is summed as its Taylor series: expm1(d) - d loses about
# log2(2 / |d|) bits to cancellation, the series none. The first omitted term, relative to the
# sum at |d| = 0.5, is 2e-9 with terms up to d^9 (under float32 rounding) and 9e-17 up to d^14.
_SERIES_BELOW = 0.5
_SERIES_TERMS = {jnp.dtype(jnp.float32): 9, jnp.dtype(jnp.float64): 14}

# The static guard against full-vocabulary log-probs ([B, T, V] where [B, T] was meant): an
# input of rank >= 3 whose last axis is at least this long is refused. Every production LM
# vocabulary (30k to 256k entries) is longer; a per-token array laid out [..., T] with T this
# long and a rank of 3 or more is rare, and reshaping it to 2-D (the estimators are elementwise)
# passes the guard. Smaller vocabularies, and [T, V] at rank 2, are not caught.
VOCAB_LIKE_AXIS = 16384


def _check_not_full_vocabulary(name: str, x: jax.Array) -> None:
  if x.ndim >= 3 and x.shape[-1] >= VOCAB_LIKE_AXIS:
    raise ValueError(
        f"{name} has shape {x.shape}: rank {x.ndim} with a last axis of {x.shape[-1]} "
        f"(>= {VOCAB_LIKE_AXIS}) looks like full-vocabulary log-probs [B, T, V]. kl_estimate "
        "wants the log-probs of the sampled tokens only, [B, T]: gather them first, e.g. "
        "jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0], or use "
        "ka.kl_per_position(logits, ref_logits) for the full-vocabulary KL. If the last axis "
        "really holds positions, reshape to 2-D first (the estimators are elementwise).")


def _k3(d: jax.Array) -> jax.Array:
  """e^d - d - 1 = sum_{n >= 2} d^n / n!, accurate to rounding for every d (inf for d > ~88).

  d = +inf (an unclipped log ratio with a -inf log-prob) gives +inf, not inf - inf = NaN; NaN
  stays NaN.
  """
  small = jnp.abs(d) < _SERIES_BELOW
  infinite = d == jnp.inf
  # Double where: each branch only ever sees inputs where it is finite, so the unselected
  # branch cannot put 0 * inf = NaN into the gradient.
  ds = jnp.where(small, d, 0.0)
  dl = jnp.where(small | infinite, 1.0, d)
  # Horner on d^2 (1/2! + d (1/3! + d (1/4! + ... + d / N!))).
  terms = _SERIES_TERMS[jnp.dtype(d.dtype)]
  series = jnp.full_like(ds, 1.0 / math.factorial(terms))
  for n in range(terms - 1, 1, -1):
    series = series * ds + 1.0 / math.factorial(n)
  series = series * ds * ds
  return jnp.where(small, series, jnp.where(infinite, jnp.inf, jnp.expm1(dl) - dl))


@compiled.compiled(data=("logp", "ref_logp"))
def kl_estimate(logp: jax.typing.ArrayLike, ref_logp: jax.typing.ArrayLike, *,
                estimator: str = "k3", where: jax.typing.ArrayLike | None = None,
                max_log_ratio: float | jax.Array | None = 20.0) -> jax.Array:
  r"""Per-token estimate of KL(student || ref) from the sampled tokens' log-probabilities.

  With :math:`d = \operatorname{clip}(\text{ref\_logp} - \text{logp}, -M, M)` for :math:`M` =
  ``max_log_ratio``:

  .. math::

     k_1 = -d = \text{logp} - \text{ref\_logp}, \qquad k_2 = d^2 / 2, \qquad k_3 = e^d - d - 1.

  For tokens sampled from the student, k1 and k3 are unbiased estimators of KL(p || r); k3 is
  never negative and has the lowest variance of the two when p and r are close; k2 is biased
  (its mean is the KL to second order) but has low variance.

  The clip is applied to the log ratio before any estimator (before k3's exp), so every value
  and gradient is finite for finite inputs: k3 <= e^M - M - 1 (4.9e8 at the default M = 20,
  a probability ratio of 4.9e8), and tokens beyond the clip get zero gradient. ``None``
  disables the clip; k3 then overflows to inf for d > ~88 in float32. k3 is summed as its
  Taylor series for :math:`|d| < 0.5`, so it keeps full relative precision near 0. Identical
  inputs give exactly 0 (k2 and k3 with a gradient of exactly 0; k1's gradient is 1 for
  ``logp`` and -1 for ``ref_logp`` everywhere inside the clip). Gradients flow into both
  arguments; stop the reference's yourself (``jax.lax.stop_gradient``) if it is not frozen.

  Only the sampled tokens' log-probs are wanted, not a full vocabulary: an input of rank >= 3
  whose last axis has >= 16384 entries (``VOCAB_LIKE_AXIS``, shorter than any production LM
  vocabulary) is refused as ``[B, T, V]`` log-probs given where ``[B, T]`` was meant. Per-token
  arrays of that rank and length pass once reshaped to 2-D. NaN at a valid position gives NaN
  there; a NaN at a masked position gives exactly 0 and zero gradient. Log-probs above 0 (logits
  passed by mistake) are a value problem: :func:`klagg_jax.check_logprobs` finds them, opt-in.

  A ``-inf`` log-prob is a token of probability 0. Where only one side is ``-inf`` the log
  ratio is ``±inf`` and the clip bounds it (``±inf`` estimates without a clip). Where both are
  ``-inf`` the token has no mass under either model, and its log ratio is taken as 0 (the
  0 log 0 = 0 convention): every estimator gives exactly 0 there, with zero gradient, clipped
  or not.

  Args:
    logp: the student's log-probabilities of the sampled tokens, e.g. ``[B, T]`` or ``[T]``,
      any float dtype.
    ref_logp: the reference's log-probabilities of the same tokens, same shape.
    estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
    where: optional bool mask broadcastable to ``logp``'s shape: False positions give exactly 0
      and exactly zero gradient, even where their log-probs are NaN or -inf (padding).
    max_log_ratio: M > 0 bounding :math:`|\text{ref\_logp} - \text{logp}|` (may be traced),
      or ``None`` for no clip.

  Returns:
    float32 array of ``logp``'s shape (float64 for float64 inputs with x64 enabled), ready for
    :func:`klagg_jax.aggregate` and :func:`klagg_jax.hinge`.

  Raises:
    ValueError: for an unknown ``estimator`` (listing the valid ones), a shape mismatch (naming
      both shapes), non-float inputs, a vocabulary-sized last axis at rank >= 3 (see above), a
      non-bool ``where`` or one that does not broadcast, or a static ``max_log_ratio <= 0``.

  Example:
    >>> kl = ka.kl_estimate(logp, jax.lax.stop_gradient(ref_logp), where=response_mask)
    >>> penalty = ka.hinge(ka.aggregate(kl, "rmse", where=response_mask), tau=0.5).mean()

  References:
    Schulman, "Approximating KL divergence", 2020 (http://joschu.net/blog/kl-approx.html).
  """
  _checks.check_choice("estimator", estimator, ESTIMATORS)
  logp, ref_logp = jnp.asarray(logp), jnp.asarray(ref_logp)
  _checks.check_float("logp", logp)
  _checks.check_float("ref_logp", ref_logp)
  _checks.check_same_shape("logp", logp, "ref_logp", ref_logp)
  _check_not_full_vocabulary("logp", logp)
  if max_log_ratio is not None:
    _checks.check_positive_if_static("max_log_ratio", max_log_ratio)
  mask = _checks.check_where(where, logp.shape, "logp")
  dtype = _checks.compute_dtype(logp, ref_logp)
  logp, ref_logp = logp.astype(dtype), ref_logp.astype(dtype)
  if mask is not None:  # padding (NaN, -inf) never reaches the arithmetic, nor its gradient
    logp, ref_logp = jnp.where(mask, logp, 0.0), jnp.where(mask, ref_logp, 0.0)
  # A token of probability 0 under both (both -inf) has no mass on either side: its log ratio
  # is 0, as 0 log 0 = 0 everywhere else, not -inf - -inf = NaN.
  both_empty = _numerics.is_empty_row(logp) & _numerics.is_empty_row(ref_logp)
  d = jnp.where(both_empty, 0.0, ref_logp - logp)
  if max_log_ratio is not None:
    bound = jnp.asarray(max_log_ratio, dtype)
    d = jnp.clip(d, -bound, bound)
  if estimator == "k1":
    out = -d
  elif estimator == "k2":
    out = 0.5 * d * d
  else:
    out = _k3(d)
  return out if mask is None else jnp.where(mask, out, 0.0)
