"""kl_estimate: k1/k2/k3 against float64 numpy, Monte Carlo means, clipping, masks, errors."""

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
from klagg_jax._estimators import VOCAB_LIKE_AXIS
from tests.conftest import DTYPES
from tests.helpers import to_f64, x64

ESTIMATORS = ("k1", "k2", "k3")


def reference(logp, ref_logp, estimator, where=None, max_log_ratio=20.0):
  """Float64 numpy, written from the formulas: d = clip(ref_logp - logp), k1 = -d, k2, k3."""
  d = to_f64(ref_logp) - to_f64(logp)
  if max_log_ratio is not None:
    d = np.clip(d, -max_log_ratio, max_log_ratio)
  out = {"k1": -d, "k2": d ** 2 / 2, "k3": np.expm1(d) - d}[estimator]
  if where is not None:
    out = np.where(where, out, 0.0)
  return out


def sampled_logprobs(rng, shape, spread=1.0):
  """Log-probs of sampled tokens: the student's, and a reference's differing by ~spread nats."""
  logp = np.log(rng.uniform(1e-4, 1.0, shape))
  ref_logp = logp + spread * rng.standard_normal(shape)
  return logp.astype(np.float32), ref_logp.astype(np.float32)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("spread", [1e-3, 1.0, 8.0])
def test_matches_float64_reference(rng, estimator, spread):
  logp, ref_logp = sampled_logprobs(rng, (4, 37), spread)
  got = ka.kl_estimate(logp, ref_logp, estimator=estimator)
  assert got.dtype == jnp.float32 and got.shape == (4, 37)
  want = reference(logp, ref_logp, estimator)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # With x64 and float64 inputs the computation is float64 throughout.
  with x64():
    got64 = ka.kl_estimate(to_f64(logp), to_f64(ref_logp), estimator=estimator)
    assert got64.dtype == jnp.float64
    # The reference's expm1(d) - d itself loses ~log2(2 / |d|) bits for small d.
    np.testing.assert_allclose(got64, want, rtol=1e-10, atol=1e-300)


