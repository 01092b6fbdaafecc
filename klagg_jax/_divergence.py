"""Per-position divergences between two next-token distributions given as logits.

The math lives in per-block functions on ``[chunk, V]`` float32 rows; ``divergence_rows`` runs
them over row chunks under a ``jax.custom_vjp`` whose backward recomputes each chunk from saved
per-row statistics (log-normalizers and the divergence), so no ``[N, V]`` temporary is held
beyond the inputs and their gradients. The fused (hidden-state) kernel reuses the block math.

Conventions (pinned by tests): 0 log 0 = 0, so ``-inf`` logits on both sides are harmless;
masked rows are replaced by zeros before any arithmetic, so they give exactly 0 and a gradient
of exactly 0 whatever garbage they hold; identical inputs give exactly 0 and gradient 0.
"""

from __future__ import annotations

import dataclasses
import math
import functools

import jax
import jax.numpy as jnp

from klagg_jax import _checks, _config, _sharding, _xla
from klagg_jax._chunked import Chunking, chunking, scan_row_chunks
from klagg_jax._numerics import (is_empty_row, is_zero, propagate_nan, safe_divide, safe_log,
                                 stable_shift, where_mass)

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


def block_forward(a, b, spec: Spec):
  """Divergence of student rows ``a`` from reference rows ``b`` (scaled logits, compute dtype)."""
  if spec.direction == "reverse":
    return _kl_forward(a, b, spec.vocab_axis)
  if spec.direction == "forward":
    return _kl_forward(b, a, spec.vocab_axis)
  return _js_forward(a, b, spec.beta, spec.vocab_axis)


def block_backward(a, b, stats, spec: Spec):
  """(d div / d a, d div / d b) per row, recomputed from ``stats`` of :func:`block_forward`."""
  if spec.direction == "reverse":
    return _kl_backward(a, b, stats)
  if spec.direction == "forward":
    db, da = _kl_backward(b, a, stats)
    return da, db
  return _js_backward(a, b, stats, spec.beta)


def prepare_block(x: jax.Array, mask: jax.Array, spec: Spec, dtype) -> jax.Array:
  """Upcasts one chunk, applies the temperature, and zeroes masked rows (NaN padding included)."""
  x = x.astype(dtype)
  if spec.inv_temperature != 1.0:
    x = x * jnp.asarray(spec.inv_temperature, dtype)
  return jnp.where(mask[:, None], x, 0.0)


# ------------------------------------------------------------------------------------------------
# The chunked kernel with its custom VJP.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def divergence_rows(a: jax.Array, b: jax.Array, mask: jax.Array, spec: Spec) -> jax.Array:
  """Per-row divergence of ``[N, V]`` logits ``a`` (student) from ``b`` (reference); ``[N]``."""
  return _rows_fwd(a, b, mask, spec)[0]


def _rows_fwd(a, b, mask, spec):
  dtype = _checks.compute_dtype(a, b)

  def body(part, fresh, carry):
    a_c, b_c, m_c = part
    div, stats = block_forward(prepare_block(a_c, m_c, spec, dtype),
                               prepare_block(b_c, m_c, spec, dtype), spec)
    return carry, [jnp.where(m_c, div, 0.0), *stats]

  _, outs = scan_row_chunks(body, (a, b, mask), spec.chunks)
  return outs[0], (a, b, mask, tuple(outs[1:]))


def _rows_bwd(spec, residuals, g):
  a, b, mask, stats = residuals
  dtype = _checks.compute_dtype(a, b)
  scale = jnp.asarray(spec.inv_temperature, dtype)

  def body(part, fresh, carry):
    a_c, b_c, m_c, g_c, *st = part
    da, db = block_backward(prepare_block(a_c, m_c, spec, dtype),
                            prepare_block(b_c, m_c, spec, dtype), st, spec)
    w = jnp.where(m_c, g_c.astype(dtype) * scale, 0.0)[:, None]
    outs = [jnp.where(m_c[:, None], w * da, 0.0).astype(a.dtype)]
    if spec.ref_grad:
      outs.append(jnp.where(m_c[:, None], w * db, 0.0).astype(b.dtype))
    return carry, outs

  _, grads = scan_row_chunks(body, (a, b, mask, g, *stats), spec.chunks)
  return grads[0], (grads[1] if spec.ref_grad else None), None


