"""kl_per_position against float64 numpy, its gradients, its conventions and its errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import klagg_jax as ka
from klagg_jax import _reference as ref
from klagg_jax._ops import compiled
from klagg_jax._ops.divergence.api import IMPLEMENTATIONS
from klagg_jax._ops.divergence import pallas_tiles
from tests.helpers import FORWARD_MODE, impl_cases, plain64, random_logits, refuses, to_f64, x64

DIRECTIONS = ("reverse", "forward", "js")
DTYPES_ALL = ("float32", "bfloat16", "float16")
SHAPE = (2, 3, 33)  # 6 rows; 33 entries: five 8-entry Pallas tiles, the last ragged
IMPLS = sorted(IMPLEMENTATIONS)


@pytest.fixture(autouse=True)
def small_pallas_tiles(monkeypatch):
  """Pallas' interpreter with 4-row, 8-entry tiles: every case spans several vocabulary tiles."""
  monkeypatch.setattr(pallas_tiles, "INTERPRET_DEFAULT", pallas_tiles.Tiles(rows=4, vocab=8))


def vg64(f, *args, argnums=(0, 1)):
  """Value and gradient of ``f`` in float64 (the truth for gradients), as numpy."""
  with x64():
    value, grads = jax.value_and_grad(f, argnums)(*(np.float64(x) for x in args))
    return np.asarray(value), [np.asarray(g) for g in grads]


def refused(impl, feature, call):
  """True (after checking it raises NotImplementedError) where ``impl`` lacks ``feature``."""
  if not refuses("divergence", impl, feature):
    return False
  with pytest.raises(NotImplementedError):
    call()
  return True


