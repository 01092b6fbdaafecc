"""fused_linear_kl equals kl_per_position of the materialized logits, in value and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import klagg_jax as ka
from klagg_jax._ops.divergence import pallas_tiles
from klagg_jax._ops.fused.api import IMPLEMENTATIONS
from tests.helpers import FORWARD_MODE, impl_cases, plain64, refused, to_f64, x64

IMPLS = sorted(IMPLEMENTATIONS)

try:
  from jax.extend.core import jaxprs_in_params
except ImportError:  # JAX < 0.10
  from jax.core import jaxprs_in_params

N, D, V = 11, 6, 19


@pytest.fixture(autouse=True)
def small_pallas_tiles(monkeypatch):
  """Pallas' interpreter with 4-row, 8-entry tiles: V = 19 spans 3 vocabulary tiles, the last
  ragged, and 4-row blocks a ragged last row tile."""
  monkeypatch.setattr(pallas_tiles, "INTERPRET_DEFAULT", pallas_tiles.Tiles(rows=4, vocab=8))


@pytest.fixture
def problem(rng):
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  return dict(h=f(N, D), w=f(D, V), b=f(V), rh=f(N, D + 2), rw=f(D + 2, V), rb=f(V),
              mask=rng.random(N) > 0.25, weights=f(N))


@pytest.mark.parametrize("direction", ["reverse", "forward", "js"])
@pytest.mark.parametrize("layout", ["dv", "vd"])
@pytest.mark.parametrize("impl, chunk_size", impl_cases(IMPLS, 4))  # 1-row blocks: below
def test_fused_matches_float64(problem, direction, layout, impl, chunk_size):
  p = problem
  w = p["w"] if layout == "dv" else p["w"].T
  rw = p["rw"] if layout == "dv" else p["rw"].T
  fused = lambda h, w_, b: (p["weights"] * ka.fused_linear_kl(
      h, w_, p["rh"], rw, bias=b, ref_bias=p["rb"], where=p["mask"], direction=direction,
      temperature=0.8, chunk_size=chunk_size, weight_layout=layout, implementation=impl)).sum()
  got = jax.value_and_grad(fused, (0, 1, 2))(p["h"], w, p["b"])
  want = vg64(lambda h, w_, b: p["weights"] @ materialized_total(p, layout, direction, "sum",
                                                                 per_position=True)(h, w_, b),
              p["h"], w, p["b"])
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, h in zip(got[1], want[1]):
    np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)


def test_without_bias_and_reference_gets_no_gradient(problem):
  p = problem
  f = lambda h, rh: ka.fused_linear_kl(h, p["w"], rh, p["rw"]).sum()
  g_h, g_rh = jax.grad(f, (0, 1))(p["h"], p["rh"])
  want = jax.grad(lambda h: ka.kl_per_position(h @ p["w"], p["rh"] @ p["rw"]).sum())(p["h"])
  np.testing.assert_allclose(g_h, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(g_rh, 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_positions_ignore_garbage(problem, impl):
  p = problem
  h = p["h"].copy()
  h[~p["mask"]] = np.nan
  value, (g, g_w) = jax.value_and_grad(
      lambda x, w: ka.fused_linear_kl(x, w, p["rh"], p["rw"], where=p["mask"], chunk_size=3,
                                      implementation=impl).sum(), (0, 1))(h, p["w"])
  assert np.isfinite(value) and np.isfinite(g).all() and np.isfinite(g_w).all()
  np.testing.assert_array_equal(np.asarray(g)[~p["mask"]], 0.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_computes_in_float32(problem, impl, dtype):
  p = problem
  h, w = jnp.asarray(p["h"], dtype), jnp.asarray(p["w"], dtype)
  got = ka.fused_linear_kl(h, w, h, w * 0.5, implementation=impl)
  assert got.dtype == jnp.float32
  with x64():  # the float64 truth of the rounded inputs
    want = plain64(to_f64(h) @ to_f64(w), to_f64(h) @ (to_f64(w) * 0.5), "reverse")
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  g = jax.grad(lambda x: ka.fused_linear_kl(x, w, h, w * 0.5, implementation=impl).sum())(h)
  assert g.dtype == h.dtype and np.isfinite(to_f64(g)).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_identical_student_and_reference_give_exact_zero(problem, impl):
  p = problem
  value, grads = jax.value_and_grad(
      lambda h, w: ka.fused_linear_kl(h, w, p["h"], p["w"], implementation=impl).sum(),
      (0, 1))(p["h"], p["w"])
  assert value == 0.0
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)


def test_jit_and_batched_leading_shape(problem):
  p = problem
  h3 = p["h"][:10].reshape(2, 5, D)
  rh3 = p["rh"][:10].reshape(2, 5, D + 2)
  got = jax.jit(ka.fused_linear_kl)(h3, p["w"], rh3, p["rw"])
  want = ka.kl_per_position(h3 @ p["w"], rh3 @ p["rw"])
  assert got.shape == (2, 5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda p: ka.fused_linear_kl(p["h"], p["w"].T, p["rh"], p["rw"]), "expected hidden"),
    (lambda p: ka.fused_linear_kl(p["h"], p["w"], p["rh"], p["rw"][:, :5]), "Vocabulary mismatch"),
    (lambda p: ka.fused_linear_kl(p["h"], p["w"], p["rh"][:3], p["rw"]), "Shape mismatch"),
    (lambda p: ka.fused_linear_kl(p["h"], p["w"], p["rh"], p["rw"], bias=p["b"][:3]), "bias"),
    (lambda p: ka.fused_linear_kl(p["h"], p["w"], p["rh"], p["rw"], weight_layout="dd"),
     "weight_layout"),
    (lambda p: ka.fused_linear_kl(p["h"], p["w"], p["rh"], p["rw"], direction="x"), "direction"),
    (lambda p: ka.fused_linear_kl(p["h"], p["w"][None], p["rh"], p["rw"]), "2-D"),
    (lambda p: ka.fused_linear_kl(p["h"], p["w"], p["rh"], p["rw"], temperature=0.0),
     "temperature"),
])
def test_bad_static_input_raises(problem, call, match):
  with pytest.raises(ValueError, match=match):
    call(problem)


# ------------------------------------------------------------------------------------------------
# reduction="mean" / "sum": the scalar path whose gradient is formed in the forward pass.


def materialized_total(p, layout, direction, reduction, temperature=0.8, per_position=False):
  """The float64 truth: the definition on the materialized float64 logits."""
  def loss(h, w_, b):
    z = h @ (w_ if layout == "dv" else w_.T) + b[None]
    zr = jnp.asarray(p["rh"], jnp.float64) @ p["rw"] + p["rb"][None]
    kl = jnp.where(p["mask"], plain64(z / temperature, zr / temperature, direction), 0.0)
    if per_position:
      return kl
    return kl.sum() / (p["mask"].sum() if reduction == "mean" else 1.0)
  return loss


def vg64(f, *args):
  with x64():
    value, grads = jax.value_and_grad(f, tuple(range(len(args))))(*(np.float64(x) for x in args))
    return np.asarray(value), [np.asarray(g) for g in grads]


@pytest.mark.parametrize("direction", ["reverse", "forward", "js"])
@pytest.mark.parametrize("layout, reduction, chunk_size", [
    ("dv", "mean", None), ("vd", "mean", 4), ("dv", "sum", 3), ("vd", "sum", 1)])
def test_reduced_equals_materialized(problem, direction, layout, reduction, chunk_size):
  p = problem
  w = p["w"] if layout == "dv" else p["w"].T
  rw = p["rw"] if layout == "dv" else p["rw"].T
  fused = lambda h, w_, b: ka.fused_linear_kl(
      h, w_, p["rh"], rw, bias=b, ref_bias=p["rb"], where=p["mask"], direction=direction,
      temperature=0.8, chunk_size=chunk_size, weight_layout=layout, reduction=reduction)
  got = jax.value_and_grad(fused, (0, 1, 2))(p["h"], w, p["b"])
  want = vg64(materialized_total(p, layout, direction, reduction), p["h"], w, p["b"])
  assert got[0].shape == () and got[0].dtype == jnp.float32
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, h in zip(got[1], want[1]):
    np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6)
  # The value alone (no gradient) is the same number.
  np.testing.assert_allclose(jax.jit(fused)(p["h"], w, p["b"]), got[0], rtol=1e-6)


def test_reduced_mean_equals_the_mean_of_the_per_position_path(problem):
  p = problem
  per = ka.fused_linear_kl(p["h"], p["w"], p["rh"], p["rw"], where=p["mask"])
  mean = ka.fused_linear_kl(p["h"], p["w"], p["rh"], p["rw"], where=p["mask"], reduction="mean")
  np.testing.assert_allclose(mean, per.sum() / p["mask"].sum(), rtol=1e-6)
  assert ka.fused_linear_kl(p["h"], p["w"], p["rh"], p["rw"], where=np.zeros(N, bool),
                            reduction="mean") == 0.0


def test_reduced_nan_surfaces_and_masked_garbage_does_not(problem):
  p = problem
  h = p["h"].copy()
  h[~p["mask"]] = np.nan  # masked garbage
  f = lambda h, w: ka.fused_linear_kl(h, w, p["rh"], p["rw"], where=p["mask"], reduction="mean",
                                      chunk_size=4)
  value, (g_h, g_w) = jax.value_and_grad(f, (0, 1))(h, p["w"])
  assert np.isfinite(value) and np.isfinite(g_h).all() and np.isfinite(g_w).all()
  np.testing.assert_array_equal(np.asarray(g_h)[~p["mask"]], 0.0)
  clean = jax.value_and_grad(f, (0, 1))(np.where(p["mask"][:, None], p["h"], 0.0), p["w"])
  np.testing.assert_allclose(value, clean[0], rtol=1e-6)
  h[np.argmax(p["mask"]), 2] = np.nan  # a valid position
  assert np.isnan(f(h, p["w"]))
  assert np.isnan(ka.fused_linear_kl(h, p["w"], p["rh"], p["rw"], where=p["mask"],
                                     reduction="sum"))


def test_reduced_low_precision_with_accum_dtype(problem):
  p = problem
  h, w = jnp.asarray(p["h"], jnp.bfloat16), jnp.asarray(p["w"], jnp.bfloat16)
  h32, w32 = h.astype(jnp.float32), w.astype(jnp.float32)  # exact copies of the bf16 values
  ref_logits = to_f64(h32) @ (to_f64(w32) * 0.5)  # the reference gets no gradient
  want = vg64(lambda h, w: plain64(h @ w, ref_logits, "reverse").mean(), h32, w32)
  for accum in (jnp.float32, jnp.bfloat16):
    value, (g_h, g_w) = jax.value_and_grad(lambda h, w: ka.fused_linear_kl(
        h, w, h, w * 0.5, reduction="mean", chunk_size=4, accum_dtype=accum), (0, 1))(h, w)
    assert value.dtype == jnp.float32 and g_h.dtype == g_w.dtype == jnp.bfloat16
    np.testing.assert_allclose(value, want[0], rtol=1e-4)
    # bf16 gradients: the logit gradient is rounded to bf16 before its matmuls.
    np.testing.assert_allclose(to_f64(g_h), want[1][0], rtol=0.05, atol=2e-3)
    np.testing.assert_allclose(to_f64(g_w), want[1][1], rtol=0.05, atol=2e-3)


def _equations(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jaxprs_in_params(eqn.params):
      yield from _equations(sub)


def test_no_float32_copy_of_16_bit_weights_or_hidden_states():
  """The kernel never converts a bf16 weight, hidden state or block of hidden states to float32,
  and feeds every matmul bf16 operands (float32 accumulation inside the dot). Checked on the
  program the library emits (the jaxpr): how a backend executes a bf16 dot is its own business
  (XLA:CPU, which has no bf16 matmul, computes it in float32 registers)."""
  n, d, v, chunk = 256, 48, 1000, 64
  bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
  big = {(d, v), (v, d), (n, d), (chunk, d)}
  for reduction in (None, "mean"):
    for layout, w_shape in (("dv", (d, v)), ("vd", (v, d))):
      f = jax.grad(lambda h, w, rh, rw: ka.fused_linear_kl(
          h, w, rh, rw, reduction=reduction, chunk_size=chunk, weight_layout=layout).sum(),
          (0, 1))
      jaxpr = jax.make_jaxpr(f)(bf(n, d), bf(*w_shape), bf(n, d), bf(*w_shape))
      for eqn in _equations(jaxpr.jaxpr):
        ins = [x.aval for x in eqn.invars if hasattr(x, "aval")]
        if eqn.primitive.name == "convert_element_type":
          assert not (ins[0].dtype == jnp.bfloat16 and tuple(ins[0].shape) in big), (
              reduction, layout, eqn)
        if eqn.primitive.name == "dot_general":
          assert all(a.dtype == jnp.bfloat16 for a in ins), (reduction, layout, eqn)


def _matmuls(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args)

  def count(jaxpr):
    total = 0
    for eqn in jaxpr.eqns:
      total += eqn.primitive.name == "dot_general"
      for sub in jaxprs_in_params(eqn.params):
        total += count(sub)
    return total
  return count(jaxpr.jaxpr)


def test_scalar_reduction_does_four_matmuls_per_block_and_per_position_six(problem):
  p = problem
  args = (p["h"], p["w"], p["rh"], p["rw"])
  per = jax.value_and_grad(lambda *a: ka.fused_linear_kl(*a, chunk_size=N).sum(), (0, 1))
  red = jax.value_and_grad(lambda *a: ka.fused_linear_kl(*a, chunk_size=N, reduction="sum"),
                           (0, 1))
  assert _matmuls(per, *args) == 6
  assert _matmuls(red, *args) == 4
  # Without a gradient the scalar path makes only the two logits.
  assert _matmuls(lambda *a: ka.fused_linear_kl(*a, chunk_size=N, reduction="sum"), *args) == 2


def test_precision_reaches_every_matmul(problem):
  p = problem
  for precision, want in ((None, "DEFAULT"), ("highest", "HIGHEST"),
                          (jax.lax.Precision.HIGH, "HIGH")):
    f = jax.grad(lambda h, w: ka.fused_linear_kl(h, w, p["rh"], p["rw"], reduction="mean",
                                                 precision=precision), (0, 1))
    with jax.default_matmul_precision("default"):
      text = jax.jit(f).lower(p["h"], p["w"]).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert len(dots) == 4 and all(f"precision = [{want}, {want}]" in line for line in dots), dots


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("reduction", [None, "mean"])
def test_every_implementation_matches_float64(problem, implementation, reduction):
  p = problem
  weights = p["weights"] if reduction is None else 1.0

  def f(h, w, b):
    out = ka.fused_linear_kl(h, w, p["rh"], p["rw"], bias=b, where=p["mask"], direction="js",
                             reduction=reduction, chunk_size=4, implementation=implementation)
    return (weights * out).sum()

  def want(h, w, b):
    kl = jnp.where(p["mask"], plain64(h @ w + b[None], jnp.float64(p["rh"]) @ p["rw"], "js"), 0.0)
    return (weights * kl).sum() / (1.0 if reduction is None else p["mask"].sum())

  got = jax.value_and_grad(f, (0, 1, 2))(p["h"], p["w"], p["b"])
  expected = vg64(want, p["h"], p["w"], p["b"])
  np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
  for g, h in zip(got[1], expected[1]):
    np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6)
  t = np.ones_like(p["h"])
  if implementation in FORWARD_MODE:  # forward-mode AD runs through it
    _, tangent = jax.jvp(lambda h: f(h, p["w"], p["b"]), (p["h"],), (t,))
    np.testing.assert_allclose(tangent, (expected[1][0] * t).sum(), rtol=1e-4)
  else:
    with pytest.raises(TypeError, match="implementation=\"xla\""):
      jax.jvp(lambda h: f(h, p["w"], p["b"]), (p["h"],), (t,))


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_equals_one_call_per_batch(problem, impl):
  p = problem
  hs = np.stack([p["h"], p["h"][::-1]])
  f = lambda h, w: ka.fused_linear_kl(h, w, p["rh"], p["rw"], where=p["mask"], direction="js",
                                      reduction="mean", chunk_size=4, implementation=impl)
  vg = jax.value_and_grad(f, (0, 1))
  got = jax.jit(jax.vmap(vg, in_axes=(0, None)))(hs, p["w"])
  for i, h in enumerate(hs):
    want = vg(h, p["w"])
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g[i], e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_inputs_compute_in_float64_or_are_refused(problem, impl):
  p = problem
  with x64():
    h, w, rh, rw = (np.float64(p[k]) for k in ("h", "w", "rh", "rw"))
    f = lambda h, w, implementation=impl: ka.fused_linear_kl(
        h, w, rh, rw, where=p["mask"], direction="js", reduction="sum", chunk_size=4,
        implementation=implementation)
    want = vg64(lambda h, w: jnp.where(p["mask"], plain64(h @ w, rh @ rw, "js"), 0.0).sum(),
                h, w)
    if refused("fused", impl, "float64", lambda: f(h, w)):
      # A sequence falls through to the next implementation, which computes in float64.
      f = functools.partial(f, implementation=(impl, "chunked"))
    value, grads = jax.value_and_grad(f, (0, 1))(h, w)
  assert value.dtype == jnp.float64
  np.testing.assert_allclose(value, want[0], rtol=1e-12)
  np.testing.assert_allclose(grads[0], want[1][0], rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(grads[1], want[1][1], rtol=1e-5, atol=1e-8)  # a float32 product


@pytest.mark.parametrize("kwargs, match", [
    ({"reduction": "max"}, "reduction"),
    ({"accum_dtype": jnp.int32}, "accum_dtype"),
    ({"precision": "fastest-ever"}, "precision"),
    ({"implementation": "triton"}, "implementation"),
])
def test_bad_reduction_options_raise(problem, kwargs, match):
  p = problem
  with pytest.raises(ValueError, match=match):
    ka.fused_linear_kl(p["h"], p["w"], p["rh"], p["rw"], **kwargs)


def test_zero_positions_give_zero_in_the_input_dtype_under_x64(problem):
  p = problem
  with jax.enable_x64(True):
    h, w = np.zeros((0, D)), p["w"].astype(np.float64)
    for reduction in (None, "mean", "sum"):
      out = ka.fused_linear_kl(h, w, h, w, reduction=reduction)
      assert out.dtype == jnp.float64 and out.shape == ((0,) if reduction is None else ())
    h1 = p["h"].astype(np.float64)
    assert ka.fused_linear_kl(h1, w, h1, w * 2).dtype == jnp.float64
