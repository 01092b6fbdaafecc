"""Per-position divergences between two next-token distributions: the spec and the block math.

The math works on ``[rows, V]`` blocks of transformed (soft-capped, temperature-scaled, masked)
logits in the compute dtype. Conventions (pinned by tests): 0 log 0 = 0, so ``-inf`` logits on
both sides are harmless; identical inputs give exactly 0 and a gradient of exactly 0; a
divergence is never negative (a rounding residue below 0 is clamped to 0, with a zero gradient,
NaN passing through); emptiness is tested by equality only (klagg_jax._numerics), so a NaN
anywhere in a row reaches that row's result.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from klagg_jax import _checks
from klagg_jax._chunked import Chunking
from klagg_jax._numerics import (is_empty_row, is_zero, propagate_nan, safe_divide, safe_log,
                                 stable_shift, where_mass)
from klagg_jax._ops import transform

DIRECTIONS = ("reverse", "forward", "js")


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static configuration of one divergence kernel call (hashable: a ``nondiff_argnums`` key)."""
  direction: str  # "reverse" | "forward" | "js" (endpoints of js already mapped to a KL)
  beta: float
  inv_temperature: float
  chunks: Chunking
  ref_grad: bool = True
  vocab_axis: str | None = None  # mesh axis the vocabulary is split over (inside shard_map)
  softcap: float | None = None  # the student's cap (cap * tanh(z / cap)), before the temperature
  ref_softcap: float | None = None  # the reference's cap

  @property
  def n_stats(self) -> int:
    return 4 if self.direction == "js" else 3


def resolve_direction(direction: str, beta: float) -> tuple[str, float]:
  """Validates (direction, beta); maps js at beta = 0 / 1 onto the KL it equals by convention."""
  _checks.check_choice("direction", direction, DIRECTIONS)
  beta = _checks.check_closed_unit("beta", beta)
  if direction == "js" and beta == 0.0:
    return "forward", beta  # KL(ref || student), as TRL and Liger-Kernel define the endpoint
  if direction == "js" and beta == 1.0:
    return "reverse", beta
  return direction, beta


# ------------------------------------------------------------------------------------------------
# Reductions over the vocabulary axis; over a mesh axis too when the vocabulary is sharded.


def vmax(x: jax.Array, axis_name: str | None) -> jax.Array:
  m = x.max(-1)
  return jax.lax.pmax(m, axis_name) if axis_name else m


def vsum(x: jax.Array, axis_name: str | None) -> jax.Array:
  s = x.sum(-1)
  return jax.lax.psum(s, axis_name) if axis_name else s


def log_normalizer(x: jax.Array, axis_name: str | None = None) -> jax.Array:
  """log sum_v exp(x_v) per row: -inf (not NaN) for an all -inf row, NaN for a row with NaN."""
  shift = stable_shift(jax.lax.stop_gradient(vmax(x, axis_name)))
  return shift + safe_log(vsum(jnp.exp(x - shift[..., None]), axis_name))


def log_probs(x: jax.Array, lse: jax.Array) -> jax.Array:
  """``x - lse`` per row; an empty row (lse = -inf) keeps its -inf entries rather than NaN."""
  return x - stable_shift(lse)[..., None]


# ------------------------------------------------------------------------------------------------
# Block math on [chunk, V] rows in the compute dtype. ``x`` is the first argument of the KL.
# Emptiness is tested by equality only (klagg_jax._numerics): a NaN anywhere in a row reaches
# that row's result.


def _kl_forward(x, y, axis_name):
  """KL(softmax x || softmax y) per row, with the row statistics its backward needs.

  KL = sum_v e_v (x_v - y_v) / sum_v e_v - (lse x - lse y), e = exp(x - max x): two exps per
  entry pair (one per side), the compute floor, and exactly 0 for identical rows.
  """
  shift = stable_shift(jax.lax.stop_gradient(vmax(x, axis_name)))
  e = jnp.exp(x - shift[:, None])
  sx = vsum(e, axis_name)
  # 0 log 0 = 0: entries with p = 0 contribute nothing, even where y is -inf too.
  tilt = vsum(where_mass(e, e * (x - y)), axis_name)
  lx, ly = shift + safe_log(sx), log_normalizer(y, axis_name)
  kl = safe_divide(tilt, sx) - (lx - stable_shift(ly))
  # A student row that is all -inf has no mass: nothing to diverge (0, as js gives), not 0/0;
  # a reference row that is all -inf has none where the student has some: +inf, not inf - inf.
  kl = jnp.where(is_zero(sx), 0.0, jnp.where(is_empty_row(ly), jnp.inf, kl))
  return propagate_nan(kl, sx, ly), (lx, ly, kl)


def _kl_backward(x, y, stats):
  """d KL / dx = p (log p - log r - KL), d KL / dy = r - p."""
  lx, ly, kl = stats
  lp, lr = log_probs(x, lx), log_probs(y, ly)
  p, r = jnp.exp(lp), jnp.exp(lr)
  dx = where_mass(p, p * ((lp - lr) - kl[:, None]))
  return dx, r - p