divergence_rows.defvjp(_rows_fwd, _rows_bwd)


def divide_by_traced_temperature(x: jax.Array, mask: jax.Array, temperature: jax.Array,
                                 dtype) -> jax.Array:
  """``x / temperature`` in ``dtype`` for a traced temperature, outside the chunked kernel.

  Costs a ``dtype`` copy of ``x`` (a static temperature is applied per chunk instead). Masked
  rows are zeroed and -inf entries kept out of the quotient first, so the temperature's gradient
  sees neither NaN padding nor ``0 * inf``.
  """
  x = jnp.where(mask[:, None], x.astype(dtype), 0.0)
  banned = x == -jnp.inf  # by equality: a NaN entry is divided (and stays NaN)
  return jnp.where(banned, -jnp.inf, jnp.where(banned, 0.0, x) / temperature)


# ------------------------------------------------------------------------------------------------
# Public API.


def per_position(logits, ref_logits, *, direction, where, temperature, beta, chunk_size,
                 ref_grad: bool = True, vocab_axis: str | None = None,
                 partition: _sharding.Partition | None = None,
                 implementation: str | None = None) -> jax.Array:
  """:func:`kl_per_position` with the internal switches the barrier and sharded paths use."""
  logits, ref_logits = jnp.asarray(logits), jnp.asarray(ref_logits)
  _checks.check_float("logits", logits)
  _checks.check_float("ref_logits", ref_logits)
  _checks.check_vocab("logits", logits)
  _checks.check_same_shape("logits", logits, "ref_logits", ref_logits)
  direction, beta = resolve_direction(direction, beta)
  temp = _checks.check_positive_if_static("temperature", temperature)
  impl = _config.implementation(implementation)
  lead, vocab = logits.shape[:-1], logits.shape[-1]
  chunks = chunking(chunk_size, vocab)
  mask = _checks.check_where(where, lead, "positions (logits.shape[:-1])")
  layout = None if vocab_axis else _sharding.resolve(
      partition, lead, vocab, position_inputs=(logits, ref_logits, mask),
      vocab_inputs=((logits, -1), (ref_logits, -1)))
  if layout is not None:  # each device runs this function on its own blocks

    def local(a, b, m, t):
      return per_position(a, b, direction=direction, where=m, beta=beta, chunk_size=chunk_size,
                          temperature=temperature if t is None else t, ref_grad=ref_grad,
                          vocab_axis=layout.vocab, implementation=impl)

    t = None if temp is not None else jnp.asarray(temperature)
    return _sharding.shard(local, layout, (logits, ref_logits, mask, t),
                           (layout.logits(), layout.logits(), layout.positions(), layout.scalar()))
  n = math.prod(lead)
  dtype = _checks.compute_dtype(logits, ref_logits)
  if n == 0:
    return jnp.zeros(lead, dtype)
  a, b = logits.reshape(n, vocab), ref_logits.reshape(n, vocab)
  mask = jnp.ones((n,), bool) if mask is None else mask.reshape(n)
  if not ref_grad:  # before any traced temperature, so d/dT keeps the reference's side
    b = jax.lax.stop_gradient(b)
  kernel_ref_grad = ref_grad
  if temp is None:  # traced temperature: scale outside the kernel so autodiff sees it
    a, b = (divide_by_traced_temperature(x, mask, temperature, dtype) for x in (a, b))
    temp, kernel_ref_grad = 1.0, True  # d/dT flows through the scaled reference too
  spec = Spec(direction=direction, beta=beta, inv_temperature=1.0 / temp, chunks=chunks,
              ref_grad=kernel_ref_grad, vocab_axis=vocab_axis)
  rows = _xla.divergence_rows if impl == "xla" else divergence_rows
  return rows(a, b, mask, spec).reshape(lead)


