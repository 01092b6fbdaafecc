"""Multi-device execution: GSPMD by default, ``shard_map`` where the layout is named or typed.

Logits sharded over a device mesh come in two ways, often at once: over the batch (data
parallelism: each device holds some positions, all of the vocabulary) and over the vocabulary (a
tensor-parallel LM head: each device holds a slice of every row). Three paths:

* **GSPMD** (a classic ``Mesh`` with ``Auto`` axes under ``jit``, nothing named): the kernels run
  as one program and XLA partitions it. They are written for that: their row blocks interleave
  the positions (``klagg_jax._chunked``), so no step slices a sharded axis at a traced offset (which
  GSPMD could only serve by gathering the whole ``[N, V]`` operand); reductions over a sharded
  vocabulary become all-reduces of ``[rows]`` statistics; per-row gathers and scatters of the
  top-k functions are vmapped so the row axis is a batch dimension GSPMD keeps sharded.
* **``shard_map``**, when the layout is part of the inputs' types (``Explicit`` mesh axes) or
  named by :class:`Partition`: each device runs the kernel on its own blocks. Positions split over
  mesh axes need nothing; a vocabulary split is handled by the kernels' ``vocab_axis`` (the
  per-row statistics ``pmax``/``psum``-ed over it). An input replicated over an axis its gradient
  is partial over (hidden states over the vocabulary axis, an LM-head weight over the batch
  axis) is cast to vary over that axis on entry; the transpose of that cast is the ``psum`` that
  sums the partial gradients.
* **Inside a user's ``shard_map``** already manual over the named axes: the kernel runs on the
  local blocks as they are.

This module knows nothing of divergences: the kernels pass themselves in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AxisNames = str | tuple[str, ...] | None  # one PartitionSpec entry


def _names(entry: AxisNames) -> tuple[str, ...]:
  """The mesh axis names of one PartitionSpec entry."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(names: Sequence[str]) -> AxisNames:
  """The PartitionSpec entry for ``names``: None, one name, or a tuple of names."""
  names = tuple(names)
  if not names:
    return None
  return names[0] if len(names) == 1 else names


def _normalize_axis_arg(field: str, value: Any) -> AxisNames:
  if value is None:
    return None
  if isinstance(value, str):
    return value
  if isinstance(value, (tuple, list)) and value and all(isinstance(v, str) for v in value):
    return _entry(value)
  raise ValueError(f"Partition.{field} must be a mesh axis name, a tuple of names or None; "
                   f"got {value!r}.")


@dataclasses.dataclass(frozen=True)
class Partition:
  """How the inputs of a divergence are split over a device mesh.

  Pass it as ``partition=`` to any kernel (:func:`kl_per_position`, :func:`kl_barrier`,
  :func:`fused_linear_kl`, :func:`topk_logprobs`, :func:`kl_topk`, :func:`fused_linear_kl_topk`)
  to run it on each device's block of the inputs with ``shard_map``, an explicit override of
  GSPMD's partitioning (which needs no help: the kernels gather nothing under it either).
  ``batch_axis`` splits the first (batch) axis of ``logits`` /
  ``hidden``; ``vocab_axis`` splits the vocabulary (the last axis of the logits; the ``V`` axis of
  an LM-head weight), whose per-row softmax statistics are then ``pmax``/``psum``-ed: the only
  cross-device traffic is ``[positions]``-sized. Inputs laid out differently are resharded to
  this layout first. Per-position results come back sharded over ``batch_axis``; gradients
  sharded like their inputs.

  Without ``partition=`` the layout is read from the inputs' types on a mesh with ``Explicit``
  axes (``jax.make_mesh``'s default in JAX 0.10), and left to GSPMD on ``Auto`` axes. Inside a
  ``shard_map`` already manual over these axes, the kernel runs on the local blocks as they are,
  reducing over ``vocab_axis``.

  Args:
    mesh: a ``jax.sharding.Mesh`` (or ``AbstractMesh``); None takes the mesh set with
      ``jax.set_mesh`` (or the enclosing ``shard_map``'s).
    batch_axis: mesh axis name (or tuple of names) the batch axis is split over, or None.
    vocab_axis: mesh axis name (or tuple of names) the vocabulary is split over, or None.

  Returns:
    A frozen, hashable value for the ``partition=`` arguments.

  Raises:
    ValueError: for an axis that is not a name, a tuple of names or None (names are checked
      against the mesh when used).

  Example:
    >>> mesh = jax.make_mesh((2, 4), ("data", "model"))
    >>> part = ka.Partition(mesh, batch_axis="data", vocab_axis="model")
    >>> loss, metrics = jax.jit(lambda a, b: ka.kl_barrier(a, b, partition=part))(logits, ref)
  """
  mesh: Any = None
  batch_axis: AxisNames = None
  vocab_axis: AxisNames = None

  def __post_init__(self):
    object.__setattr__(self, "batch_axis", _normalize_axis_arg("batch_axis", self.batch_axis))
    object.__setattr__(self, "vocab_axis", _normalize_axis_arg("vocab_axis", self.vocab_axis))


