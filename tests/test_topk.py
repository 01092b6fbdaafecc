"""topk_logprobs, kl_topk and fused_linear_kl_topk against float64 numpy, and their conventions."""

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
from klagg_jax._ops.fused import api as fused_api
from klagg_jax._ops.topk import api as topk_api
from tests.helpers import FORWARD_MODE, random_logits, refused, to_f64, x64

DIRECTIONS = ("forward", "reverse", "js")
SHAPE = (3, 5, 17)  # [B, T, V]
TOL = {"rtol": 1e-5, "atol": 1e-6}
IMPLS = sorted(topk_api.IMPLEMENTATIONS)
LOGPROBS_IMPLS = sorted(topk_api.LOGPROBS_IMPLEMENTATIONS)
FUSED_IMPLS = sorted(fused_api.IMPLEMENTATIONS)

# Jitted once per static configuration, so hypothesis examples of one shape share a compilation.
KL = jax.jit(ka.kl_topk, static_argnames=("direction", "temperature", "beta", "chunk_size"))
TOPK = jax.jit(ka.topk_logprobs, static_argnums=1,
               static_argnames=("temperature", "implementation"))
FULL = jax.jit(ka.kl_per_position, static_argnames=("direction", "temperature", "beta"))


def grad(f, argnums=0):
  """jit(grad(f)): eager chunked kernels would compile their loop at every call."""
  return jax.jit(jax.grad(f, argnums))


def value_and_grad(f, argnums=0):
  return jax.jit(jax.value_and_grad(f, argnums))


def _kl3(a, lp, idx, tail, where=None, temperature=1.0, beta=0.5, chunk_size=None,
         implementation=None):
  return jnp.stack([ka.kl_topk(a, lp, idx, ref_tail=tail, direction=d, where=where,
                               temperature=temperature, beta=beta, chunk_size=chunk_size,
                               implementation=implementation)
                    for d in DIRECTIONS])


def _sum3(*args, **kwargs):
  return (jnp.array([1.0, 0.7, 1.3])[:, None] * _kl3(*args, **kwargs).reshape(3, -1)).sum()


# Module-level, so that tests with the same shapes and options share one compilation.
STATIC = ("temperature", "beta", "chunk_size", "implementation")
kl3 = jax.jit(_kl3, static_argnames=STATIC)
kl3.__doc__ = "kl_topk in the three directions, stacked on a leading axis."
grad3 = jax.jit(jax.grad(_sum3), static_argnames=STATIC)
grad3.__doc__ = "Gradient w.r.t. the logits of a weighted sum over positions and directions."


def ref3(a, lp, idx, tail, where=None, temperature=1.0, beta=0.5):
  return np.stack([ref.kl_topk(a, lp, idx, tail, d, where=where, temperature=temperature,
                               beta=beta) for d in DIRECTIONS])


def plain_sum3(a, lp, idx, tail, **kwargs):
  """_sum3 of the plain composition (the independent path for gradients)."""
  return sum(w * plain_topk(a, lp, idx, tail, d, **kwargs).sum()
             for w, d in zip((1.0, 0.7, 1.3), DIRECTIONS))


def stored(teacher_logits, k, temperature=1.0, implementation=None):
  """What a pipeline stores: (log-probs, indices, tail) of the teacher, made by the library."""
  return TOPK(jnp.asarray(teacher_logits), k, temperature=temperature,
              implementation=implementation)


def grad64(f, *args):
  """jit(grad(f)) in float64, the truth for gradients (f a float64 jax.numpy composition)."""
  with x64():
    return np.asarray(jax.jit(jax.grad(f))(*(np.float64(x) for x in args)))


def plain_topk(a, lp, idx, tail, direction, beta=0.5, temperature=1.0):
  """Autodiff-able jax.numpy composition of the coarsened divergence (the gradient's check)."""
  x = jax.nn.log_softmax(a / temperature)
  is_stored = jax.nn.one_hot(idx, a.shape[-1], dtype=bool).any(-2)
  outside = jax.nn.logsumexp(jnp.where(is_stored, -jnp.inf, x), axis=-1, keepdims=True)
  s = jax.nn.log_softmax(jnp.concatenate([jnp.take_along_axis(x, idx, -1), outside], -1))
  t = jax.nn.log_softmax(jnp.concatenate([lp, tail[..., None]], -1))
  p, r = jnp.exp(s), jnp.exp(t)
  if direction == "forward":
    return (r * (t - s)).sum(-1)
  if direction == "reverse":
    return (p * (s - t)).sum(-1)
  lm = jnp.log((1 - beta) * p + beta * r)
  return beta * (r * (t - lm)).sum(-1) + (1 - beta) * (p * (s - lm)).sum(-1)


