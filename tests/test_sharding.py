"""Inputs sharded over 8 simulated devices (a 2 x 4 ``data`` x ``model`` mesh): one device's answer.

The repository's conftest.py starts JAX with 8 CPU devices (``jax_num_cpu_devices``), so each
check runs in the test process as its own test. Each compares values and gradients with the
unsharded computation (float32, 1e-5 relative) and reads the compiled program's HLO: no
collective that moves data (all-gather, all-to-all, collective-permute) may produce anything
logits-sized.
"""

from __future__ import annotations

import functools
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import klagg_jax as ka
from tests.helpers import cuda_target

if jax.device_count() < 8:  # conftest.py asks for 8 CPU devices; other backends may have fewer
  pytest.skip("needs 8 devices", allow_module_level=True)

ROOT = pathlib.Path(__file__).resolve().parents[1]
B, T, V, D = 8, 16, 256, 24
N_DEV = 8
LOGITS_BLOCK = B * T * V // N_DEV  # one device's share of the logits
EXPLICIT = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
AUTO = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
LAYOUTS = {"batch": ("data", None), "vocab": (None, "model"), "both": ("data", "model")}
AGGS = ("mean", "rmse", "max", "p95", "soft_p95", "cvar95", "smooth_max", "power_mean")


def data(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  return dict(a=2 * f(B, T, V), b=2 * f(B, T, V), mask=rng.random((B, T)) > 0.25, w=f(B, T),
              h=f(B, T, D), rh=f(B, T, D), wt=f(D, V) / 3, rwt=f(D, V) / 3, bias=f(V),
              rbias=f(V))


def put(x, mesh, *spec):
  return jax.device_put(x, NamedSharding(mesh, P(*spec)))


def moved_elements(hlo: str) -> list[int]:
  """Element counts of the results of the data-moving collectives in compiled HLO text."""
  counts = []
  for m in re.finditer(r"=\s*(.*?)\s(all-gather|all-to-all|collective-permute)(-start)?\(", hlo):
    shapes = re.findall(r"[a-z]+\d*\[([\d,]*)\]", m.group(1))
    counts += [math.prod(int(s) for s in dims.split(",") if s) for dims in shapes]
  return counts


def run(fn, *args):
  """(outputs, HLO text) of ``jit(fn)`` compiled for ``args``."""
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled(*args), compiled.as_text()


def assert_tree_close(got, want, what=""):
  assert jax.tree.structure(got) == jax.tree.structure(want), what
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6, err_msg=what)


def test_runs_on_8_devices():
  assert jax.device_count() == N_DEV


# ----------------------------------------------------------------------------------------------
# kl_per_position: explicit axes, layout read off the inputs.


@pytest.mark.parametrize("layout,chunk_size,direction", [
    ("batch", None, "reverse"), ("batch", 12, "forward"), ("vocab", None, "js"),
    ("vocab", 12, "reverse"), ("both", None, "forward"), ("both", 12, "js")])
def test_kl_per_position_matches_one_device(layout, chunk_size, direction):
  p = data()
  bs, vs = LAYOUTS[layout]

  def f(a, b, mask, w):
    kl, vjp = jax.vjp(lambda a, b: ka.kl_per_position(
        a, b, where=mask, direction=direction, chunk_size=chunk_size), a, b)
    return kl, vjp(w)

  want = jax.jit(f)(p["a"], p["b"], p["mask"], p["w"])
  args = (put(p["a"], EXPLICIT, bs, None, vs), put(p["b"], EXPLICIT, bs, None, vs),
          put(p["mask"], EXPLICIT, bs, None), put(p["w"], EXPLICIT, bs, None))
  (kl, (da, db)), hlo = run(f, *args)
  assert_tree_close((kl, (da, db)), want)
  assert kl.sharding.spec == P(bs, None)
  assert da.sharding.spec == db.sharding.spec == P(bs, None, vs)
  assert moved_elements(hlo) == []


