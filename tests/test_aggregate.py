"""Aggregators against float64 numpy, their gradients, conventions, properties and errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

import klagg_jax as ka
from klagg_jax import _reference as ref
from tests.conftest import DTYPES
from tests.helpers import x64

LEVELS = (0.5, 0.9, 0.95, 0.99)
# (library function, reference, extra kwargs); quantile-like ones take q.
PLAIN = {
    "mean": (ka.mean, ref.mean, {}),
    "rmse": (ka.rmse, ref.rmse, {}),
    "max": (ka.maximum, ref.maximum, {}),
    "smooth_max": (ka.smooth_max, ref.smooth_max, {"temperature": 0.7}),
    "power_mean": (ka.power_mean, ref.power_mean, {"p": 3.0}),
}
LEVELED = {
    "quantile": (ka.quantile, ref.quantile),
    "soft_quantile": (ka.soft_quantile, ref.soft_quantile),
    "cvar": (ka.cvar, ref.cvar),
}
NAMES = ("mean", "rmse", "max", "p95", "p50", "soft_p95", "cvar95", "smooth_max", "power_mean")


def masked_batch(rng, shape=(5, 23)):
  x = (rng.standard_normal(shape) ** 2).astype(np.float32)
  mask = rng.random(shape) > 0.35
  mask[0] = False  # an empty row
  mask[1] = False
  mask[1, 3] = True  # a single valid entry
  return x, mask


@pytest.mark.parametrize("name", PLAIN)
@pytest.mark.parametrize("axis", [-1, None, 0])
def test_plain_aggregators_match_reference(rng, name, axis):
  fn, want_fn, kw = PLAIN[name]
  x, mask = masked_batch(rng)
  got = fn(x, where=mask, axis=axis, **kw)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want_fn(x, where=mask, axis=axis, **kw), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", LEVELED)
@pytest.mark.parametrize("q", LEVELS)
@pytest.mark.parametrize("axis", [-1, None])
def test_leveled_aggregators_match_reference(rng, name, q, axis):
  fn, want_fn = LEVELED[name]
  x, mask = masked_batch(rng)
  got = fn(x, q, where=mask, axis=axis)
  np.testing.assert_allclose(got, want_fn(x, q, where=mask, axis=axis), rtol=1e-5, atol=1e-6)


def test_quantile_is_numpy_percentile_with_variable_length_under_jit(rng):
  x, mask = masked_batch(rng, (8, 40))
  got = jax.jit(lambda v, m: ka.quantile(v, 0.95, where=m))(x, mask)
  want = [np.percentile(x[i][mask[i]], 95) if mask[i].any() else 0.0 for i in range(8)]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_mask_equals_slicing(rng):
  x = rng.standard_normal(30).astype(np.float32) ** 2
  mask = rng.random(30) > 0.5
  for how in NAMES:
    kw = {"p": 2.0} if how == "power_mean" else {}
    np.testing.assert_allclose(ka.aggregate(x, how, where=mask, **kw),
                               ka.aggregate(x[mask], how, **kw), rtol=1e-6, err_msg=how)


def test_axis_matches_moveaxis(rng):
  x = rng.standard_normal((4, 6, 5)).astype(np.float32) ** 2
  for how in NAMES:
    kw = {"p": 2.0} if how == "power_mean" else {}
    np.testing.assert_allclose(ka.aggregate(x, how, axis=1, **kw),
                               ka.aggregate(np.moveaxis(x, 1, -1), how, **kw), rtol=1e-6)


@pytest.mark.parametrize("how", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_gradient_at_all_zero_input(how, dtype):
  kw = {"p": 2.0} if how == "power_mean" else {}
  x = jnp.zeros((3, 8), dtype)
  value, g = jax.value_and_grad(lambda v: ka.aggregate(v, how, **kw).sum())(x)
  assert np.isfinite(value)
  assert np.isfinite(np.asarray(g, np.float32)).all()


def test_rmse_grad_finite_at_zero_fp16():
  """The seed's eps of 1e-8 underflowed in fp16: sqrt(0) had an infinite gradient."""
  g = jax.grad(lambda v: ka.rmse(v))(jnp.zeros(6, jnp.float16))
  np.testing.assert_array_equal(np.asarray(g, np.float32), 0.0)
  g = jax.grad(lambda v: ka.rmse(v, eps=0.0))(jnp.zeros(6))
  np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("how", NAMES)