def test_k3_keeps_relative_precision_near_zero():
  """expm1(d) - d cancels for small d; the series branch does not."""
  d = np.array([-0.49, -0.3, -1e-2, -1e-4, -1e-6, 1e-6, 1e-4, 1e-2, 0.3, 0.49, 0.51], np.float32)
  got = ka.kl_estimate(np.zeros_like(d), d, estimator="k3")
  want = np.expm1(to_f64(d)) - to_f64(d)
  np.testing.assert_allclose(got, want, rtol=2e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_low_precision_inputs_compute_in_float32(rng, dtype, estimator):
  logp, ref_logp = sampled_logprobs(rng, (3, 11))
  a, b = jnp.asarray(logp, dtype), jnp.asarray(ref_logp, dtype)
  got = ka.kl_estimate(a, b, estimator=estimator)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, reference(a, b, estimator), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("closeness", ["near", "far"])
def test_monte_carlo_mean_approaches_exact_kl(closeness):
  """Tokens y ~ p: mean k1 and mean k3 are unbiased for KL(p || r); k3 never goes negative
  and, for a reference near the student (the regime of a KL penalty), has the lower variance."""
  rng = np.random.default_rng(1)
  vocab, n = 40, 200_000
  lp = np.log(rng.dirichlet(np.ones(vocab)))
  if closeness == "near":  # KL ~ 0.02
    lr = lp + 0.3 * rng.standard_normal(vocab)
    lr -= np.log(np.exp(lr).sum())
  else:  # an unrelated distribution, KL ~ 1.3
    lr = np.log(rng.dirichlet(np.ones(vocab)))
  lp, lr = lp.astype(np.float32).astype(np.float64), lr.astype(np.float32).astype(np.float64)
  p = np.exp(lp)
  exact = float(np.sum(p * (lp - lr)) / p.sum())  # KL of the float32-rounded distributions
  y = rng.choice(vocab, size=n, p=p / p.sum())
  logp, ref_logp = jnp.asarray(lp[y], jnp.float32), jnp.asarray(lr[y], jnp.float32)
  estimates = {e: np.asarray(ka.kl_estimate(logp, ref_logp, estimator=e), np.float64)
               for e in ESTIMATORS}
  for e in ("k1", "k3"):
    se = estimates[e].std() / np.sqrt(n)
    assert abs(estimates[e].mean() - exact) < 4 * se, (e, estimates[e].mean(), exact, se)
  if closeness == "near":
    assert estimates["k3"].var() < 0.5 * estimates["k1"].var()
  assert (estimates["k3"] >= 0).all()
  # The aggregator sees the same number: ka.mean over the sampled tokens.
  np.testing.assert_allclose(ka.mean(ka.kl_estimate(logp, ref_logp), axis=None),
                             estimates["k3"].mean(), rtol=1e-5)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_extreme_finite_inputs_give_finite_value_and_gradient(estimator):
  logp = jnp.array([-1e4, 0.0, -1e4, -3e38, 0.0, -50.0], jnp.float32)
  ref_logp = jnp.array([0.0, -1e4, -1e4, 0.0, -3e38, -1.0], jnp.float32)
  f = lambda a, b: ka.kl_estimate(a, b, estimator=estimator).sum()
  value, (ga, gb) = jax.value_and_grad(f, (0, 1))(logp, ref_logp)
  assert np.isfinite(float(value))
  assert np.isfinite(np.asarray(ga)).all() and np.isfinite(np.asarray(gb)).all()
  # Values beyond the clip equal the estimator at the clip: log ratio +-20.
  got = ka.kl_estimate(logp, ref_logp, estimator=estimator)
  np.testing.assert_allclose(got, reference(logp, ref_logp, estimator), rtol=1e-6)


def test_clip_bounds_and_disabling_it():
  logp, ref_logp = jnp.float32(-1e4), jnp.float32(0.0)
  np.testing.assert_allclose(ka.kl_estimate(logp, ref_logp, max_log_ratio=5.0),
                             np.expm1(5.0) - 5.0, rtol=1e-6)
  # The clip zeroes the gradient beyond it; inside, the gradient is the estimator's.
  assert jax.grad(ka.kl_estimate)(logp, ref_logp) == 0.0
  np.testing.assert_allclose(jax.grad(ka.kl_estimate)(jnp.float32(-3.0), 0.0), -np.expm1(3.0),
                             rtol=1e-6)
  # None disables it: the overflow is then the user's.
  assert ka.kl_estimate(logp, ref_logp, max_log_ratio=None) == np.inf
  assert ka.kl_estimate(logp, ref_logp, estimator="k1", max_log_ratio=None) == -1e4
  # A traced bound works under jit.
  f = jax.jit(lambda m: ka.kl_estimate(logp, ref_logp, estimator="k2", max_log_ratio=m))
  np.testing.assert_allclose(f(3.0), 4.5, rtol=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("pad", [np.nan, -np.inf, np.inf])
def test_masked_padding_gives_exact_zero_and_zero_gradient(rng, estimator, pad):
  logp, ref_logp = sampled_logprobs(rng, (3, 9))
  mask = rng.random((3, 9)) > 0.4
  mask[1] = False
  logp_pad, ref_pad = logp.copy(), ref_logp.copy()
  logp_pad[~mask] = pad
  ref_pad[~mask] = pad
  f = lambda a, b: ka.kl_estimate(a, b, estimator=estimator, where=mask)
  got = f(logp_pad, ref_pad)
  np.testing.assert_array_equal(np.asarray(got)[~mask], 0.0)
  np.testing.assert_allclose(got, reference(logp, ref_logp, estimator, where=mask),
                             rtol=1e-5, atol=1e-6)
  ga, gb = jax.grad(lambda a, b: f(a, b).sum(), (0, 1))(logp_pad, ref_pad)
  for g in (ga, gb):
    g = np.asarray(g)
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(g[~mask], 0.0)
  # A mask broadcast over positions: [B, 1] masks whole sequences.
  seq_mask = mask.any(-1, keepdims=True)
  np.testing.assert_array_equal(np.asarray(ka.kl_estimate(logp, ref_logp, where=seq_mask))[1], 0.0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_identical_inputs_give_exact_zero_and_zero_gradient(rng, estimator):
  """k2 and k3 have a minimum at d = 0 (value and gradient exactly 0); k1 = logp - ref_logp has
  gradient +1 / -1 everywhere."""
  logp, _ = sampled_logprobs(rng, (2, 7))
  value, (ga, gb) = jax.value_and_grad(
      lambda a, b: ka.kl_estimate(a, b, estimator=estimator).sum(), (0, 1))(logp, logp)
  assert value == 0.0
  slope = 1.0 if estimator == "k1" else 0.0
  np.testing.assert_array_equal(ga, slope)
  np.testing.assert_array_equal(gb, -slope)


def test_jit_and_vmap_match_eager(rng):
  logp, ref_logp = sampled_logprobs(rng, (4, 3, 10), spread=2.0)
  mask = rng.random((4, 3, 10)) > 0.2
  f = lambda a, b, m: ka.kl_estimate(a, b, where=m)
  eager = f(logp, ref_logp, mask)
  np.testing.assert_allclose(jax.jit(f)(logp, ref_logp, mask), eager, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(jax.vmap(f)(logp, ref_logp, mask), eager, rtol=1e-6, atol=1e-7)
  g = jax.jit(jax.grad(lambda a: jax.vmap(f)(a, ref_logp, mask).sum()))(logp)
  g_eager = jax.grad(lambda a: f(a, ref_logp, mask).sum())(logp)
  np.testing.assert_allclose(g, g_eager, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_check_grads_float64(estimator):
  rng = np.random.default_rng(3)
  with x64():
    logp = np.log(rng.uniform(0.05, 1.0, (3, 8)))
    # Log ratios on both sides of the series switch at |d| = 0.5, inside the clip.
    ref_logp = logp + rng.choice([-1, 1], (3, 8)) * rng.uniform(0.01, 3.0, (3, 8))
    mask = np.ones((3, 8), bool)
    mask[0, :3] = False
    f = lambda a, b: ka.kl_estimate(a, b, estimator=estimator, where=mask)
    check_grads(f, (logp, ref_logp), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("kwargs, match", [
    ({"estimator": "k4"}, r"Unknown estimator 'k4'; expected one of 'k1', 'k2', 'k3'"),
    ({"max_log_ratio": 0.0}, "max_log_ratio must be > 0; got 0.0"),
    ({"max_log_ratio": -1.0}, "max_log_ratio must be > 0"),
    ({"where": np.ones((3,), bool)}, "where has shape"),
])
def test_bad_static_input_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ka.kl_estimate(jnp.zeros((2, 4)), jnp.zeros((2, 4)), **kwargs)


def test_shape_mismatch_names_both_shapes():
  with pytest.raises(ValueError, match=r"logp has shape \(2, 4\) and ref_logp has shape \(2, 5\)"):
    ka.kl_estimate(jnp.zeros((2, 4)), jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match="floating"):
    ka.kl_estimate(jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 4)))


# ------------------------------------------------------------------------------------------------
# Bad input (issue 13).


@functools.lru_cache(maxsize=None)
def nan_probe():
  """One jitted program for the NaN property: every estimator, dtype and clip, for a clean and a
  dirty copy of the inputs at once (vmapped), so hypothesis examples never recompile."""

  def one(a, b, mask, estimator, dtype, clip):
    f = lambda a, b: ka.kl_estimate(a, b, estimator=estimator, where=mask, max_log_ratio=clip)
    a, b = a.astype(dtype), b.astype(dtype)
    value = f(a, b)
    ga, gb = jax.grad(lambda a, b: f(a, b).sum(), (0, 1))(a, b)
    return value, ga.astype(jnp.float32), gb.astype(jnp.float32)

  def probe(a, b, mask):  # a, b: [2, R, N] (clean, dirty)
    return {(est, dtype, str(clip)): jax.vmap(lambda a, b: one(a, b, mask, est, dtype, clip))(a, b)
            for est in ESTIMATORS for dtype in DTYPES for clip in (20.0, None)}

  return jax.jit(probe)


# Log ratios up to 8 nats: k3's gradient e^d - 1 then fits in float16 (e^12 would not).
logprob_values = hnp.arrays(np.float32, (3, 6), elements=st.floats(-8, 0, width=32))


@settings(max_examples=200, deadline=None)
@given(logprob_values, logprob_values, hnp.arrays(np.bool_, (3, 6)), st.integers(0, 2),
       st.integers(0, 5), st.booleans(), st.sampled_from(["logp", "ref_logp", "both"]))
def test_property_nan_valid_is_nan_and_nan_masked_is_invisible(logp, ref_logp, mask, i, j, valid,
                                                               which):
  """k1 / k2 / k3, f32 / bf16 / f16, clipped or not: a NaN log-prob at a valid position gives NaN
  there and leaves every other position alone; at a masked position the output is exactly the
  clean one (0 there) with exactly zero gradient into both arguments."""
  mask = mask.copy()
  mask[i, j] = valid
  dirty_a, dirty_b = logp.copy(), ref_logp.copy()
  if which in ("logp", "both"):
    dirty_a[i, j] = np.nan
  if which in ("ref_logp", "both"):
    dirty_b[i, j] = np.nan
  out = jax.device_get(nan_probe()(np.stack([logp, dirty_a]), np.stack([ref_logp, dirty_b]), mask))
  others = np.ones((3, 6), bool)
  others[i, j] = False
  for key, (value, ga, gb) in out.items():
    where = f"{key} NaN in {which}"
    assert np.isfinite(value[0]).all() and np.isfinite(ga[0]).all() and np.isfinite(gb[0]).all()
    np.testing.assert_array_equal(value[1][others], value[0][others], err_msg=where)
    if valid:
      assert np.isnan(value[1][i, j]), where
    else:
      assert value[1][i, j] == 0.0, where
      for g in (ga, gb):
        np.testing.assert_array_equal(g[1], g[0], err_msg=where)
        assert g[1][i, j] == 0.0, where


def test_full_vocabulary_logprobs_are_refused():
  """[B, T, V] log-probs where [B, T] was meant (the issue's misuse) raise, saying what to do."""
  lp = jnp.zeros((2, 3, 32000))
  with pytest.raises(ValueError, match=r"\(2, 3, 32000\).*full-vocabulary.*take_along_axis"):
    ka.kl_estimate(lp, lp)
  with pytest.raises(ValueError, match="reshape to 2-D"):
    jax.jit(ka.kl_estimate)(lp, lp)
  edge = jnp.zeros((1, 1, VOCAB_LIKE_AXIS))
  with pytest.raises(ValueError, match="full-vocabulary"):
    ka.kl_estimate(edge, edge)


@pytest.mark.parametrize("shape", [(7,), (4, 40000), (2, 3, 5), (2, 3, VOCAB_LIKE_AXIS - 1),
                                   (2, 2, 2, 7)])
def test_per_token_inputs_of_any_rank_pass_the_vocabulary_guard(shape):
  """[T], a long [B, T], and rank >= 3 with a short last axis are legitimate per-token layouts."""
  lp = jnp.full(shape, -1.0)
  assert ka.kl_estimate(lp, lp).shape == shape
  # A rank-3 layout with a long position axis passes once reshaped, as the error says.
  long = jnp.full((2, 2, 20000), -1.0)
  assert ka.kl_estimate(long.reshape(4, 20000), long.reshape(4, 20000)).shape == (4, 20000)


@pytest.mark.parametrize("mask_dtype", [jnp.int32, jnp.float32, jnp.uint8])
def test_non_bool_mask_error_suggests_astype_bool(mask_dtype):
  with pytest.raises(ValueError, match=r"where must be a boolean array.*\.astype\(bool\)"):
    ka.kl_estimate(jnp.zeros((2, 4)), jnp.zeros((2, 4)), where=jnp.ones((2, 4), mask_dtype))


def test_k3_of_an_infinite_log_ratio_is_inf_not_nan():
  """Unclipped, a -inf student log-prob gives d = +inf: e^d - d - 1 was inf - inf = NaN."""
  logp = jnp.array([-jnp.inf, -1.0, -1.0], jnp.float32)
  ref_logp = jnp.array([-1.0, -jnp.inf, -1.0], jnp.float32)
  got = ka.kl_estimate(logp, ref_logp, max_log_ratio=None)
  np.testing.assert_array_equal(got, [np.inf, np.inf, 0.0])
  g = jax.grad(lambda a: ka.kl_estimate(a, ref_logp, max_log_ratio=None)[2])(logp)
  np.testing.assert_array_equal(g, 0.0)  # the other positions' gradients stay clean
  assert np.isnan(ka.kl_estimate(jnp.float32(jnp.nan), jnp.float32(-1.0), max_log_ratio=None))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("max_log_ratio", [20.0, None])
def test_both_logprobs_minus_inf_give_zero_with_zero_gradient(estimator, max_log_ratio):
  """A token of probability 0 under both models: log ratio 0 (0 log 0 = 0), not -inf - -inf."""
  logp = jnp.array([-jnp.inf, -1.0], jnp.float32)
  ref_logp = jnp.array([-jnp.inf, -1.5], jnp.float32)
  f = lambda a, b: ka.kl_estimate(a, b, estimator=estimator, max_log_ratio=max_log_ratio)
  got = f(logp, ref_logp)
  assert got[0] == 0.0 and np.isfinite(got[1])
  ga, gb = jax.grad(lambda a, b: f(a, b)[0], argnums=(0, 1))(logp, ref_logp)
  np.testing.assert_array_equal(ga, 0.0)
  np.testing.assert_array_equal(gb, 0.0)
  # One side alone at -inf still gives the clipped (or infinite) ratio, never 0.
  one = f(jnp.array([-1.0]), jnp.array([-jnp.inf]))
  assert one[0] != 0.0 and not np.isnan(one[0])