def test_sequence_sharded_traced_temperature_host_mask():
  # Positions split along T, ref_logits laid out otherwise (resharded), a host mask, a traced
  # and differentiated temperature, a global quantile over the sequence-sharded values.
  p = data(1)
  f = lambda a, b, t: jax.grad(lambda a, t: ka.kl_barrier(
      a, b, where=p["mask"], temperature=t, chunk_size=8, agg="cvar90", axis=None)[0],
      (0, 1))(a, t)
  want = jax.jit(f)(p["a"], p["b"], 0.7)
  got, hlo = run(f, put(p["a"], EXPLICIT, None, "data", "model"),
                 put(p["b"], EXPLICIT, None, None, "model"), jnp.float32(0.7))
  assert_tree_close(got, want)
  assert got[0].sharding.spec == P(None, "data", "model")
  assert all(n < LOGITS_BLOCK for n in moved_elements(hlo))


# ----------------------------------------------------------------------------------------------
# kl_barrier: every aggregator, per sequence and over all tokens.


@pytest.mark.parametrize("axis", [-1, None])
def test_kl_barrier_every_aggregator_matches_one_device(axis):
  p = data(2)

  def f(a, b, mask):  # every aggregator in one program: one compilation
    out = {}
    for agg in AGGS:
      kw = {"p": 3.0} if agg == "power_mean" else {}
      loss = lambda a: ka.kl_barrier(a, b, where=mask, agg=agg, axis=axis, tau=0.05,
                                     agg_kwargs=kw)
      out[agg] = jax.value_and_grad(loss, has_aux=True)(a)
    return out

  want = jax.jit(f)(p["a"], p["b"], p["mask"])
  got, hlo = run(f, put(p["a"], EXPLICIT, "data", None, "model"),
                 put(p["b"], EXPLICIT, "data", None, "model"),
                 put(p["mask"], EXPLICIT, "data", None))
  for agg in AGGS:
    assert_tree_close(got[agg], want[agg], agg)  # ((loss, metrics), gradient)
    assert got[agg][1].sharding.spec == P("data", None, "model"), agg
  # Per sequence nothing is gathered; global quantiles gather the B * T per-position values.
  moved = moved_elements(hlo)
  assert moved == [] if axis == -1 else all(n <= B * T for n in moved)


# ----------------------------------------------------------------------------------------------
# fused_linear_kl: weight split over the vocabulary, hidden over the batch.


@pytest.mark.parametrize("layout,chunk_size,weight_layout", [
    ("batch", None, "dv"), ("vocab", 12, "dv"), ("both", 12, "vd")])