# ---------------------------------------------------------------------------------- topk_logprobs


@pytest.mark.parametrize("impl", LOGPROBS_IMPLS)
@pytest.mark.parametrize("k, temperature", [(1, 1.0), (5, 0.6), (17, 1.0)])
def test_topk_logprobs_matches_float64_reference(rng, impl, k, temperature):
  b = random_logits(rng, SHAPE, scale=3.0)
  lp, idx, tail = stored(b, k, temperature, implementation=impl)
  want_lp, want_idx, want_tail = ref.topk_logprobs(b, k, temperature)
  assert (lp.dtype, idx.dtype, tail.dtype) == (jnp.float32, jnp.int32, jnp.float32)
  assert lp.shape == idx.shape == SHAPE[:-1] + (k,) and tail.shape == SHAPE[:-1]
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(lp, want_lp, **TOL)
  assert np.all(np.diff(np.asarray(lp), axis=-1) <= 0)  # sorted by decreasing probability
  if k == SHAPE[-1]:
    np.testing.assert_array_equal(tail, -np.inf)  # nothing left outside
  else:
    np.testing.assert_allclose(tail, want_tail, **TOL)


def test_topk_logprobs_tail_is_exact_at_1e_30():
  # Ten entries hold everything but 1e-30 of the mass: 1 - sum(exp(logprobs)) rounds to 0.
  logits = np.concatenate([np.zeros(10), np.full(90, np.log(1e-30 / 90 * 10))]).astype(np.float32)
  lp, _, tail = stored(logits, 10)
  assert -jnp.expm1(jax.nn.logsumexp(lp)) == 0.0  # the cancelling formula has nothing left
  np.testing.assert_allclose(tail, np.log(1e-30), rtol=1e-6)
  np.testing.assert_allclose(tail, ref.topk_logprobs(logits, 10)[2], rtol=1e-6)


def test_topk_logprobs_chunks_and_low_precision(rng):
  b = jnp.asarray(random_logits(rng, (300, 4096)), jnp.bfloat16)  # 3 chunks of 128 rows on CPU
  lp, idx, tail = stored(b, 7)
  want_lp, want_idx, want_tail = ref.topk_logprobs(to_f64(b), 7)
  # bf16 logits tie often, so tied entries may be kept in another order: compare values.
  np.testing.assert_allclose(lp, want_lp, **TOL)
  np.testing.assert_allclose(tail, want_tail, **TOL)
  np.testing.assert_allclose(np.take_along_axis(to_f64(b), np.asarray(idx), -1),
                             np.take_along_axis(to_f64(b), want_idx, -1))


# ------------------------------------------------------------------------- kl_topk: values


