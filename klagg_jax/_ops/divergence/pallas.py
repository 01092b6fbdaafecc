"""The ``"pallas"`` implementation of the per-position divergence: hand-written row kernels.

``divergence_rows`` has the chunked kernel's contract (same arguments, values, gradients and
conventions) and runs the Pallas kernels of :mod:`klagg_jax._ops.divergence.pallas_kernels`.
A program owns ``tiles.rows`` rows (grid ``cdiv(N, rows)``) and walks their vocabulary in tiles
of ``tiles.vocab`` entries with masked loads (any N and V; nothing padded in memory). Bytes
moved, in ``N V`` entries of the input dtype (``[N]`` vectors aside):

- forward, ``"reverse"`` / ``"forward"``: one read of each input (2), an online log-sum-exp of
  both sides and the tilt per row; writes the ``[N]`` row statistics only;
- forward, ``"js"``: one read for the log-normalizers, one more for the mixture sums (4);
- backward: one more read of each input and one write of each gradient requested (3 or 4).

So a KL's value and gradient into the student move 5 ``N V`` entries, the least a kernel that
does not hold a whole row on chip can: a row's gradient needs its log-normalizer first.

Platforms, chosen when the program is lowered (``jax.lax.platform_dependent``), so a program
exported for CUDA from a CPU host holds the Triton kernels:

- GPU: Pallas' Triton lowering, tiles from :mod:`klagg_jax._ops.divergence.pallas_tiles`;
- CPU: Pallas' interpreter, exact and slow, a correctness mode. Inside a ``shard_map`` that
  checks varying axes the interpreter cannot run (it mixes the per-device blocks with the
  kernel's device-invariant indices, which the check rejects), so there the CPU path applies the
  kernels' tile steps to whole rows in plain JAX;
- TPU: the same tile steps as Mosaic kernels over a 2-D grid of aligned blocks
  (:mod:`klagg_jax._ops.divergence.pallas_tpu`). Unmeasured: checked through Pallas' TPU
  interpret mode and by lowering for TPU from a CPU host only.

Sharding: a ``pallas_call`` is opaque to GSPMD, so the forward and the backward are each wrapped
in ``jax.experimental.custom_partitioning`` (with a Shardy ``sharding_rule``) and run on each
device's block on a classic mesh. Inputs on ``Explicit`` mesh axes run in a ``shard_map`` read
off their types. A vocabulary split merges the per-shard row statistics with ``pmax`` / ``psum``
over ``[N]`` arrays, in the partitioned program or over ``spec.vocab_axis`` inside the caller's
``shard_map``; no logits are gathered. Under ``vmap`` the kernels see more rows. A program
exported with shardings (``jax.export``) must take the ``shard_map`` path (``partition=``, or
``Explicit`` axes): ``custom_partitioning``'s partitioner is a host callback, which ``jax.export``
cannot serialize; unsharded programs export as they are.

Unsupported inputs raise ``NotImplementedError`` (float64, a softcap, spec fields this kernel
does not know), the signal for a caller to try the next implementation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.custom_batching
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from klagg_jax._ops.divergence.base import Spec
from klagg_jax._ops.rows import hint_jvp
from klagg_jax._ops.divergence import pallas_kernels as K
from klagg_jax._ops.divergence import pallas_tiles, pallas_tpu
from klagg_jax._ops.divergence.pallas_tiles import Tiles

__all__ = ["Tiles", "block_backward", "block_forward", "check_block", "divergence_rows"]

# Spec fields this kernel reads; any other field set to something other than None / False is
# a feature it does not implement.
_KNOWN_FIELDS = {"direction", "beta", "inv_temperature", "chunks", "ref_grad", "vocab_axis"}


def _check_supported(a: jax.Array, b: jax.Array, spec: Spec) -> None:
  for x in (a, b):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"logits must be floating point; got {x.dtype}.")
    if jnp.dtype(x.dtype).itemsize > 4:
      raise NotImplementedError(f"the Pallas divergence kernel computes in float32; {x.dtype} "
                                "inputs are left to another implementation.")
  if getattr(spec, "softcap", None) is not None:
    raise NotImplementedError("the Pallas divergence kernel has no softcap.")
  for field in dataclasses.fields(spec):
    if field.name not in _KNOWN_FIELDS and getattr(spec, field.name) not in (None, False):
      raise NotImplementedError(f"the Pallas divergence kernel does not handle Spec.{field.name}.")
  if spec.direction not in ("reverse", "forward", "js"):
    raise NotImplementedError(f"direction {spec.direction!r} is not implemented in Pallas.")
  if spec.direction == "js" and not 0.0 < spec.beta < 1.0:
    raise NotImplementedError("js at beta = 0 or 1 is a KL: map it with resolve_direction.")


# ------------------------------------------------------------------------------------------------
# One kernel, every platform.


@dataclasses.dataclass(frozen=True)
class _Config:
  """A kernel's static configuration, with the tiles given by the caller (None: the table's)."""
  kernel: K.Kernel
  tiles: Tiles | None


def _gpu_tiles(v: int) -> Tiles:
  kind = jax.devices()[0].device_kind if jax.default_backend() == "gpu" else None
  return pallas_tiles.lookup(kind, v)


_TPU = {K.row_stats: pallas_tpu.row_stats, K.mix_sums: pallas_tpu.mix_sums,
        K.row_grads: pallas_tpu.row_grads}


def _on_every_platform(fn, cfg: _Config, n: int, v: int, *args):
  """``fn(*args, kernel, ...)``: Triton on GPU, Mosaic on TPU, the interpreter on CPU.

  Inside a ``shard_map`` that checks varying axes, the CPU path evaluates the kernels' tile steps
  on whole rows in plain JAX instead: Pallas' interpreter cannot run there (it mixes per-device
  blocks with device-invariant indices, which the check rejects). GPU and TPU run the kernels.
  """
  emulate = any(K.varying(x) for x in jax.tree.leaves(args))

  def variant(interpret: bool):
    tiles = cfg.tiles or (pallas_tiles.lookup(None, v, interpret=True) if interpret
                          else _gpu_tiles(v))
    kernel = dataclasses.replace(cfg.kernel, tiles=tiles.fit(n, v))
    return lambda *xs: fn(*xs, kernel, interpret=interpret, emulate=interpret and emulate)

  def mosaic(*xs):
    tiles = cfg.tiles or pallas_tiles.lookup(None, v, tpu=True)
    return _TPU[fn](*xs, dataclasses.replace(cfg.kernel, tiles=tiles))

  return jax.lax.platform_dependent(*args, cpu=variant(True), tpu=mosaic,
                                    default=variant(False))


# ------------------------------------------------------------------------------------------------
# Row statistics with the cross-shard merge, and the gradients: the units that are partitioned.


def _psum(x, axes):
  return jax.lax.psum(x, axes) if axes else x


def _merge_lse(m, s, axes):
  """The log-normalizer from per-shard (max, rescaled sum) pairs; and each shard's rescale."""
  if axes:
    top = jax.lax.pmax(m, axes)
    f = jnp.exp(m - K.shift_of(top))
    return top, _psum(s * f, axes), f
  return m, s, jnp.ones_like(s)


