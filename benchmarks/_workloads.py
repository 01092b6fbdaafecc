"""The workloads and, for each, the rows (implementations) that one case times side by side.

Each `rows_<workload>(case, dev)` returns `_harness.Impl`s over the case's device inputs `dev`.
klagg rows look their function up lazily through `ka(name)`, so a name the library does not
provide (yet) turns into a skipped row with a note instead of a crash; the same holds for a
keyword argument it does not take yet (`implementation=`, `reduction=`: `ka_with`).

PyTorch-side peers (`peers_torch.py`) run where the inputs live: on the host next to a CPU JAX,
on the GPU next to a GPU JAX (sharing the inputs through DLPack). Which of them run is decided
once per run (`set_peers`, from `peers_torch.plan`); the others become skipped rows with a note.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import _harness as H
import peers
import peers_host
import peers_torch

WORKLOADS = ("kl", "barrier", "fused", "topk", "agg", "fused_js")
EXP_FLOOR = "floor: exp (compute)"
READ_FLOOR = "floor: read (memory)"
MATMUL_FLOOR = "floor: matmuls (fwd)"
LIGER_NAMES = {"kl": "liger KLDivLoss", "fused_js": "liger FusedLinearJSD"}

# Why each PyTorch-side peer is skipped (None: it runs). Set once per run by `set_peers`.
_peer_notes: dict[str, str | None] = dict.fromkeys(
    (peers_torch.TORCH, peers_torch.COMPILE, peers_torch.LIGER), None)


def set_peers(notes: dict[str, str | None]) -> None:
  """Which PyTorch-side peers run: `peers_torch.plan`'s `{peer: None or why it is skipped}`."""
  _peer_notes.update(notes)


@dataclasses.dataclass(frozen=True)
class Case:
  """One workload at one shape and dtype; its rows are timed together.

  `inputs` names a maker in `_inputs` ("logits", "hidden" or "positions") called with
  `input_args`; `params` holds `dtype` and the workload's options (`n`, `v`, `t`, `agg`, `d`, `ks`).
  """

  workload: str
  inputs: str
  input_args: dict[str, int]
  params: dict[str, Any]

  @property
  def label(self) -> str:
    p = self.params
    if self.workload == "agg":
      return f"B={p['b']} T={p['t']}"
    text = f"N={p['n']} V={p['v']} {p['dtype']}"
    if self.workload == "barrier":
      text += f" {p['agg']} T={p['t']}"
    if self.workload == "fused":
      text += f" D={p['d']}"
    if self.workload == "fused_js":
      text = f"N={p['n']} D={p['d']} V={p['v']} {p['dtype']} beta={p['beta']}"
    return text


def ka(name: str) -> Callable:
  """`klagg_jax.<name>`, or `Unavailable` while the library does not provide it."""
  try:
    import klagg_jax
  except Exception as e:  # noqa: BLE001 - a library in progress may fail to import in any way
    raise H.Unavailable(f"klagg_jax not importable ({type(e).__name__}: {e})") from None
  if not hasattr(klagg_jax, name):
    raise H.Unavailable(f"klagg_jax.{name} not available")
  return getattr(klagg_jax, name)


def ka_with(name: str, kwargs: dict[str, Any]) -> Callable:
  """`ka(name)`, or `Unavailable` when it does not take every keyword argument in `kwargs`."""
  fn = ka(name)
  params = inspect.signature(fn).parameters
  if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    missing = [k for k in kwargs if k not in params]
    if missing:
      raise H.Unavailable(f"klagg_jax.{name} takes no {', '.join(missing)}= argument here")
  return fn


def has_kwarg(name: str, kwarg: str) -> bool:
  """Whether `klagg_jax.<name>` exists here and takes `kwarg`."""
  try:
    ka_with(name, {kwarg: None})
  except H.Unavailable:
    return False
  return True


def _row(name: str, family: str, make: Callable, check: str | None = None) -> H.Impl:
  return H.Impl(name, family, make, check)