def test_empty_selection_gives_zero_with_zero_gradient(how):
  kw = {"p": 2.0} if how == "power_mean" else {}
  x = jnp.array([[1.0, jnp.nan, jnp.inf], [2.0, 3.0, 4.0]])
  mask = jnp.array([[False, False, False], [True, False, True]])
  value, g = jax.value_and_grad(lambda v: ka.aggregate(v, how, where=mask, **kw)[0])(x)
  assert value == 0.0
  np.testing.assert_array_equal(g, 0.0)
  value, g = jax.value_and_grad(
      lambda v: ka.aggregate(v, how, where=jnp.zeros_like(mask), axis=None, **kw))(x)
  assert value == 0.0
  np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("how", NAMES)
def test_nan_padding_never_reaches_value_or_gradient(rng, how):
  kw = {"p": 2.0} if how == "power_mean" else {}
  x, mask = masked_batch(rng)
  dirty = np.where(mask, x, np.nan)
  value, g = jax.value_and_grad(lambda v: ka.aggregate(v, how, where=mask, **kw).sum())(dirty)
  np.testing.assert_allclose(value, ka.aggregate(x, how, where=mask, **kw).sum(), rtol=1e-6)
  assert np.isfinite(g).all()
  np.testing.assert_array_equal(np.asarray(g)[~mask], 0.0)


