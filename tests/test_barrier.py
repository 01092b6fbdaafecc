"""hinge and kl_barrier: composition, per-sequence semantics, metrics, gradients, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import klagg_jax as ka
from klagg_jax import _aggregate, _barrier
from klagg_jax import _reference as ref
from tests.conftest import DTYPES
from tests.helpers import random_logits, x64

AGGS = ("mean", "rmse", "max", "p95", "soft_p95", "cvar95", "smooth_max")


def test_hinge_kinds():
  div = jnp.array([0.2, 0.5, 1.5])
  np.testing.assert_allclose(ka.hinge(div, 0.5), [0.0, 0.0, 1.0])
  np.testing.assert_allclose(ka.hinge(div, 0.5, "squared"), [0.0, 0.0, 1.0])
  np.testing.assert_allclose(ka.hinge(div, 0.5, "softplus", sharpness=4.0),
                             np.log1p(np.exp(4.0 * (np.array([0.2, 0.5, 1.5]) - 0.5))) / 4.0,
                             rtol=1e-6)
  assert jax.grad(lambda d: ka.hinge(d, 0.5))(0.5) == 0.0  # relu's convention at the kink
  with pytest.raises(ValueError, match="Unknown hinge 'cubic'.*'relu'"):
    ka.hinge(div, 0.5, "cubic")
  with pytest.raises(ValueError, match="sharpness"):
    ka.hinge(div, 0.5, "softplus", sharpness=0.0)


def reference_barrier(a, b, mask, agg_ref, tau, lam, per_sequence=True):
  kl = ref.kl_per_position(a, b, "reverse", where=mask)
  if per_sequence:
    div = agg_ref(kl, where=mask, axis=-1)
    valid = mask.any(-1)
    return lam * np.maximum(div - tau, 0)[valid].mean(), div[valid].mean()
  div = agg_ref(kl, where=mask, axis=None)
  return lam * max(div - tau, 0.0), div


@pytest.mark.parametrize("agg, agg_ref", [
    ("rmse", ref.rmse), ("mean", ref.mean), ("max", ref.maximum),
    ("p95", lambda x, **k: ref.quantile(x, 0.95, **k)),
    ("cvar90", lambda x, **k: ref.cvar(x, 0.9, **k))])
@pytest.mark.parametrize("axis", [-1, None])
def test_matches_reference_composition(rng, agg, agg_ref, axis):
  a, b = random_logits(rng, (4, 9, 17)), random_logits(rng, (4, 9, 17))
  mask = rng.random((4, 9)) > 0.3
  mask[2] = False  # a sequence with no valid position is left out of the mean
  loss, metrics = ka.kl_barrier(a, b, where=mask, agg=agg, tau=0.8, lam=2.0, axis=axis)
  want_loss, want_div = reference_barrier(a, b, mask, agg_ref, 0.8, 2.0, axis == -1)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["div"], want_div, rtol=1e-5, atol=1e-6)


def test_metrics_are_complete_consistent_and_without_gradient(rng):
  a, b = random_logits(rng, (3, 8, 11)), random_logits(rng, (3, 8, 11))
  mask = np.ones((3, 8), bool)
  mask[1, 5:] = False
  loss, m = ka.kl_barrier(a, b, where=mask, agg="rmse", tau=0.5)
  assert set(m) == {"div", "kl_mean", "kl_rmse", "kl_p95", "kl_max", "fired", "n_positions"}
  assert all(v.dtype == jnp.float32 and v.shape == () for v in m.values())
  np.testing.assert_allclose(m["div"], m["kl_rmse"], rtol=1e-6)
  kl = ref.kl_per_position(a, b, where=mask)
  np.testing.assert_allclose(m["kl_max"], ref.maximum(kl, where=mask).mean(), rtol=1e-5)
  np.testing.assert_allclose(m["kl_p95"], ref.quantile(kl, 0.95, where=mask).mean(), rtol=1e-5)
  np.testing.assert_allclose(m["fired"], (ref.rmse(kl, where=mask) > 0.5).mean(), rtol=1e-6)
  assert m["n_positions"] == mask.sum()
  for name in m:
    g = jax.grad(lambda x: ka.kl_barrier(x, b, where=mask)[1][name])(a)
    np.testing.assert_array_equal(g, 0.0)


def test_one_looping_sequence_is_not_diluted_by_the_batch():
  rng = np.random.default_rng(0)
  base = random_logits(rng, (32, 60, 50), scale=1.0)
  student = base.copy()
  student[7, 10:14] = -10.0
  student[7, 10:14, 3] = 12.0  # one sequence loops on 4 positions
  per_seq, _ = ka.kl_barrier(student, base, agg="max", tau=0.5, axis=-1)
  token_mean, _ = ka.kl_barrier(student, base, agg="mean", tau=0.5, axis=None)
  assert token_mean == 0.0 and per_seq > 0.0


def test_reference_gradient_is_stopped_by_default(rng):
  a, b = random_logits(rng, (2, 5, 7)), random_logits(rng, (2, 5, 7))
  f = lambda x, y, stop: ka.kl_barrier(x, y, tau=0.0, stop_ref_grad=stop)[0]
  np.testing.assert_array_equal(jax.grad(f, 1)(a, b, True), 0.0)
  g = jax.grad(f, 1)(a, b, False)
  want = jax.grad(lambda y: ka.rmse(ka.kl_per_position(a, y)).mean())(b)
  np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
  assert np.abs(g).max() > 0


@pytest.mark.parametrize("agg", AGGS + ("power_mean",))
@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_gradient_at_zero_kl(rng, agg, dtype):
  """A B = 0 LoRA init: student == reference at step 0, every KL exactly 0."""
  a = jnp.asarray(random_logits(rng, (2, 6, 13)), dtype)
  kw = {"agg_kwargs": {"p": 2.0}} if agg == "power_mean" else {}
  step = jax.jit(jax.value_and_grad(
      lambda x, tau: ka.kl_barrier(x, a, agg=agg, tau=tau, hinge="softplus", **kw)[0]))
  for tau in (0.0, 0.5):  # a traced tau: one program for both
    loss, g = step(a, jnp.float32(tau))
    assert np.isfinite(float(loss))
    g = np.asarray(g, np.float32)
    assert np.isfinite(g).all()


@pytest.mark.parametrize("agg", AGGS)
def test_empty_mask_gives_zero_loss_and_zero_gradient(rng, agg):
  a, b = random_logits(rng, (2, 4, 9)), random_logits(rng, (2, 4, 9))
  a[:] = np.nan  # all padding
  mask = np.zeros((2, 4), bool)
  for axis in (-1, None):
    (loss, m), g = jax.jit(jax.value_and_grad(
        lambda x: ka.kl_barrier(x, b, where=mask, agg=agg, tau=0.0, axis=axis), has_aux=True))(a)
    assert loss == 0.0 and m["n_positions"] == 0 and m["fired"] == 0
    np.testing.assert_array_equal(g, 0.0)


def test_jit_vmap_grad_invariance(rng):
  a, b = random_logits(rng, (3, 2, 6, 9)), random_logits(rng, (3, 2, 6, 9))
  f = lambda x, y: ka.kl_barrier(x, y, agg="soft_p95", tau=0.1)[0]
  one = jax.jit(f)  # the per-example program, looped in Python
  eager = jnp.stack([one(a[i], b[i]) for i in range(3)])
  np.testing.assert_allclose(jax.vmap(f)(a, b), eager, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(jax.vmap(f))(a, b), eager, rtol=1e-5)
  g = jax.jit(jax.grad(lambda x: jax.vmap(f)(x, b).sum()))(a)
  one_grad = jax.jit(jax.grad(f))
  g_eager = jnp.stack([one_grad(a[i], b[i]) for i in range(3)])
  np.testing.assert_allclose(g, g_eager, rtol=1e-5, atol=1e-7)


def test_traced_tau_and_lam(rng):
  a, b = random_logits(rng, (2, 5, 7)), random_logits(rng, (2, 5, 7))
  f = jax.jit(lambda x, t, l: ka.kl_barrier(x, b, tau=t, lam=l)[0])
  np.testing.assert_allclose(f(a, 0.1, 3.0), ka.kl_barrier(a, b, tau=0.1, lam=3.0)[0], rtol=1e-6)


def test_agg_and_hinge_kwargs_are_forwarded(rng):
  a, b = random_logits(rng, (2, 5, 7)), random_logits(rng, (2, 5, 7))
  loss, m = ka.kl_barrier(a, b, agg="smooth_max", agg_kwargs={"temperature": 0.25}, tau=0.0)
  kl = ka.kl_per_position(a, b)
  np.testing.assert_allclose(m["div"], ka.smooth_max(kl, 0.25).mean(), rtol=1e-6)
  loss, _ = ka.kl_barrier(a, b, hinge="softplus", hinge_kwargs={"sharpness": 2.0}, tau=0.0)
  np.testing.assert_allclose(loss, ka.hinge(ka.rmse(kl), 0.0, "softplus", sharpness=2.0).mean(),
                             rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"agg": "median"}, "Unknown aggregator"),
    ({"hinge": "cubic"}, "Unknown hinge"),
    ({"axis": 0}, "axis must be -1"),
    ({"direction": "up"}, "Unknown direction"),
    ({"where": np.ones((2, 4), bool)}, "where"),
])
def test_bad_static_input_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ka.kl_barrier(jnp.zeros((2, 5, 7)), jnp.zeros((2, 5, 7)), **kwargs)


def test_logits_without_position_axis_raise():
  with pytest.raises(ValueError, match=r"\[\.\.\., T, V\]"):
    ka.kl_barrier(jnp.zeros(7), jnp.zeros(7))


# ------------------------------------------------------------------------------------------------
# Bad input (issue 13).

METRIC_AGGREGATES = ("div", "kl_mean", "kl_rmse", "kl_p95", "kl_max")


# Every aggregator's own NaN handling is tested in test_aggregate.py; here the barrier's plumbing
# (hinge, mean over sequences, metrics) around a few of them.
@pytest.mark.parametrize("agg", ["rmse", "p95", "smooth_max", "power_mean"])
@pytest.mark.parametrize("axis", [-1, None])
def test_nan_divergence_at_a_valid_position_reaches_loss_and_metrics(agg, axis):
  """The barrier's aggregation half, fed per-position values: a NaN at a valid position makes the
  loss and every aggregate metric NaN; a NaN at a masked position changes nothing and gets zero
  gradient."""
  kl = jnp.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
  mask = jnp.array([[True, True, True, False], [True, True, False, True]])
  kw = {"p": 2.0} if agg == "power_mean" else {}

  def barrier(v):
    return _barrier._from_divergence(v, mask, _aggregate.resolve(agg), tau=0.0,
                                     lam=1.0, axis=axis, hinge="relu", agg_kwargs=kw,
                                     hinge_kwargs=None)

  loss, m = barrier(kl.at[1, 0].set(jnp.nan))
  assert np.isnan(loss), agg
  for name in METRIC_AGGREGATES:
    assert np.isnan(m[name]), (agg, name)
  assert m["n_positions"] == 6
  clean_loss, clean_m = barrier(kl)
  assert np.isfinite(clean_loss)
  (loss, m), g = jax.value_and_grad(barrier, has_aux=True)(kl.at[0, 3].set(jnp.nan))
  assert loss == clean_loss and all(m[k] == clean_m[k] for k in m)
  assert g[0, 3] == 0.0 and np.isfinite(g).all()


def test_nan_logits_at_a_valid_position_give_nan_loss_and_metrics():
  """The issue's reproducer end to end: kl_barrier(s[None], r[None], agg="rmse", tau=0.0) was
  0.39 with a NaN student logit; every direction and aggregate metric must say NaN."""
  s = np.zeros((2, 4), np.float32)
  s[1, 0] = np.nan
  r = np.array([[0, 1, 2, 3]] * 2, np.float32)
  for direction in ("reverse", "forward", "js"):
    for chunk_size in (None, 1):
      loss, m = ka.kl_barrier(s[None], r[None], agg="rmse", tau=0.0, direction=direction,
                              chunk_size=chunk_size)
      assert np.isnan(loss), direction
      for name in METRIC_AGGREGATES:
        assert np.isnan(m[name]), (direction, name)
  mask = np.array([[True, False]])  # the NaN row masked: the clean value, zero gradient there
  (loss, m), g = jax.value_and_grad(
      lambda x: ka.kl_barrier(x, r[None], where=mask, tau=0.0), has_aux=True)(s[None])
  np.testing.assert_allclose(loss, ka.kl_barrier(s[None, :1], r[None, :1], tau=0.0)[0])
  np.testing.assert_array_equal(g[0, 1], 0.0)


@pytest.mark.parametrize("agg", ["rmse", "cvar95", "power_mean"])
@pytest.mark.parametrize("axis", [-1, None])
def test_empty_position_axis_gives_zero_loss_metrics_and_gradient(agg, axis):
  """[B, 0, V] logits raised numpy's "zero-size array to reduction operation max" (kl_max)."""
  a = jnp.zeros((3, 0, 7))
  kw = {"agg_kwargs": {"p": 2.0}} if agg == "power_mean" else {}
  f = lambda x: ka.kl_barrier(x, a, agg=agg, tau=0.1, axis=axis, **kw)
  (loss, m), g = jax.jit(jax.value_and_grad(f, has_aux=True))(a)
  assert loss == 0.0 and loss.dtype == jnp.float32
  assert set(m) == set(METRIC_AGGREGATES) | {"fired", "n_positions"}
  assert all(v == 0.0 for v in m.values())
  assert g.shape == (3, 0, 7)
  loss, m = f(a)  # eagerly as well
  assert loss == 0.0 and m["kl_max"] == 0.0