# Without ref_tail the teacher's tail is computed as log(-expm1(logsumexp(lp))): exact enough
# where the tail is not tiny (k = 5 of 17); for a tiny tail (k = 16) that is what ref_tail is for.
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k, with_tail", [(1, True), (5, True), (16, True), (5, False)])
def test_matches_float64_reference(rng, impl, k, with_tail):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE, scale=3.0)
  lp, idx, tail = stored(b, k)
  tail = tail if with_tail else None
  got = kl3(a, lp, idx, tail, implementation=impl)
  assert got.dtype == jnp.float32 and got.shape == (3,) + SHAPE[:-1]
  np.testing.assert_allclose(got, ref3(a, lp, idx, tail), **TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_temperature_and_chunk_size_one(rng, impl):
  chunk_size, temperature = 1, 0.6  # the chunk size is read by the row-block loop only
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  lp, idx, tail = stored(b, 5, temperature)  # the teacher is stored at the distillation T
  got = kl3(a, lp, idx, tail, temperature=temperature, chunk_size=chunk_size, implementation=impl)
  np.testing.assert_allclose(got, ref3(a, lp, idx, tail, temperature=temperature), **TOL)


@pytest.mark.parametrize("beta", [0.0, 0.2, 1.0])
def test_js_beta_and_its_endpoints(rng, beta):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  lp, idx, tail = stored(b, 5)
  forward, reverse, js = kl3(a, lp, idx, tail, beta=beta)
  np.testing.assert_allclose(js, ref.kl_topk(a, lp, idx, tail, "js", beta=beta), **TOL)
  if beta in (0.0, 1.0):  # exactly KL(teacher || student) and KL(student || teacher)
    np.testing.assert_array_equal(js, forward if beta == 0.0 else reverse)


def test_k_equal_to_vocabulary_is_kl_per_position(rng):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  full = np.stack([FULL(a, b, direction=d, beta=0.3) for d in DIRECTIONS])
  lp, idx, tail = stored(b, SHAPE[-1])
  np.testing.assert_allclose(kl3(a, lp, idx, tail, beta=0.3), full, **TOL)
  # Unsorted, with the teacher's tail left to the library (its rounding residue must not count).
  perm = rng.permutation(SHAPE[-1])
  lr = np.asarray(jax.nn.log_softmax(b))[..., perm]
  idx = np.broadcast_to(perm, SHAPE).astype(np.int32)
  np.testing.assert_allclose(kl3(a, lr, idx, None, beta=0.3), full, **TOL)


def test_forward_is_exact_when_the_teacher_has_no_tail(rng):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  b[..., 6:] = -np.inf  # the teacher's mass lies on 6 entries, all stored
  lp, idx, tail = stored(b, 6)
  np.testing.assert_array_equal(tail, -np.inf)
  np.testing.assert_allclose(KL(a, lp, idx, ref_tail=tail), FULL(a, b, direction="forward"), **TOL)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_inputs_compute_in_float32(rng, dtype):
  a = jnp.asarray(random_logits(rng, SHAPE), dtype)
  lp32, idx, tail32 = stored(random_logits(rng, SHAPE), 5)
  lp, tail = lp32.astype(dtype), tail32.astype(dtype)  # stored rounded: sums are off by ~1e-3
  got = kl3(a, lp, idx, tail)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref3(to_f64(a), to_f64(lp), idx, to_f64(tail)), **TOL)
  assert np.all(np.asarray(got) >= 0)  # renormalized teacher: still a divergence
  if dtype == "bfloat16":
    g = grad3(a, lp, idx, tail)
    assert g.dtype == a.dtype and np.isfinite(to_f64(g)).all()