@pytest.mark.parametrize("how", NAMES)
def test_check_grads_float64(how):
  kw = {"p": 3.0} if how == "power_mean" else {}
  rng = np.random.default_rng(3)
  with x64():
    x = rng.random((3, 11)) + 0.1  # distinct values: sort-based aggregators are smooth here
    mask = np.ones((3, 11), bool)
    mask[0, :4] = False
    f = lambda v: ka.aggregate(v, how, where=mask, **kw)
    assert f(x).dtype == jnp.float64
    order = 1 if how == "max" else 2
    check_grads(f, (x,), order=order, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_jit_vmap_grad_invariance(rng):
  x, mask = masked_batch(rng)
  for how in NAMES:
    kw = {"p": 2.0} if how == "power_mean" else {}
    f = lambda v, m: ka.aggregate(v, how, where=m, **kw)
    eager = f(x, mask)
    np.testing.assert_allclose(jax.jit(f)(x, mask), eager, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jax.vmap(f)(x, mask), eager, rtol=1e-5, atol=1e-7)
    g = jax.jit(jax.grad(lambda v: f(v, mask).sum()))(x)
    gv = jax.jit(jax.vmap(jax.grad(lambda v, m: f(v, m))))(x, mask)
    np.testing.assert_allclose(g, gv, rtol=1e-5, atol=1e-7)


def test_max_ties_split_the_gradient():
  g = jax.grad(ka.maximum)(jnp.array([1.0, 3.0, 3.0, 2.0]))
  np.testing.assert_allclose(g, [0.0, 0.5, 0.5, 0.0])


def test_smooth_max_lies_between_mean_and_max_and_tends_to_max(rng):
  x = rng.random(50).astype(np.float32)
  assert ka.mean(x) <= ka.smooth_max(x, 1.0) <= ka.maximum(x)
  np.testing.assert_allclose(ka.smooth_max(x, 1e-3), x.max(), atol=5e-3)
  np.testing.assert_allclose(ka.smooth_max(x, 1e4), x.mean(), rtol=1e-3)


def test_power_mean_special_cases(rng):
  x = rng.random(40).astype(np.float32)
  np.testing.assert_allclose(ka.power_mean(x, 1.0), ka.mean(x), rtol=1e-6)
  np.testing.assert_allclose(ka.power_mean(x, 2.0), ka.rmse(x, eps=0.0), rtol=1e-6)
  np.testing.assert_allclose(ka.power_mean(x, 500.0), x.max(), rtol=2e-2)
  assert np.isfinite(ka.power_mean(x * 1e30, 50.0))


def test_soft_quantile_tends_to_quantile(rng):
  x = rng.standard_normal(60).astype(np.float32) ** 2
  q = ka.quantile(x, 0.95)
  gaps = [abs(float(ka.soft_quantile(x, 0.95, bandwidth=b) - q)) for b in (1.0, 0.1, 0.01)]
  assert gaps[2] < 1e-3 * float(q) and gaps[2] <= gaps[1] <= gaps[0] + 1e-6
  assert ka.soft_quantile(x, 0.95, bandwidth=0.0) == q


def test_soft_quantile_gradient_reach_at_n60_q95(rng):
  x = jnp.asarray(rng.permutation(60).astype(np.float32))  # distinct values
  soft = jax.grad(lambda v: ka.soft_quantile(v, 0.95))(x)
  hard = jax.grad(lambda v: ka.quantile(v, 0.95))(x)
  assert int((hard != 0).sum()) == 2
  assert int((soft > 1e-3).sum()) == 9  # the number the docstring states
  np.testing.assert_allclose(soft.sum(), 1.0, rtol=1e-5)
  assert (soft >= 0).all()


def test_cvar_tail_weights():
  x = jnp.arange(1.0, 21.0)  # n = 20, q = 0.9: mean of the top two
  np.testing.assert_allclose(ka.cvar(x, 0.9), 19.5, rtol=1e-6)
  np.testing.assert_allclose(ka.cvar(x, 0.925), (0.5 * 19 + 20) / 1.5, rtol=1e-6)
  g = jax.grad(lambda v: ka.cvar(v, 0.5))(x)
  assert int((g > 0).sum()) == 10  # dense over the upper half


@pytest.mark.parametrize("how", ["p95", "soft_p95", "cvar95", "max"])
def test_constant_input_is_exact(how):
  c = np.float32(0.123456789)
  np.testing.assert_array_equal(ka.aggregate(jnp.full((2, 37), c), how), c)


# Few distinct lengths: each new shape costs a compilation.
values = hnp.arrays(np.float32, st.sampled_from([1, 2, 7, 40]),
                    elements=st.floats(0, 100, width=32, allow_subnormal=False))
LEVEL_NAMES = ("p50", "p95", "soft_p95", "soft_p50", "cvar95", "cvar50")


@settings(max_examples=25, deadline=None)
@given(values, st.sampled_from(NAMES + LEVEL_NAMES), st.randoms(use_true_random=False))
def test_property_permutation_invariance_and_bounds(x, how, r):
  kw = {"p": 2.0} if how == "power_mean" else {}
  perm = list(range(x.size))
  r.shuffle(perm)
  v = float(ka.aggregate(x, how, **kw))
  np.testing.assert_allclose(v, float(ka.aggregate(x[perm], how, **kw)), rtol=1e-5, atol=1e-6)
  lo = float(x.min()) if how != "rmse" else 0.0
  assert lo - 1e-4 * (1 + abs(lo)) <= v <= float(x.max()) * (1 + 1e-5) + 1e-4


@settings(max_examples=25, deadline=None)
@given(values, st.sampled_from(NAMES + LEVEL_NAMES), st.integers(0, 39),
       st.floats(0.0, 10.0, width=32))
def test_property_non_decreasing_in_each_entry(x, how, i, bump):
  kw = {"p": 2.0} if how == "power_mean" else {}
  i = i % x.size
  y = x.copy()
  y[i] += bump
  before, after = float(ka.aggregate(x, how, **kw)), float(ka.aggregate(y, how, **kw))
  assert after >= before - 1e-5 * (1 + abs(before))


@settings(max_examples=25, deadline=None)
@given(values, st.sampled_from(NAMES + LEVEL_NAMES), st.integers(0, 2 ** 32 - 1))
def test_property_mask_equals_slicing(x, how, seed):
  kw = {"p": 2.0} if how == "power_mean" else {}
  mask = np.random.default_rng(seed).random(x.size) > 0.5
  got = float(ka.aggregate(x, how, where=mask, **kw))
  want = float(ka.aggregate(x[mask], how, **kw)) if mask.any() else 0.0
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_aggregate_by_name_and_callable(rng):
  x = rng.random((2, 9)).astype(np.float32)
  np.testing.assert_allclose(ka.aggregate(x, "p99.5"), ka.quantile(x, 0.995))
  np.testing.assert_allclose(ka.aggregate(x, "soft_p90", bandwidth=0.5),
                             ka.soft_quantile(x, 0.9, bandwidth=0.5))
  np.testing.assert_allclose(ka.aggregate(x, "cvar75"), ka.cvar(x, 0.75))
  np.testing.assert_allclose(ka.aggregate(x, "smooth_max", temperature=0.3),
                             ka.smooth_max(x, 0.3))
  np.testing.assert_allclose(ka.aggregate(x, ka.mean), ka.mean(x))
  assert ka.max is ka.maximum


@pytest.mark.parametrize("call, match", [
    (lambda x: ka.aggregate(x, "median"), "Unknown aggregator 'median'.*pNN"),
    (lambda x: ka.aggregate(x, "p100"), "0 < NN < 100"),
    (lambda x: ka.aggregate(x, "p0"), "0 < NN < 100"),
    (lambda x: ka.aggregate(x, 3), "name or a callable"),
    (lambda x: ka.quantile(x, 1.0), r"q must lie in the open interval \(0, 1\)"),
    (lambda x: ka.cvar(x, 0.0), r"\(0, 1\)"),
    (lambda x: ka.soft_quantile(x, -0.5), r"\(0, 1\)"),
    (lambda x: ka.soft_quantile(x, 0.5, bandwidth=-1.0), "bandwidth"),
    (lambda x: ka.mean(x, axis=2), "axis 2 is out of range"),
    (lambda x: ka.mean(x, axis=-3), "out of range"),
    (lambda x: ka.mean(x, where=jnp.ones((3,), bool)), "broadcast"),
    (lambda x: ka.mean(x.astype(jnp.int32)), "floating"),
    (lambda x: ka.smooth_max(x, 0.0), "temperature"),
    (lambda x: ka.power_mean(x, 0.5), "p must be"),
    (lambda x: ka.rmse(x, eps=-1.0), "eps"),
])
def test_bad_static_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call(jnp.ones((2, 4)))


def test_power_mean_of_an_infinite_entry_is_infinite():
  """A reference with -inf where the student has mass gives KL = +inf; every mean says so."""
  x = jnp.array([[0.0, 1.0, jnp.inf], [0.0, 1.0, 3.0]])
  got = ka.power_mean(x, 2.0)
  assert got[0] == jnp.inf
  np.testing.assert_allclose(got[1], np.sqrt(10.0 / 3.0), rtol=1e-6)


def test_power_mean_by_name_requires_its_exponent():
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="power_mean.*needs its exponent.*p"):
    ka.aggregate(x, "power_mean")
  np.testing.assert_allclose(ka.aggregate(x, "power_mean", p=3.0), [1.0, 1.0])