def kl_per_position(logits: jax.typing.ArrayLike, ref_logits: jax.typing.ArrayLike, *,
                    direction: str = "reverse", where: jax.typing.ArrayLike | None = None,
                    temperature: float | jax.Array = 1.0, beta: float = 0.5,
                    chunk_size: int | None = None,
                    partition: _sharding.Partition | None = None,
                    implementation: str | None = None) -> jax.Array:
  """Divergence between the student's and the reference's next-token distributions, per position.

  With p = softmax(logits / T) and r = softmax(ref_logits / T) over the last axis:
  ``"reverse"``: KL(p || r) = sum_v p_v (log p_v - log r_v) (mode-seeking);
  ``"forward"``: KL(r || p);
  ``"js"``: beta KL(r || m) + (1 - beta) KL(p || m), m = (1 - beta) p + beta r, the generalized
  Jensen-Shannon divergence of TRL's ``generalized_jsd_loss`` (beta = 0.5 symmetric; beta = 0 is
  exactly KL(r || p), beta = 1 exactly KL(p || r)).

  Log-probabilities are valid inputs (log_softmax is idempotent). ``-inf`` entries are allowed
  (0 log 0 = 0, with a zero gradient); a student entry with mass where the reference has none
  gives +inf, as the KL does; a student row that is all ``-inf`` gives 0. A NaN (or +inf) in
  either row of a valid position gives NaN there: a diverged student never reads as KL 0.
  By default computed block by block in float32 with a custom VJP that recomputes, so only the
  inputs and their gradients are ever ``[N, V]``.

  Args:
    logits: student logits ``[..., V]``, any float dtype.
    ref_logits: reference logits, same shape.
    direction: ``"reverse"``, ``"forward"`` or ``"js"``.
    where: optional bool ``[...]``: False positions give exactly 0 and a zero gradient, even
      where their logits are NaN or inf.
    temperature: T > 0 dividing both logits; may be traced (then differentiable).
    beta: weight of the reference in ``"js"``, a static number in [0, 1].
    chunk_size: at most this many positions per block (per device when sharded); the blocks
      take rows spread over the whole batch, so the largest divisor of the position count
      within it is used. ``None`` lets the library choose for the platform the computation is
      lowered on (cache-sized blocks on CPU, device-filling ones on GPU and TPU).
    partition: a :class:`klagg_jax.Partition` naming the mesh axes the batch and the vocabulary
      are split over, to run each device's blocks in a ``shard_map``. Not needed for sharded
      inputs: on a classic ``Mesh`` under ``jit`` GSPMD partitions the kernel without gathering
      logits, and on ``Explicit`` axes the layout is read off the inputs.
    implementation: ``None`` (the library's choice: ``"chunked"``), ``"chunked"`` (the
      memory-bounded custom-VJP kernel) or ``"xla"`` (the plain differentiable composition:
      holds ``[N, V]`` float32 residuals for its backward pass, and supports forward-mode AD,
      ``jax.jvp`` / ``jax.jacfwd``, which the custom VJP does not).

  Returns:
    float32 array of shape ``logits.shape[:-1]`` (float64 for float64 inputs with x64 on);
    sharded over the batch axis when the inputs are.

  Raises:
    ValueError: for a shape mismatch, V == 0, an unknown direction, beta outside [0, 1], a
      static temperature <= 0, a bad ``where`` or ``chunk_size``, an unknown ``implementation``,
      or a ``partition`` whose axes are not in the mesh or do not divide the shapes.

  Example:
    >>> kl = ka.kl_per_position(student_logits, base_logits, where=completion_mask)  # [B, T]
  """
  return per_position(logits, ref_logits, direction=direction, where=where,
                      temperature=temperature, beta=beta, chunk_size=chunk_size,
                      partition=partition, implementation=implementation)