def test_tail_of_1e_30_gives_the_exact_reverse_divergence(rng):
  v, k = 40, 8
  teacher = np.concatenate([rng.standard_normal(k), np.full(v - k, -80.0)]).astype(np.float32)
  teacher = np.broadcast_to(teacher, (4, v))
  student = random_logits(rng, (4, v))  # the student has real mass in the teacher's tail
  lp, idx, tail = stored(teacher, k)
  assert np.all(np.asarray(tail) < -60)  # ~1e-30: 1 - sum(exp(lp)) is 0 in float32
  got = KL(student, lp, idx, ref_tail=tail, direction="reverse")
  want = ref.kl_topk(student, *ref.topk_logprobs(teacher, k), direction="reverse")
  assert np.isfinite(got).all() and np.all(want > 10)
  np.testing.assert_allclose(got, want, **TOL)
  # Without the stored tail the teacher's tail is 0 in float32: the reverse divergence is
  # infinite there (the student has mass the teacher lacks); forward stays exact.
  assert np.all(np.isinf(KL(student, lp, idx, direction="reverse")))
  np.testing.assert_allclose(KL(student, lp, idx), ref.kl_topk(student, lp, idx, tail), **TOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k", [3, 15])
def test_negative_infinite_vocabulary_entries(rng, impl, k):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  banned_cols = np.zeros(SHAPE[-1], bool)
  banned_cols[rng.choice(SHAPE[-1], 5, replace=False)] = True
  a[..., banned_cols], b[..., banned_cols] = -np.inf, -np.inf
  lp, idx, tail = stored(b, k)  # k = 15 stores -inf log-probs and leaves both tails empty
  np.testing.assert_allclose(kl3(a, lp, idx, tail, implementation=impl), ref3(a, lp, idx, tail),
                             **TOL)
  g = grad3(a, lp, idx, tail, implementation=impl)
  assert np.isfinite(g).all()
  np.testing.assert_array_equal(np.asarray(g)[..., banned_cols], 0.0)
  if k == 3:  # the finite entries agree with float64 autodiff over the unbanned vocabulary
    keep = ~banned_cols
    sub_idx = (np.cumsum(keep) - 1)[np.asarray(idx)]
    want = grad64(lambda x, y, t: plain_sum3(x, y, sub_idx, t), a[..., keep], lp, tail)
    np.testing.assert_allclose(np.asarray(g)[..., keep], want, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_positions_are_exact_zero_even_with_garbage(rng, impl):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  lp, idx, tail = (np.array(x) for x in stored(b, 4))
  mask = rng.random(SHAPE[:-1]) > 0.4
  clean = (a.copy(), lp.copy(), idx.copy(), tail.copy())
  a[~mask], lp[~mask], tail[~mask] = np.nan, np.nan, np.inf
  idx[~mask] = -1
  idx[~mask & (rng.random(SHAPE[:-1]) > 0.5)] = 10**6
  for t, t_clean in ((tail, clean[3]), (None, None)):  # garbage log-probs make garbage tails
    value = kl3(a, lp, idx, t, where=mask, chunk_size=4, implementation=impl)
    np.testing.assert_array_equal(np.asarray(value)[:, ~mask], 0.0)
    np.testing.assert_allclose(value, ref3(*clean[:3], t_clean, where=mask), **TOL)
  g = grad3(a, lp, idx, tail, where=mask, chunk_size=4, implementation=impl)
  assert np.isfinite(g).all()
  np.testing.assert_array_equal(np.asarray(g)[~mask], 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_student_equal_to_teacher_gives_zero(rng, impl):
  a = random_logits(rng, SHAPE, scale=4.0)
  lp, idx, tail = stored(a, 5)
  kw = {"implementation": impl}
  np.testing.assert_allclose(kl3(a, lp, idx, tail, **kw), 0.0, atol=1e-6)  # float32 rounding
  np.testing.assert_allclose(grad3(a, lp, idx, tail, **kw), 0.0, atol=1e-5)


# --------------------------------------------------------------------- hypothesis properties

VALUES = hnp.arrays(np.float32, (2, 12), elements=st.floats(-12, 12, width=32))


@settings(max_examples=25, deadline=None)
@given(a=VALUES, b=VALUES, k=st.sampled_from([3, 12]))
def test_property_between_zero_and_the_full_divergence(a, b, k):
  lp, idx, tail = stored(b, k)
  got = np.asarray(kl3(a, lp, idx, tail), np.float64)
  full = np.stack([np.asarray(FULL(a, b, direction=d), np.float64) for d in DIRECTIONS])
  assert np.all(got >= -1e-6)
  assert np.all(got <= full + 1e-5 * (1 + full))  # data processing inequality
  if k == 12:
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(a=VALUES, b=VALUES, seed=st.integers(0, 2**31))
def test_property_invariant_to_permuting_the_vocabulary(a, b, seed):
  lp, idx, tail = stored(b, 4)
  perm = np.random.default_rng(seed).permutation(12)
  inverse = np.argsort(perm)  # entry v of the old vocabulary is entry inverse[v] of the new one
  got = kl3(a[:, perm], lp, inverse[np.asarray(idx)], tail)
  np.testing.assert_allclose(got, kl3(a, lp, idx, tail), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_match_float64_autodiff(rng, impl):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  lp, idx, tail = stored(b, 5)
  got = grad3(a, lp, idx, tail, temperature=0.8, beta=0.3, chunk_size=3, implementation=impl)
  want = grad64(lambda x, y, t: plain_sum3(x, y, idx, t, beta=0.3, temperature=0.8), a, lp, tail)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("order", [1, 2])
def test_check_grads_float64(impl, order):
  rng = np.random.default_rng(1)
  with x64():
    a, b = rng.standard_normal((2, 3, 9)), rng.standard_normal((2, 3, 9))
    lp, idx, tail = ka.topk_logprobs(b, 4)
    if order == 1:  # every direction
      f = jax.jit(lambda x: kl3(x, lp, idx, tail, beta=0.3, implementation=impl))
    else:  # the distillation default
      f = jax.jit(lambda x: ka.kl_topk(x, lp, idx, ref_tail=tail, implementation=impl))
    assert f(a).dtype == jnp.float64
    check_grads(f, (a,), order=order, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_traced_temperature_is_differentiable(rng, impl):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  lp, idx, tail = stored(b, 5)
  f = lambda t: ka.kl_topk(a, lp, idx, ref_tail=tail, temperature=t, implementation=impl).sum()
  v_f, g_f = value_and_grad(f)(1.3)
  with x64():  # the float64 truth
    g = lambda t: plain_topk(*(np.float64(x) for x in (a, lp)), idx, np.float64(tail), "forward",
                             temperature=t).sum()
    v_g, g_g = value_and_grad(g)(np.float64(1.3))
  np.testing.assert_allclose(v_f, v_g, rtol=1e-5)
  np.testing.assert_allclose(g_f, g_g, rtol=1e-4)


def test_gradient_flows_into_logits_only(rng):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  lp, idx, tail = stored(b, 5)
  grads = grad(lambda x, y, t: ka.kl_topk(x, y, idx, ref_tail=t).sum(), (0, 1, 2))(a, lp, tail)
  assert np.abs(grads[0]).max() > 0
  np.testing.assert_array_equal(grads[1], 0.0)
  np.testing.assert_array_equal(grads[2], 0.0)


def test_chunked_equals_unchunked_in_value_and_gradient(rng):
  a, b = random_logits(rng, (37, 21)), random_logits(rng, (37, 21))
  lp, idx, tail = stored(b, 5)
  mask = rng.random(37) > 0.2
  f = lambda x, c: ka.kl_topk(x, lp, idx, ref_tail=tail, where=mask, chunk_size=c, direction="js",
                              implementation="chunked")
  want = ref.kl_topk(a, lp, idx, tail, "js", where=mask).sum()
  want_grad = grad64(lambda x, y, t: jnp.where(mask, plain_topk(x, y, idx, t, "js"), 0.0).sum(),
                     a, lp, tail)
  for chunk in (1, 8):  # 8 does not divide 37: the last chunk overlaps the one before
    part = value_and_grad(lambda x: f(x, chunk).sum())(a)
    np.testing.assert_allclose(part[0], want, rtol=1e-5)
    np.testing.assert_allclose(part[1], want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_jit_and_vmap_invariance(rng, impl):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  lp, idx, tail = stored(b, 5)
  vmapped = jax.jit(jax.vmap(lambda x, y, i, t: ka.kl_topk(x, y, i, ref_tail=t, chunk_size=2,
                                                           implementation=impl)))(a, lp, idx, tail)
  np.testing.assert_allclose(vmapped, ref.kl_topk(a, lp, idx, tail, "forward"), **TOL)


# ------------------------------------------------------------------------------------ fused


@pytest.mark.parametrize("direction, layout", [("js", "vd")])
def test_fused_equals_materialized(rng, direction, layout):
  h, w = rng.standard_normal((2, 7, 6)).astype(np.float32), rng.standard_normal((6, 40))
  w, bias = (0.5 * w).astype(np.float32), rng.standard_normal(40).astype(np.float32)
  lp, idx, tail = stored(random_logits(rng, (2, 7, 40)), 8)
  mask = rng.random((2, 7)) > 0.3
  kernel = w if layout == "dv" else w.T
  fused = lambda h, k, c: ka.fused_linear_kl_topk(
      h, k, lp, idx, ref_tail=tail, bias=c, weight_layout=layout, direction=direction,
      where=mask, temperature=0.9, chunk_size=3)
  logits = lambda h, k, c: (h @ k if layout == "dv" else h @ k.T) + c[None, None]
  plain = lambda h, k, c: ka.kl_topk(logits(h, k, c), lp, idx, ref_tail=tail,
                                     direction=direction, where=mask, temperature=0.9)
  weights = rng.standard_normal((2, 7)).astype(np.float32)
  loss = lambda f: lambda *p: ((weights * f(*p)).sum(), f(*p))  # noqa: E731
  vg = lambda f: jax.jit(jax.value_and_grad(loss(f), (0, 1, 2), has_aux=True))  # noqa: E731
  got, want = vg(fused)(h, kernel, bias), vg(plain)(h, kernel, bias)
  np.testing.assert_allclose(got[0][1], want[0][1], **TOL)  # per position
  for g_fused, g_plain in zip(got[1], want[1]):
    np.testing.assert_allclose(g_fused, g_plain, rtol=1e-4, atol=1e-5)


def test_fused_default_layout_and_direction_values(rng):
  h, w = rng.standard_normal((9, 6)).astype(np.float32), rng.standard_normal((6, 30))
  w = w.astype(np.float32)
  lp, idx, tail = stored(random_logits(rng, (9, 30)), 6)
  got = jax.jit(lambda h, w: ka.fused_linear_kl_topk(h, w, lp, idx, ref_tail=tail, chunk_size=4))
  np.testing.assert_allclose(got(h, w), ref.kl_topk(h.astype(np.float64) @ w, lp, idx, tail),
                             **TOL)


def test_fused_masked_garbage_in_teacher_data(rng):
  h, w = rng.standard_normal((5, 6)).astype(np.float32), rng.standard_normal((6, 20))
  w = w.astype(np.float32)
  lp, idx, tail = (np.array(x) for x in stored(random_logits(rng, (5, 20)), 4))
  mask = np.array([True, False, True, False, True])
  lp[~mask], idx[~mask], tail[~mask] = np.nan, -7, np.nan
  f = lambda h, w: ka.fused_linear_kl_topk(h, w, lp, idx, ref_tail=tail, where=mask,
                                           chunk_size=2).sum()
  value, (gh, gw) = value_and_grad(f, (0, 1))(h, w)
  assert np.isfinite(value) and np.isfinite(gh).all() and np.isfinite(gw).all()
  np.testing.assert_array_equal(gh[~mask], 0.0)


def test_fused_nan_padding_in_hidden_gives_finite_weight_gradient(rng):
  h, w = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((6, 20))
  w = w.astype(np.float32)
  lp, idx, tail = stored(random_logits(rng, (4, 20)), 4)
  mask = np.array([True, False, True, True])
  h[1] = np.nan
  gw = grad(lambda w: ka.fused_linear_kl_topk(h, w, lp, idx, ref_tail=tail, where=mask,
                                                  chunk_size=2).sum())(w)
  assert np.isfinite(gw).all()


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("k, match", [
    (0, r"\[1, V\] = \[1, 5\]; got 0"),
    (6, r"\[1, V\] = \[1, 5\]; got 6"),
    (2.0, "int"),
    (True, "int"),
])
def test_topk_logprobs_bad_k_raises(k, match):
  with pytest.raises(ValueError, match=match):
    ka.topk_logprobs(jnp.zeros((2, 5)), k)


@pytest.mark.parametrize("args, kwargs, match", [
    ((jnp.zeros((2, 5), jnp.int32), 2), {}, "floating"),
    ((jnp.zeros((2, 0)), 1), {}, "V >= 1"),
    ((jnp.zeros((2, 5)), 2), {"temperature": 0.0}, "temperature"),
])
def test_topk_logprobs_bad_input_raises(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    ka.topk_logprobs(*args, **kwargs)


LOGITS = jnp.zeros((2, 3, 5))
LP = jnp.full((2, 3, 2), -1.0)
IDX = jnp.broadcast_to(jnp.array([0, 3], jnp.int32), (2, 3, 2))


@pytest.mark.parametrize("args, kwargs, match", [
    ((LOGITS, jnp.zeros((2, 4, 2)), IDX), {}, r"ref_logprobs has shape \(2, 4, 2\)"),
    ((LOGITS, jnp.zeros((2, 3, 6)), jnp.zeros((2, 3, 6), jnp.int32)), {},
     r"k \(ref_logprobs.shape\[-1\]\) must lie in \[1, V\] = \[1, 5\]; got 6"),
    ((LOGITS, jnp.zeros((2, 3, 0)), jnp.zeros((2, 3, 0), jnp.int32)), {}, r"got 0"),
    ((LOGITS, LP, IDX[..., :1]), {}, r"ref_indices has shape \(2, 3, 1\).*\(2, 3, 2\)"),
    ((LOGITS, LP, IDX.astype(jnp.float32)), {}, "integer"),
    ((LOGITS, LP, IDX.at[1, 2, 0].set(5)), {}, r"holds 5, outside .* \[0, 5\)"),
    ((LOGITS, LP, IDX.at[0, 0, 1].set(-1)), {}, r"holds -1"),
    ((LOGITS, LP, IDX.at[0, 1, 1].set(0)), {}, "repeats index 0"),
    ((LOGITS, LP, IDX), {"ref_tail": jnp.zeros((2,))}, r"ref_tail has shape \(2,\)"),
    ((LOGITS, LP.astype(jnp.int32), IDX), {}, "ref_logprobs must be a floating"),
    ((LOGITS.astype(jnp.int32), LP, IDX), {}, "logits must be a floating"),
    ((jnp.zeros((2, 3, 0)), LP, IDX), {}, "V >= 1"),
    ((LOGITS, LP, IDX), {"direction": "sideways"}, "direction.*'forward'"),
    ((LOGITS, LP, IDX), {"beta": 1.5}, "beta"),
    ((LOGITS, LP, IDX), {"temperature": -1.0}, "temperature"),
    ((LOGITS, LP, IDX), {"chunk_size": 0}, "chunk_size"),
    ((LOGITS, LP, IDX), {"where": jnp.ones((2, 4), bool)}, "where"),
])
def test_kl_topk_bad_input_raises(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    ka.kl_topk(*args, **kwargs)


def test_indices_of_masked_positions_are_not_range_checked():
  where = jnp.ones((2, 3), bool).at[1, 2].set(False)
  out = ka.kl_topk(LOGITS, LP, IDX.at[1, 2, 0].set(99), where=where)
  assert out[1, 2] == 0.0 and np.isfinite(out).all()


def test_errors_raise_while_tracing():
  f = jax.jit(lambda x, y, i: ka.kl_topk(x, y, i[..., :1]))
  with pytest.raises(ValueError, match="ref_indices has shape"):
    f(LOGITS, LP, IDX)


@pytest.mark.parametrize("kwargs, match", [
    ({"weight": jnp.zeros((4, 5))}, r"hidden \[..., 4\]"),
    ({"weight": jnp.zeros((5,))}, "2-D"),
    ({"weight_layout": "dd"}, "weight_layout"),
    ({"bias": jnp.zeros((4,))}, r"bias has shape \(4,\)"),
    ({"ref_logprobs": jnp.zeros((2, 4, 2))}, "ref_logprobs has shape"),
    ({"direction": "up"}, "direction"),
])
def test_fused_bad_input_raises(kwargs, match):
  args = {"hidden": jnp.zeros((2, 3, 6)), "weight": jnp.zeros((6, 5)), "ref_logprobs": LP,
          "ref_indices": IDX, **kwargs}
  with pytest.raises(ValueError, match=match):
    ka.fused_linear_kl_topk(**args)


def test_fused_traced_temperature_raises():
  f = jax.jit(lambda t: ka.fused_linear_kl_topk(jnp.zeros((2, 3, 6)), jnp.zeros((6, 5)), LP, IDX,
                                                temperature=t))
  with pytest.raises(ValueError, match="static temperature"):
    f(1.0)


# ------------------------------------------------------------------------------------------------
# The two-level top-k, the positional tail, NaN, implementation="xla", the scalar fused path.


@pytest.mark.parametrize("v, k", [(64, 1), (64, 3), (64, 31), (4096, 8), (4096, 200),
                                  (1000, 7), (97, 5)])
def test_top_k_rows_is_exact_with_ties_by_lower_index(v, k):
  from klagg_jax._ops.topk import base as _topk
  rng = np.random.default_rng(v + k)
  x = rng.integers(0, 6, (7, v)).astype(np.float32)  # many ties
  x[0] = -np.inf
  x[1, : v // 2] = -np.inf
  values, indices = jax.jit(_topk.top_k_rows, static_argnums=1)(x, k)
  want_v, want_i = jax.lax.top_k(x, k)
  np.testing.assert_array_equal(values, want_v)
  np.testing.assert_array_equal(indices, want_i)
  order = np.lexsort((np.arange(v)[None].repeat(7, 0), -x), axis=-1)[:, :k]  # stable descending
  np.testing.assert_array_equal(indices, order)


def test_ref_tail_may_be_passed_positionally(rng):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  by_position = ka.kl_topk(a, *ka.topk_logprobs(b, 4))
  lp, idx, tail = ka.topk_logprobs(b, 4)
  np.testing.assert_array_equal(by_position, ka.kl_topk(a, lp, idx, ref_tail=tail))
  np.testing.assert_array_equal(
      ka.fused_linear_kl_topk(a[..., :6], np.eye(6, 17, dtype=np.float32), lp, idx, tail),
      ka.fused_linear_kl_topk(a[..., :6], np.eye(6, 17, dtype=np.float32), lp, idx,
                              ref_tail=tail))


@pytest.mark.parametrize("implementation", IMPLS)
@pytest.mark.parametrize("what", ["student", "teacher", "tail"])
def test_nan_at_a_valid_position_surfaces_and_masked_nan_does_not(rng, implementation, what):
  a, b = random_logits(rng, (6, 17)), random_logits(rng, (6, 17))
  lp, idx, tail = (np.array(x) for x in ka.topk_logprobs(b, 4))
  mask = np.array([True, True, False, True, True, True])
  clean = ka.kl_topk(a, lp, idx, tail, where=mask, implementation=implementation, chunk_size=2)
  for row in (1, 2):  # valid, masked
    a2, lp2, tail2 = a.copy(), lp.copy(), tail.copy()
    {"student": a2, "teacher": lp2, "tail": tail2[:, None]}[what][row, 0] = np.nan
    f = lambda x: ka.kl_topk(x, lp2, idx, tail2, where=mask, implementation=implementation,
                             chunk_size=2)
    got, g = jax.value_and_grad(lambda x: f(x).sum())(a2)
    out = np.asarray(f(a2))
    if mask[row]:
      assert np.isnan(out[row]) and np.isnan(got), (what, implementation)
    else:
      np.testing.assert_array_equal(out, clean)
      np.testing.assert_array_equal(np.asarray(g)[row], 0.0)
  h = random_logits(rng, (6, 5))
  h[1, 3] = np.nan
  w = random_logits(rng, (5, 17))
  for reduction in (None, "mean"):
    out = ka.fused_linear_kl_topk(h, w, lp, idx, tail, where=mask, reduction=reduction,
                                  implementation=implementation)
    assert np.isnan(np.asarray(out)[1] if reduction is None else out)


def test_issue_reproducers_now_print_nan():
  s = np.zeros((2, 4), np.float32)
  s[1, 0] = np.nan
  r = np.array([[0, 1, 2, 3]] * 2, np.float32)
  got = np.asarray(ka.kl_topk(s, *ka.topk_logprobs(r, 2)))
  assert np.isfinite(got[0]) and np.isnan(got[1])
  assert np.isnan(ka.kl_topk(s, *ka.topk_logprobs(r, 2), temperature=jnp.float32(2.0))[1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_every_implementation_matches_float64_in_value_and_gradient(rng, impl, direction):
  a, b = random_logits(rng, SHAPE), random_logits(rng, SHAPE)
  a[..., 3], b[..., 3] = -np.inf, -np.inf  # banned on both sides (never stored)
  mask = rng.random(SHAPE[:-1]) > 0.3
  a[~mask] = np.nan
  lp, idx, tail = ka.topk_logprobs(b, 5)

  f = lambda x: (ka.kl_topk(x, lp, idx, tail, where=mask, direction=direction, beta=0.3,
                            temperature=0.9, chunk_size=4, implementation=impl) ** 2).sum()
  value, g = jax.value_and_grad(f)(a)
  clean = np.where(mask[..., None], a, 0.0)
  want = (ref.kl_topk(clean, lp, idx, tail, direction, where=mask, temperature=0.9,
                      beta=0.3) ** 2).sum()
  want_grad = grad64(lambda x, y, t: (jnp.where(mask, plain_topk(
      x, y, idx, t, direction, beta=0.3, temperature=0.9), 0.0) ** 2).sum(), clean, lp, tail)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  assert np.isfinite(g).all()
  np.testing.assert_allclose(g, want_grad, rtol=1e-4, atol=1e-6)
  t = rng.standard_normal(SHAPE).astype(np.float32)
  jvp = lambda: jax.jvp(lambda x: ka.kl_topk(x, lp, idx, tail, implementation=impl),
                        (np.nan_to_num(a),), (t,))
  if impl in FORWARD_MODE:
    jvp()
  else:
    with pytest.raises(TypeError, match="implementation=\"xla\""):
      jvp()


@pytest.mark.parametrize("impl", LOGPROBS_IMPLS)
def test_every_topk_logprobs_implementation_matches_float64(rng, impl):
  b = random_logits(rng, SHAPE)
  b[..., 3] = -np.inf
  lp, idx, tail = ka.topk_logprobs(b, 5, implementation=impl)
  want_lp, want_idx, want_tail = ref.topk_logprobs(b, 5)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(lp, want_lp, **TOL)
  np.testing.assert_allclose(tail, want_tail, **TOL)


@pytest.mark.parametrize("impl, reduction, direction", [
    (impl, reduction, direction) for impl in FUSED_IMPLS
    for reduction, direction in (("mean", "forward"), ("sum", "reverse"), ("mean", "js"))])
def test_fused_reduced_matches_float64(rng, impl, reduction, direction):
  n, d, v = 12, 6, 17
  h, w, bias = (random_logits(rng, s, scale=1.0) for s in ((n, d), (d, v), (v,)))
  lp, idx, tail = ka.topk_logprobs(random_logits(rng, (n, v)), 4)
  mask = rng.random(n) > 0.3

  def fused(h, w, bias):
    return ka.fused_linear_kl_topk(h, w, lp, idx, tail, bias=bias, where=mask,
                                   direction=direction, chunk_size=5, reduction=reduction,
                                   temperature=0.8, implementation=impl)

  def materialized(h, w, bias):  # the float64 truth
    kl = jnp.where(mask, plain_topk(h @ w + bias[None], np.float64(lp), idx, np.float64(tail),
                                    direction, temperature=0.8), 0.0)
    return kl.sum() / (mask.sum() if reduction == "mean" else 1.0)

  if refused("fused", impl, "topk", lambda: fused(h, w, bias)):
    return
  got = jax.value_and_grad(fused, (0, 1, 2))(h, w, bias)
  with x64():
    want = jax.value_and_grad(materialized, (0, 1, 2))(*(np.float64(x) for x in (h, w, bias)))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, e in zip(got[1], want[1]):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)
