"""calibrate_tau, separation and grad_pressure against independent numpy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import klagg_jax as ka
from klagg_jax import _reference as ref
from klagg_jax import diag
from tests.helpers import random_logits

REF_AGGS = {
    "mean": ref.mean,
    "rmse": ref.rmse,
    "max": ref.maximum,
    "p95": functools.partial(ref.quantile, q=0.95),
    "cvar90": functools.partial(ref.cvar, q=0.9),
}


def good_kl(rng, shape=(40, 17)):
  """Per-position KL-like values: mostly small, a few heavy-tailed positions."""
  return (0.05 * rng.standard_exponential(shape) ** 2).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# calibrate_tau


@pytest.mark.parametrize("agg", REF_AGGS)
@pytest.mark.parametrize("fire_rate", [0.05, 0.2])
def test_calibrate_tau_is_the_quantile_of_per_sequence_aggregates(rng, agg, fire_rate):
  kl = good_kl(rng)
  mask = rng.random(kl.shape) > 0.3
  mask[3] = False  # a sequence without valid positions is left out
  kl[~mask] = np.nan  # padding never reaches the result
  tau = ka.calibrate_tau(kl, agg=agg, where=mask, fire_rate=fire_rate)
  per_seq = REF_AGGS[agg](np.where(mask, kl, 0.0), where=mask, axis=-1)
  want = np.percentile(np.delete(per_seq, 3), 100 * (1 - fire_rate))
  assert tau.dtype == jnp.float32 and tau.shape == ()
  np.testing.assert_allclose(tau, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("agg", ["rmse", "p95", "max", "mean"])
def test_barrier_fires_on_fire_rate_of_the_calibration_sequences(agg):
  rng = np.random.default_rng(5)
  base = random_logits(rng, (200, 12, 8), scale=1.0)
  student = base + random_logits(rng, (200, 12, 8), scale=0.3)
  mask = np.ones((200, 12), bool)
  mask[:, :3] = False  # prompt positions
  kl = ka.kl_per_position(student, base, where=mask)
  tau = ka.calibrate_tau(kl, agg=agg, where=mask, fire_rate=0.05)
  _, metrics = ka.kl_barrier(student, base, where=mask, agg=agg, tau=tau)
  # n = 200: h = 0.95 * 199 = 189.05, so 199 - 189 = 10 sequences lie above tau.
  np.testing.assert_allclose(metrics["fired"], 10 / 200)
  _, metrics = ka.kl_barrier(student, base, where=mask, agg=agg,
                             tau=ka.calibrate_tau(kl, agg=agg, where=mask, fire_rate=0.25))
  assert abs(float(metrics["fired"]) - 0.25) <= 1 / 200


def test_calibrate_tau_scale_differs_per_aggregator(rng):
  kl = good_kl(rng)
  taus = {agg: float(ka.calibrate_tau(kl, agg=agg)) for agg in ("mean", "rmse", "p95", "max")}
  assert taus["mean"] < taus["rmse"] < taus["p95"] < taus["max"]


def test_calibrate_tau_forwards_agg_kwargs_and_works_under_jit(rng):
  kl = good_kl(rng)
  tau = jax.jit(lambda x: ka.calibrate_tau(x, agg="smooth_max", temperature=0.1))(kl)
  want = np.percentile(ref.smooth_max(kl, temperature=0.1), 95)
  np.testing.assert_allclose(tau, want, rtol=1e-5)
  assert ka.calibrate_tau(kl, agg="rmse", where=np.zeros(kl.shape, bool)) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"fire_rate": 0.0}, r"fire_rate must lie in the open interval \(0, 1\); got 0.0"),
    ({"fire_rate": 1.0}, "fire_rate must lie in the open interval"),
    ({"fire_rate": 1.5}, "fire_rate"),
    ({"agg": "median"}, "Unknown aggregator 'median'"),
    ({"where": np.ones((3, 2), bool)}, "where has shape"),
])
def test_calibrate_tau_bad_static_input_raises(kwargs, match):
  kwargs = {"agg": "rmse", **kwargs}
  with pytest.raises(ValueError, match=match):
    ka.calibrate_tau(jnp.zeros((4, 5)), **kwargs)


def test_calibrate_tau_needs_a_position_axis():
  with pytest.raises(ValueError, match="position axis"):
    ka.calibrate_tau(jnp.float32(1.0), agg="rmse")


# ------------------------------------------------------------------------------------------------
# separation


def test_separation_reproduces_the_seed_table():
  kl = diag.per_position_kl()
  sep = ka.separation(kl["coherent trait"], kl["incoherent loop"])
  assert list(sep) == ["mean", "rmse", "p95", "max", "soft_p95", "cvar95"]
  ratios = {name: round(sep[name]["ratio"], 1) for name in ("mean", "rmse", "p95", "max")}
  assert ratios == {"mean": 20.6, "rmse": 57.7, "p95": 77.0, "max": 85.4}
  loop = {name: round(sep[name]["b"], 3) for name in ("mean", "rmse", "p95", "max")}
  assert loop == {"mean": 0.379, "rmse": 1.527, "p95": 3.777, "max": 8.081}
  rows = diag.table(kl)  # the diag CLI's table agrees column by column
  for name in sep:
    assert sep[name]["a"] == pytest.approx(rows["coherent trait"][name], rel=1e-6)
    assert sep[name]["ratio"] == pytest.approx(rows["sep ratio (loop/trait)"][name], rel=1e-6)
  assert all(isinstance(v, float) for row in sep.values() for v in row.values())


@pytest.mark.parametrize("axis", [None, -1])
def test_separation_matches_reference(rng, axis):
  kl_a, kl_b = good_kl(rng, (6, 20)), 3.0 * good_kl(rng, (9, 14))
  where_a, where_b = rng.random(kl_a.shape) > 0.2, rng.random(kl_b.shape) > 0.2
  where_b[4] = False  # an empty sequence is left out of the per-sequence average
  sep = ka.separation(kl_a, kl_b, aggs=list(REF_AGGS), where_a=where_a, where_b=where_b, axis=axis)

  def want(f, kl, where):
    if axis is None:
      return float(f(kl, where=where, axis=None))
    per_seq = f(kl, where=where, axis=-1)
    return float(per_seq[where.any(-1)].mean())

  for name, f in REF_AGGS.items():
    a, b = want(f, kl_a, where_a), want(f, kl_b, where_b)
    assert sep[name]["a"] == pytest.approx(a, rel=1e-5)
    assert sep[name]["b"] == pytest.approx(b, rel=1e-5)
    assert sep[name]["ratio"] == pytest.approx(b / a, rel=1e-5)


def test_separation_labels_callables_and_mappings(rng):
  kl_a, kl_b = good_kl(rng, (20,)), good_kl(rng, (30,))
  smooth = functools.partial(ka.smooth_max, temperature=0.5)
  sep = ka.separation(kl_a, kl_b, aggs={"sm0.5": smooth, "p99": "p99"})
  assert list(sep) == ["sm0.5", "p99"]
  assert sep["sm0.5"]["b"] == pytest.approx(float(ref.smooth_max(kl_b, 0.5)), rel=1e-5)
  sep = ka.separation(kl_a, kl_b, aggs=(ka.rmse, "mean"))
  assert list(sep) == ["rmse", "mean"]
  assert list(ka.separation(kl_a, kl_b, aggs="max")) == ["max"]


def test_separation_zero_denominator_convention():
  zeros, ones = np.zeros(5, np.float32), np.ones(5, np.float32)
  assert ka.separation(zeros, ones, aggs=("mean",))["mean"]["ratio"] == np.inf
  assert ka.separation(zeros, zeros, aggs=("mean",))["mean"]["ratio"] == 0.0


def test_separation_bad_input_raises():
  with pytest.raises(ValueError, match="axis must be None"):
    ka.separation(np.ones((2, 3)), np.ones((2, 3)), axis=0)
  with pytest.raises(ValueError, match="Unknown aggregator"):
    ka.separation(np.ones(3), np.ones(3), aggs=("median",))


# ------------------------------------------------------------------------------------------------
# grad_pressure


def quadratic_losses():
  """Two losses of a dict of params with gradients known in closed form."""
  c = {"w": np.array([[1.0, -2.0], [0.5, 3.0]], np.float32), "b": np.array([4.0, 0.0], np.float32)}

  def loss_a(p, scale):  # grad = scale * c * p (elementwise), per leaf
    return 0.5 * scale * sum(jnp.sum(c[k] * p[k] ** 2) for k in p)

  def loss_b(p, scale):  # grad = 1 everywhere
    return sum(jnp.sum(p[k]) for k in p)

  return c, loss_a, loss_b


def test_grad_pressure_matches_closed_form_and_optax():
  c, loss_a, loss_b = quadratic_losses()
  params = {"w": np.array([[1.0, 2.0], [-1.0, 0.5]], np.float32),
            "b": np.array([0.5, 7.0], np.float32)}
  got = ka.grad_pressure(loss_a, loss_b, params, 3.0)
  grad_a = np.concatenate([(3.0 * c[k] * params[k]).ravel() for k in ("w", "b")]).astype(np.float64)
  want = np.linalg.norm(grad_a) / np.sqrt(6.0)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(got, want, rtol=1e-6)
  via_optax = (optax.global_norm(jax.grad(loss_a)(params, 3.0))
               / optax.global_norm(jax.grad(loss_b)(params, 3.0)))
  np.testing.assert_allclose(got, via_optax, rtol=1e-6)
  jitted = jax.jit(lambda p, s: ka.grad_pressure(loss_a, loss_b, p, s))
  np.testing.assert_allclose(jitted(params, 3.0), want, rtol=1e-6)


def test_grad_pressure_zero_denominator_convention():
  params = {"w": jnp.ones(3)}
  inert = lambda p: 0.0 * jnp.sum(p["w"])
  active = lambda p: jnp.sum(p["w"] ** 2)
  assert ka.grad_pressure(active, inert, params) == np.inf
  assert ka.grad_pressure(inert, inert, params) == 0.0
  assert ka.grad_pressure(inert, active, params) == 0.0


def test_grad_pressure_scales_tiny_and_huge_gradients():
  params = {"w": jnp.ones(4), "v": jnp.ones((2, 2))}
  for s in (1e-30, 1e30):
    loss_a = lambda p, s=s: s * (jnp.sum(p["w"]) + jnp.sum(p["v"]))  # ||g|| = sqrt(8) s
    loss_b = lambda p, s=s: 0.5 * s * jnp.sum(p["w"])  # ||g|| = s
    np.testing.assert_allclose(ka.grad_pressure(loss_a, loss_b, params), np.sqrt(8.0), rtol=1e-6)


def test_grad_pressure_of_a_barrier_against_an_nll(rng):
  """The intended use: barrier vs SFT loss on a linear head, against a plain two-grad path."""
  hidden = jnp.asarray(rng.standard_normal((2, 5, 4)), jnp.float32)
  ref_logits = jnp.asarray(random_logits(rng, (2, 5, 6)))
  targets = jnp.asarray(rng.integers(0, 6, (2, 5)))
  params = {"kernel": jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)}

  def barrier(p, h):
    return ka.kl_barrier(h @ p["kernel"], ref_logits, agg="max", tau=0.1)[0]

  def nll(p, h):
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["kernel"], targets).mean()

  # Under jit, as in a train step (eagerly the first call compiles every primitive apart).
  got = jax.jit(lambda p, h: ka.grad_pressure(barrier, nll, p, h))(params, hidden)
  norm = lambda g: np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree_util.tree_leaves(g)))
  grads = jax.jit(lambda p, h: (jax.grad(barrier)(p, h), jax.grad(nll)(p, h)))(params, hidden)
  want = norm(grads[0]) / norm(grads[1])
  assert want > 0
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_grad_pressure_ignores_integer_leaves():
  params = {"w": jnp.ones(3), "count": jnp.int32(2)}
  loss_a = lambda p: p["count"] * jnp.sum(p["w"] ** 2)  # grad 2 * count * w: norm 4 sqrt(3)
  loss_b = lambda p: jnp.sum(p["w"])  # norm sqrt(3)
  np.testing.assert_allclose(ka.grad_pressure(loss_a, loss_b, params), 4.0, rtol=1e-6)


def test_grad_pressure_needs_scalar_losses():
  with pytest.raises(ValueError, match=r"loss_b must return a scalar; got shape \(3,\)"):
    ka.grad_pressure(lambda p: p.sum(), lambda p: p * 2, jnp.ones(3))


def test_separation_under_jit_raises_a_clear_error():
  """It returns Python floats: under jit it raised a raw ConcretizationTypeError."""
  kl = jnp.ones((2, 3))
  for transform in (jax.jit, jax.vmap):
    with pytest.raises(ValueError, match=r"separation returns Python floats.*traced kl_a"
                                         r".*ka\.aggregate"):
      transform(lambda a, b: ka.separation(a, b))(kl, kl)
  with pytest.raises(ValueError, match="traced where_b"):
    jax.jit(lambda m: ka.separation(kl, kl, where_b=m))(jnp.ones((2, 3), bool))


def test_separation_positive_last_axis_means_per_sequence(rng):
  kl_a, kl_b = rng.random((3, 8)), rng.random((4, 8)) * 3
  np.testing.assert_equal(ka.separation(kl_a, kl_b, axis=1), ka.separation(kl_a, kl_b, axis=-1))
  with pytest.raises(ValueError, match=r"axis must be None.*1, the last axis of kl"):
    ka.separation(kl_a, kl_b, axis=0)


def test_grad_pressure_of_a_nan_gradient_is_nan_not_inert():
  """The norm's scale test was ``top > 0``, which NaN fails: a NaN gradient read as 0 (inert)."""
  params = {"w": jnp.ones(3)}
  nan_loss = lambda p: jnp.sum(p["w"] * jnp.array([1.0, jnp.nan, 2.0]))
  fine = lambda p: jnp.sum(p["w"] ** 2)
  assert np.isnan(ka.grad_pressure(nan_loss, fine, params))
  assert np.isnan(ka.grad_pressure(fine, nan_loss, params))