# ------------------------------------------------------------------------------------------------
# Bad input (issue 13): NaN surfaces, masked NaN is invisible, zero-length axes are empty.

EVERY_NAME = NAMES + ("maximum",)
# The property below skips "maximum": the same function as "max" (ka.max is ka.maximum,
# pinned by test_aggregate_by_name_and_callable), and each name costs a compilation.
PROPERTY_NAMES = NAMES


def kwargs_for(how):
  return {"p": 2.0} if how == "power_mean" else {}


@pytest.mark.parametrize("how", EVERY_NAME)
def test_nan_at_a_valid_position_gives_nan(how):
  """The issue's reproducer: ka.rmse([1, nan]) and power_mean(p=2) read 0.0."""
  x = jnp.array([[1.0, 2.0, 3.0, jnp.nan], [1.0, 2.0, 3.0, 4.0]])
  got = ka.aggregate(x, how, **kwargs_for(how))
  assert np.isnan(got[0]) and np.isfinite(got[1]), (how, got)
  assert np.isnan(ka.aggregate(x, how, axis=None, **kwargs_for(how))), how


def test_rmse_and_power_mean_of_a_nan_are_nan():
  assert np.isnan(ka.rmse(np.float32([1.0, np.nan])))
  assert np.isnan(ka.rmse(np.float32([1.0, np.nan]), eps=0.0))
  assert np.isnan(ka.power_mean(np.float32([1.0, np.nan]), 2.0))
  assert np.isnan(ka.power_mean(np.float32([0.0, np.nan]), 3.0))