def _safe_log(s):
  zero = s == 0
  return jnp.where(zero, -jnp.inf, jnp.log(jnp.where(zero, 1.0, s)))


def _forward_stats(x, y, mask, cfg: _Config, axes: tuple[str, ...] | None):
  """The backward's row statistics: ``(lx, ly, kl)`` for a KL, ``(lx, ly, kl_pm, kl_rm)`` js."""
  n, v = x.shape
  stats = _on_every_platform(K.row_stats, cfg, n, v, x, y, mask)
  mx, sx, fx = _merge_lse(stats[0], stats[1], axes)
  my, sy, _ = _merge_lse(stats[2], stats[3], axes)
  lx, ly = K.shift_of(mx) + _safe_log(sx), K.shift_of(my) + _safe_log(sy)
  nan = jnp.isnan(sx) | jnp.isnan(ly)
  if cfg.kernel.kind == "kl":
    t = _psum(stats[4] * fx, axes)
    kl = t / jnp.where(sx == 0, 1.0, sx) - (lx - K.shift_of(ly))
    # An empty student row has nothing to diverge (0); an empty reference row where the student
    # has mass is +inf (not inf - inf); a NaN in either row reaches the result.
    kl = jnp.where(sx == 0, 0.0, jnp.where(ly == -jnp.inf, jnp.inf, kl))
    return lx, ly, jnp.where(nan, jnp.nan, kl)
  pm, rm = _on_every_platform(K.mix_sums, cfg, n, v, x, y, mask, lx, ly)
  return lx, ly, _psum(pm, axes), _psum(rm, axes)


def _grads(x, y, mask, w, stats, cfg: _Config):
  n, v = x.shape
  return _on_every_platform(K.row_grads, cfg, n, v, x, y, mask, w, tuple(stats))


