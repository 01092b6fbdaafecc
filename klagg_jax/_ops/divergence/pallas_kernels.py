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
  r"""The log-ratio of a two-point mixture to one of its points, per entry.

  .. math::

     \log\frac{m_v}{p_v} = \log\left(w_c + w\, e^{\delta_v}\right), \qquad
     m = w_c\, p + w\, r, \quad \delta_v = \log r_v - \log p_v, \quad w_c = 1 - w.

  For :math:`|\delta| \le 1` it is :math:`\mathrm{log1p}(w\, \mathrm{expm1}(\delta))`,
  with :math:`\mathrm{expm1}(\delta) = 2\tau / (1 - \tau)`, :math:`\tau = \tanh(\delta / 2)`:
  accurate relative to its (possibly tiny) size, and exactly 0 at :math:`\delta = 0`, so
  identical inputs give exactly 0. Beyond, the result is no smaller than about
  :math:`\min(w, w_c)` in size and the two-term log-sum-exp of the static logs
  :math:`\log w_c` and :math:`\log w + \delta` is accurate, with the limits
  :math:`\log w_c` at :math:`\delta = -\infty` and :math:`+\infty` at :math:`+\infty`.

  Args:
    delta: float32 log-ratios ``log r - log p``, any shape (NaN passes through).
    log_w: ``log w``, a Python float computed in float64.
    log_wc: ``log(1 - w)``, likewise (``log1p(-w)``: exact for tiny ``w``).
    w: the weight of ``r`` in the mixture, strictly inside (0, 1).

  Returns:
    ``log(m / p)``, float32, the shape of ``delta``.
  """
  near = jnp.abs(delta) <= 1.0  # False for NaN: the far branch passes NaN through
  d = jnp.where(near, delta, 0.0)
  # expm1(d) = 2 t / (1 - t), t = tanh(d / 2): as accurate near 0 (1 - t >= 0.53 here), and
  # Mosaic lowers tanh but not expm1.
  t = jnp.tanh(0.5 * d)
  small = jnp.log1p(w * (2.0 * t / (1.0 - t)))
  # Selects, not maximum/minimum: Triton lowers those to maxnumf/minnumf, which drop a NaN.
  other = log_w + delta
  first = log_wc > other  # False for NaN: hi takes the NaN
  hi = jnp.where(first, log_wc, other)
  lo = jnp.where(first, other, log_wc)
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
# Tile steps: what a program does with one [rows, vocab] tile of each input (float32, scaled,
# -inf at masked rows and past V). The kernels loop them over the vocabulary; the plain-JAX
# evaluation (:func:`row_stats` and co. with ``emulate=True``) applies them to whole rows.


def prepare(x: jax.Array, valid: jax.Array, scale: float) -> jax.Array:
  """float32, times ``scale``, ``-inf`` where not ``valid`` (masked rows, entries past V)."""
  x = x.astype(jnp.float32)
  if scale != 1.0:
    x = x * scale
  return jnp.where(valid, x, NEG_INF)


# Row vectors are ``[rows]`` (Triton, plain JAX) or ``[rows, 1]`` (``keepdims``: Mosaic keeps
# them two-dimensional, in the layout of the tiles they come from).


def _col(s: jax.Array, keepdims: bool) -> jax.Array:
  return s if keepdims else s[:, None]


def _online(m, x, keepdims: bool = False):
  """One online log-sum-exp step: the new maximum, the rescale factor of the old sums, e^(x-m).

  Triton's maximum drops NaN (maxnumf) where XLA's keeps it; either way a NaN or +inf entry
  reaches the sum through its own ``exp``, so the row's statistics become NaN on every platform.
  """
  new = jnp.maximum(m, x.max(axis=1, keepdims=keepdims))
  shift = shift_of(new)
  # exp(m - shift) is 0 for an old maximum of -inf (its sums are 0), and NaN carries through.
  return new, jnp.exp(m - shift), jnp.exp(x - _col(shift, keepdims))


def stats_step(carry, x, y, tilt: bool, keepdims: bool = False):
  """Merges a tile into ``(max x, sum e^(x - max x), max y, sum e^(y - max y), tilt)``."""
  mx, sx, my, sy, t = carry
  total = lambda z: z.sum(axis=1, keepdims=keepdims)
  mx, ax, ex = _online(mx, x, keepdims)
  my, ay, ey = _online(my, y, keepdims)
  sx = sx * ax + total(ex)
  sy = sy * ay + total(ey)
  if tilt:  # 0 log 0 = 0: entries without student mass add nothing, even where y = -inf
    t = t * ax + total(where_mass(ex, ex * (x - y)))
  return mx, sx, my, sy, t


