"""The Pallas divergence kernels for TPU (Mosaic): the same tile steps on a 2-D grid of blocks.

Unmeasured: no TPU was available when they were written. They are checked through Pallas' TPU
interpret mode only (``pltpu.InterpretParams``), which runs the kernels' semantics on a CPU but
not Mosaic's compiler, so a layout the compiler rejects would show only on a TPU.

Mosaic wants blocks, not pointer arithmetic: the grid is ``(row blocks, vocabulary tiles)``,
each program gets one ``[rows, vocab]`` block of each input (rows a multiple of 16, vocab of
128, the bfloat16 tile; or the whole axis when it is shorter), and the row statistics live in
``[N, 1]`` float32 outputs whose block stays resident across the vocabulary axis (declared
``"arbitrary"``) and accumulates there. The blocks past N and V of the last row block and tile
are read as whatever Mosaic pads them with and masked by their indices, as in the Triton kernels.
Bytes moved are those of the Triton kernels (see :mod:`klagg_jax._ops.divergence.pallas`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from klagg_jax._ops.divergence import pallas_kernels as K
from klagg_jax._ops.divergence.pallas_tiles import Tiles

ROW_ALIGN, LANES = 16, 128  # the bfloat16 (sublane, lane) tile; float32's (8, 128) divides it


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Mosaic block sizes: ``rows`` x ``vocab``, aligned or the whole axis (not powers of two)."""
  rows: int
  vocab: int


def fit(tiles: Tiles, n: int, v: int) -> Blocks:
  """``tiles`` made legal for Mosaic at ``[n, v]``: aligned blocks, or the whole (short) axis.

  Args:
    tiles: the requested tiles (powers of two).
    n: rows; v: vocabulary entries.

  Returns:
    Blocks with ``rows`` a multiple of 16 (or ``n`` when ``n`` is smaller) and ``vocab`` a
    multiple of 128 (or ``v`` when smaller).
  """
  rows = n if n <= ROW_ALIGN else max(ROW_ALIGN, min(tiles.rows, n))
  vocab = v if v <= LANES else max(LANES, min(tiles.vocab, v))
  rows, vocab = (rows if rows == n else rows - rows % ROW_ALIGN,
                 vocab if vocab == v else vocab - vocab % LANES)
  return Blocks(rows, vocab)


def _positions(n: int, v: int, k: K.Kernel):
  """(row indices ``[R, 1]``, column indices ``[R, C]``) of this program's block."""
  i, j = pl.program_id(0), pl.program_id(1)
  shape = (k.tiles.rows, k.tiles.vocab)
  rows = i * k.tiles.rows + jax.lax.broadcasted_iota(jnp.int32, (k.tiles.rows, 1), 0)
  cols = j * k.tiles.vocab + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  return rows, cols


def _inputs(x_ref, y_ref, mask_ref, n: int, v: int, k: K.Kernel):
  rows, cols = _positions(n, v, k)
  keep = (mask_ref[...] != 0) & (rows < n)
  valid = keep & (cols < v)
  return K.prepare(x_ref[...], valid, k.scale), K.prepare(y_ref[...], valid, k.scale), valid


def _stats_kernel(x_ref, y_ref, mask_ref, *out_refs, n: int, v: int, k: K.Kernel):
  @pl.when(pl.program_id(1) == 0)
  def _init():
    for ref, value in zip(out_refs, K.stats_init((k.tiles.rows, 1))):
      ref[...] = value

  x, y, _ = _inputs(x_ref, y_ref, mask_ref, n, v, k)
  carry = [ref[...] for ref in out_refs] + [jnp.zeros((k.tiles.rows, 1), jnp.float32)]
  new = K.stats_step(tuple(carry[:5]), x, y, k.kind == "kl", keepdims=True)
  for ref, value in zip(out_refs, new):
    ref[...] = value


def _mix_kernel(x_ref, y_ref, mask_ref, lx_ref, ly_ref, pm_ref, rm_ref, *, n: int, v: int,
                k: K.Kernel):
  @pl.when(pl.program_id(1) == 0)
  def _init():
    pm_ref[...] = jnp.zeros(pm_ref.shape, jnp.float32)
    rm_ref[...] = jnp.zeros(rm_ref.shape, jnp.float32)

  x, y, _ = _inputs(x_ref, y_ref, mask_ref, n, v, k)
  sx, sy = K.shift_of(lx_ref[...]), K.shift_of(ly_ref[...])
  pm, rm = K.mix_step((pm_ref[...], rm_ref[...]), x, y, sx, sy, k.beta, keepdims=True)
  pm_ref[...], rm_ref[...] = pm, rm