def test_fused_linear_kl_matches_one_device(layout, chunk_size, weight_layout):
  p = data(3)
  bs, vs = LAYOUTS[layout]
  t = (lambda x: x) if weight_layout == "dv" else (lambda x: x.T)
  w_spec = (None, vs) if weight_layout == "dv" else (vs, None)

  def f(h, wt, bias, rh, rwt, rbias, mask, w):
    def loss(h, wt, bias):
      kl = ka.fused_linear_kl(h, wt, rh, rwt, bias=bias, ref_bias=rbias, where=mask,
                              direction="js", chunk_size=chunk_size,
                              weight_layout=weight_layout)
      return (kl * w).sum()
    return jax.value_and_grad(loss, (0, 1, 2))(h, wt, bias)

  host = (p["h"], t(p["wt"]), p["bias"], p["rh"], t(p["rwt"]), p["rbias"], p["mask"], p["w"])
  want = jax.jit(f)(*host)
  specs = ((bs, None, None), w_spec, (vs,), (bs, None, None), w_spec, (vs,), (bs, None),
           (bs, None))
  (value, (dh, dwt, dbias)), hlo = run(f, *[put(x, EXPLICIT, *s) for x, s in zip(host, specs)])
  assert_tree_close((value, (dh, dwt, dbias)), want)
  assert dh.sharding.spec == P(bs, None, None)
  assert dwt.sharding.spec == P(*w_spec) and dbias.sharding.spec == P(vs)
  assert all(n < LOGITS_BLOCK for n in moved_elements(hlo))


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_fused_pallas_block_step_runs_per_shard(kind):
  """The Pallas block step on a vocabulary- and batch-split head: in the library's shard_map
  (Explicit axes: row statistics merged over the vocabulary axis) and under GSPMD (a classic
  mesh: the kernels partitioned per shard). One device's values and gradients, nothing moved."""
  p = data(3)

  def f(h, wt, rh, rwt, mask, w, impl="pallas"):
    fused = lambda h, wt, **kw: ka.fused_linear_kl(h, wt, rh, rwt, where=mask, chunk_size=12,
                                                   implementation=impl, **kw)
    per = jax.value_and_grad(lambda h, wt: (fused(h, wt, direction="js") * w).sum(),
                             (0, 1))(h, wt)
    return per, jax.value_and_grad(lambda h, wt: fused(h, wt, reduction="mean"), (0, 1))(h, wt)

  host = (p["h"], p["wt"], p["rh"], p["rwt"], p["mask"], p["w"])
  want = jax.jit(functools.partial(f, impl="chunked"))(*host)
  bs, vs = LAYOUTS["both"]
  specs = ((bs, None, None), (None, vs), (bs, None, None), (None, vs), (bs, None), (bs, None))
  mesh = CLASSIC if kind == "auto" else EXPLICIT
  got, hlo = run(f, *[put(x, mesh, *s) for x, s in zip(host, specs)])
  assert_tree_close(got, want, kind)
  assert moved_elements(hlo) == [], kind


def test_fused_pallas_vocab_split_head_exports_for_cuda_with_the_triton_kernels():
  """A tensor-parallel head (partition=, weights split over the vocabulary) exports for CUDA:
  the block step's Triton kernels run per shard, nothing is gathered."""
  part = ka.Partition(AUTO, batch_axis="data", vocab_axis="model")
  n, d, v = 64, 8, 128256

  def loss(h, w, rh, rw):
    return ka.fused_linear_kl(h, w, rh, rw, reduction="mean", weight_layout="vd",
                              implementation="pallas", partition=part)

  hs = jax.ShapeDtypeStruct((n, d), jnp.bfloat16, sharding=NamedSharding(AUTO, P("data", None)))
  ws = jax.ShapeDtypeStruct((v, d), jnp.bfloat16, sharding=NamedSharding(AUTO, P("model", None)))
  triton = "__gpu$xla.gpu.triton"
  with cuda_target():
    exported = jax.export.export(
        jax.jit(jax.value_and_grad(loss, (0, 1))), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)])(hs, ws, hs, ws)
  module = exported.mlir_module()
  assert exported.nr_devices == N_DEV
  assert module.count(triton) == 2 and "all_gather" not in module  # statistics, gradient


# ----------------------------------------------------------------------------------------------
# Every public kernel, on a classic Mesh (Auto axes) under jit with no annotation, and on
# Explicit axes: one device's values and gradients, outputs sharded like inputs, and nothing
# logits-, hidden- or [N, k]-sized moved between devices.

CLASSIC = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
LAYOUTS4 = dict(LAYOUTS, batch2=(("data", "model"), None))
MESHES8 = {1: (1, 1), 8: (2, 4)}
K = 8