def test_float64_under_x64_for_loss_and_metrics(rng):
  """SPEC: a float32 scalar, float64 under x64 with float64 inputs; metrics follow the loss."""
  a, b = random_logits(rng, (3, 6, 9)), random_logits(rng, (3, 6, 9))
  mask = rng.random((3, 6)) > 0.3
  with x64():
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    loss, m = ka.kl_barrier(a64, b64, where=mask, agg="rmse", tau=0.2, lam=2.0)
    assert loss.dtype == jnp.float64
    assert all(v.dtype == jnp.float64 for v in m.values()), {k: v.dtype for k, v in m.items()}
    want_loss, want_div = reference_barrier(a64, b64, mask, ref.rmse, 0.2, 2.0)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    np.testing.assert_allclose(m["div"], want_div, rtol=1e-12)
    # float32 inputs under x64 stay float32.
    loss32, m32 = ka.kl_barrier(a, b, where=mask)
    assert loss32.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in m32.values())
    # An empty position axis keeps the dtype too.
    assert ka.kl_barrier(np.zeros((2, 0, 5)), np.zeros((2, 0, 5)))[0].dtype == jnp.float64


def test_positive_position_axis_means_per_sequence(rng):
  """axis=1 on [B, T, V] logits names the position axis: the same as axis=-1."""
  a, b = random_logits(rng, (3, 6, 9)), random_logits(rng, (3, 6, 9))
  want = ka.kl_barrier(a, b, agg="p95", tau=0.1, axis=-1)
  got = ka.kl_barrier(a, b, agg="p95", tau=0.1, axis=1)
  np.testing.assert_array_equal(got[0], want[0])
  a4, b4 = a.reshape(3, 1, 6, 9), b.reshape(3, 1, 6, 9)
  np.testing.assert_array_equal(ka.kl_barrier(a4, b4, agg="p95", tau=0.1, axis=2)[0], want[0])
  for bad in (0, 2, -2, True, 1.0):
    with pytest.raises(ValueError, match=r"axis must be -1 \(per sequence; 1, the position axis "
                                         r"of logits with shape \(3, 6, 9\)"):
      ka.kl_barrier(a, b, axis=bad)
