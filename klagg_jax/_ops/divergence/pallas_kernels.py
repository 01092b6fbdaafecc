"""The Pallas kernels of the per-position divergence, written once for Triton and the interpreter.

Every kernel is a grid over row blocks (``tiles.rows`` rows per program); a program walks its
rows' vocabulary in tiles of ``tiles.vocab`` entries with masked loads, so any N and V work: the
rows past N and the entries past V of the last blocks are masked, never padded in memory.
Masked rows and entries past V read as ``-inf`` (no mass), so a masked row's garbage, NaN
included, never reaches the arithmetic. All arithmetic is float32.

``x`` is the first argument of the KL (the student for ``"reverse"``, the reference for
``"forward"``); ``js`` takes the student as ``x``.

- :func:`row_stats`: one read of ``x`` and ``y``. Per row, the running maximum and the rescaled
  sum of exponentials of both sides (an online log-sum-exp: Milakov & Gimelshein 2018), and for
  a KL the rescaled tilt ``sum_v e_v (x_v - y_v)``, ``e = exp(x - max x)``. Partial statistics
  of several vocabulary shards merge with :func:`merge_stats`.
- :func:`mix_sums`: one more read, for ``js`` only: ``-sum_v p_v log(m_v / p_v)`` and the same
  for ``r``, given both log-normalizers.
- :func:`row_grads`: one read of ``x`` and ``y`` and one write of each gradient requested.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from klagg_jax._ops.divergence.pallas_tiles import Tiles

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Kernel:
  """The static part of one kernel call (hashable).

  Attributes:
    kind: ``"kl"`` (a KL of ``x`` from ``y``) or ``"js"``.
    beta: the reference's weight in ``js``, strictly inside (0, 1).
    scale: the inverse temperature multiplying both inputs.
    tiles: block sizes.
    want_dx: write the gradient into ``x`` (:func:`row_grads`).
    want_dy: write the gradient into ``y``.
  """
  kind: str
  beta: float
  scale: float
  tiles: Tiles
  want_dx: bool = True
  want_dy: bool = True


# ------------------------------------------------------------------------------------------------
# Per-tile math (plain jax.numpy on [rows, vocab] float32 tiles; lowers to Triton and runs in the
# interpreter alike).


def shift_of(m: jax.Array) -> jax.Array:
  """The stabilizing shift of a row maximum: 0 for an empty row (all -inf), NaN kept."""
  return jnp.where(m == NEG_INF, 0.0, m)


def log_mix_ratio(delta: jax.Array, log_w: float, log_wc: float, w: float) -> jax.Array:
  """log(wc + w e^delta), i.e. log(m / p) for m = wc p + w r and delta = log r - log p.

  Near delta = 0 the result is small and ``log1p(w expm1(delta))`` keeps its relative accuracy
  (and is exactly 0 at delta = 0, so identical inputs give exactly 0). For |delta| > 1 the
  result is at least min(log wc + ..., ...) away from cancellation and the two-term log-sum-exp
  of the static logs ``log w``, ``log wc`` (no underflow of a tiny ``wc``) is accurate, with
  the right limits at delta = +-inf.
  """
  near = jnp.abs(delta) <= 1.0  # False for NaN: the far branch passes NaN through
  d = jnp.where(near, delta, 0.0)
  small = jnp.log1p(w * jnp.expm1(d))
  hi = jnp.maximum(log_wc, log_w + delta)
  lo = jnp.minimum(log_wc, log_w + delta)
  far = hi + jnp.log1p(jnp.exp(lo - hi))
  return jnp.where(near, small, far)


def mix_terms(lp: jax.Array, lr: jax.Array, beta: float) -> tuple[jax.Array, jax.Array]:
  """Per entry, ``-log(m / p)`` and ``-log(m / r)``, m = (1 - beta) p + beta r."""
  lb, lbc = math.log(beta), math.log1p(-beta)
  delta = lr - lp
  return (-log_mix_ratio(delta, lb, lbc, beta), -log_mix_ratio(-delta, lbc, lb, 1.0 - beta))


def where_mass(mass: jax.Array, value: jax.Array) -> jax.Array:
  """0 log 0 = 0: ``value`` where ``mass != 0`` (by equality, NaN kept), else 0."""
  return jnp.where(mass == 0, 0.0, value)


# ------------------------------------------------------------------------------------------------
# Loads.


def _rows_of(n: int, tiles: Tiles):
  r0 = pl.program_id(0) * tiles.rows
  rows = r0 + jnp.arange(tiles.rows)
  return r0, rows < n


def _keep(mask_ref, r0, row_in, tiles: Tiles) -> jax.Array:
  m = plgpu.load(mask_ref.at[pl.ds(r0, tiles.rows)], mask=row_in, other=0)
  return (m != 0) & row_in


def _load(ref, r0, j, keep, row_in, v: int, k: Kernel) -> tuple[jax.Array, jax.Array]:
  """Tile ``j`` of the row block as float32 (scaled), ``-inf`` at masked rows and past V."""
  c0 = j * k.tiles.vocab
  col_in = (c0 + jnp.arange(k.tiles.vocab)) < v
  x = plgpu.load(ref.at[pl.ds(r0, k.tiles.rows), pl.ds(c0, k.tiles.vocab)],
                 mask=row_in[:, None] & col_in[None, :], other=0.0).astype(jnp.float32)
  if k.scale != 1.0:
    x = x * k.scale
  valid = keep[:, None] & col_in[None, :]
  return jnp.where(valid, x, NEG_INF), col_in


def _store_rows(refs, values, r0, row_in, tiles: Tiles) -> None:
  for ref, val in zip(refs, values):
    plgpu.store(ref.at[pl.ds(r0, tiles.rows)], val.astype(ref.dtype), mask=row_in)


# ------------------------------------------------------------------------------------------------
# Kernels.


def _online(m, s, x):
  """One online log-sum-exp step: the new maximum, the rescale factor of the old sums, e^(x-m)."""
  new = jnp.maximum(m, x.max(axis=1))
  shift = shift_of(new)
  # exp(m - shift) is 0 for an old maximum of -inf (its sums are 0), and NaN carries through.
  return new, jnp.exp(m - shift), jnp.exp(x - shift[:, None])


def _stats_kernel(x_ref, y_ref, mask_ref, *out_refs, n: int, v: int, k: Kernel):
  r0, row_in = _rows_of(n, k.tiles)
  keep = _keep(mask_ref, r0, row_in, k.tiles)
  tilt = k.kind == "kl"

  def body(j, carry):
    mx, sx, my, sy, t = carry
    x, _ = _load(x_ref, r0, j, keep, row_in, v, k)
    y, _ = _load(y_ref, r0, j, keep, row_in, v, k)
    mx, ax, ex = _online(mx, sx, x)
    my, ay, ey = _online(my, sy, y)
    sx = sx * ax + ex.sum(axis=1)
    sy = sy * ay + ey.sum(axis=1)
    if tilt:  # 0 log 0 = 0: entries without student mass add nothing, even where y = -inf
      t = t * ax + where_mass(ex, ex * (x - y)).sum(axis=1)
    return mx, sx, my, sy, t

  full = lambda value: jnp.full((k.tiles.rows,), value, jnp.float32)
  init = (full(NEG_INF), full(0.0), full(NEG_INF), full(0.0), full(0.0))
  out = jax.lax.fori_loop(0, pl.cdiv(v, k.tiles.vocab), body, init)
  _store_rows(out_refs, out[:len(out_refs)], r0, row_in, k.tiles)


def _mix_kernel(x_ref, y_ref, mask_ref, lx_ref, ly_ref, pm_ref, rm_ref, *, n: int, v: int,
                k: Kernel):
  r0, row_in = _rows_of(n, k.tiles)
  keep = _keep(mask_ref, r0, row_in, k.tiles)
  sx = shift_of(plgpu.load(lx_ref.at[pl.ds(r0, k.tiles.rows)], mask=row_in, other=0.0))
  sy = shift_of(plgpu.load(ly_ref.at[pl.ds(r0, k.tiles.rows)], mask=row_in, other=0.0))

  def body(j, carry):
    pm, rm = carry
    x, _ = _load(x_ref, r0, j, keep, row_in, v, k)
    y, _ = _load(y_ref, r0, j, keep, row_in, v, k)
    lp, lr = x - sx[:, None], y - sy[:, None]
    p, r = jnp.exp(lp), jnp.exp(lr)
    gp, gr = mix_terms(lp, lr, k.beta)
    return pm + where_mass(p, p * gp).sum(axis=1), rm + where_mass(r, r * gr).sum(axis=1)

  zeros = jnp.zeros((k.tiles.rows,), jnp.float32)
  out = jax.lax.fori_loop(0, pl.cdiv(v, k.tiles.vocab), body, (zeros, zeros))
  _store_rows((pm_ref, rm_ref), out, r0, row_in, k.tiles)


def _grads_kernel(x_ref, y_ref, mask_ref, w_ref, *refs, n: int, v: int, k: Kernel):
  n_stats = 4 if k.kind == "js" else 3
  stat_refs, grad_refs = refs[:n_stats], refs[n_stats:]
  r0, row_in = _rows_of(n, k.tiles)
  keep = _keep(mask_ref, r0, row_in, k.tiles)
  row = lambda ref: plgpu.load(ref.at[pl.ds(r0, k.tiles.rows)], mask=row_in, other=0.0)
  w = row(w_ref)
  stats = [row(ref) for ref in stat_refs]
  sx, sy = shift_of(stats[0]), shift_of(stats[1])

  def body(j, carry):
    x, col_in = _load(x_ref, r0, j, keep, row_in, v, k)
    y, _ = _load(y_ref, r0, j, keep, row_in, v, k)
    lp, lr = x - sx[:, None], y - sy[:, None]
    p, r = jnp.exp(lp), jnp.exp(lr)
    if k.kind == "kl":
      dx = where_mass(p, p * ((lp - lr) - stats[2][:, None]))
      dy = r - p
    else:
      gp, gr = mix_terms(lp, lr, k.beta)
      dx = (1.0 - k.beta) * where_mass(p, p * (gp - stats[2][:, None]))
      dy = k.beta * where_mass(r, r * (gr - stats[3][:, None]))
    c0 = j * k.tiles.vocab
    valid = keep[:, None] & col_in[None, :]
    store_in = row_in[:, None] & col_in[None, :]
    outs = [d for d, want in ((dx, k.want_dx), (dy, k.want_dy)) if want]
    for ref, d in zip(grad_refs, outs):
      # Masked rows are written as exact zeros, whatever their stats hold.
      d = jnp.where(valid, w[:, None] * d, 0.0)
      plgpu.store(ref.at[pl.ds(r0, k.tiles.rows), pl.ds(c0, k.tiles.vocab)],
                  d.astype(ref.dtype), mask=store_in)
    return carry

  jax.lax.fori_loop(0, pl.cdiv(v, k.tiles.vocab), body, 0)


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers: one function per kernel for both the interpreter and Triton.


def _call(kernel, out_shape, n: int, k: Kernel, interpret: bool, name: str):
  params = {} if interpret else {"compiler_params": plgpu.CompilerParams(
      num_warps=k.tiles.num_warps, num_stages=k.tiles.num_stages)}
  return pl.pallas_call(kernel, out_shape=out_shape, grid=(pl.cdiv(n, k.tiles.rows),),
                        interpret=interpret, name=name, **params)


def row_stats(x, y, mask, k: Kernel, *, interpret: bool):
  """``(max x, sum e^(x - max x), max y, sum e^(y - max y)[, tilt])`` per row, float32 ``[N]``."""
  n, v = x.shape
  count = 5 if k.kind == "kl" else 4
  shape = [jax.ShapeDtypeStruct((n,), jnp.float32)] * count
  kernel = functools.partial(_stats_kernel, n=n, v=v, k=k)
  return tuple(_call(kernel, shape, n, k, interpret, "klagg_divergence_stats")(x, y, mask))


def mix_sums(x, y, mask, lx, ly, k: Kernel, *, interpret: bool):
  """``(KL(p || m), KL(r || m))`` per row (partial over a vocabulary shard), float32 ``[N]``."""
  n, v = x.shape
  shape = [jax.ShapeDtypeStruct((n,), jnp.float32)] * 2
  kernel = functools.partial(_mix_kernel, n=n, v=v, k=k)
  return tuple(_call(kernel, shape, n, k, interpret, "klagg_divergence_mix")(x, y, mask, lx, ly))


def row_grads(x, y, mask, w, stats, k: Kernel, *, interpret: bool):
  """``w`` times the gradients of the per-row divergence into ``x`` and ``y`` (those wanted)."""
  n, v = x.shape
  shape = [jax.ShapeDtypeStruct(z.shape, z.dtype)
           for z, want in ((x, k.want_dx), (y, k.want_dy)) if want]
  kernel = functools.partial(_grads_kernel, n=n, v=v, k=k)
  return tuple(_call(kernel, shape, n, k, interpret, "klagg_divergence_grads")(
      x, y, mask, w, *stats))