def _mesh_axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _split_of(sharding, rank: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(batch axes, vocabulary axes) of an operand's sharding; nothing split if not a NamedSharding."""
  if not isinstance(sharding, NamedSharding):
    return (), ()
  spec = tuple(sharding.spec) + (None,) * rank
  return _mesh_axes(spec[0]), (_mesh_axes(spec[1]) if rank > 1 else ())


def _spec_entry(axes: tuple[str, ...]):
  return None if not axes else (axes[0] if len(axes) == 1 else axes)


def _layout(mesh, arg_shapes):
  batch, vocab = _split_of(arg_shapes[0].sharding, 2)
  logits = NamedSharding(mesh, P(_spec_entry(batch), _spec_entry(vocab)))
  rows = NamedSharding(mesh, P(_spec_entry(batch)))
  return logits, rows, vocab


def _rule(n_logits: int, n_rows: int, n_out_logits: int, n_out_rows: int) -> str:
  ins = ", ".join(["n v"] * n_logits + ["n"] * n_rows)
  outs = ", ".join(["n v"] * n_out_logits + ["n"] * n_out_rows)
  return f"{ins} -> {outs}"


@functools.partial(custom_partitioning, static_argnums=(3,))
def _forward_op(x, y, mask, cfg: _Config):
  return _forward_stats(x, y, mask, cfg, None)


def _forward_infer(cfg, mesh, arg_shapes, result_shape):
  _, rows, _ = _layout(mesh, arg_shapes)
  return tuple(rows for _ in result_shape)


def _forward_partition(cfg, mesh, arg_shapes, result_shape):
  logits, rows, vocab = _layout(mesh, arg_shapes)

  def lower(x, y, mask):
    return _forward_stats(x, y, mask, cfg, vocab or None)

  return mesh, lower, tuple(rows for _ in result_shape), (logits, logits, rows)


@functools.partial(custom_partitioning, static_argnums=(4,))
def _grads_op(x, y, mask, w, cfg: _Config, *stats):
  return _grads(x, y, mask, w, stats, cfg)


def _grads_infer(cfg, mesh, arg_shapes, result_shape):
  logits, _, _ = _layout(mesh, arg_shapes)
  return tuple(logits for _ in result_shape)


def _grads_partition(cfg, mesh, arg_shapes, result_shape):
  logits, rows, _ = _layout(mesh, arg_shapes)

  def lower(x, y, mask, w, *stats):
    return _grads(x, y, mask, w, stats, cfg)

  args = (logits, logits) + (rows,) * (len(arg_shapes) - 2)
  return mesh, lower, tuple(logits for _ in result_shape), args


def _forward_rule(cfg, mesh, arg_shapes, result_shape) -> str:
  """Shardy: rows are a batch factor of every operand, the vocabulary a reduction factor."""
  return _rule(2, 1, 0, len(result_shape))


def _grads_rule(cfg, mesh, arg_shapes, result_shape) -> str:
  """Shardy: per-row inputs, ``[N, V]`` gradients laid out as the logits."""
  return _rule(2, len(arg_shapes) - 2, len(result_shape), 0)


_forward_op.def_partition(infer_sharding_from_operands=_forward_infer,
                          partition=_forward_partition, sharding_rule=_forward_rule)
_grads_op.def_partition(infer_sharding_from_operands=_grads_infer, partition=_grads_partition,
                        sharding_rule=_grads_rule)


@functools.lru_cache(maxsize=None)
def _rowwise(op: str, cfg: _Config):
  """The partitioned op for ``cfg``, batched under ``vmap`` as more rows.

  Every operand is ``[N, ...]`` rows treated independently, so a vmapped call is the same op on
  ``[B N, ...]`` (``custom_partitioning`` itself has no batching rule).
  """
  if op == "forward":
    call = lambda x, y, mask: _forward_op(x, y, mask, cfg)
  else:
    call = lambda x, y, mask, w, *stats: _grads_op(x, y, mask, w, cfg, *stats)
  fn = jax.custom_batching.custom_vmap(call)

  @fn.def_vmap
  def _rule(axis_size, in_batched, *args):
    args = [x if batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
            for x, batched in zip(args, in_batched)]
    outs = fn(*(x.reshape((-1,) + x.shape[2:]) for x in args))
    outs = tuple(o.reshape((axis_size, -1) + o.shape[1:]) for o in outs)
    return outs, tuple(True for _ in outs)

  return fn


# ------------------------------------------------------------------------------------------------
# The differentiable entry point.


def _operands(a, b, spec: Spec):
  """(x, y, gradient-into-a is dx): ``x`` is the first argument of the KL."""
  if spec.direction == "forward":
    return b, a, False
  return a, b, True


def _config(spec: Spec, tiles: Tiles | None, *, want_a: bool = True,
            want_b: bool = True) -> _Config:
  kind = "js" if spec.direction == "js" else "kl"
  a_is_x = spec.direction != "forward"
  want_dx, want_dy = (want_a, want_b) if a_is_x else (want_b, want_a)
  return _Config(K.Kernel(kind, float(spec.beta), float(spec.inv_temperature),
                          tiles or pallas_tiles.GPU_DEFAULT, want_dx, want_dy), tiles)


def _raw_value(stats: Sequence[jax.Array], spec: Spec) -> jax.Array:
  """The divergence before the clamp at 0."""
  if spec.direction == "js":
    lx, ly, pm, rm = stats
    value = spec.beta * rm + (1.0 - spec.beta) * pm
    return jnp.where(jnp.isnan(lx) | jnp.isnan(ly), jnp.nan, value)
  return stats[2]


def _value(stats: Sequence[jax.Array], mask: jax.Array, spec: Spec) -> jax.Array:
  value = _raw_value(stats, spec)
  value = jnp.where(value <= 0, 0.0, value)  # rounding below 0; NaN fails the test and stays
  return jnp.where(mask, value, 0.0)


def _run_forward(x, y, m, cfg: _Config, spec: Spec):
  if spec.vocab_axis is not None:  # inside shard_map: merge over its axis here
    return _forward_stats(x, y, m, cfg, _mesh_axes(spec.vocab_axis))
  return _rowwise("forward", cfg)(x, y, m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _rows(a, b, mask, spec: Spec, tiles: Tiles | None):
  return _rows_fwd(a, b, mask, spec, tiles)[0]


def _rows_fwd(a, b, mask, spec, tiles):
  x, y, _ = _operands(a, b, spec)
  m = mask.astype(jnp.int32)
  stats = _run_forward(x, y, m, _config(spec, tiles), spec)
  return _value(stats, mask, spec), (a, b, mask, tuple(stats))


def _rows_bwd(spec, tiles, residuals, g):
  a, b, mask, stats = residuals
  x, y, a_is_x = _operands(a, b, spec)
  cfg = _config(spec, tiles, want_b=spec.ref_grad)
  # Where the clamp holds the value at 0 (identical rows, a row without mass) it is a minimum:
  # zero gradient, as every implementation gives.
  live = mask & ~(_raw_value(stats, spec) <= 0)
  w = jnp.where(live, g.astype(jnp.float32) * spec.inv_temperature, 0.0)
  m = mask.astype(jnp.int32)
  if spec.vocab_axis is not None:
    grads = _grads(x, y, m, w, stats, cfg)
  else:
    grads = _rowwise("grads", cfg)(x, y, m, w, *stats)
  grads = list(grads)
  k = cfg.kernel
  dx = grads.pop(0) if k.want_dx else None
  dy = grads.pop(0) if k.want_dy else None
  da, db = (dx, dy) if a_is_x else (dy, dx)
  return da, db, None


_rows.defvjp(_rows_fwd, _rows_bwd)
_rows_or_hint = hint_jvp(_rows)  # a jax.jvp through it names implementation="xla"


def divergence_rows(a: jax.Array, b: jax.Array, mask: jax.Array, spec: Spec,
                    tiles: Tiles | None = None) -> jax.Array:
  """Per-row divergence of ``[N, V]`` logits ``a`` (student) from ``b`` (reference), in Pallas.

  With x = a / T, y = b / T (``spec.inv_temperature`` = 1 / T), p = softmax(x), r = softmax(y):

  .. math::

     \\mathrm{reverse} = \\mathrm{KL}(p \\| r) = \\sum_v p_v (\\log p_v - \\log r_v), \\qquad
     \\mathrm{forward} = \\mathrm{KL}(r \\| p),

  .. math::

     \\mathrm{js} = \\beta\\, \\mathrm{KL}(r \\| m) + (1 - \\beta)\\, \\mathrm{KL}(p \\| m),
     \\qquad m = (1 - \\beta) p + \\beta r.

  A KL is read in one pass from the online statistics
  :math:`M = \\max_v x_v`, :math:`S = \\sum_v e^{x_v - M}`,
  :math:`T = \\sum_v e^{x_v - M} (x_v - y_v)`:

  .. math::

     \\mathrm{KL}(p \\| r) = T / S - (\\log Z_x - \\log Z_y), \\qquad \\log Z_x = M + \\log S,

  and js takes :math:`\\log(m_v / p_v) = \\log((1 - \\beta) + \\beta e^{\\delta_v})`,
  :math:`\\delta_v = \\log r_v - \\log p_v`, from ``log1p``/``expm1`` near 0.
  The gradients are :math:`\\partial \\mathrm{KL}(p\\|r) / \\partial x = p (\\log p - \\log r -
  \\mathrm{KL})` and :math:`\\partial / \\partial y = r - p`, times 1 / T.

  The chunked kernel's conventions hold: masked rows give exactly 0 and a zero gradient whatever
  they hold; 0 log 0 = 0 at ``-inf`` entries; an all ``-inf`` student row gives 0 and an all
  ``-inf`` reference row where the student has mass +inf; a NaN (or +inf) at a valid position
  gives NaN; identical rows give exactly 0 and a zero gradient; results below 0 by rounding are
  0. Arithmetic is float32 whatever the input dtype.

  Args:
    a: student logits ``[N, V]``, float16, bfloat16 or float32.
    b: reference logits ``[N, V]``.
    mask: bool ``[N]``; False rows give 0.
    spec: the static configuration (direction with js endpoints already mapped to a KL, beta,
      inverse temperature, whether ``b`` gets a gradient, the ``shard_map`` vocabulary axis).
      ``spec.chunks`` is ignored.
    tiles: block sizes; None takes them from :mod:`~klagg_jax._ops.divergence.pallas_tiles`
      (per device kind and vocabulary on GPU, the interpreter's on CPU).

  Returns:
    float32 ``[N]``.

  Raises:
    NotImplementedError: float64 inputs, or a softcap or other Spec feature this kernel lacks:
      the caller should use another implementation.
    ValueError: non-float inputs or mismatched shapes.
  """
  a, b, mask = jnp.asarray(a), jnp.asarray(b), jnp.asarray(mask)
  _check_supported(a, b, spec)
  if a.ndim != 2 or a.shape != b.shape or mask.shape != a.shape[:1]:
    raise ValueError(f"expected a, b of one shape [N, V] and mask [N]; got {a.shape}, "
                     f"{b.shape}, {mask.shape}.")
  if a.shape[1] == 0:
    raise ValueError("the vocabulary (last axis) is empty.")
  if tiles is not None and not isinstance(tiles, Tiles):
    raise ValueError(f"tiles must be a Tiles or None; got {tiles!r}.")
  if a.shape[0] == 0:
    return jnp.zeros((0,), jnp.float32)
  mask = mask.astype(bool)
  explicit = _explicit_layout(a, b) if spec.vocab_axis is None else None
  if explicit is not None:
    return _on_explicit_mesh(a, b, mask, spec, tiles, *explicit)
  return _rows_or_hint(a, b, mask, spec, tiles)


def _explicit_layout(a, b):
  """(mesh, batch axes, vocabulary axes) when ``a``'s type holds ``Explicit`` mesh axes."""
  sharding = getattr(jax.typeof(a), "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return None
  mesh = sharding.mesh
  explicit = {name for name, t in zip(mesh.axis_names, getattr(mesh, "axis_types", ()))
              if t == AxisType.Explicit}
  batch, vocab = _split_of(sharding, 2)
  if not (set(batch) | set(vocab)) & explicit:
    return None
  if _split_of(getattr(jax.typeof(b), "sharding", None), 2) != (batch, vocab):
    raise NotImplementedError("a and b are laid out differently; resharding either would move "
                              "logits, which this kernel does not do.")
  return mesh, batch, vocab


def _on_explicit_mesh(a, b, mask, spec, tiles, mesh, batch, vocab):
  """Each device's blocks in a ``shard_map``, the vocabulary shards merged over ``vocab``."""
  logits, rows = P(_spec_entry(batch), _spec_entry(vocab)), P(_spec_entry(batch))
  mask = jax.sharding.reshard(mask, rows)  # [N] bools: cheap, whatever their layout was
  local_spec = dataclasses.replace(spec, vocab_axis=_spec_entry(vocab))

  def local(a, b, mask):
    return _rows_or_hint(a, b, mask, local_spec, tiles)

  return jax.shard_map(local, mesh=mesh, in_specs=(logits, logits, rows), out_specs=rows)(
      a, b, mask)


# ------------------------------------------------------------------------------------------------
# The block step of the fused (hidden-state) heads.


def _block_spec(spec: Spec) -> Spec:
  """The block functions take scaled, prepared rows: no temperature, and no reference stop."""
  return dataclasses.replace(spec, inv_temperature=1.0, ref_grad=True)


def check_block(dtype, spec: Spec) -> None:
  """Raises ``NotImplementedError`` where the block step cannot run ``spec`` on ``dtype`` rows.

  The check :func:`block_forward` and :func:`block_backward` make, for a caller that wants to
  refuse before it traces anything.
  """
  x = jax.ShapeDtypeStruct((0, 0), dtype)
  _check_supported(x, x, spec)


def block_forward(a: jax.Array, b: jax.Array, spec: Spec):
  """Divergence of prepared student rows ``a`` from reference rows ``b``, with its row stats.

  The Pallas counterpart of the chunked kernel's block step, for heads that compute a
  ``[block, V]`` logits block and hand it over: ``a`` and ``b`` are already scaled by the inverse
  temperature and have masked rows zeroed, in float32 or a 16-bit dtype (arithmetic is float32).
  One read of the block for a KL (two for js); see :func:`divergence_rows` for the math.

  Args:
    a: student rows ``[block, V]``.
    b: reference rows ``[block, V]``.
    spec: as for :func:`divergence_rows`; its temperature and ``ref_grad`` are not used here.

  Returns:
    ``(div, stats)``: float32 ``[block]`` divergences and the statistics
    :func:`block_backward` takes, ``(lx, ly, kl)`` for a KL and ``(lx, ly, kl_pm, kl_rm)`` for
    js (``lx``, ``ly`` the log-normalizers).

  Raises:
    NotImplementedError: as :func:`divergence_rows`.
  """
  _check_supported(a, b, spec)
  spec = _block_spec(spec)
  x, y, _ = _operands(a, b, spec)
  mask = jnp.ones(a.shape[:1], bool)
  stats = _run_forward(x, y, mask.astype(jnp.int32), _config(spec, None), spec)
  return _value(stats, mask, spec), tuple(stats)


def block_backward(a: jax.Array, b: jax.Array, stats, spec: Spec, *, ref_grad: bool = True):
  """``(d div / d a, d div / d b)`` per row of a block, from :func:`block_forward`'s ``stats``.

  .. math::

     \\frac{\\partial\\, \\mathrm{KL}(p \\| r)}{\\partial a} = p (\\log p - \\log r - \\mathrm{KL}),
     \\qquad \\frac{\\partial\\, \\mathrm{KL}(p \\| r)}{\\partial b} = r - p,

  and for js :math:`(1 - \\beta) p (-\\log(m/p) - \\mathrm{KL}(p\\|m))` into ``a``,
  :math:`\\beta r (-\\log(m/r) - \\mathrm{KL}(r\\|m))` into ``b``. One more read of the block
  and one write of each gradient, in the dtype of its input. Rows whose divergence the clamp
  holds at 0 (identical rows, rows without mass) get a zero gradient, as in the chunked step.

  Args:
    a: student rows ``[block, V]``, as given to :func:`block_forward`.
    b: reference rows ``[block, V]``.
    stats: the statistics :func:`block_forward` returned.
    spec: the same spec.
    ref_grad: whether to form (and write) the gradient into ``b``; False returns None there.

  Returns:
    The two ``[block, V]`` gradients (of each row's divergence, unweighted).

  Raises:
    NotImplementedError: as :func:`divergence_rows`.
  """
  _check_supported(a, b, spec)
  spec = _block_spec(spec)
  x, y, a_is_x = _operands(a, b, spec)
  cfg = _config(spec, None, want_b=ref_grad)
  w = jnp.where(_raw_value(stats, spec) <= 0, 0.0, 1.0).astype(jnp.float32)
  m = jnp.ones(a.shape[:1], jnp.int32)
  if spec.vocab_axis is not None:
    grads = _grads(x, y, m, w, tuple(stats), cfg)
  else:
    grads = _rowwise("grads", cfg)(x, y, m, w, *stats)
  grads = list(grads)
  dx = grads.pop(0) if cfg.kernel.want_dx else None
  dy = grads.pop(0) if cfg.kernel.want_dy else None
  return (dx, dy) if a_is_x else (dy, dx)
