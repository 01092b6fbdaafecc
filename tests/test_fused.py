"""fused_linear_kl equals kl_per_position of the materialized logits, in value and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import klagg_jax as ka
from tests.helpers import to_f64

N, D, V = 11, 6, 19


@pytest.fixture
def problem(rng):
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  return dict(h=f(N, D), w=f(D, V), b=f(V), rh=f(N, D + 2), rw=f(D + 2, V), rb=f(V),
              mask=rng.random(N) > 0.25, weights=f(N))


def materialized(p, layout, direction, **kw):
  w = p["w"] if layout == "dv" else p["w"].T
  return lambda h, w_, b: (p["weights"] * ka.kl_per_position(
      h @ (w_ if layout == "dv" else w_.T) + b[None], p["rh"] @ p["rw"] + p["rb"][None],
      where=p["mask"], direction=direction, **kw)).sum(), w


@pytest.mark.parametrize("direction", ["reverse", "forward", "js"])
@pytest.mark.parametrize("layout", ["dv", "vd"])
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_fused_equals_materialized(problem, direction, layout, chunk_size):
  p = problem
  want_fn, w = materialized(p, layout, direction, temperature=0.8)
  rw = p["rw"] if layout == "dv" else p["rw"].T
  fused = lambda h, w_, b: (p["weights"] * ka.fused_linear_kl(
      h, w_, p["rh"], rw, bias=b, ref_bias=p["rb"], where=p["mask"], direction=direction,
      temperature=0.8, chunk_size=chunk_size, weight_layout=layout)).sum()
  got = jax.value_and_grad(fused, (0, 1, 2))(p["h"], w, p["b"])
  want = jax.value_and_grad(want_fn, (0, 1, 2))(p["h"], w, p["b"])
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


def test_masked_positions_ignore_garbage(problem):
  p = problem
  h = p["h"].copy()
  h[~p["mask"]] = np.nan
  value, (g, g_w) = jax.value_and_grad(
      lambda x, w: ka.fused_linear_kl(x, w, p["rh"], p["rw"], where=p["mask"],
                                      chunk_size=3).sum(), (0, 1))(h, p["w"])
  assert np.isfinite(value) and np.isfinite(g).all() and np.isfinite(g_w).all()
  np.testing.assert_array_equal(np.asarray(g)[~p["mask"]], 0.0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_computes_in_float32(problem, dtype):
  p = problem
  h, w = jnp.asarray(p["h"], dtype), jnp.asarray(p["w"], dtype)
  got = ka.fused_linear_kl(h, w, h, w * 0.5)
  assert got.dtype == jnp.float32
  want = ka.kl_per_position(to_f64(h) @ to_f64(w), to_f64(h) @ (to_f64(w) * 0.5))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  g = jax.grad(lambda x: ka.fused_linear_kl(x, w, h, w * 0.5).sum())(h)
  assert g.dtype == h.dtype and np.isfinite(to_f64(g)).all()


def test_identical_student_and_reference_give_exact_zero(problem):
  p = problem
  value, grads = jax.value_and_grad(
      lambda h, w: ka.fused_linear_kl(h, w, p["h"], p["w"]).sum(), (0, 1))(p["h"], p["w"])
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