@dataclasses.dataclass(frozen=True)
class Layout:
  """A resolved layout: the mesh, the spec entries of the position axes and of the vocabulary."""
  mesh: Any  # Mesh or AbstractMesh
  lead: tuple[AxisNames, ...]  # one PartitionSpec entry per position axis
  vocab: AxisNames
  manual: bool = False  # inside a shard_map over these axes: run the kernel as it is

  @property
  def lead_axes(self) -> tuple[str, ...]:
    return tuple(a for e in self.lead for a in _names(e))

  @property
  def vocab_axes(self) -> tuple[str, ...]:
    return _names(self.vocab)

  def positions(self) -> P:
    """Spec of a ``[...]`` per-position array (the mask, the result)."""
    return P(*self.lead)

  def logits(self) -> P:
    """Spec of ``[..., V]`` logits."""
    return P(*self.lead, self.vocab)

  def rows(self) -> P:
    """Spec of ``[..., D]`` hidden states (the feature axis whole)."""
    return P(*self.lead, None)

  def vocab_matrix(self, weight_layout: str) -> P:
    """Spec of an LM-head weight, ``[D, V]`` (``"dv"``) or ``[V, D]`` (``"vd"``)."""
    return P(None, self.vocab) if weight_layout == "dv" else P(self.vocab, None)

  def vocab_vector(self) -> P:
    """Spec of a ``[V]`` bias."""
    return P(self.vocab)

  def scalar(self) -> P:
    """Spec of a replicated scalar (a traced temperature)."""
    return P()


# ------------------------------------------------------------------------------------------------
# Mesh-axis variance inside shard_map (JAX's "vma" type): a no-op outside, and on JAX versions
# without it.


def _aval(x: Any) -> Any:
  return jax.typeof(x) if hasattr(jax, "typeof") else jax.core.get_aval(x)


def varying_axes(aval: Any) -> frozenset[str]:
  """Mesh axes a value (an aval or ShapeDtypeStruct) varies over inside ``shard_map``."""
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None:
    return frozenset(getattr(mat, "varying", ()))
  return frozenset(getattr(aval, "vma", ()) or ())


def cast_varying(x: jax.Array, axes: Sequence[str]) -> jax.Array:
  """Marks ``x`` as varying over ``axes`` (those it does not vary over yet).

  Its transpose is a ``psum`` over the same axes: what turns per-device partial gradients of an
  input replicated over ``axes`` into the full gradient.
  """
  missing = tuple(a for a in axes if a not in varying_axes(_aval(x)))
  if not missing:
    return x
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, missing, to="varying")
  return jax.lax.pvary(x, missing)


def match_varying(x: jax.Array, like: Any) -> jax.Array:
  """Casts ``x`` to vary over every axis ``like`` varies over: a loop carry started from
  constants gets the type the loop body gives it."""
  return cast_varying(x, sorted(varying_axes(like)))


# ------------------------------------------------------------------------------------------------
# Resolving the layout: from Partition, or from the inputs' shardings.