def stats_init(shape) -> tuple[jax.Array, ...]:
  full = lambda value: jnp.full(shape, value, jnp.float32)
  return full(NEG_INF), full(0.0), full(NEG_INF), full(0.0), full(0.0)


def mix_step(carry, x, y, sx, sy, beta: float, keepdims: bool = False):
  """Adds a tile's ``-sum p log(m / p)`` and ``-sum r log(m / r)`` (shifts ``sx``, ``sy``)."""
  pm, rm = carry
  total = lambda z: z.sum(axis=1, keepdims=keepdims)
  lp, lr = x - _col(sx, keepdims), y - _col(sy, keepdims)
  p, r = jnp.exp(lp), jnp.exp(lr)
  gp, gr = mix_terms(lp, lr, beta)
  return pm + total(where_mass(p, p * gp)), rm + total(where_mass(r, r * gr))


def grads_tile(x, y, w, stats, k: "Kernel", keepdims: bool = False):
  """``w`` times the gradients into ``x`` and ``y`` of a tile, given the row statistics."""
  col = lambda s: _col(s, keepdims)
  sx, sy = shift_of(stats[0]), shift_of(stats[1])
  lp, lr = x - col(sx), y - col(sy)
  p, r = jnp.exp(lp), jnp.exp(lr)
  if k.kind == "kl":
    dx = where_mass(p, p * ((lp - lr) - col(stats[2])))
    dy = r - p
  else:
    gp, gr = mix_terms(lp, lr, k.beta)
    dx = (1.0 - k.beta) * where_mass(p, p * (gp - col(stats[2])))
    dy = k.beta * where_mass(r, r * (gr - col(stats[3])))
  return col(w) * dx, col(w) * dy


# ------------------------------------------------------------------------------------------------
# Loads and stores. Blocks are addressed by index vectors (``ref.at[rows]``,
# ``ref.at[rows[:, None], cols]``), the layer-norm idiom of Pallas' GPU ops, which Triton turns
# into pointer arithmetic with masks.


def _rows_of(n: int, tiles: Tiles):
  rows = pl.program_id(0) * tiles.rows + jnp.arange(tiles.rows)
  return rows, rows < n


def _row_vector(ref, rows, row_in, other=0.0) -> jax.Array:
  return plgpu.load(ref.at[rows], mask=row_in, other=other)


def _keep(mask_ref, rows, row_in) -> jax.Array:
  return (_row_vector(mask_ref, rows, row_in, 0) != 0) & row_in


def _cols_of(j, k: Kernel):
  return j * k.tiles.vocab + jnp.arange(k.tiles.vocab)


def _load(ref, rows, j, keep, row_in, v: int, k: Kernel) -> tuple[jax.Array, jax.Array]:
  """Tile ``j`` of the row block, prepared; and which of its columns are inside V."""
  cols = _cols_of(j, k)
  col_in = cols < v
  x = plgpu.load(ref.at[rows[:, None], cols[None, :]],
                 mask=row_in[:, None] & col_in[None, :], other=0.0)
  return prepare(x, keep[:, None] & col_in[None, :], k.scale), col_in


def _store_rows(refs, values, rows, row_in) -> None:
  for ref, val in zip(refs, values):
    plgpu.store(ref.at[rows], val.astype(ref.dtype), mask=row_in)


# ------------------------------------------------------------------------------------------------
# Kernels.


def _stats_kernel(x_ref, y_ref, mask_ref, *out_refs, n: int, v: int, k: Kernel):
  rows, row_in = _rows_of(n, k.tiles)
  keep = _keep(mask_ref, rows, row_in)

  def body(j, carry):
    x, _ = _load(x_ref, rows, j, keep, row_in, v, k)
    y, _ = _load(y_ref, rows, j, keep, row_in, v, k)
    return stats_step(carry, x, y, k.kind == "kl")

  out = jax.lax.fori_loop(0, pl.cdiv(v, k.tiles.vocab), body, stats_init((k.tiles.rows,)))
  _store_rows(out_refs, out[:len(out_refs)], rows, row_in)


def _mix_kernel(x_ref, y_ref, mask_ref, lx_ref, ly_ref, pm_ref, rm_ref, *, n: int, v: int,
                k: Kernel):
  rows, row_in = _rows_of(n, k.tiles)
  keep = _keep(mask_ref, rows, row_in)
  sx = shift_of(_row_vector(lx_ref, rows, row_in))
  sy = shift_of(_row_vector(ly_ref, rows, row_in))

  def body(j, carry):
    x, _ = _load(x_ref, rows, j, keep, row_in, v, k)
    y, _ = _load(y_ref, rows, j, keep, row_in, v, k)
    return mix_step(carry, x, y, sx, sy, k.beta)

  zeros = jnp.zeros((k.tiles.rows,), jnp.float32)
  out = jax.lax.fori_loop(0, pl.cdiv(v, k.tiles.vocab), body, (zeros, zeros))
  _store_rows((pm_ref, rm_ref), out, rows, row_in)