def every_kernel(a, b, mask, w, h, rh, wt, rwt, lp, idx, tail):
  """Every public kernel in one program (one compilation per layout), values and gradients."""
  out = {}
  kl, vjp = jax.vjp(lambda a, b: ka.kl_per_position(a, b, where=mask, chunk_size=12), a, b)
  out["kl"] = (kl, vjp(w))
  out["barrier"] = jax.value_and_grad(lambda a: ka.kl_barrier(
      a, b, where=mask, agg="p95", tau=0.05, chunk_size=16)[0])(a)
  out["topk_logprobs"] = ka.topk_logprobs(b, K, chunk_size=16)
  out["kl_topk"] = jax.value_and_grad(lambda a: (ka.kl_topk(
      a, lp, idx, tail, where=mask, chunk_size=12) * w).sum())(a)
  fused = lambda h, wt, **kw: ka.fused_linear_kl(h, wt, rh, rwt, where=mask, chunk_size=12,
                                                 direction="js", **kw)
  out["fused"] = jax.value_and_grad(lambda h, wt: (fused(h, wt) * w).sum(), (0, 1))(h, wt)
  out["fused_mean"] = jax.value_and_grad(lambda h, wt: fused(h, wt, reduction="mean"),
                                         (0, 1))(h, wt)
  out["fused_topk"] = jax.value_and_grad(lambda h, wt: ka.fused_linear_kl_topk(
      h, wt, lp, idx, tail, where=mask, chunk_size=16, reduction="sum"), (0, 1))(h, wt)
  est = ka.kl_estimate(jax.nn.log_sigmoid(w), jax.nn.log_sigmoid(0.5 * w + 0.1), where=mask)
  out["estimate"] = (est, ka.aggregate(est, "cvar90", where=mask, axis=None))
  return out


def host_inputs(seed):
  p = data(seed)
  lp, idx, tail = ka.topk_logprobs(p["b"], K)
  return (p["a"], p["b"], p["mask"], p["w"], p["h"], p["rh"], p["wt"], p["rwt"],
          np.asarray(lp), np.asarray(idx), np.asarray(tail))


@pytest.mark.parametrize("kind", ["auto", "explicit"])
@pytest.mark.parametrize("layout", list(LAYOUTS4))
def test_every_kernel_without_partition_matches_one_device(kind, layout):
  host = host_inputs(7)
  want = jax.jit(every_kernel)(*host)
  mesh = CLASSIC if kind == "auto" else EXPLICIT
  bs, vs = LAYOUTS4[layout]
  specs = ((bs, None, vs), (bs, None, vs), (bs, None), (bs, None), (bs, None, None),
           (bs, None, None), (None, vs), (None, vs), (bs, None, None), (bs, None, None),
           (bs, None))
  args = [put(x, mesh, *s) for x, s in zip(host, specs)]
  got, hlo = run(every_kernel, *args)
  for name in want:
    assert_tree_close(got[name], want[name], f"{kind} {layout} {name}")
  def laid_out(x, *spec):
    return x.sharding.is_equivalent_to(NamedSharding(mesh, P(*spec)), x.ndim)

  # Outputs and gradients come back sharded like their inputs.
  assert laid_out(got["kl"][0], bs, None)
  assert laid_out(got["kl"][1][0], bs, None, vs) and laid_out(got["kl"][1][1], bs, None, vs)
  assert laid_out(got["barrier"][1], bs, None, vs)
  assert laid_out(got["kl_topk"][1], bs, None, vs)
  for name in ("fused", "fused_mean", "fused_topk"):
    d_hidden, d_weight = got[name][1]
    assert laid_out(d_hidden, bs, None, None) and laid_out(d_weight, None, vs), name
  # Nothing logits-, hidden- or [N, k]-sized moves: a sharded vocabulary exchanges per-row
  # statistics and top-k candidates; a sharded batch only the B * T per-position values that
  # the global quantile (cvar90 over axis=None) needs.
  moved = moved_elements(hlo)
  assert all(n < min(LOGITS_BLOCK, B * T * K) for n in moved), (kind, layout, moved)
  if vs is None:
    assert all(n <= B * T for n in moved), (kind, layout, moved)


@pytest.mark.parametrize("workload, layout", [
    ("barrier", "batch"), ("barrier", "both"), ("kl_topk", "batch"), ("fused_mean", "vocab")])