def test_quantile_reading_low_ranks_still_sees_a_nan():
  """jnp.sort puts NaN last: a p50 of [1, 2, 3, nan] would read 2.5 from the ranks it uses."""
  x = jnp.array([1.0, 2.0, 3.0, jnp.nan])
  for how in ("p50", "p10", "soft_p10", "cvar10"):
    assert np.isnan(ka.aggregate(x, how)), how


@pytest.mark.parametrize("how", EVERY_NAME)
def test_zero_length_axis_gives_zero_with_zero_gradient(how):
  kw = kwargs_for(how)
  f = lambda v: ka.aggregate(v, how, **kw)
  value, g = jax.value_and_grad(lambda v: f(v).sum())(jnp.zeros((2, 0)))
  np.testing.assert_array_equal(f(jnp.zeros((2, 0))), [0.0, 0.0])
  assert value == 0.0 and g.shape == (2, 0)
  # axis=None over an empty array, and a zero-length axis that is not the last one.
  value, g = jax.value_and_grad(lambda v: ka.aggregate(v, how, axis=None, **kw))(jnp.zeros((0, 3)))
  assert value == 0.0 and value.dtype == jnp.float32 and g.shape == (0, 3)
  value, g = jax.value_and_grad(
      lambda v: ka.aggregate(v, how, axis=0, **kw).sum())(jnp.zeros((0, 3), jnp.bfloat16))
  np.testing.assert_array_equal(ka.aggregate(jnp.zeros((0, 3)), how, axis=0, **kw), 0.0)
  assert value == 0.0 and g.shape == (0, 3)
  with x64():
    assert ka.aggregate(np.zeros((0,)), how, **kw).dtype == jnp.float64
  # Under jit too, with a mask of the same empty shape.
  got = jax.jit(lambda v, m: ka.aggregate(v, how, where=m, **kw))(
      jnp.zeros((3, 0)), jnp.zeros((3, 0), bool))
  np.testing.assert_array_equal(got, np.zeros(3))


@functools.lru_cache(maxsize=None)
def nan_probe():
  """One jitted program for the NaN property: every name, dtype and axis, for a clean and a
  dirty copy of the input at once (vmapped), so hypothesis examples never recompile."""

  def one(x, mask, how, dtype, axis):
    f = lambda v: ka.aggregate(v, how, where=mask, axis=axis, **kwargs_for(how))
    v = x.astype(dtype)
    value = f(v)
    grad = jax.grad(lambda v: f(v).sum())(v)
    return value, grad.astype(jnp.float32)

  def probe(pair, mask):  # pair: [2, R, N] (clean, dirty)
    return {(how, dtype, str(axis)): jax.vmap(lambda x: one(x, mask, how, dtype, axis))(pair)
            for how in PROPERTY_NAMES for dtype in DTYPES for axis in (-1, None)}

  return jax.jit(probe)


nan_values = hnp.arrays(np.float32, (3, 6), elements=st.floats(0, 20, width=32))
nan_masks = hnp.arrays(np.bool_, (3, 6))