@pytest.mark.parametrize("impl, chunk_size", impl_cases(IMPLS, 1, 4, 100))
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_matches_float64_reference(rng, impl, chunk_size, direction):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  got = ka.kl_per_position(a, b, direction=direction, temperature=0.7, chunk_size=chunk_size,
                           implementation=impl)
  want = ref.kl_per_position(a, b, direction, temperature=0.7)
  assert got.dtype == jnp.float32 and got.shape == SHAPE[:-1]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_js_beta_and_its_endpoints(rng, impl):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  f = lambda **kw: ka.kl_per_position(a, b, implementation=impl, **kw)
  for beta in (0.0, 0.1, 1.0):  # 0.9 and 0.5 in the tests of extreme beta
    got = f(direction="js", beta=beta)
    np.testing.assert_allclose(got, ref.kl_per_position(a, b, "js", beta=beta), rtol=1e-5,
                               atol=1e-6)
  # The endpoints are exactly KL(ref || student) and KL(student || ref), as TRL defines them.
  np.testing.assert_array_equal(f(direction="js", beta=0.0), f(direction="forward"))
  np.testing.assert_array_equal(f(direction="js", beta=1.0), f(direction="reverse"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_inputs_compute_in_float32(rng, impl, dtype):
  a = jnp.asarray(random_logits(rng, SHAPE), dtype)
  b = jnp.asarray(random_logits(rng, SHAPE), dtype)
  for direction in DIRECTIONS:
    got = ka.kl_per_position(a, b, direction=direction, implementation=impl)
    assert got.dtype == jnp.float32
    # Exact float64 truth of the rounded inputs: only float32 arithmetic error remains.
    np.testing.assert_allclose(got, ref.kl_per_position(to_f64(a), to_f64(b), direction),
                               rtol=1e-5, atol=1e-6)
  if dtype == "float16":  # the gradient once per implementation
    return
  g = jax.grad(lambda x: ka.kl_per_position(x, b, direction="js", implementation=impl).sum())(a)
  _, (want, _) = vg64(lambda x, y: plain64(x, y, "js").sum(), to_f64(a), to_f64(b))
  assert g.dtype == a.dtype
  np.testing.assert_allclose(to_f64(g), want, rtol=1e-2, atol=1e-3)  # rounded to 16 bits


@pytest.mark.parametrize("impl", IMPLS)
def test_log_probabilities_are_valid_inputs(rng, impl):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  la, lb = jax.nn.log_softmax(a), jax.nn.log_softmax(b)
  for d in DIRECTIONS:
    np.testing.assert_allclose(ka.kl_per_position(la, lb, direction=d, implementation=impl),
                               ref.kl_per_position(a, b, d), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_check_grads_float64(impl, direction):
  rng = np.random.default_rng(1)
  with x64():
    a, b = rng.standard_normal((2, 3, 9)), rng.standard_normal((2, 3, 9))
    f = lambda x, y: ka.kl_per_position(x, y, direction=direction, beta=0.3, chunk_size=2,
                                        implementation=impl)
    if refused(impl, "float64", lambda: f(a, b)):
      return
    assert f(a, b).dtype == jnp.float64
    # Second order once, through a custom VJP's backward pass (js composes both KLs' terms);
    # a plain composition's second order is JAX's own autodiff.
    order = 2 if direction == "js" and impl not in FORWARD_MODE else 1
    check_grads(f, (a, b), order=order, modes=["rev"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_traced_temperature_is_differentiable(rng, impl):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  f = lambda t: ka.kl_per_position(a, b, temperature=t, implementation=impl).sum()
  want, (g,) = vg64(lambda t: plain64(a / t, b / t, "reverse").sum(), 1.3, argnums=(0,))
  np.testing.assert_allclose(jax.jit(f)(1.3), want, rtol=1e-5)
  np.testing.assert_allclose(jax.grad(f)(1.3), g, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_identical_inputs_give_exact_zero_and_zero_gradient(rng, impl, direction):
  a = random_logits(rng, SHAPE, scale=5.0)
  value, grads = jax.value_and_grad(
      lambda x, y: ka.kl_per_position(x, y, direction=direction, beta=0.3,
                                      implementation=impl).sum(), (0, 1))(a, a)
  assert value == 0.0
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("impl, chunk_size", impl_cases(IMPLS, 4))
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_masked_positions_are_exact_zero_even_with_garbage(rng, impl, chunk_size, direction):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  mask = rng.random(SHAPE[:-1]) > 0.4
  a[~mask] = np.nan
  b[~mask] = -np.inf
  a[0, 0, 0] = np.inf if not mask[0, 0] else a[0, 0, 0]
  f = lambda x, y: ka.kl_per_position(x, y, direction=direction, where=mask,
                                      chunk_size=chunk_size, implementation=impl)
  value = f(a, b)
  np.testing.assert_array_equal(np.asarray(value)[~mask], 0.0)
  a_clean = np.where(mask[..., None], a, 0.0)
  b_clean = np.where(mask[..., None], b, 0.0)
  np.testing.assert_allclose(value, ref.kl_per_position(a_clean, b_clean, direction, where=mask),
                             rtol=1e-5, atol=1e-6)
  ga, gb = jax.grad(lambda x, y: f(x, y).sum(), (0, 1))(a, b)
  for g in (ga, gb):
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(np.asarray(g)[~mask], 0.0)


@pytest.mark.parametrize("impl, chunk_size", impl_cases(IMPLS, 5))
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_negative_infinite_vocabulary_entries(rng, impl, chunk_size, direction):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  banned_cols = rng.random(SHAPE[-1]) < 0.3
  banned_cols[0] = False
  banned = np.broadcast_to(banned_cols, SHAPE)
  a[banned], b[banned] = -np.inf, -np.inf
  f = lambda x, y: ka.kl_per_position(x, y, direction=direction, chunk_size=chunk_size,
                                      implementation=impl)
  value = f(a, b)
  np.testing.assert_allclose(value, ref.kl_per_position(a, b, direction), rtol=1e-5, atol=1e-6)
  ga, gb = jax.grad(lambda x, y: f(x, y).sum(), (0, 1))(a, b)
  assert np.isfinite(ga).all() and np.isfinite(gb).all()
  np.testing.assert_array_equal(np.asarray(ga)[banned], 0.0)
  np.testing.assert_array_equal(np.asarray(gb)[banned], 0.0)
  # Finite entries agree with float64 autodiff over the vocabulary without the banned entries.
  keep = ~banned_cols
  _, want = vg64(lambda x, y: plain64(x, y, direction).sum(), a[..., keep], b[..., keep])
  np.testing.assert_allclose(np.asarray(ga)[..., keep], want[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gb)[..., keep], want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_underflowing_entries_give_no_nan_in_js(impl):
  a = jnp.array([[0.0, -200.0, -200.0], [0.0, -120.0, 3.0]])
  b = jnp.array([[0.0, -210.0, -190.0], [1.0, -130.0, -2.0]])
  f = lambda x, y: ka.kl_per_position(x, y, direction="js", implementation=impl)
  value, grads = jax.value_and_grad(lambda x, y: f(x, y).sum(), (0, 1))(a, b)
  assert np.isfinite(value)
  assert all(np.isfinite(g).all() for g in grads)
  np.testing.assert_allclose(f(a, b), ref.kl_per_position(a, b, "js"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_jit_and_vmap_invariance(rng, impl):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  f = lambda x, y: ka.kl_per_position(x, y, chunk_size=2, implementation=impl)
  eager = f(a, b)
  np.testing.assert_allclose(eager, ref.kl_per_position(a, b), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jit(f)(a, b), eager, rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(f)(a, b), eager, rtol=1e-6, atol=1e-7)
  g1 = jax.grad(lambda x: f(x, b).sum())(a)
  g2 = jax.vmap(jax.grad(lambda x, y: f(x, y).sum()))(a, b)
  np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_traced_temperature_gradient_ignores_padding_and_banned_entries(rng, impl):
  """d/dT sees only valid rows and finite entries: as if the garbage were not there at all."""
  a, b = random_logits(rng, (4, 9)), random_logits(rng, (4, 9))
  valid = np.array([True, False, True, True])
  a_bad = a.copy()
  a_bad[1] = np.nan
  a_bad[:, 2], b[:, 2] = -np.inf, -np.inf  # banned on both sides: the same as absent
  keep = [0, 1, 3, 4, 5, 6, 7, 8]
  f = lambda t: ka.kl_per_position(a_bad, b, direction="js", where=valid, temperature=t,
                                   implementation=impl).sum()
  _, (want,) = vg64(lambda t: plain64(a[valid][:, keep] / t, b[valid][:, keep] / t, "js").sum(),
                    1.3, argnums=(0,))
  np.testing.assert_allclose(jax.grad(f)(1.3), want, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_rows_with_no_mass(impl, direction):
  """An all -inf student row diverges by 0; an all -inf reference row where the student has
  mass gives +inf (forward/reverse) or the finite js; never NaN, in value or gradient."""
  none, flat = np.full(4, -np.inf, np.float32), np.zeros(4, np.float32)
  x, y = np.stack([none, none, flat]), np.stack([none, flat, none])  # one program for all three
  f = lambda x: ka.kl_per_position(x, y, direction=direction, implementation=impl)
  value, grad = jax.value_and_grad(lambda x: (f(x)[0], f(x)), has_aux=True)(x)
  both_empty, student_empty, ref_empty = value[1]
  assert both_empty == 0.0
  assert np.all(np.asarray(grad)[0] == 0.0)
  if direction == "js":  # m = beta r (or (1 - beta) p): KL(r || m) = -log beta, weighted by beta
    np.testing.assert_allclose([student_empty, ref_empty], [0.5 * np.log(2)] * 2, rtol=1e-6)
  else:
    empty_side = {"reverse": (0.0, np.inf), "forward": (np.inf, 0.0)}[direction]
    assert (float(student_empty), float(ref_empty)) == empty_side


@pytest.mark.parametrize("impl", IMPLS)
def test_js_near_its_endpoints_is_accurate_with_banned_entries(impl):
  """1 - beta rounds to 1 in float32 at beta = 1e-9; the mixture's weights are kept exact."""
  a = np.array([[0.0, -np.inf, 1.0], [0.5, 0.0, -np.inf], [2.0, 0.0, 0.0]], np.float32)
  b = np.array([[0.0, 0.0, -np.inf], [0.5, -1.0, 3.0], [0.0, 2.0, -0.5]], np.float32)
  x, y = np.concatenate([a, b]), np.concatenate([b, a])  # both orders in one call
  for beta in (1e-9, 1e-3, 1 - 1e-6, 1 - 1e-9):
    got = ka.kl_per_position(x, y, direction="js", beta=beta, implementation=impl)
    want = ref.kl_per_position(x, y, "js", beta=beta)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-12, err_msg=str(beta))


def test_chunk_size_accepts_numpy_integers(rng):
  a, b = random_logits(rng, (6, 5)), random_logits(rng, (6, 5))
  np.testing.assert_array_equal(ka.kl_per_position(a, b, chunk_size=np.int64(4)),
                                ka.kl_per_position(a, b, chunk_size=4))


def test_shape_mismatch_names_both_shapes():
  with pytest.raises(ValueError, match=r"\(2, 3, 7\).*\(2, 3, 8\)"):
    ka.kl_per_position(jnp.zeros((2, 3, 7)), jnp.zeros((2, 3, 8)))


@pytest.mark.parametrize("kwargs, match", [
    ({"direction": "sideways"}, "direction.*'reverse'"),
    ({"beta": 1.5}, "beta"),
    ({"beta": -0.1}, "beta"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": 2.5}, "chunk_size"),
    ({"where": jnp.ones((2, 4), bool)}, "where"),
    ({"where": jnp.ones((2, 3))}, "boolean"),
])
def test_bad_static_input_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ka.kl_per_position(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3, 5)), **kwargs)


def test_empty_vocabulary_raises():
  with pytest.raises(ValueError, match="V >= 1"):
    ka.kl_per_position(jnp.zeros((2, 0)), jnp.zeros((2, 0)))


def test_errors_raise_while_tracing():
  f = jax.jit(lambda x, y: ka.kl_per_position(x, y, direction="nope"))
  with pytest.raises(ValueError, match="direction"):
    f(jnp.zeros((2, 3)), jnp.zeros((2, 3)))


# ------------------------------------------------------------------------------------------------
# NaN at a valid position surfaces; NaN at a masked position is garbage that changes nothing.

# (chunk, implementation, traced temperature) modes: every implementation, and the row-block
# loop at 2-row blocks under a traced temperature. Each mode meets every direction and every dtype
# once (a Latin square): 3 compiled programs per mode.
NAN_MODES = ((2, "chunked", True),) + tuple((None, impl, False) for impl in IMPLS)
NAN_CONFIGS = [(d, DTYPES_ALL[(m + j) % 3], *mode) for m, mode in enumerate(NAN_MODES)
               for j, d in enumerate(DIRECTIONS)]


@functools.lru_cache(maxsize=None)
def _nan_program(direction, chunk, impl, traced):
  def run(a, b, mask, w, t):
    temperature = t if traced else 0.8
    f = lambda x, y: ka.kl_per_position(x, y, direction=direction, where=mask, chunk_size=chunk,
                                        temperature=temperature, implementation=impl)
    kl, vjp = jax.vjp(f, a, b)
    return kl, vjp(w.astype(kl.dtype))
  return jax.jit(run)


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(config=st.sampled_from(NAN_CONFIGS), seed=st.integers(0, 2**31 - 1),
       side=st.sampled_from(["student", "reference"]), masked=st.booleans())
def test_nan_at_a_valid_position_surfaces_and_masked_nan_changes_nothing(config, seed, side,
                                                                         masked):
  direction, dtype, chunk, impl, traced = config
  rng = np.random.default_rng(seed)
  a = jnp.asarray(random_logits(rng, (6, 11)), dtype)
  b = jnp.asarray(random_logits(rng, (6, 11)), dtype)
  mask = rng.random(6) > 0.3
  row, col = int(rng.integers(6)), int(rng.integers(11))
  mask[row] = not masked
  w = rng.standard_normal(6).astype(np.float32)
  program = _nan_program(direction, chunk, impl, traced)
  clean = program(a, b, mask, w, 0.8)
  poisoned = (a.at[row, col].set(jnp.nan), b) if side == "student" else (a, b.at[row, col].set(jnp.nan))
  kl, (ga, gb) = program(*poisoned, mask, w, 0.8)
  others = np.arange(6) != row
  np.testing.assert_array_equal(np.asarray(kl)[others], np.asarray(clean[0])[others])
  if masked:
    assert kl[row] == 0.0
    np.testing.assert_array_equal(to_f64(ga), to_f64(clean[1][0]))
    np.testing.assert_array_equal(to_f64(gb), to_f64(clean[1][1]))
  else:
    assert np.isnan(kl[row]), (config, side)


@pytest.mark.parametrize("impl", IMPLS)
def test_issue_reproducers_now_print_nan(impl):
  s = np.zeros((2, 4), np.float32)
  s[1, 0] = np.nan
  r = np.array([[0, 1, 2, 3]] * 2, np.float32)
  f = lambda x, y, **kw: np.asarray(ka.kl_per_position(x, y, implementation=impl, **kw))
  for direction in DIRECTIONS:
    got = f(s, r, direction=direction)
    np.testing.assert_allclose(got[0], ref.kl_per_position(s[:1], r[:1], direction)[0], rtol=1e-6)
    assert np.isnan(got[1]), direction
  assert np.isnan(f(s, r, temperature=jnp.float32(2.0))[1])
  # The reference all -inf while the student's row is NaN: NaN, not the +inf of an empty reference.
  assert np.isnan(f(s[1:], np.full((1, 4), -np.inf, np.float32))[0])
  # The student's row all -inf (no mass) while the reference's is NaN: NaN, not 0.
  assert np.isnan(f(np.full((1, 4), -np.inf, np.float32), s[1:])[0])


# ------------------------------------------------------------------------------------------------
# A traced temperature under stop_ref_grad: d/dT includes softmax(ref / T)'s dependence on T.


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_traced_temperature_gradient_of_the_barrier_with_a_stopped_reference(direction):
  rng = np.random.default_rng(3)
  with x64():
    a, b = rng.standard_normal((2, 5, 9)), rng.standard_normal((2, 5, 9))

    def ours(t):
      return ka.kl_barrier(a, b, temperature=t, direction=direction, agg="mean", tau=0.0)[0]

    def plain(t):  # the composition with the reference's gradient stopped
      kl = plain64(a / t, jax.lax.stop_gradient(jnp.asarray(b)) / t, direction)
      return kl.mean(-1).mean()

    np.testing.assert_allclose(jax.grad(ours)(1.3), jax.grad(plain)(1.3), rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_traced_temperature_gradient_with_a_stopped_reference(rng, impl, direction):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  f = lambda t: ka.kl_per_position(a, jax.lax.stop_gradient(b), temperature=t,
                                   direction=direction, implementation=impl).sum()
  _, (want,) = vg64(lambda t: plain64(a / t, jax.lax.stop_gradient(b) / t, direction).sum(),
                    1.3, argnums=(0,))
  np.testing.assert_allclose(jax.grad(f)(1.3), want, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Every registered implementation against the float64 truth; forward mode through "xla".


@pytest.mark.parametrize("impl, chunk_size", impl_cases(IMPLS, 3))
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_every_implementation_matches_float64_in_value_and_gradient(rng, impl, chunk_size,
                                                                    direction):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  a[..., 3], b[..., 3] = -np.inf, -np.inf  # banned on both sides
  if direction == "reverse":
    a[0, 1, 5] = -np.inf  # the student gives no mass where the reference has some
  mask = rng.random(SHAPE[:-1]) > 0.3
  a[~mask] = np.nan
  w = rng.standard_normal(SHAPE[:-1]).astype(np.float32)
  f = lambda x, y: (w * ka.kl_per_position(x, y, direction=direction, where=mask, beta=0.3,
                                           temperature=0.9, chunk_size=chunk_size,
                                           implementation=impl)).sum()
  value, grads = jax.value_and_grad(f, (0, 1))(a, b)
  clean = [np.where(mask[..., None], x, 0.0) for x in (a, b)]  # as the kernels do
  want, want_grads = vg64(lambda x, y: (w * jnp.where(
      mask, plain64(x / 0.9, y / 0.9, direction, beta=0.3), 0.0)).sum(), *clean)
  np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5)
  for got, exp in zip(grads, want_grads):
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl, direction", [(i, d) for i in IMPLS for d in DIRECTIONS
                                             if i in FORWARD_MODE or d == "reverse"])
def test_forward_mode_ad(rng, impl, direction):
  a, b = random_logits(rng, (4, 6)), random_logits(rng, (4, 6))
  t = rng.standard_normal((4, 6)).astype(np.float32)
  f = lambda x: ka.kl_per_position(x, b, direction=direction, implementation=impl)
  if impl not in FORWARD_MODE:  # a custom VJP: reverse mode only, and the error says the way out
    with pytest.raises(TypeError, match="implementation=\"xla\""):
      jax.jvp(f, (a,), (t,))
    return
  value, tangent = jax.jvp(f, (a,), (t,))
  with x64():  # the float64 truth of the directional derivative
    want, want_tangent = jax.jvp(lambda x: plain64(x, np.float64(b), direction),
                                 (np.float64(a),), (np.float64(t),))
  np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tangent, want_tangent, rtol=1e-5, atol=1e-6)
  with x64():  # forward over forward (a Hessian-vector product) too
    check_grads(lambda x: ka.kl_per_position(x, np.float64(b), direction=direction,
                                             implementation=impl),
                (np.float64(a),), order=2, modes=["fwd"], atol=1e-6, rtol=1e-6)


def test_unknown_implementation_lists_the_valid_ones():
  with pytest.raises(ValueError, match=", ".join(map(repr, IMPLEMENTATIONS))):
    ka.kl_per_position(jnp.zeros((2, 3)), jnp.zeros((2, 3)), implementation="triton")


def test_default_implementation_is_the_chunked_kernel(rng):
  a, b = random_logits(rng, (8, 5)), random_logits(rng, (8, 5))
  assert "custom_vjp_call" in str(jax.make_jaxpr(lambda x: ka.kl_per_position(x, b))(a))
  assert "custom_vjp_call" not in str(jax.make_jaxpr(
      lambda x: ka.kl_per_position(x, b, implementation="xla"))(a))


# ------------------------------------------------------------------------------------------------
# The whole-array KL (many rows on a CPU; "chunked" and "xla" both have one): enabled here from
# one row up, so small shapes take it.


@pytest.fixture
def whole_path(monkeypatch):
  from klagg_jax import _config
  monkeypatch.setitem(_config.PLATFORMS, "cpu",
                      dataclasses.replace(_config.CPU, whole_min_rows=1))
  # Traces made under the default config must not be reused, nor these later (JAX >= 0.12 also
  # shares traces between jit objects of one function, so every cache goes).
  compiled._jitted.cache_clear()
  jax.clear_caches()
  yield
  compiled._jitted.cache_clear()
  jax.clear_caches()


def _takes_whole_path(f, *args):
  return "cond" in str(jax.make_jaxpr(f)(*args))


WHOLE = ("chunked", "xla")


@pytest.mark.parametrize("impl", WHOLE)
@pytest.mark.parametrize("direction, poison", [
    ("reverse", None), ("forward", None), ("forward", "banned"), ("reverse", "masked_nan"),
    ("forward", "valid_nan")])
def test_whole_array_kl_matches_float64_and_falls_back_where_conventions_decide(
    whole_path, rng, impl, direction, poison):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  mask = rng.random(SHAPE[:-1]) > 0.3
  mask[0, 0] = True
  a[~mask] = rng.normal(size=a[~mask].shape) * 50  # finite garbage: masked by the weight alone
  if poison == "banned":
    a[..., 3], b[..., 3] = -np.inf, -np.inf
  elif poison == "masked_nan":
    a[~mask] = np.nan
  elif poison == "valid_nan":
    a[0, 0, 2] = np.nan
  w = rng.standard_normal(SHAPE[:-1]).astype(np.float32)
  f = lambda x, y: (w * ka.kl_per_position(x, y, direction=direction, where=mask,
                                           temperature=0.9, implementation=impl)).sum()
  assert _takes_whole_path(f, a, b)
  value, grads = jax.value_and_grad(f, (0, 1))(a, b)
  grad_only = jax.grad(f, (0, 1))(a, b)
  if poison == "valid_nan":
    assert np.isnan(value)
    assert np.isnan(grads[0][0, 0]).all() and np.isfinite(np.asarray(grads[0])[1:]).all()
    return
  with x64():
    clean = [np.float64(np.where(mask[..., None], x, 0.0)) for x in (a, b)]
    g = lambda x, y: (w * jnp.where(mask, plain64(x / 0.9, y / 0.9, direction), 0.0)).sum()
    want, want_grads = jax.value_and_grad(g, (0, 1))(*clean)
  np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5)
  for got, again, exp in zip(grads, grad_only, want_grads):
    np.testing.assert_array_equal(got, again)
    np.testing.assert_array_equal(np.asarray(got)[~mask], 0.0)
    np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", WHOLE)
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_whole_array_kl_keeps_exact_zeros_and_low_precision(whole_path, rng, impl, direction):
  kl = functools.partial(ka.kl_per_position, direction=direction, implementation=impl)
  a = jnp.asarray(rng.normal(size=(4, 9)) * 5, jnp.float32)
  f = lambda x, y: kl(x, y).sum()
  assert _takes_whole_path(f, a, a)
  value, grads = jax.value_and_grad(f, (0, 1))(a, a)
  assert value == 0.0 and all((g == 0).all() for g in grads)
  assert (kl(a * 6.0, a * 6.0 + 3.0) >= 0).all()
  lo, ref_lo = (jnp.asarray(random_logits(rng, (6, 33)), jnp.bfloat16) for _ in range(2))
  got = kl(lo, ref_lo)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref.kl_per_position(to_f64(lo), to_f64(ref_lo), direction),
                             rtol=1e-5, atol=1e-6)
  ga = jax.grad(lambda x: kl(x, ref_lo).sum())(lo)
  assert ga.dtype == jnp.bfloat16


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_whole_array_xla_kl_keeps_forward_mode_and_hessians(whole_path, rng, direction):
  a, b = random_logits(rng, (5, 7)), random_logits(rng, (5, 7))
  a[1, 2] = -np.inf  # one row the exact formulas make, beside four streamed ones
  mask = np.array([True, True, True, False, True])
  f = lambda x: ka.kl_per_position(x, b, direction=direction, where=mask, temperature=1.3,
                                   implementation="xla")
  assert _takes_whole_path(f, a)
  t = rng.standard_normal(a.shape)
  t[1, 2] = 0.0  # no tangent along a banned entry (its logit stays -inf)
  with x64():
    g = lambda x: jnp.where(mask, plain64(x / 1.3, to_f64(b) / 1.3, direction), 0.0)
    want, want_t = jax.jvp(g, (to_f64(a),), (to_f64(t),))
    want_h = jax.hessian(lambda x: g(x)[0])(to_f64(a))
  got, got_t = jax.jvp(f, (jnp.asarray(a),), (jnp.asarray(t, jnp.float32),))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_t, want_t, rtol=1e-4, atol=1e-5)
  t[3] = np.nan  # along garbage in a masked row, that row's tangent is 0 and the rest unchanged
  _, nan_t = jax.jvp(f, (jnp.asarray(a),), (jnp.asarray(t, jnp.float32),))
  assert nan_t[3] == 0.0
  np.testing.assert_array_equal(np.delete(np.asarray(nan_t), 3), np.delete(np.asarray(got_t), 3))
  np.testing.assert_allclose(jax.hessian(lambda x: f(x)[0])(jnp.asarray(a)), want_h,
                             rtol=1e-4, atol=1e-5)