def test_separation_ratio_of_a_nan_is_nan():
  """x / 0 = inf tested ``x > 0``: a NaN aggregate over a zero one gave a ratio of 0."""
  got = ka.separation(np.zeros(4), np.array([1.0, np.nan, 0.0, 2.0]), aggs=("mean", "rmse", "p95"))
  for row in got.values():
    assert np.isnan(row["b"]) and np.isnan(row["ratio"]), got


def test_grad_pressure_near_float32_limit_and_with_an_infinite_entry():
  """1e38 gradients: 1 / max is subnormal, and a backend that flushes it read 0 pressure.
  An infinite gradient entry: the batched backward pass made it 0 * inf = NaN."""
  w = jnp.ones(3)
  big = lambda s: (lambda p: s * jnp.sum(p))  # ||g|| = sqrt(3) s
  np.testing.assert_allclose(ka.grad_pressure(big(1e38), big(2e37), w), 5.0, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(lambda p: ka.grad_pressure(big(1.5e38), big(1.0), p))(w),
                             1.5e38, rtol=1e-6)
  inf_entry = lambda p: jnp.sum(p * jnp.array([jnp.inf, 1.0, 1.0]))
  assert ka.grad_pressure(inf_entry, big(1.0), w) == np.inf
  assert ka.grad_pressure(big(1.0), inf_entry, w) == 0.0
  nan_entry = lambda p: jnp.sum(p * jnp.array([jnp.nan, 1.0, 1.0]))
  assert np.isnan(ka.grad_pressure(nan_entry, big(1.0), w))


def test_separation_refuses_arrays_that_span_processes():
  class GlobalArray:  # a stand-in: one process cannot build an array sharded over two
    is_fully_addressable = False

  for kw in ({"kl_a": GlobalArray(), "kl_b": jnp.ones(3)},
             {"kl_a": jnp.ones(3), "kl_b": jnp.ones(3), "segment_ids_b": GlobalArray()}):
    with pytest.raises(ValueError, match="spans several processes.*process_allgather"):
      ka.separation(**kw)