def _grads_kernel(x_ref, y_ref, mask_ref, w_ref, *refs, n: int, v: int, k: K.Kernel):
  n_stats = 4 if k.kind == "js" else 3
  stat_refs, grad_refs = refs[:n_stats], refs[n_stats:]
  x, y, valid = _inputs(x_ref, y_ref, mask_ref, n, v, k)
  stats = [ref[...] for ref in stat_refs]
  dx, dy = K.grads_tile(x, y, w_ref[...], stats, k, keepdims=True)
  outs = [d for d, want in ((dx, k.want_dx), (dy, k.want_dy)) if want]
  for ref, d in zip(grad_refs, outs):
    ref[...] = jnp.where(valid, d, 0.0).astype(ref.dtype)


def _call(kernel, out_shapes, out_blocks, n: int, v: int, k: K.Kernel, semantics, interpret,
          name: str, *args):
  r, c = k.tiles.rows, k.tiles.vocab
  logits = pl.BlockSpec((r, c), lambda i, j: (i, j))
  column = pl.BlockSpec((r, 1), lambda i, j: (i, 0))
  in_specs = [logits, logits] + [column] * (len(args) - 2)
  out_specs = [logits if block == "logits" else column for block in out_blocks]
  params = {} if interpret else {"compiler_params": pltpu.CompilerParams(
      dimension_semantics=semantics)}
  # Inside shard_map: every operand and output varies over the union of the operands' axes.
  axes = frozenset().union(*(K.varying(z) for z in args))
  args = [K.cast_varying(z, axes) for z in args]
  out_shapes = [K.struct(z.shape, z.dtype, args[0]) for z in out_shapes]
  return tuple(pl.pallas_call(
      kernel, out_shape=out_shapes, grid=(pl.cdiv(n, r), pl.cdiv(v, c)), in_specs=in_specs,
      out_specs=out_specs, interpret=interpret or False, name=name, **params)(*args))


def _column(z: jax.Array) -> jax.Array:
  return z.reshape(-1, 1)


def row_stats(x, y, mask, k: K.Kernel, *, interpret=None):
  """:func:`pallas_kernels.row_stats` on TPU; ``interpret``: ``pltpu.InterpretParams`` or None."""
  n, v = x.shape
  k = dataclasses.replace(k, tiles=fit(k.tiles, n, v))  # type: ignore[arg-type]
  count = 5 if k.kind == "kl" else 4
  shapes = [jax.ShapeDtypeStruct((n, 1), jnp.float32)] * count
  kernel = functools.partial(_stats_kernel, n=n, v=v, k=k)
  out = _call(kernel, shapes, ["column"] * count, n, v, k, ("parallel", "arbitrary"), interpret,
              "klagg_divergence_stats", x, y, _column(mask))
  return tuple(o[:, 0] for o in out)


def mix_sums(x, y, mask, lx, ly, k: K.Kernel, *, interpret=None):
  """:func:`pallas_kernels.mix_sums` on TPU."""
  n, v = x.shape
  k = dataclasses.replace(k, tiles=fit(k.tiles, n, v))  # type: ignore[arg-type]
  shapes = [jax.ShapeDtypeStruct((n, 1), jnp.float32)] * 2
  kernel = functools.partial(_mix_kernel, n=n, v=v, k=k)
  out = _call(kernel, shapes, ["column"] * 2, n, v, k, ("parallel", "arbitrary"), interpret,
              "klagg_divergence_mix", x, y, _column(mask), _column(lx), _column(ly))
  return tuple(o[:, 0] for o in out)


def row_grads(x, y, mask, w, stats, k: K.Kernel, *, interpret=None):
  """:func:`pallas_kernels.row_grads` on TPU."""
  n, v = x.shape
  k = dataclasses.replace(k, tiles=fit(k.tiles, n, v))  # type: ignore[arg-type]
  shapes = [jax.ShapeDtypeStruct(z.shape, z.dtype)
            for z, want in ((x, k.want_dx), (y, k.want_dy)) if want]
  kernel = functools.partial(_grads_kernel, n=n, v=v, k=k)
  return _call(kernel, shapes, ["logits"] * len(shapes), n, v, k, ("parallel", "parallel"),
               interpret, "klagg_divergence_grads", x, y, _column(mask), _column(w),
               *(_column(s) for s in stats))
