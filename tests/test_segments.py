"""Packed rows (``segment_ids``): a packed batch equals the same sequences unpacked and padded.

Every aggregator, the barrier and the tools are checked against the unpacked batch (value and
gradient), each aggregator against a float64 numpy reference per segment, and bad inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import klagg_jax as ka
from klagg_jax import _reference as ref
from klagg_jax import _segments
from tests.helpers import x64

T, S = 16, 4  # positions per row; output columns (one more than any row uses)
# Row 0: segments of 5, 3 and 6 positions, then a padding tail of 2.
# Row 1: 7 positions, then 4 whose positions are all masked by ``where``, then 2, then 3 padding.
SEGMENT_IDS = np.array([[1] * 5 + [2] * 3 + [3] * 6 + [0] * 2,
                        [1] * 7 + [2] * 4 + [3] * 2 + [0] * 3], np.int32)
WHERE = np.ones((2, T), bool)
WHERE[1, 7:11] = False  # segment 2 of row 1: every position masked
WHERE[0, 2] = False  # and one masked position inside a segment

AGGREGATORS = {  # name: (library function, reference, keywords)
    "mean": (ka.mean, ref.mean, {}),
    "rmse": (ka.rmse, ref.rmse, {}),
    "max": (ka.maximum, ref.maximum, {}),
    "p50": (ka.quantile, ref.quantile, {"q": 0.5}),
    "p90": (ka.quantile, ref.quantile, {"q": 0.9}),
    "soft_p90": (ka.soft_quantile, ref.soft_quantile, {"q": 0.9}),
    "cvar75": (ka.cvar, ref.cvar, {"q": 0.75}),
    "smooth_max": (ka.smooth_max, ref.smooth_max, {"temperature": 0.7}),
    "power_mean": (ka.power_mean, ref.power_mean, {"p": 3.0}),
}


def unpack_index():
  """(index [B * S, T] into the flattened packed row, valid [B * S, T]): sequence (b, k) of the
  packed batch laid out alone in row b * S + k - 1, left-aligned, padded."""
  index = np.zeros((2 * S, T), np.int32)
  valid = np.zeros((2 * S, T), bool)
  for b in range(2):
    for k in range(1, S + 1):
      pos = np.flatnonzero(SEGMENT_IDS[b] == k)
      index[b * S + k - 1, :pos.size] = b * T + pos
      valid[b * S + k - 1, :pos.size] = WHERE[b, pos]
  return index, valid


def packed_values(rng):
  """x [2, T] with NaN wherever a position is padding or masked (garbage never leaks)."""
  x = (rng.standard_normal((2, T)) ** 2 + 0.05).astype(np.float32)
  return np.where(WHERE & (SEGMENT_IDS > 0), x, np.nan).astype(np.float32)


def unpacked(x):
  index, valid = unpack_index()
  return x.reshape(-1)[index], valid


@functools.lru_cache(maxsize=None)
def packed_and_unpacked(name):
  """One jitted program: (packed, unpacked) value and gradient of sum(c * agg), the packed
  aggregates, and the gradient of the empty columns (the all-masked segment, the unused S)."""
  fn, _, kw = AGGREGATORS[name]
  agg = lambda x: fn(x, where=WHERE, segment_ids=SEGMENT_IDS, max_segments=S, **kw)

  def plain(x, c):
    xu, valid = unpacked(x)
    return (c.reshape(-1) * fn(xu, where=valid, **kw)).sum()

  def run(x, c):
    empty = jax.value_and_grad(lambda v: agg(v)[1, 1] + agg(v)[:, 3].sum())(x)
    return (jax.value_and_grad(lambda v: (c * agg(v)).sum())(x),
            jax.value_and_grad(plain)(x, c), agg(x), empty)

  return jax.jit(run)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_packed_equals_unpacked_and_float64_reference(rng, name):
  fn, want_fn, kw = AGGREGATORS[name]
  x = packed_values(rng)
  c = rng.standard_normal((2, S)).astype(np.float32)
  (v_packed, g_packed), (v_plain, g_plain), got, (v_empty, g_empty) = (
      packed_and_unpacked(name)(x, c))
  np.testing.assert_allclose(v_packed, v_plain, rtol=2e-6, atol=1e-6)
  np.testing.assert_allclose(g_packed, g_plain, rtol=2e-6, atol=1e-7)
  assert np.isfinite(g_packed).all()
  garbage = ~(WHERE & (SEGMENT_IDS > 0))
  np.testing.assert_array_equal(g_packed[garbage], 0.0)  # padding and masked: exactly zero
  # Empty segments: 0 with a zero gradient; every segment against float64.
  assert v_empty == 0.0
  np.testing.assert_array_equal(g_empty, 0.0)
  assert got.shape == (2, S) and got.dtype == jnp.float32
  want = ref.per_segment(want_fn, x, SEGMENT_IDS, S, where=WHERE, **kw)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_nan_at_a_valid_position_gives_nan_for_its_segment_only(rng):
  x = packed_values(rng)
  dirty = x.copy()
  dirty[0, 9] = np.nan  # segment 3 of row 0

  @jax.jit
  def run(v):
    return {name: fn(v, where=WHERE, segment_ids=SEGMENT_IDS, max_segments=S, **kw)
            for name, (fn, _, kw) in AGGREGATORS.items()}

  clean, got = run(x), run(dirty)
  for name in AGGREGATORS:
    assert np.isnan(got[name][0, 2]), name
    others = ~np.isnan(np.asarray(got[name]))
    assert others.sum() == 2 * S - 1, name
    np.testing.assert_array_equal(got[name][others], clean[name][others], err_msg=name)


def test_eager_calls_read_max_segments_from_the_ids(rng):
  x = packed_values(rng)
  got = ka.mean(x, where=WHERE, segment_ids=SEGMENT_IDS)
  assert got.shape == (2, 3)  # the largest id
  np.testing.assert_allclose(got, ref.per_segment(ref.mean, x, SEGMENT_IDS, 3, where=WHERE),
                             rtol=1e-6)
  # Ids that are constants of a jitted function are concrete too: read and checked at trace.
  jitted = jax.jit(lambda v: ka.mean(v, where=WHERE, segment_ids=SEGMENT_IDS))(x)
  np.testing.assert_array_equal(jitted.shape, (2, 3))
  with pytest.raises(ValueError, match="id 3, above max_segments=2"):
    jax.jit(lambda v: ka.mean(v, segment_ids=SEGMENT_IDS, max_segments=2))(x)


def barrier_case(rng, vocab=6):
  logits = rng.standard_normal((2, T, vocab)).astype(np.float32)
  ref_logits = (logits + 0.7 * rng.standard_normal((2, T, vocab))).astype(np.float32)
  garbage = ~(WHERE & (SEGMENT_IDS > 0))
  logits[garbage] = np.nan  # padding and masked logits must never be read
  return logits, ref_logits


@pytest.mark.parametrize("agg", ["rmse", "cvar75"])
def test_barrier_packed_equals_unpacked(rng, agg):
  logits, ref_logits = barrier_case(rng)
  index, valid = unpack_index()
  kw = {"agg": agg, "tau": 0.05, "lam": 2.0}

  def packed(z):
    return ka.kl_barrier(z, ref_logits, where=WHERE, segment_ids=SEGMENT_IDS, max_segments=S,
                         **kw)

  def plain(z):
    zu = z.reshape(-1, z.shape[-1])[index]
    ru = ref_logits.reshape(-1, z.shape[-1])[index]
    return ka.kl_barrier(zu, ru, where=valid, **kw)

  run = jax.jit(lambda z: (jax.value_and_grad(packed, has_aux=True)(z),
                           jax.value_and_grad(plain, has_aux=True)(z)))
  ((loss_p, m_p), g_p), ((loss_u, m_u), g_u) = run(logits)
  np.testing.assert_allclose(loss_p, loss_u, rtol=2e-6)
  assert loss_p > 0.0
  for name in m_u:
    np.testing.assert_allclose(m_p[name], m_u[name], rtol=2e-6, atol=1e-7, err_msg=name)
  np.testing.assert_allclose(g_p, g_u, rtol=2e-6, atol=1e-8)
  garbage = ~(WHERE & (SEGMENT_IDS > 0))
  np.testing.assert_array_equal(g_p[garbage], 0.0)
  # Eager (max_segments from the ids) gives the same; the metrics average over the 5 non-empty
  # segments, the loss against float64: lam * mean over them of relu(agg - tau).
  loss_e, m_e = ka.kl_barrier(logits, ref_logits, where=WHERE, segment_ids=SEGMENT_IDS, **kw)
  np.testing.assert_allclose(loss_e, loss_p, rtol=1e-6)
  kl = ref.kl_per_position(np.nan_to_num(logits), ref_logits)
  fn, want_fn, akw = AGGREGATORS[agg]
  per_seg = ref.per_segment(want_fn, kl, SEGMENT_IDS, S, where=WHERE, **akw)
  nonempty = np.array([[True, True, True, False], [True, False, True, False]])
  want = 2.0 * np.maximum(per_seg[nonempty] - 0.05, 0.0).mean()
  np.testing.assert_allclose(loss_p, want, rtol=2e-5)
  np.testing.assert_allclose(m_p["div"], per_seg[nonempty].mean(), rtol=2e-5)
  assert m_p["n_positions"] == (WHERE & (SEGMENT_IDS > 0)).sum()


def test_barrier_token_level_ids_only_mask_padding(rng):
  logits, ref_logits = barrier_case(rng)
  mask = WHERE & (SEGMENT_IDS > 0)
  x = packed_values(rng)

  @jax.jit
  def run(z, x):
    return (ka.kl_barrier(z, ref_logits, where=WHERE, segment_ids=SEGMENT_IDS, axis=None)[0],
            ka.kl_barrier(z, ref_logits, where=mask, axis=None)[0],
            ka.cvar(x, 0.8, where=WHERE, segment_ids=SEGMENT_IDS, axis=None),
            ka.cvar(x, 0.8, where=mask, axis=None))

  got, want, got_cvar, want_cvar = run(logits, x)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got_cvar, want_cvar, rtol=1e-6)


def test_callable_aggregator_receives_segment_ids(rng):
  seen = {}

  def my_agg(x, *, where=None, axis=-1, segment_ids=None, max_segments=None):
    seen.update(segment_ids=segment_ids, max_segments=max_segments)
    return ka.mean(x, where=where, axis=axis, segment_ids=segment_ids, max_segments=max_segments)

  logits, ref_logits = barrier_case(rng)
  loss, _ = ka.kl_barrier(logits, ref_logits, where=WHERE, agg=my_agg,
                          segment_ids=SEGMENT_IDS, max_segments=S)
  assert seen["max_segments"] == S and seen["segment_ids"].shape == (2, T)
  want, _ = ka.kl_barrier(logits, ref_logits, where=WHERE, agg="mean",
                          segment_ids=SEGMENT_IDS, max_segments=S)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  x = packed_values(rng)
  got = ka.aggregate(x, my_agg, where=WHERE, segment_ids=SEGMENT_IDS)
  assert seen["max_segments"] == 3 and got.shape == (2, 3)


@pytest.mark.parametrize("how", ["soft_p90", "smooth_max"])
def test_check_grads_float64_per_segment(how):
  rng = np.random.default_rng(5)
  with x64():
    x = rng.random((2, T)) + 0.1  # distinct values: the sort-based ones are smooth here
    f = jax.jit(lambda v: ka.aggregate(v, how, where=WHERE, segment_ids=SEGMENT_IDS,
                                       max_segments=S))
    assert f(x).dtype == jnp.float64
    check_grads(f, (x,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_jit_vmap_grad_invariance(rng):
  x = packed_values(rng)
  for how in ("soft_p90",):
    f = lambda v, s, m: ka.aggregate(v, how, where=m, segment_ids=s, max_segments=S)
    eager = f(x, SEGMENT_IDS, WHERE)
    np.testing.assert_allclose(jax.jit(f)(x, SEGMENT_IDS, WHERE), eager, rtol=1e-6, err_msg=how)
    np.testing.assert_allclose(jax.vmap(f)(x, SEGMENT_IDS, WHERE), eager, rtol=1e-6, err_msg=how)
    g = jax.jit(jax.grad(lambda v: f(v, SEGMENT_IDS, WHERE).sum()))(x)
    gv = jax.jit(jax.vmap(jax.grad(lambda v, s, m: f(v, s, m).sum())))(x, SEGMENT_IDS, WHERE)
    np.testing.assert_allclose(g, gv, rtol=1e-6, atol=1e-8, err_msg=how)


def test_ids_above_max_segments_are_ignored_under_jit(rng):
  x = packed_values(rng)
  got = jax.jit(lambda v, s: ka.cvar(v, 0.75, where=WHERE, segment_ids=s, max_segments=2))(
      x, SEGMENT_IDS)
  want = ka.cvar(x, 0.75, where=WHERE & (SEGMENT_IDS <= 2), segment_ids=SEGMENT_IDS * (
      SEGMENT_IDS <= 2), max_segments=2)
  np.testing.assert_array_equal(got, want)


def test_other_axis_moves_last(rng):
  x = packed_values(rng)
  got = ka.soft_quantile(x.T, 0.9, where=WHERE.T, segment_ids=SEGMENT_IDS.T, axis=0,
                         max_segments=S)
  np.testing.assert_allclose(
      got, ka.soft_quantile(x, 0.9, where=WHERE, segment_ids=SEGMENT_IDS, max_segments=S),
      rtol=1e-6)


def test_zero_length_axis_with_segments():
  value, g = jax.jit(jax.value_and_grad(lambda v: ka.cvar(
      v, 0.5, segment_ids=jnp.zeros((2, 0), jnp.int32), max_segments=3).sum()))(jnp.zeros((2, 0)))
  assert value == 0.0 and g.shape == (2, 0)
  assert ka.mean(jnp.zeros((2, 0)), segment_ids=jnp.zeros((2, 0), jnp.int32)).shape == (2, 1)


def test_calibrate_tau_and_separation_count_segments_as_sequences(rng):
  x = packed_values(rng)
  xu, valid = unpacked(x)
  for agg in ("p90",):
    got = ka.calibrate_tau(x, agg=agg, where=WHERE, segment_ids=SEGMENT_IDS, fire_rate=0.3)
    want = ka.calibrate_tau(xu, agg=agg, where=valid, fire_rate=0.3)
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=agg)
  jitted = jax.jit(lambda v: ka.calibrate_tau(v, agg="rmse", where=WHERE, fire_rate=0.3,
                                              segment_ids=SEGMENT_IDS, max_segments=S))
  np.testing.assert_allclose(jitted(x), ka.calibrate_tau(xu, agg="rmse", where=valid,
                                                         fire_rate=0.3), rtol=1e-6)
  y = (2.0 * x).astype(np.float32)
  for axis in (-1, None):
    got = ka.separation(x, y, aggs=("cvar75",), where_a=WHERE, where_b=WHERE, axis=axis,
                        segment_ids_a=SEGMENT_IDS, segment_ids_b=SEGMENT_IDS)
    want = ka.separation(xu, 2.0 * xu, aggs=("cvar75",), where_a=valid, where_b=valid,
                         axis=axis)
    for name in want:
      for key in ("a", "b", "ratio"):
        np.testing.assert_allclose(got[name][key], want[name][key], rtol=1e-6)


def test_packed_memory_does_not_grow_with_segments_times_positions():
  """No [S, T] array per row: the compiled value-and-gradient temp at S = 64 segments exceeds
  the one at S = 2 by far less than one [B, S, T] float32 array (2 MiB here)."""
  b, t = 2, 4096
  x = jax.ShapeDtypeStruct((b, t), jnp.float32)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def temp(how, s):
    f = jax.jit(jax.value_and_grad(
        lambda v, i: ka.aggregate(v, how, segment_ids=i, max_segments=s).sum()))
    return f.lower(x, seg).compile().memory_analysis().temp_size_in_bytes

  for how in ("cvar95", "rmse"):
    assert temp(how, 64) - temp(how, 2) < b * t * 4, how


# ------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("call, match", [
    (lambda x: ka.mean(x, segment_ids=np.ones((2, T), np.float32)), "integer"),
    (lambda x: ka.mean(x, segment_ids=np.ones((2, T), bool)), "integer"),
    (lambda x: ka.mean(x, segment_ids=np.ones((3, T), np.int32)), "does not broadcast"),
    (lambda x: ka.mean(x, segment_ids=np.ones((2, T, 2), np.int32)), "does not broadcast"),
    (lambda x: ka.cvar(x, 0.5, segment_ids=SEGMENT_IDS, max_segments=2), "id 3, above"),
    (lambda x: ka.mean(x, segment_ids=-SEGMENT_IDS), ">= 0"),
    (lambda x: ka.mean(x, segment_ids=-SEGMENT_IDS, axis=None), ">= 0"),
    (lambda x: ka.mean(x, segment_ids=SEGMENT_IDS, max_segments=0), "max_segments must be >= 1"),
    (lambda x: ka.mean(x, segment_ids=SEGMENT_IDS, max_segments=2.0), "static Python int"),
    (lambda x: ka.aggregate(x, "mean", max_segments=3), "without segment_ids"),
    (lambda x: jax.jit(lambda v, s: ka.quantile(v, 0.5, segment_ids=s))(x, SEGMENT_IDS),
     "max_segments is required"),
    (lambda x: jax.vmap(lambda v, s: ka.rmse(v, segment_ids=s))(x, SEGMENT_IDS),
     "max_segments is required"),
    (lambda x: ka.kl_barrier(np.zeros((2, T, 3)), np.zeros((2, T, 3)),
                             segment_ids=SEGMENT_IDS.astype(np.float32)), "integer"),
    (lambda x: ka.kl_barrier(np.zeros((2, T, 3)), np.zeros((2, T, 3)), segment_ids=SEGMENT_IDS,
                             max_segments=1), "above max_segments=1"),
    (lambda x: jax.jit(lambda s: ka.kl_barrier(np.zeros((2, T, 3)), np.zeros((2, T, 3)),
                                               segment_ids=s))(SEGMENT_IDS),
     "max_segments is required"),
    (lambda x: ka.calibrate_tau(x, agg="rmse", segment_ids=SEGMENT_IDS[:, :3]), "broadcast"),
])
def test_bad_segment_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call(jnp.ones((2, T)))


def test_spans_processes_predicate():
  """The check behind the tools' multi-process error, on a stand-in for a global array (one
  process cannot build an array with shards on another)."""

  class GlobalArray:
    is_fully_addressable = False

  assert _segments.spans_processes(GlobalArray())
  assert not _segments.spans_processes(jnp.ones(3))
  assert not _segments.spans_processes(np.ones(3))
  jax.jit(lambda v: _segments.spans_processes(v) and pytest.fail("a tracer spans no process"))(
      jnp.ones(3))
  with pytest.raises(ValueError, match="process_allgather"):
    _segments.check_addressable("f", "x", GlobalArray())
  with pytest.raises(ValueError, match="max_segments is required.*span several processes"):
    _segments.resolve_max_segments(GlobalArray(), None)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (a batch-sharded mesh)")
@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_batch_sharded_rows_give_what_one_device_gives(rng, axis_type):
  from jax.sharding import AxisType, NamedSharding, PartitionSpec
  logits, ref_logits = barrier_case(rng)
  f = jax.jit(jax.value_and_grad(lambda z, s: ka.kl_barrier(
      z, ref_logits, where=WHERE, agg="p90", segment_ids=s, max_segments=S)[0]))
  want, g_want = f(logits, SEGMENT_IDS)
  mesh = jax.make_mesh((2,), ("b",), axis_types=(getattr(AxisType, axis_type),),
                       devices=jax.devices()[:2])
  with jax.set_mesh(mesh):
    put = lambda v: jax.device_put(v, NamedSharding(mesh, PartitionSpec("b")))
    got, g = f(put(logits), put(SEGMENT_IDS))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(g, g_want, rtol=1e-6, atol=1e-9)