def test_per_device_memory_falls_as_one_over_devices(workload, layout):
  """Compile only (nothing allocated): temp + arguments + outputs per device on a classic mesh
  of 8 devices, against one device, at a shape where the [N, V] arrays dominate."""
  b, t, v, d, k = 8, 128, 4096, 256, 16

  def total(devices):
    shape = {"batch": (devices, 1), "vocab": (1, devices), "both": MESHES8[devices]}[layout]
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]).reshape(shape),
                             ("data", "model"))
    bs, vs = LAYOUTS[layout]
    st = lambda shp, spec, dt=jnp.float32: jax.ShapeDtypeStruct(
        shp, dt, sharding=NamedSharding(mesh, P(*spec)))
    if workload == "barrier":
      fn = jax.grad(lambda a, r: ka.kl_barrier(a, r, agg="rmse", tau=0.0)[0])
      args = (st((b, t, v), (bs, None, vs)),) * 2
    elif workload == "kl_topk":
      fn = jax.grad(lambda a, lp, i, tl: ka.kl_topk(a, lp, i, tl).sum())
      args = (st((b, t, v), (bs, None, vs)), st((b, t, k), (bs, None, None)),
              st((b, t, k), (bs, None, None), jnp.int32), st((b, t), (bs, None)))
    else:
      fn = jax.grad(lambda h, w, rh, rw: ka.fused_linear_kl(h, w, rh, rw, reduction="mean"),
                    (0, 1))
      args = (st((b, t, d), (bs, None, None)), st((d, v), (None, vs))) * 2
    m = jax.jit(fn).lower(*args).compile().memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes

  assert total(8) <= 0.2 * total(1), (workload, layout, total(8), total(1))


def test_the_same_program_whether_the_reference_is_an_argument_or_a_constant():
  """On Auto axes nothing is detected from concrete arrays: a sharded reference closed over by
  the jitted function compiles like one passed in (GSPMD, no shard_map, nothing gathered)."""
  host = host_inputs(9)
  a, b = (put(x, CLASSIC, "data", None, "model") for x in host[:2])
  as_arg = jax.jit(lambda a, b: ka.kl_barrier(a, b)[0])
  closed = jax.jit(lambda a: ka.kl_barrier(a, b)[0])
  for fn, args in ((as_arg, (a, b)), (closed, (a,))):
    assert "shard_map" not in str(jax.make_jaxpr(fn)(*args))
    assert moved_elements(fn.lower(*args).compile().as_text()) == []
  np.testing.assert_allclose(closed(a), as_arg(a, b), rtol=1e-6)
  eager = ka.kl_per_position(a, b)  # outside jit too
  assert "shard_map" not in str(jax.make_jaxpr(lambda: ka.kl_per_position(a, b))())
  assert eager.sharding.is_equivalent_to(NamedSharding(CLASSIC, P("data", None)), 2)


def test_a_chunk_that_does_not_divide_the_rows_per_device():
  # 64 positions, 32 per device: blocks of at most 5 rows take 4-row blocks (no gather),
  # and blocks of at most 7 a prime-free divisor too; values and gradients as on one device.
  host = host_inputs(8)
  for chunk in (5, 7, 30):
    f = lambda a, b, mask: jax.value_and_grad(lambda a: ka.kl_barrier(
        a, b, where=mask, chunk_size=chunk)[0])(a)
    want = jax.jit(f)(*host[:3])
    got, hlo = run(f, *[put(x, CLASSIC, "data", *([None] * (x.ndim - 1))) for x in host[:3]])
    assert_tree_close(got, want, f"chunk {chunk}")
    assert moved_elements(hlo) == [], chunk


# ----------------------------------------------------------------------------------------------
# Auto axes with partition=: the explicit override (shard_map).