def klagg_variants(params: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
  """The extra klagg rows a case asks for: other implementations and forced chunk sizes.

  Returns `(row name suffix, keyword arguments)` pairs, from `params["xla"]`,
  `params["implementations"]` and `params["chunks"]`.
  """
  impls = (["xla"] if params.get("xla") else []) + list(params.get("implementations", ()))
  out = [(f" implementation='{i}'", {"implementation": i}) for i in dict.fromkeys(impls)]
  return out + [(f" chunk_size={c}", {"chunk_size": c}) for c in params.get("chunks", ())]


def known_implementation(kwargs: dict[str, Any], fn_name: str = "kl_per_position") -> None:
  """Raises `Unavailable` when `fn_name` (`kl_per_position` or `fused_linear_kl`) rejects
  `kwargs["implementation"]` (not yet there)."""
  if "implementation" not in kwargs:
    return
  fn = ka_with(fn_name, kwargs)
  tiny = jax.ShapeDtypeStruct((2, 2), jnp.float32)
  args = (tiny,) * (4 if fn_name == "fused_linear_kl" else 2)
  try:
    jax.eval_shape(lambda *xs: fn(*xs, implementation=kwargs["implementation"]), *args)
  except ValueError as e:
    raise H.Unavailable(f"implementation={kwargs['implementation']!r} not in this build: "
                        f"{e}") from None


def pallas_entry() -> Callable:
  """The Pallas divergence kernel's own entry, as a `[N, V]` -> `[N]` reverse KL (temperature 1)."""
  try:
    from klagg_jax._chunked import Chunking
    from klagg_jax._ops.divergence.base import Spec
    from klagg_jax._ops.divergence import pallas
  except ImportError as e:
    raise H.Unavailable(f"the Pallas kernel is not importable here ({e})") from None

  def kl(a, b):
    spec = Spec("reverse", 0.5, 1.0, Chunking(None, a.shape[-1]))
    return pallas.divergence_rows(a, b, jnp.ones(a.shape[:1], bool), spec)

  return kl


def register_pallas_tiles(path: str) -> str:
  """Registers the tile table rows of a `pallas_sweep.py` JSON; says what it did."""
  import json
  try:
    from klagg_jax._ops.divergence import pallas_tiles
  except ImportError as e:
    return f"not registered ({e})"
  try:
    rows = json.loads(Path(path).read_text())["table"]
  except (OSError, ValueError, KeyError) as e:
    return f"not registered ({type(e).__name__}: {e})"
  for row in rows:
    key = (row["family"], row["vocab_bucket"])
    pallas_tiles.TABLE[key] = pallas_tiles.Tiles(**row["tiles"])
  return f"{len(rows)} row(s) from {path}: " + "; ".join(
      f"{r['family']} V<={r['vocab_bucket']}: {r['tiles']}" for r in rows)


def _platform(dev: dict[str, Any]) -> str:
  """Where the case's inputs live (the default device's platform for shape-only stand-ins)."""
  x = next(iter(dev.values()), None)
  if isinstance(x, jax.Array):
    return x.devices().pop().platform
  return jax.devices()[0].platform


# The torch tensors of the current case's inputs (one case at a time; see `end_case`).
_tensors: dict[str, Any] = {"dev": None, "tensors": None}


def _torch_tensors(dev: dict[str, jax.Array], dtype: str, runner: str) -> dict[str, Any]:
  """The case's inputs as torch tensors, made once per case.

  On a GPU: zero-copy views of the JAX arrays through DLPack (a copy through the host if DLPack
  fails). On the host: zero-copy from CPU arrays, else float32 copies cast back.
  """
  if _tensors["dev"] is dev:
    return _tensors["tensors"]
  if runner == "cuda":
    import torch

    try:
      out = {k: torch.from_dlpack(x) for k, x in dev.items()}
    except Exception as e:  # noqa: BLE001 - slower, but the peers still see the same numbers
      print(f"    note: DLPack failed ({type(e).__name__}: {e}); copying the inputs through the "
            "host", file=sys.stderr, flush=True)
      want = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
      out = {k: torch.from_numpy(np.asarray(x.astype(jnp.float32))).to("cuda").to(want)
             for k, x in dev.items()}
  else:
    out = {k: peers_host.as_torch(_host_view(x), dtype) for k, x in dev.items()}
  _tensors.update(dev=dev, tensors=out)
  return out


def end_case() -> None:
  """Forget the case's torch tensors: on a GPU they keep the JAX input buffers alive."""
  _tensors.update(dev=None, tensors=None)


def _torch_row(peer: str, case: Case, dev: dict[str, jax.Array], check: str) -> H.Impl:
  """A PyTorch-side row (`peers_torch`): torch eager, `torch.compile` or Liger-Kernel."""
  runner = "host" if _platform(dev) == "cpu" else "cuda"

  def make():
    note = _peer_notes.get(peer)
    if note:
      raise H.Unavailable(note)
    tensors = _torch_tensors(dev, case.params["dtype"], runner)
    try:
      return peers_torch.build(case.workload, peer, tensors, case.params)
    except NotImplementedError as e:
      raise H.Unavailable(str(e)) from None
    except ImportError as e:  # installed but not importable here (e.g. Triton's version)
      raise H.Unavailable(f"{peer} not importable: {type(e).__name__}: {e}"[:300]) from None

  if peer == peers_torch.LIGER:
    name, family = LIGER_NAMES.get(case.workload, "liger"), "liger"
  else:
    name, family = peer, "torch"
    if case.workload in ("fused", "fused_js"):
      name += " (materialized)"
  return H.Impl(name, family, make, check, runner=runner)


def _torch_peers(case: Case, dev: dict[str, jax.Array], factor: int, check: str) -> list[H.Impl]:
  """torch eager (on the host: the peak-RSS-probed `peers_host` row), then torch.compile and
  Liger-Kernel where the workload has such a row."""
  eager = (_host_row("torch", case, dev, factor, check) if _platform(dev) == "cpu"
           and case.workload in ("kl", "barrier", "fused")
           else _torch_row(peers_torch.TORCH, case, dev, check))
  rows = [eager]
  if case.workload in ("kl", "barrier"):
    rows.append(_torch_row(peers_torch.COMPILE, case, dev, check))
  if case.workload in LIGER_NAMES:
    rows.append(_torch_row(peers_torch.LIGER, case, dev, check))
  return rows


def _host_view(x: jax.Array) -> Any:
  """The array as host code sees it: the jax array itself on CPU (zero-copy), else a f32 copy."""
  return x if x.devices().pop().platform == "cpu" else np.asarray(x.astype(jnp.float32))


def _host_row(impl: str, case: Case, dev: dict[str, jax.Array], factor: int, check: str) -> H.Impl:
  """A numpy/torch row on host views of the inputs, needing about `factor` [N, V] f32 arrays."""

  def make():
    if impl == "torch" and _peer_notes[peers_torch.TORCH]:
      raise H.Unavailable(_peer_notes[peers_torch.TORCH])
    if _platform(dev) != "cpu":
      raise H.Unavailable(f"{impl} is a host peer: skipped on an accelerator (it times the CPU)")
    views = {k: _host_view(x) for k, x in dev.items()}
    try:
      return peers_host.build(case.workload, impl, views, case.params)
    except NotImplementedError as e:
      raise H.Unavailable(str(e)) from None

  name = f"{impl} (materialized)" if case.workload == "fused" else impl
  nbytes = factor * case.params["n"] * case.params["v"] * 4
  spec = {"workload": case.workload, "impl": impl, "inputs": case.inputs,
          "input_args": case.input_args, "params": case.params}
  return H.Impl(name, impl, make, check, nbytes, spec, runner="host")


def _floors(a: jax.Array, b: jax.Array) -> list[H.Impl]:
  return [_row(EXP_FLOOR, "floor", lambda: (peers.exp_floor, (a, b))),
          _row(READ_FLOOR, "floor", lambda: (peers.read_floor, (a, b)))]


def _klagg_topk_refs(ref_logits: jax.Array, k: int) -> tuple[jax.Array, ...]:
  """What a pipeline stores per position, made by klagg: top-k log-probs, indices, tail."""
  topk = ka("topk_logprobs")
  return jax.block_until_ready(jax.jit(lambda r: topk(r, k))(ref_logits))


def _peer_topk_refs(ref_logits: jax.Array, k: int) -> tuple[jax.Array, ...]:
  """The peers' stored teacher: top-k log-probs and indices (no tail)."""
  fn = lambda r: jax.lax.top_k(jax.nn.log_softmax(r.astype(jnp.float32)), k)  # noqa: E731
  return jax.block_until_ready(jax.jit(fn)(ref_logits))


def rows_kl(case: Case, dev: dict[str, jax.Array]) -> list[H.Impl]:
  """Per-position KL forward: `[N, V]` logits -> `[N]`."""
  a, b = dev["logits"], dev["ref_logits"]

  def variant(kwargs):
    f = ka_with("kl_per_position", kwargs)
    known_implementation(kwargs)
    return (lambda x, r: f(x, r, **kwargs)), (a, b)

  direct = ([_row("klagg pallas kernel (entry point)", "klagg", lambda: (pallas_entry(), (a, b)),
                  "kl")] if "pallas" in case.params.get("implementations", ()) else [])
  return [
      *_floors(a, b),
      _row("klagg", "klagg", lambda: (ka("kl_per_position"), (a, b)), "kl"),
      *[_row("klagg" + suffix, "klagg", lambda kw=kw: variant(kw), "kl")
        for suffix, kw in klagg_variants(case.params)],
      *direct,
      _row("jax.numpy", "jax", lambda: (peers.jnp_kl, (a, b)), "kl"),
      _row("optax", "jax", lambda: (peers.optax_kl, (a, b)), "kl"),
      _host_row("numpy", case, dev, 6, "kl"),
      *_torch_peers(case, dev, 5, "kl"),
  ]


def rows_barrier(case: Case, dev: dict[str, jax.Array]) -> list[H.Impl]:
  """Loss and gradient w.r.t. logits of the per-sequence barrier over `[N // t, t, V]`."""
  a, b = dev["logits"], dev["ref_logits"]
  agg, t, (n, v) = case.params["agg"], case.params["t"], a.shape

  def klagg(kwargs=None):
    kwargs = kwargs or {}
    barrier = ka_with("kl_barrier", kwargs)
    known_implementation(kwargs)

    def loss(x, r):
      return barrier(x.reshape(n // t, t, v), r.reshape(n // t, t, v), agg=agg, **kwargs)[0]

    return jax.value_and_grad(loss), (a, b)

  rows = [*_floors(a, b), _row("klagg kl_barrier", "klagg", klagg, "barrier")]
  rows += [_row("klagg kl_barrier" + suffix, "klagg", lambda kw=kw: klagg(kw), "barrier")
           for suffix, kw in klagg_variants(case.params)]
  if agg in peers.PEER_AGGS:  # soft_p95 has no peer
    for name, kl_fn in (("jax.numpy", peers.jnp_kl), ("optax", peers.optax_kl)):
      loss = peers.barrier_loss(kl_fn, peers.PEER_AGGS[agg], t)
      make = lambda loss=loss: (jax.value_and_grad(loss), (a, b))  # noqa: E731
      rows.append(_row(name, "jax", make, "barrier"))
    rows += _torch_peers(case, dev, 9, "barrier")
  return rows


def rows_fused(case: Case, dev: dict[str, jax.Array]) -> list[H.Impl]:
  """Mean KL from hidden states and its gradient w.r.t. hidden and weight: fused vs materialized."""
  args = tuple(dev[k] for k in ("hidden", "weight", "ref_hidden", "ref_weight"))
  grad = lambda loss: jax.value_and_grad(loss, argnums=(0, 1))  # noqa: E731

  def fused():
    f = ka("fused_linear_kl")
    return grad(lambda h, w, rh, rw: jnp.mean(f(h, w, rh, rw))), args

  def fused_mean():  # the scalar path: the gradient formed in the forward pass (4 matmuls)
    f = ka_with("fused_linear_kl", {"reduction": "mean"})
    return grad(lambda h, w, rh, rw: f(h, w, rh, rw, reduction="mean")), args

  def materialized(kl_fn):
    loss = lambda h, w, rh, rw: jnp.mean(kl_fn(h @ w, jax.lax.stop_gradient(rh @ rw)))  # noqa: E731
    return grad(loss), args

  def fused_topk(k):
    f, refs = ka("fused_linear_kl_topk"), _klagg_topk_refs(args[2] @ args[3], k)
    loss = lambda h, w, lp, idx, tail: jnp.mean(f(h, w, lp, idx, ref_tail=tail))  # noqa: E731
    return grad(loss), (args[0], args[1], *refs)

  rows = [
      _row(MATMUL_FLOOR, "floor", lambda: (peers.matmul_floor, args)),
      _row("klagg fused_linear_kl", "klagg", fused, "fused"),
      _row("klagg fused_linear_kl reduction='mean'", "klagg", fused_mean, "fused"),
      _row("klagg (materialized)", "klagg", lambda: materialized(ka("kl_per_position")), "fused"),
      _row("jax.numpy (materialized)", "jax", lambda: materialized(peers.jnp_kl), "fused"),
      *_torch_peers(case, dev, 6, "fused"),
  ]
  for k in case.params["ks"]:
    rows.append(_row(f"klagg fused_linear_kl_topk k={k}", "klagg", lambda k=k: fused_topk(k)))
  return rows


def rows_topk(case: Case, dev: dict[str, jax.Array]) -> list[H.Impl]:
  """Distillation loss (forward KL, mean over positions) and its gradient w.r.t. student logits."""
  a, b = dev["logits"], dev["ref_logits"]
  grad = jax.value_and_grad

  def full(kl_fn):
    return grad(lambda x, r: jnp.mean(kl_fn(x, jax.lax.stop_gradient(r)))), (a, b)

  def klagg_full():
    f = ka("kl_per_position")
    return full(lambda x, r: f(x, r, direction="forward"))

  def klagg_topk(k):
    f, refs = ka("kl_topk"), _klagg_topk_refs(b, k)
    return grad(lambda x, lp, idx, tail: jnp.mean(f(x, lp, idx, ref_tail=tail))), (a, *refs)

  def truncated(k):
    loss = lambda x, lp, idx: jnp.mean(peers.jnp_truncated_topk_kl(x, lp, idx))  # noqa: E731
    return grad(loss), (a, *_peer_topk_refs(b, k))

  rows = [
      *_floors(a, b),
      _row("klagg kl_per_position (full)", "klagg", klagg_full, "full"),
      _row("jax.numpy (full)", "jax", lambda: full(lambda x, r: peers.jnp_kl(r, x)), "full"),
  ]
  for k in case.params["ks"]:
    rows.append(_row(f"klagg kl_topk k={k}", "klagg", lambda k=k: klagg_topk(k)))
    rows.append(_row(f"jax.numpy truncated k={k}", "jax", lambda k=k: truncated(k)))
  return rows


AGG_FORMS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("mean", {}), ("rmse", {}), ("p95", {}), ("soft_p95", {}), ("cvar95", {}),
    ("smooth_max", {"temperature": 1.0}), ("max", {}),
)
PEER_AGG_FORMS: dict[str, Callable] = {
    "mean": lambda x: jnp.mean(x, axis=-1), "rmse": peers.rmse, "p95": peers.p95,
    "max": lambda x: jnp.max(x, axis=-1),
}


def rows_agg(case: Case, dev: dict[str, jax.Array]) -> list[H.Impl]:
  """Value and gradient of each aggregator alone, per sequence over `[B, T]`."""
  x = dev["x"]

  def klagg(how, kwargs):
    aggregate = ka("aggregate")
    return jax.value_and_grad(lambda x: jnp.sum(aggregate(x, how, axis=-1, **kwargs))), (x,)

  def peer(fn):
    return jax.value_and_grad(lambda x: jnp.sum(fn(x))), (x,)

  rows = [_row(f"klagg {how}", "klagg", lambda h=how, kw=kw: klagg(h, kw), how)
          for how, kw in AGG_FORMS]
  rows += [_row(f"jax.numpy {how}", "jax", lambda f=f: peer(f), how)
           for how, f in PEER_AGG_FORMS.items()]
  return rows


def rows_fused_js(case: Case, dev: dict[str, jax.Array]) -> list[H.Impl]:
  """Mean JSD (beta) from hidden states, weights `[V, D]`, and its gradient w.r.t. hidden and
  weight: Liger-Kernel's `LigerFusedLinearJSD` setting. klagg per position then mean (the
  aggregator path), klagg `reduction="mean"` (the scalar-loss path) and forced chunk sizes,
  against the materialized compositions and Liger."""
  args = tuple(dev[k] for k in ("hidden", "weight", "ref_hidden", "ref_weight"))
  beta = case.params["beta"]
  grad = lambda loss: jax.value_and_grad(loss, argnums=(0, 1))  # noqa: E731

  def klagg(kwargs):
    kwargs = {"direction": "js", "beta": beta, "weight_layout": "vd", **kwargs}
    f = ka_with("fused_linear_kl", kwargs)
    if "reduction" in kwargs:
      return grad(lambda h, w, rh, rw: f(h, w, rh, rw, **kwargs)), args
    return grad(lambda h, w, rh, rw: jnp.mean(f(h, w, rh, rw, **kwargs))), args

  def klagg_at(kwargs):  # a named implementation: a skipped row where the library lacks it
    known_implementation({"implementation": kwargs["implementation"]}, "fused_linear_kl")
    return klagg(kwargs)

  def materialized():
    return grad(lambda h, w, rh, rw: peers.fused_js_materialized(h, w, rh, rw, beta)), args

  scalar = has_kwarg("fused_linear_kl", "reduction")
  rows = [
      _row(MATMUL_FLOOR, "floor", lambda: (peers.matmul_floor_vd, args)),
      _row("klagg fused_linear_kl (per position, mean)", "klagg", lambda: klagg({}), "fused_js"),
      _row("klagg fused_linear_kl reduction='mean'", "klagg",
           lambda: klagg({"reduction": "mean"}), "fused_js"),
      # A 16-bit d weight accumulator halves the largest temporary ([V, D]).
      _row("klagg fused_linear_kl reduction='mean' accum_dtype=bfloat16", "klagg",
           lambda: klagg({"reduction": "mean", "accum_dtype": jnp.bfloat16}), "fused_js"),
  ]
  for c in case.params.get("chunks", ()):
    kw = {"chunk_size": c, **({"reduction": "mean"} if scalar else {})}
    name = f"klagg fused_linear_kl{' reduction=' + repr('mean') if scalar else ''} chunk_size={c}"
    rows.append(_row(name, "klagg", lambda kw=kw: klagg(kw), "fused_js"))
  # Other block steps (implementation="pallas": the hand-written kernel between the matmuls),
  # at the float32 accumulator and at the 16-bit one of the memory comparison with Liger.
  for impl in case.params.get("implementations", ()):
    for accum in (None, jnp.bfloat16):
      kw = {"reduction": "mean", "implementation": impl,
            **({} if accum is None else {"accum_dtype": accum})}
      name = (f"klagg fused_linear_kl reduction='mean' implementation={impl!r}"
              + ("" if accum is None else " accum_dtype=bfloat16"))
      rows.append(_row(name, "klagg", lambda kw=kw: klagg_at(kw), "fused_js"))
  rows.append(_row("jax.numpy (materialized)", "jax", materialized, "fused_js"))
  return rows + _torch_peers(case, dev, 6, "fused_js")


ROWS: dict[str, Callable[[Case, dict[str, jax.Array]], list[H.Impl]]] = {
    "kl": rows_kl, "barrier": rows_barrier, "fused": rows_fused, "topk": rows_topk,
    "agg": rows_agg, "fused_js": rows_fused_js,
}