def _known_sharding(x: Any) -> tuple[Any, tuple[AxisNames, ...]] | None:
  """(mesh, spec entries padded to x.ndim) when x's layout is part of its type, else None.

  Known: an array or aval sharded over ``Explicit`` mesh axes (under ``jit`` or not). Arrays on
  ``Auto`` axes are left to GSPMD, which partitions the kernels without gathering, whether they
  are ``jit`` arguments, closed-over constants or eager inputs: the same program either way.
  """
  if x is None:
    return None
  sharding = getattr(_aval(x), "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return None
  explicit = _axes_of_type(sharding.mesh, "Explicit")
  entries = tuple(sharding.spec)
  if not any(a in explicit for e in entries for a in _names(e)):
    return None
  return sharding.mesh, entries + (None,) * (x.ndim - len(entries))


def _axes_of_type(mesh: Any, kind: str) -> frozenset[str]:
  """Names of the mesh axes of type ``kind`` ("Auto", "Explicit", "Manual")."""
  types = getattr(mesh, "axis_types", None) or ()
  return frozenset(a for a, t in zip(getattr(mesh, "axis_names", ()), types)
                   if getattr(t, "name", str(t)) == kind)


def _mesh_sizes(mesh: Any) -> dict[str, int]:
  return dict(mesh.shape)


def _check_divisible(what: str, size: int, entry: AxisNames, sizes: dict[str, int]) -> None:
  parts = math.prod(sizes[a] for a in _names(entry))
  if size % parts:
    raise ValueError(f"{what} has size {size}, which the mesh axes {_names(entry)} cannot split "
                     f"evenly into {parts} parts; expected a multiple of {parts}.")


def _context_mesh() -> Any:
  """The mesh of ``jax.set_mesh`` or of the enclosing ``shard_map`` (empty when none)."""
  get = getattr(jax.sharding, "get_abstract_mesh", None)
  return get() if get is not None else None


def _manual_axes() -> frozenset[str]:
  """Mesh axes that are manual here (inside a ``shard_map`` over them)."""
  return _axes_of_type(_context_mesh(), "Manual")


def resolve(partition: Partition | None, lead_shape: tuple[int, ...], vocab: int, *,
            position_inputs: Sequence[Any] = (),
            vocab_inputs: Sequence[tuple[Any, int]] = ()) -> Layout | None:
  """The layout to run a kernel with, or None for the plain (single-program) path.

  Args:
    partition: the user's :class:`Partition`, or None to read the layout off the inputs.
    lead_shape: the global shape of the position axes.
    vocab: the global vocabulary size.
    position_inputs: arrays whose leading ``len(lead_shape)`` axes are the positions; the first
      one with a known sharding gives the layout of the positions.
    vocab_inputs: ``(array, axis)`` pairs whose ``axis`` is the vocabulary; the first one with
      a known sharding gives the vocabulary's mesh axes.

  Returns:
    A :class:`Layout`, or None when nothing is sharded (or nothing is known about it).

  Raises:
    ValueError: for unknown or repeated mesh axes, no mesh to use, or a sharded axis the mesh
      cannot split evenly.
  """
  n_lead = len(lead_shape)
  if partition is not None and partition.batch_axis is None and partition.vocab_axis is None:
    partition = None  # names no axis: read the layout off the inputs
  if partition is not None:
    lead = (partition.batch_axis,) + (None,) * (n_lead - 1) if n_lead else ()
    if n_lead == 0 and partition.batch_axis is not None:
      raise ValueError("Partition.batch_axis needs a position axis; got inputs without one.")
    vocab_entry = partition.vocab_axis
    used = _names(partition.batch_axis) + _names(vocab_entry)
    manual = _manual_axes()
    if used and all(a in manual for a in used):
      return Layout(mesh=None, lead=lead, vocab=vocab_entry, manual=True)
    mesh = partition.mesh if partition.mesh is not None else _context_mesh()
    if not getattr(mesh, "axis_names", ()):
      raise ValueError("Partition has no mesh: pass Partition(mesh, ...) or call inside "
                       "`with jax.set_mesh(mesh):`.")
  else:
    known_pos = [k for x in position_inputs if (k := _known_sharding(x)) is not None]
    known_voc = [(k, axis) for x, axis in vocab_inputs if (k := _known_sharding(x)) is not None]
    if not known_pos and not known_voc:
      return None  # nothing known to be sharded: the plain path
    mesh = (known_pos or [k for k, _ in known_voc])[0][0]
    lead = next((k[1][:n_lead] for k in known_pos if any(k[1][:n_lead])), (None,) * n_lead)
    vocab_entry = next((k[1][axis] for k, axis in known_voc if k[1][axis] is not None), None)
  sizes = _mesh_sizes(mesh)
  used = [a for e in (*lead, vocab_entry) for a in _names(e)]
  unknown = [a for a in used if a not in sizes]
  if unknown:
    raise ValueError(f"Mesh axes {unknown} are not in the mesh, whose axes are "
                     f"{tuple(sizes)}.")
  if len(set(used)) != len(used):
    raise ValueError(f"A mesh axis is used twice in the layout: positions {lead}, vocabulary "
                     f"{vocab_entry!r}.")
  for i, (size, entry) in enumerate(zip(lead_shape, lead)):
    _check_divisible(f"Position axis {i} (shape {tuple(lead_shape)})", size, entry, sizes)
  _check_divisible(f"The vocabulary (V = {vocab})", vocab, vocab_entry, sizes)
  return Layout(mesh=mesh, lead=tuple(lead), vocab=vocab_entry)


# ------------------------------------------------------------------------------------------------
# Running a kernel on each device's blocks.


def _conform(x: jax.Array, spec: P, mesh: Any) -> jax.Array:
  """Reshards ``x`` to ``spec`` where its sharding is part of its type (``Explicit`` axes).

  On ``Auto`` axes ``shard_map`` reshards its inputs itself.
  """
  if not _axes_of_type(mesh, "Explicit"):
    return x
  sharding = getattr(_aval(x), "sharding", None)
  current = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else None
  target = tuple(spec) + (None,) * (x.ndim - len(spec))
  if current is not None and current + (None,) * (x.ndim - len(current)) == target:
    return x
  return jax.sharding.reshard(x, NamedSharding(mesh, spec))


def unshard(x: jax.Array, axes: Sequence[int]) -> jax.Array:
  """``x`` whole along ``axes`` on every device, where its sharding is part of its type.

  ``Explicit`` sharding refuses what GSPMD does silently: sorting along a sharded axis, or
  flattening one that is not the major axis. The aggregators call this on per-position values
  (B * T floats) before those; a no-op on unsharded or ``Auto``-sharded values.
  """
  sharding = getattr(_aval(x), "sharding", None)
  if x.ndim == 0 or not isinstance(sharding, NamedSharding):
    return x
  spec = list(sharding.spec) + [None] * (x.ndim - len(sharding.spec))
  explicit = _axes_of_type(sharding.mesh, "Explicit")
  axes = [a % x.ndim for a in axes]
  if not any(n in explicit for a in axes for n in _names(spec[a])):
    return x
  for a in axes:
    spec[a] = None
  return jax.sharding.reshard(x, NamedSharding(sharding.mesh, P(*spec)))


def shard(kernel: Callable[..., jax.Array], layout: Layout, args: Sequence[jax.Array | None],
          specs: Sequence[P], vary: Sequence[Sequence[str]] | None = None,
          reduce_scalar: bool = False, out_specs: Any = None) -> Any:
  """Runs ``kernel(*args)`` on every device's blocks of ``args``; returns its per-position result.

  Args:
    kernel: the single-device function, given local blocks (and None where ``args`` has None);
      it must reduce over ``layout.vocab`` itself (the kernels' ``vocab_axis``) and return a
      ``[...]`` per-position array.
    layout: where the position axes and the vocabulary live.
    args: global arrays, or None for an absent optional argument.
    specs: the ``PartitionSpec`` of each argument under ``layout`` (ignored for None).
    vary: per argument, the mesh axes it is replicated over but its gradient is partial over;
      it is cast to vary over them, so its cotangent is ``psum``-ed over them. None: none.
    reduce_scalar: the kernel returns a scalar sum over its local positions; it is ``psum``-ed
      over the position axes' mesh axes into the global sum (replicated).
    out_specs: the kernel's output specs when they are not one per-position array.

  Returns:
    The per-position result, sharded as ``layout.positions()``; or the global sum.
  """
  vary = vary or [()] * len(args)
  if not hasattr(jax, "shard_map"):
    raise ValueError(f"Sharded inputs need jax.shard_map, which JAX {jax.__version__} does not "
                     "have; upgrade JAX.")
  def total(out):
    return jax.lax.psum(out, layout.lead_axes) if reduce_scalar and layout.lead_axes else out

  if layout.manual:  # already inside a shard_map: args are the local blocks
    return total(kernel(*[a if a is None or not v else cast_varying(a, v)
                          for a, v in zip(args, vary)]))
  present = [i for i, a in enumerate(args) if a is not None]
  arrays = [_conform(args[i], specs[i], layout.mesh) for i in present]

  def body(*local):
    full = list(args)
    for i, x in zip(present, local):
      full[i] = cast_varying(x, vary[i]) if vary[i] else x
    return total(kernel(*full))

  mapped = jax.shard_map(body, mesh=layout.mesh, in_specs=tuple(specs[i] for i in present),
                         out_specs=out_specs if out_specs is not None
                         else P() if reduce_scalar else layout.positions())
  return mapped(*arrays)