def _grads_kernel(x_ref, y_ref, mask_ref, w_ref, *refs, n: int, v: int, k: Kernel):
  n_stats = 4 if k.kind == "js" else 3
  stat_refs, grad_refs = refs[:n_stats], refs[n_stats:]
  rows, row_in = _rows_of(n, k.tiles)
  keep = _keep(mask_ref, rows, row_in)
  w = _row_vector(w_ref, rows, row_in)
  stats = [_row_vector(ref, rows, row_in) for ref in stat_refs]

  def body(j, carry):
    x, col_in = _load(x_ref, rows, j, keep, row_in, v, k)
    y, _ = _load(y_ref, rows, j, keep, row_in, v, k)
    dx, dy = grads_tile(x, y, w, stats, k)
    cols = _cols_of(j, k)
    valid = keep[:, None] & col_in[None, :]
    store_in = row_in[:, None] & col_in[None, :]
    outs = [d for d, want in ((dx, k.want_dx), (dy, k.want_dy)) if want]
    for ref, d in zip(grad_refs, outs):
      # Masked rows are written as exact zeros, whatever their stats hold.
      plgpu.store(ref.at[rows[:, None], cols[None, :]],
                  jnp.where(valid, d, 0.0).astype(ref.dtype), mask=store_in)
    return carry

  jax.lax.fori_loop(0, pl.cdiv(v, k.tiles.vocab), body, 0)


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers: one function per kernel for both the interpreter and Triton.