def _log_mix_ratio(delta, w, wc):
  """log(wc + w e^delta), i.e. log(m / p) for m = wc p + w r and delta = log r - log p.

  ``w`` and ``wc = 1 - w`` are static and given apart, so a w within float32 rounding of 1 (beta
  = 1e-9) keeps its exact complement. Exactly 0 at delta = 0 (identical inputs give exactly 0);
  accurate for tiny results and large |delta|; log wc at delta = -inf.
  """
  # log1p(w expm1(delta)) is accurate unless it overflows or nears log(0); there the result is
  # far from 0 and logaddexp of the two log-terms (static logs: no float32 underflow) is.
  t = w * jnp.expm1(jnp.clip(delta, None, _MIX_DELTA_MAX))
  mid = (t > -0.5) & (delta <= _MIX_DELTA_MAX)
  rest = jnp.logaddexp(math.log(wc), math.log(w) + delta)
  return jnp.where(mid, jnp.log1p(jnp.where(mid, t, 0.0)), rest)


_MIX_DELTA_MAX = 60.0  # w expm1(60) < 1.2e26: no float32 overflow in the log1p form


def _js_forward(x, y, beta, axis_name):
  """beta KL(r || m) + (1 - beta) KL(p || m), m = (1 - beta) p + beta r, per row."""
  lx, ly = log_normalizer(x, axis_name), log_normalizer(y, axis_name)
  lp, lr = log_probs(x, lx), log_probs(y, ly)
  p, r = jnp.exp(lp), jnp.exp(lr)
  delta = lr - lp
  kl_pm = vsum(where_mass(p, -p * _log_mix_ratio(delta, beta, 1.0 - beta)), axis_name)
  kl_rm = vsum(where_mass(r, -r * _log_mix_ratio(-delta, 1.0 - beta, beta)), axis_name)
  js = propagate_nan(beta * kl_rm + (1.0 - beta) * kl_pm, lx, ly)
  return js, (lx, ly, kl_pm, kl_rm)


def _js_backward(x, y, stats, beta):
  """d JS / dx = (1 - beta) p (log p - log m - KL(p||m)); symmetrically for y with weight beta."""
  lx, ly, kl_pm, kl_rm = stats
  lp, lr = log_probs(x, lx), log_probs(y, ly)
  p, r = jnp.exp(lp), jnp.exp(lr)
  delta = lr - lp
  dx = where_mass(p, p * (-_log_mix_ratio(delta, beta, 1.0 - beta) - kl_pm[:, None]))
  dy = where_mass(r, r * (-_log_mix_ratio(-delta, 1.0 - beta, beta) - kl_rm[:, None]))
  return (1.0 - beta) * dx, beta * dy


def clamp(div: jax.Array) -> jax.Array:
  """A divergence is >= 0: a rounding residue at or below 0 becomes 0; NaN passes through."""
  return jnp.where(flat(div), jnp.zeros_like(div), div)


def flat(div: jax.Array) -> jax.Array:
  """True where :func:`clamp` holds the value at 0 (there the gradient is 0: the minimum)."""
  return div <= 0  # False for NaN


def _raw_value(stats, spec: Spec) -> jax.Array:
  """The unclamped divergence from :func:`block_forward`'s statistics."""
  if spec.direction == "js":
    return spec.beta * stats[3] + (1.0 - spec.beta) * stats[2]
  return stats[2]


def block_forward(a, b, spec: Spec):
  """Divergence of student rows ``a`` from reference rows ``b`` (transformed logits, compute
  dtype), clamped at 0, with the per-row statistics :func:`block_backward` needs."""
  if spec.direction == "reverse":
    div, stats = _kl_forward(a, b, spec.vocab_axis)
  elif spec.direction == "forward":
    div, stats = _kl_forward(b, a, spec.vocab_axis)
  else:
    div, stats = _js_forward(a, b, spec.beta, spec.vocab_axis)
  return clamp(div), stats


def block_backward(a, b, stats, spec: Spec):
  """(d div / d a, d div / d b) per row, recomputed from ``stats`` of :func:`block_forward`;
  0 on rows the clamp holds at 0."""
  if spec.direction == "reverse":
    da, db = _kl_backward(a, b, stats)
  elif spec.direction == "forward":
    db, da = _kl_backward(b, a, stats)
  else:
    da, db = _js_backward(a, b, stats, spec.beta)
  held = flat(_raw_value(stats, spec))[:, None]
  return jnp.where(held, 0.0, da), jnp.where(held, 0.0, db)


def prepare(x: jax.Array, mask: jax.Array, spec: Spec, dtype, *, ref: bool = False):
  """(one block transformed, its slope): soft-cap, temperature, masked rows zeroed."""
  cap = spec.ref_softcap if ref else spec.softcap
  return transform.apply(x, mask, cap, spec.inv_temperature, dtype)


def prepare_block(x: jax.Array, mask: jax.Array, spec: Spec, dtype, *,
                  ref: bool = False) -> jax.Array:
  """One block, upcast and transformed (:mod:`klagg_jax._ops.transform`), masked rows zeroed."""
  return prepare(x, mask, spec, dtype, ref=ref)[0]
