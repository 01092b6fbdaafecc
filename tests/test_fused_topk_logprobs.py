"""fused_linear_topk_logprobs against float64 numpy and against topk_logprobs of the logits.

Most cases pin the vocabulary tile to a few entries (``TILE``), so that small vocabularies run
many tiles: candidates merged across tiles, ties split between tiles, entries evicted long after
they were kept.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import klagg_jax as ka
from klagg_jax._ops.topk import fused_logprobs as fused_topk
from klagg_jax import _reference as ref
from tests.helpers import to_f64, x64

N, D, V = 12, 6, 96
TOL = {"rtol": 1e-6, "atol": 1e-6}
TOPK = jax.jit(ka.topk_logprobs, static_argnums=1, static_argnames=("temperature",))


@pytest.fixture
def tile(monkeypatch):
  """Vocabulary tiles of 8 entries: 12 tiles of V = 96."""
  monkeypatch.setattr(fused_topk, "_TILE", 8)
  return 8


@functools.cache
def _jitted(tile, **static):
  del tile  # part of the cache key: read at trace time
  return jax.jit(functools.partial(ka.fused_linear_topk_logprobs, **static))


def call(h, w, *, bias=None, **static):
  return _jitted(fused_topk._TILE, **static)(h, w, bias=bias)


def inputs(rng, n=N, d=D, v=V, layout="dv", dtype=np.float32):
  h = rng.standard_normal((n, d)).astype(dtype)
  w = (rng.standard_normal((d, v) if layout == "dv" else (v, d)) * 1.5).astype(dtype)
  b = rng.standard_normal(v).astype(dtype)
  return h, w, b


def assert_same(got, want, tol=TOL):
  (lp, idx, tail), (w_lp, w_idx, w_tail) = got, want
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(w_idx))
  np.testing.assert_allclose(np.asarray(lp, np.float64), np.asarray(w_lp, np.float64), **tol)
  np.testing.assert_allclose(np.asarray(tail, np.float64), np.asarray(w_tail, np.float64), **tol)


# ------------------------------------------------------------------------------------------------
# Values.


@pytest.mark.parametrize("k,layout,chunk_size,tiled", [
    (1, "dv", 5, True), (5, "vd", None, True), (13, "dv", 5, True), (V, "vd", 5, True),
    (8, "dv", None, False)])
def test_matches_float64_reference(monkeypatch, rng, k, layout, chunk_size, tiled):
  if tiled:
    monkeypatch.setattr(fused_topk, "_TILE", 8)
  h, w, b = inputs(rng, layout=layout)
  got = call(h, w, bias=b, k=k, weight_layout=layout, chunk_size=chunk_size)
  assert got[0].dtype == jnp.float32 and got[1].dtype == jnp.int32 and got[2].dtype == jnp.float32
  assert got[0].shape == got[1].shape == (N, k) and got[2].shape == (N,)
  want = ref.linear_topk_logprobs(h, w, k, b, weight_layout=layout)
  assert_same(got, want, {"rtol": 2e-6, "atol": 2e-6})


@pytest.mark.parametrize("implementation", ["chunked", "xla"])
def test_equals_topk_logprobs_of_the_logits(tile, rng, implementation):
  h, w, b = inputs(rng)
  h = h.reshape(3, 4, D)
  logits = jnp.einsum("btd,dv->btv", h, w, precision="highest") + b[None, None]
  want = TOPK(logits, 7, temperature=0.7)
  assert_same(call(h, w, bias=b, k=7, temperature=0.7, implementation=implementation), want)


def test_float64_is_exact(tile, rng):
  with x64():
    h, w, b = (x.astype(np.float64) for x in inputs(rng))
    got = call(h, w, bias=b, k=9, temperature=1.3, softcap=4.0)
    assert got[0].dtype == jnp.float64
    assert_same(got, ref.linear_topk_logprobs(h, w, 9, b, 1.3, 4.0), {"rtol": 1e-12, "atol": 0})


def test_tail_exact_where_the_mass_is_tiny(tile):
  """Mass 1e-30 outside the kept entries: 1 - sum exp(logprobs) would round to 0 in float32."""
  h = np.ones((2, 1), np.float32)
  w = np.zeros((1, V), np.float32)
  b = np.full(V, -72.0, np.float32)  # 90 entries of mass ~ e^-72 = 5e-32 each
  b[[3, 17, 40, 41, 77, 95]] = [0.0, 1.0, 0.5, -1.0, 2.0, 0.25]
  lp, idx, tail = call(h, w, bias=b, k=6)
  want = ref.linear_topk_logprobs(h, w, 6, b)
  assert_same((lp, idx, tail), want)
  assert np.all(np.asarray(tail) < -60) and np.all(np.asarray(tail) != -np.inf)


def test_ties_by_lower_index_and_signed_zeros(tile):
  """Equal logits across and within tiles: the lower index first; -0.0 ties with 0.0."""
  values = np.array([0.0, -0.0, 1.0, -0.0, 0.0, 1.0, -1.0, 1.0], np.float32)
  w = np.tile(values, V // values.size)[None, :]  # logit = 1 * weight: signed zeros preserved
  w[0, 50] = -0.0
  h = np.ones((3, 1), np.float32)
  for k in (1, 4, 40):
    got = call(h, w, k=k)
    assert_same(got, ref.linear_topk_logprobs(h, w, k))


def test_masked_vocabulary_and_fewer_finite_entries_than_k(tile, rng):
  """-inf biases mask entries; with k above the finite count the -inf entries follow by index."""
  h, w, b = inputs(rng)
  b[rng.permutation(V)[:V - 5]] = -np.inf
  for k, cap in ((3, None), (9, 2.0), (V, 2.0)):
    got = call(h, w, bias=b, k=k, softcap=cap)
    want = ref.linear_topk_logprobs(h, w, k, b, softcap=cap)
    assert_same(got, want)
    assert (np.asarray(got[2]) == -np.inf).all() == (k >= 5)


# Caps well above the logits' spread: a saturated tanh rounds distinct logits to ties in float32.
@pytest.mark.parametrize("cap,temperature", [(3.0, 2.0), (30.0, 0.5)])
def test_softcap_then_temperature(tile, rng, cap, temperature):
  h, w, b = inputs(rng)
  got = call(h, w, bias=b, k=7, softcap=cap, temperature=temperature)
  assert_same(got, ref.linear_topk_logprobs(h, w, 7, b, temperature, cap),
              {"rtol": 2e-6, "atol": 2e-6})


def test_bfloat16_inputs_within_16_bit_rounding(tile, rng):
  h, w, b = inputs(rng, dtype=jnp.bfloat16)
  got = call(h, w, bias=b, k=6)
  assert got[0].dtype == jnp.float32
  # Products of bf16 values accumulate in float32: the float64 truth of the same values.
  assert_same(got, ref.linear_topk_logprobs(to_f64(h), to_f64(w), 6, to_f64(b)),
              {"rtol": 1e-5, "atol": 1e-5})
  # The materialized composition rounds its logits to bf16 first: agreement to that rounding.
  lp, _, tail = TOPK(jnp.asarray(h) @ jnp.asarray(w) + b[None], 6)
  np.testing.assert_allclose(got[0], lp, atol=0.1)
  np.testing.assert_allclose(got[2], tail, atol=0.1)


def test_nan_hidden_state_gives_nan_for_its_row_only(tile, rng):
  h, w, b = inputs(rng)
  h[4, 2] = np.nan
  lp, idx, tail = call(h, w, bias=b, k=5)
  assert np.isnan(lp[4]).all() and np.isnan(tail[4])
  assert ((0 <= np.asarray(idx)) & (np.asarray(idx) < V)).all()
  keep = np.arange(N) != 4
  want = ref.linear_topk_logprobs(h[keep], w, 5, b)
  assert_same((lp[keep], idx[keep], tail[keep]), want)


def test_feeds_kl_topk(rng):
  """The stored teacher from hidden states gives the same loss as from its logits."""
  h, w, b = inputs(rng)
  student = rng.standard_normal((N, V)).astype(np.float32)

  @jax.jit
  def both(student, h, w, b):
    stored = ka.fused_linear_topk_logprobs(h, w, 8, bias=b)
    from_logits = ka.topk_logprobs(h @ w + b[None], 8)
    return ka.kl_topk(student, *stored), ka.kl_topk(student, *from_logits)

  np.testing.assert_allclose(*both(student, h, w, b), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Transformations.


def test_eager_vmap_and_leading_shapes(rng):
  h, w, b = inputs(rng)
  eager = ka.fused_linear_topk_logprobs(h, w, 4, bias=b)  # one block, one tile: no loop
  batched = jax.jit(jax.vmap(lambda x: ka.fused_linear_topk_logprobs(x, w, 4, bias=b,
                                                                     chunk_size=2)))(
      h.reshape(3, 4, D))
  leading = call(h.reshape(2, 6, D), w, bias=b, k=4, chunk_size=5)
  for got in (batched, leading):
    assert_same(jax.tree.map(lambda x: x.reshape((N,) + x.shape[2:]), got), eager)
  empty = ka.fused_linear_topk_logprobs(np.zeros((0, 3, D), np.float32), w, 4)
  assert [x.shape for x in empty] == [(0, 3, 4), (0, 3, 4), (0, 3)]


def test_gradient_is_refused_on_the_chunked_path_and_given_by_xla(rng):
  h, w, b = inputs(rng)

  def loss(h, implementation):
    lp, _, tail = ka.fused_linear_topk_logprobs(h, w, 4, bias=b, implementation=implementation)
    return lp.sum() + tail.sum()

  with pytest.raises(ValueError, match="no gradient.*implementation='xla'"):
    jax.grad(loss, argnums=0)(h, "chunked")
  z = jnp.asarray(h) @ w + b[None]
  want = jax.jit(jax.grad(lambda z: sum(x.sum() for x in ka.topk_logprobs(z, 4)[::2])))(z) @ w.T
  got = jax.jit(jax.grad(loss), static_argnums=1)(h, "xla")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # A teacher under stop_gradient inside a student's loss is fine.
  jax.jit(jax.grad(lambda h: loss(jax.lax.stop_gradient(h), None) + h.sum()))(h)


# ------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=0), r"k must lie in \[1, V\] = \[1, 96\]; got 0"),
    (dict(k=97), r"k must lie in \[1, V\] = \[1, 96\]; got 97"),
    (dict(k=2.0), "k must be a Python int"),
    (dict(k=3, temperature=0.0), "temperature must be > 0"),
    (dict(k=3, softcap=0.0), "softcap must be > 0"),
    (dict(k=3, softcap=True), "softcap"),
    (dict(k=3, weight_layout="DV"), "Unknown weight_layout 'DV'"),
    (dict(k=3, implementation="pallas"), "Unknown implementation 'pallas'"),
    (dict(k=3, chunk_size=0), "chunk_size must be a positive int"),
    (dict(k=3, precision="float"), "precision must be None"),
    (dict(k=3, bias=np.zeros(95, np.float32)), r"bias has shape \(95,\); expected \(96,\)"),
])
def test_bad_static_input_raises(rng, kwargs, match):
  h, w, _ = inputs(rng)
  with pytest.raises(ValueError, match=match):
    ka.fused_linear_topk_logprobs(h, w, **kwargs)


def test_traced_temperature_under_jit_raises(rng):
  h, w, _ = inputs(rng)
  with pytest.raises(ValueError, match="static temperature"):
    jax.jit(lambda t: ka.fused_linear_topk_logprobs(h, w, 3, temperature=t))(2.0)


def test_shape_mismatch_names_both(rng):
  h, w, _ = inputs(rng)
  with pytest.raises(ValueError, match=r"hidden has shape \(12, 5\).*expected hidden \[..., 6\]"):
    ka.fused_linear_topk_logprobs(h[:, :5], w, 3)
  with pytest.raises(ValueError, match="must be a floating array"):
    ka.fused_linear_topk_logprobs(h.astype(np.int32), w, 3)


# ------------------------------------------------------------------------------------------------
# Memory (compile only: nothing is allocated or run).


@pytest.mark.cpu_only
@pytest.mark.parametrize("n,d,v,dtype", [(4096, 64, 8192, jnp.float32),
                                         (4096, 2048, 8192, jnp.bfloat16)])
def test_compiled_temp_is_under_a_quarter_of_one_logits_array(n, d, v, dtype):
  """The default blocks hold a few [rows, tile] arrays, never [N, V]; a 16-bit weight is not
  copied (at D = N / 2 such a copy alone would be a quarter of one [N, V] float32 array)."""
  specs = [jax.ShapeDtypeStruct(s, dtype) for s in ((n, d), (d, v), (v,))]
  f = jax.jit(lambda h, w, b: ka.fused_linear_topk_logprobs(h, w, 32, bias=b, softcap=30.0))
  temp = f.lower(*specs).compile().memory_analysis().temp_size_in_bytes
  assert temp <= 0.25 * n * v * 4, temp