def _varying(x) -> frozenset:
  """Mesh axes ``x`` varies over inside ``shard_map`` (empty elsewhere, and without the type)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None:
    return frozenset(getattr(mat, "varying", ()))
  return frozenset(getattr(aval, "vma", ()) or ())


def _cast_varying(x, axes: frozenset):
  missing = tuple(sorted(axes - _varying(x)))
  if not missing:
    return x
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, missing, to="varying")
  return jax.lax.pvary(x, missing)


def _struct(shape, dtype, like) -> jax.ShapeDtypeStruct:
  """An output type varying over the mesh axes ``like`` varies over (inside ``shard_map``)."""
  aval = jax.typeof(like)
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None:
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
  vma = getattr(aval, "vma", None)
  if vma is not None:
    return jax.ShapeDtypeStruct(shape, dtype, vma=vma)
  return jax.ShapeDtypeStruct(shape, dtype)


def _call(kernel, shapes, n: int, k: Kernel, interpret: bool, name: str, *args):
  """Runs ``kernel`` over the row blocks; outputs ``shapes`` as (shape, dtype) pairs.

  Inside ``shard_map`` every operand is first made to vary over the union of the axes any of
  them varies over, and the outputs vary over it too.
  """
  axes = frozenset().union(*(_varying(x) for x in args))
  args = [_cast_varying(x, axes) for x in args]
  out_shape = [_struct(shape, dtype, args[0]) for shape, dtype in shapes]
  params = {} if interpret else {"compiler_params": plgpu.CompilerParams(
      num_warps=k.tiles.num_warps, num_stages=k.tiles.num_stages)}
  return tuple(pl.pallas_call(kernel, out_shape=out_shape, grid=(pl.cdiv(n, k.tiles.rows),),
                              interpret=interpret, name=name, **params)(*args))


# Plain-JAX evaluation of the same tile steps on whole rows (one tile of V entries). The CPU path
# inside a ``shard_map`` that checks varying axes uses it: there Pallas' interpreter mixes the
# per-device blocks with the kernel's device-invariant indices, which that check rejects.


def varying(x) -> frozenset:
  """Mesh axes ``x`` varies over inside ``shard_map`` (empty elsewhere)."""
  return _varying(x)


def cast_varying(x, axes: frozenset):
  """``x`` marked as varying over ``axes`` too (inside ``shard_map``)."""
  return _cast_varying(x, axes)


def struct(shape, dtype, like) -> jax.ShapeDtypeStruct:
  """An output type varying over the mesh axes ``like`` varies over."""
  return _struct(shape, dtype, like)


def _whole(x, mask, k: Kernel) -> jax.Array:
  return prepare(x, (mask != 0)[:, None], k.scale)


def row_stats(x, y, mask, k: Kernel, *, interpret: bool, emulate: bool = False):
  r"""The forward pass: one read of ``x`` and ``y``, the online row statistics.

  With :math:`M_x = \max_v x_v`, :math:`S_x = \sum_v e^{x_v - M_x}` (likewise for ``y``) and
  the tilt :math:`T = \sum_v e^{x_v - M_x} (x_v - y_v)` (KL only), merged tile by tile as
  :math:`S \leftarrow S e^{M_{old} - M_{new}} + \sum_{tile} e^{x - M_{new}}`.

  Args:
    x: ``[N, V]`` logits, the first argument of the KL (unscaled, any float dtype).
    y: ``[N, V]`` logits, the second.
    mask: int32 ``[N]``; rows with 0 read as empty (all ``-inf``).
    k: the static kernel configuration (kind, scale, tiles).
    interpret: run through Pallas' interpreter rather than Triton.
    emulate: apply the tile step to whole rows in plain JAX instead of a ``pallas_call``.

  Returns:
    float32 ``[N]`` arrays ``(M_x, S_x, M_y, S_y, T)`` for a KL, ``(M_x, S_x, M_y, S_y)`` for js;
    a vocabulary shard's partial statistics when ``x`` holds one.
  """
  n, v = x.shape
  count = 5 if k.kind == "kl" else 4
  if emulate:
    out = stats_step(stats_init((n,)), _whole(x, mask, k), _whole(y, mask, k), k.kind == "kl")
    return out[:count]
  kernel = functools.partial(_stats_kernel, n=n, v=v, k=k)
  return _call(kernel, [((n,), jnp.float32)] * count, n, k, interpret, "klagg_divergence_stats",
               x, y, mask)


def mix_sums(x, y, mask, lx, ly, k: Kernel, *, interpret: bool, emulate: bool = False):
  r"""The js pass: one more read of ``x`` and ``y`` given both log-normalizers.

  .. math::

     \mathrm{KL}(p \| m) = -\sum_v p_v \log\frac{m_v}{p_v}, \qquad
     \mathrm{KL}(r \| m) = -\sum_v r_v \log\frac{m_v}{r_v}, \qquad
     m = (1 - \beta) p + \beta r.

  Args:
    x: student ``[N, V]`` logits; y: reference logits; mask: int32 ``[N]``.
    lx: float32 ``[N]`` log-normalizers of the scaled ``x`` (over the whole vocabulary).
    ly: those of ``y``.
    k: the static kernel configuration; interpret, emulate: as :func:`row_stats`.

  Returns:
    float32 ``[N]`` arrays ``(KL(p || m), KL(r || m))``, partial over a vocabulary shard.
  """
  n, v = x.shape
  if emulate:
    zeros = jnp.zeros((n,), jnp.float32)
    return mix_step((zeros, zeros), _whole(x, mask, k), _whole(y, mask, k), shift_of(lx),
                    shift_of(ly), k.beta)
  kernel = functools.partial(_mix_kernel, n=n, v=v, k=k)
  return _call(kernel, [((n,), jnp.float32)] * 2, n, k, interpret, "klagg_divergence_mix",
               x, y, mask, lx, ly)


def row_grads(x, y, mask, w, stats, k: Kernel, *, interpret: bool, emulate: bool = False):
  r"""The backward pass: one more read of ``x`` and ``y``, one write of each gradient wanted.

  .. math::

     \frac{\partial\, \mathrm{KL}(p\|r)}{\partial x} = p(\log p - \log r - \mathrm{KL}),
     \qquad \frac{\partial\, \mathrm{KL}(p\|r)}{\partial y} = r - p,

  with respect to the scaled logits (js: see :func:`grads_tile`), times ``w`` per row.

  Args:
    x, y, mask: as :func:`row_stats`.
    w: float32 ``[N]`` row weights (the cotangent times the inverse temperature; 0 at masked
      rows).
    stats: the merged statistics ``(lx, ly, kl)`` (KL) or ``(lx, ly, kl_pm, kl_rm)`` (js).
    k: the static kernel configuration (``want_dx``, ``want_dy`` pick the outputs).
    interpret, emulate: as :func:`row_stats`.

  Returns:
    The wanted gradients, each ``[N, V]`` in the dtype of its input; exactly 0 at masked rows.
  """
  n, v = x.shape
  if emulate:
    grads = grads_tile(_whole(x, mask, k), _whole(y, mask, k), w, stats, k)
    keep = (mask != 0)[:, None]
    return tuple(jnp.where(keep, d, 0.0).astype(z.dtype)
                 for d, z, want in zip(grads, (x, y), (k.want_dx, k.want_dy)) if want)
  shapes = [(z.shape, z.dtype) for z, want in ((x, k.want_dx), (y, k.want_dy)) if want]
  kernel = functools.partial(_grads_kernel, n=n, v=v, k=k)
  return _call(kernel, shapes, n, k, interpret, "klagg_divergence_grads", x, y, mask, w, *stats)