def test_auto_axes_with_partition_argument():
  p = data(4)
  part = ka.Partition(AUTO, batch_axis="data", vocab_axis="model")

  def f(a, b, mask, h, wt, rh, rwt, part=None):
    barrier = jax.value_and_grad(lambda a: ka.kl_barrier(
        a, b, where=mask, agg="p95", axis=None, chunk_size=8, partition=part)[0])(a)
    fused = jax.grad(lambda h, wt: ka.rmse(ka.fused_linear_kl(
        h, wt, rh, rwt, where=mask, chunk_size=8, partition=part)).mean(), (0, 1))(h, wt)
    return barrier, fused

  host = (p["a"], p["b"], p["mask"], p["h"], p["wt"], p["rh"], p["rwt"])
  want = jax.jit(f)(*host)
  specs = (("data", None, "model"),) * 2 + (("data", None),) + (("data", None, None),
           (None, "model")) * 2
  got, hlo = run(lambda *x: f(*x, part=part), *[put(x, AUTO, *s) for x, s in zip(host, specs)])
  assert_tree_close(got, want)
  (_, d_logits), (d_hidden, d_weight) = got
  assert d_logits.sharding.spec == P("data", None, "model")
  assert d_weight.sharding.spec == P(None, "model")
  assert all(n <= B * T for n in moved_elements(hlo))


def test_partition_takes_the_mesh_of_set_mesh():
  p = data(5)
  part = ka.Partition(batch_axis="data", vocab_axis="model")
  want = ka.kl_per_position(p["a"], p["b"], chunk_size=8)
  sharded = [put(x, AUTO, "data", None, "model") for x in (p["a"], p["b"])]
  with jax.set_mesh(AUTO):
    got = jax.jit(lambda a, b: ka.kl_per_position(a, b, chunk_size=8, partition=part))(*sharded)
  assert_tree_close(got, want)


def test_inside_a_user_shard_map_reduces_over_the_vocab_axis():
  p = data(6)
  part = ka.Partition(vocab_axis="model")
  want = jax.grad(lambda a: ka.kl_per_position(a, p["b"], chunk_size=8).sum())(p["a"])

  def local(a, b):  # the user's own per-device code: blocks [B/2, T, V/4]
    return ka.kl_per_position(a, b, chunk_size=8, partition=part)

  mapped = jax.shard_map(local, mesh=AUTO, in_specs=P("data", None, "model"),
                         out_specs=P("data", None))
  got = jax.jit(jax.grad(lambda a, b: mapped(a, b).sum()))(p["a"], p["b"])
  assert_tree_close(got, want)


@pytest.mark.parametrize("part,match", [
    (ka.Partition(AUTO, batch_axis="rows"), "not in the mesh"),
    (ka.Partition(AUTO, batch_axis="model", vocab_axis="model"), "used twice"),
    (ka.Partition(AUTO, batch_axis=("data", "model")), "Position axis 0"),
])
def test_bad_partition_raises(part, match):
  p = data()
  with pytest.raises(ValueError, match=match):
    ka.kl_per_position(p["a"][:2], p["b"][:2], partition=part)


def test_bad_partition_axis_type_raises():
  with pytest.raises(ValueError, match="vocab_axis"):
    ka.Partition(AUTO, vocab_axis=3)


# ----------------------------------------------------------------------------------------------
# The example of docs/scaling.md (its first Python block) runs as written.


def test_docs_scaling_out_example_runs(capsys):
  page = (ROOT / "docs" / "scaling.md").read_text()
  code = re.search(r"```python\n(.*?)```", page, flags=re.S).group(1)
  exec(compile(code, "docs/scaling.md", "exec"), {})
  out = capsys.readouterr().out.splitlines()
  assert out[0].endswith("P('data', None, 'model')")
  assert out[1] == "P('data', None, None) P(None, 'model')"
  np.testing.assert_allclose(float(out[2]), float(out[0].split()[0]), rtol=1e-6)  # Explicit