@settings(max_examples=200, deadline=None)
@given(nan_values, nan_masks, st.integers(0, 2), st.integers(0, 5), st.booleans())
def test_property_nan_valid_is_nan_and_nan_masked_is_invisible(x, mask, i, j, valid):
  """Every aggregator name, f32 / bf16 / f16, per sequence and over all tokens: a NaN at a valid
  position gives NaN (and leaves the other sequences alone); at a masked position it gives
  exactly the value without it, with exactly zero gradient there."""
  mask = mask.copy()
  mask[i, j] = valid
  dirty = x.copy()
  dirty[i, j] = np.nan
  out = jax.device_get(nan_probe()(np.stack([x, dirty]), mask))
  for (how, dtype, axis), (value, grad) in out.items():
    where = f"{how} {dtype} axis={axis}"
    clean_v, dirty_v = value
    clean_g, dirty_g = grad
    assert np.isfinite(clean_v).all() and np.isfinite(clean_g).all(), where
    if valid:
      if axis == "None":
        assert np.isnan(dirty_v), where
      else:
        assert np.isnan(dirty_v[i]), where
        others = np.arange(3) != i
        np.testing.assert_array_equal(dirty_v[others], clean_v[others], err_msg=where)
    else:
      np.testing.assert_array_equal(dirty_v, clean_v, err_msg=where)
      np.testing.assert_array_equal(dirty_g, clean_g, err_msg=where)
      assert dirty_g[i, j] == 0.0, where


# ------------------------------------------------------------------------------------------------
# Reproducers of an adversarial search against float64.


@pytest.mark.parametrize("q", [0.95, 0.999999, 0.9999999, 1.0 - 1e-9])
def test_cvar_weights_sum_to_one_at_any_level(q):
  """Near q = 1 the weights used q rounded to float32 in one place and the exact q in 1 - q:
  cvar([1..5], 0.999999) read 5.0531, above the maximum, with a -0.013 gradient on the minimum."""
  x = jnp.arange(1.0, 6.0)
  value, g = jax.value_and_grad(lambda v: ka.cvar(v, q))(x)
  assert 1.0 <= value <= 5.0
  assert (g >= 0).all()
  np.testing.assert_allclose(g.sum(), 1.0, rtol=1e-6)
  want = ref.cvar(np.arange(1.0, 6.0), q)
  np.testing.assert_allclose(value, want, rtol=1e-6)


def test_values_near_float32_limit_are_finite_and_correct():
  """x * x overflowed (rmse([2e19]) = inf); 1 / max is subnormal near 1e38, and a backend that
  flushes it to zero read 0.0 (power_mean, smooth_max with a huge temperature)."""
  cases = [
      (lambda v: ka.rmse(v), [2e19], 2e19),
      (lambda v: ka.rmse(v, eps=0.0), [3e38, 1e38], np.sqrt((9 + 1) / 2) * 1e38),
      (lambda v: ka.power_mean(v, 2.0), [1e38, 5e37], np.sqrt((1 + 0.25) / 2) * 1e38),
      (lambda v: ka.power_mean(v, 3.0), [3.4e38, 1.0], 3.4e38 / 2 ** (1 / 3)),
      (lambda v: ka.smooth_max(v, 1e38), [1.0, 2.0], 1.5),
      (lambda v: ka.smooth_max(v, 3e38), [-1.0, 5.0, 2.0], 2.0),
      (lambda v: ka.cvar(v, 0.5), [3e38, 1e38, 2e38, 3.3e38], 3.15e38),
  ]
  for fn, x, want in cases:
    value, g = jax.jit(jax.value_and_grad(fn))(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(value, want, rtol=1e-6)
    assert np.isfinite(g).all()


def test_an_infinite_entry_gives_inf_and_a_finite_gradient():
  x = jnp.array([1.0, jnp.inf, 2.0])
  for how in ("mean", "rmse", "max", "smooth_max", "power_mean", "cvar50"):
    assert ka.aggregate(x, how, **kwargs_for(how)) == np.inf, how
  for how in ("rmse", "smooth_max", "power_mean"):
    assert not np.isnan(jax.grad(lambda v: ka.aggregate(v, how, **kwargs_for(how)))(x)).any(), how
