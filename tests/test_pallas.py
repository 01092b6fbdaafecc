"""The Pallas divergence kernels through Pallas' interpreter, against float64 truths.

Tiles are tiny (4 rows x 8 entries) so every case spans at least 3 vocabulary tiles with a
ragged last one, and a ragged last row block. The GPU kernels are lowered for CUDA from this CPU
(no GPU needed) to check that they are the Triton kernels and that every operation lowers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klagg_jax import _reference as ref
from klagg_jax._chunked import Chunking
from klagg_jax._ops.divergence.base import Spec, resolve_direction
from klagg_jax._ops.divergence.chunked import divergence_rows as chunked_rows
from klagg_jax._ops.divergence import pallas as pallas_div
from klagg_jax._ops.divergence import pallas_kernels, pallas_tiles
from klagg_jax._ops.divergence.pallas_tiles import Tiles

from helpers import cuda_target, random_logits, to_f64, x64

DIRECTIONS = ("reverse", "forward", "js")
TILES = Tiles(rows=4, vocab=8)
N, V = 11, 27  # 3 row blocks (the last ragged), 4 vocabulary tiles (the last holds 3 entries)


def spec_for(direction="reverse", beta=0.5, temperature=1.0, ref_grad=True, v=V):
  direction, beta = resolve_direction(direction, beta)
  return Spec(direction=direction, beta=beta, inv_temperature=1.0 / temperature,
              chunks=Chunking(None, v), ref_grad=ref_grad)


_rows_jit = jax.jit(pallas_div.divergence_rows, static_argnums=(3, 4))


def rows(a, b, mask=None, tiles=TILES, **kw):
  """The kernel under ``jit`` (one compilation per configuration, not one per operation)."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  mask = jnp.ones(a.shape[:1], bool) if mask is None else jnp.asarray(mask)
  return _rows_jit(a, b, mask, spec_for(v=a.shape[-1], **kw), tiles)


def plain64(a, b, direction, beta=0.5, temperature=1.0):
  """The textbook per-row divergence in jax.numpy, for float64 autodiff truths (finite inputs)."""
  lp = jax.nn.log_softmax(a / temperature, axis=-1)
  lr = jax.nn.log_softmax(b / temperature, axis=-1)
  kl = lambda l1, l2: jnp.sum(jnp.exp(l1) * (l1 - l2), axis=-1)
  if direction == "reverse":
    return kl(lp, lr)
  if direction == "forward":
    return kl(lr, lp)
  lm = jnp.logaddexp(jnp.log1p(-beta) + lp, jnp.log(beta) + lr)
  return beta * kl(lr, lm) + (1 - beta) * kl(lp, lm)


def with_banned_entries(rng):
  """Logits with -inf entries: a column banned on both sides, scattered single-side ones."""
  a, b = random_logits(rng, (N, V)), random_logits(rng, (N, V))
  a[:, 5], b[:, 5] = -np.inf, -np.inf
  a[2, 20:] = -np.inf  # the student bans a tail the reference allows
  b[3, 1] = -np.inf  # ... and the reference an entry the student allows: KL(p || r) = inf
  return a, b


# ------------------------------------------------------------------------------------------------
# Values.


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_match_float64_reference(rng, direction, temperature):
  a, b = with_banned_entries(rng)
  mask = rng.random(N) > 0.2
  got = rows(a, b, mask, direction=direction, beta=0.3, temperature=temperature)
  assert got.dtype == jnp.float32 and got.shape == (N,)
  want = ref.kl_per_position(a, b, direction, where=mask, temperature=temperature, beta=0.3)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("beta", [1e-6, 0.3, 1 - 1e-6])
def test_js_across_beta(rng, beta):
  a, b = with_banned_entries(rng)
  b[3, 1] = 0.0  # js is finite anyway; keep the comparison to finite values
  got = rows(a, b, direction="js", beta=beta)
  np.testing.assert_allclose(got, ref.kl_per_position(a, b, "js", beta=beta), rtol=1e-4,
                             atol=1e-9)


@pytest.mark.parametrize("beta,endpoint", [(0.0, "forward"), (1.0, "reverse")])
def test_js_endpoints_are_the_kls(rng, beta, endpoint):
  a, b = random_logits(rng, (N, V)), random_logits(rng, (N, V))
  np.testing.assert_array_equal(rows(a, b, direction="js", beta=beta),
                                rows(a, b, direction=endpoint))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_inputs_accumulate_in_float32(rng, dtype):
  a = jnp.asarray(random_logits(rng, (N, V)), dtype)
  b = jnp.asarray(random_logits(rng, (N, V)), dtype)
  for direction in DIRECTIONS:
    got = rows(a, b, direction=direction)
    assert got.dtype == jnp.float32
    want = ref.kl_per_position(to_f64(a), to_f64(b), direction)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=direction)
    grads = jax.eval_shape(jax.grad(lambda x, y: rows(x, y, direction=direction).sum(), (0, 1)),
                           a, b)
    assert [g.dtype for g in grads] == [a.dtype, b.dtype]


def test_rows_with_no_mass():
  """Student row all -inf: 0 (KL) and the js convention; reference all -inf: +inf (KL)."""
  none, flat = np.full((1, V), -np.inf, np.float32), np.zeros((1, V), np.float32)
  for direction in DIRECTIONS:
    assert rows(none, none, direction=direction)[0] == 0.0
    g = jax.jit(jax.grad(lambda x: rows(x, none, direction=direction).sum()))(none)
    assert np.all(np.asarray(g) == 0.0)
  assert rows(none, flat, direction="reverse")[0] == 0.0
  assert rows(flat, none, direction="reverse")[0] == np.inf
  assert rows(none, flat, direction="forward")[0] == np.inf
  assert rows(flat, none, direction="forward")[0] == 0.0
  js = [rows(none, flat, direction="js")[0], rows(flat, none, direction="js")[0]]
  np.testing.assert_allclose(js, [0.5 * np.log(2)] * 2, rtol=1e-6)


def test_nan_at_a_valid_position_surfaces(rng):
  a, b = random_logits(rng, (N, V)), random_logits(rng, (N, V))
  a[1, 9], b[4, 26], a[6, 3] = np.nan, np.nan, np.inf
  for direction in DIRECTIONS:
    got = np.asarray(rows(a, b, direction=direction))
    np.testing.assert_array_equal(np.isnan(got), np.isin(np.arange(N), [1, 4, 6]),
                                  err_msg=direction)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_identical_inputs_give_exact_zeros(rng, direction):
  a = random_logits(rng, (N, V), scale=5.0)
  a[:, 7] = -np.inf
  value, grads = jax.jit(jax.value_and_grad(
      lambda x, y: rows(x, y, direction=direction, temperature=0.6).sum(), (0, 1)))(a, a)
  assert value == 0.0
  assert all(np.all(np.asarray(g) == 0.0) for g in grads)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_masked_rows_are_exact_zeros_whatever_they_hold(rng, direction):
  a, b = random_logits(rng, (N, V)), random_logits(rng, (N, V))
  mask = np.ones(N, bool)
  mask[[0, 5, 10]] = False
  dirty_a, dirty_b = a.copy(), b.copy()
  dirty_a[0], dirty_b[5], dirty_a[10, ::2], dirty_b[10, 1] = np.nan, np.inf, -np.inf, np.nan
  cot = jnp.asarray(rng.standard_normal(N), jnp.float32)
  f = lambda x, y: (rows(x, y, mask, direction=direction) * cot).sum()
  vg = jax.jit(jax.value_and_grad(f, (0, 1)))
  clean, dirty = vg(a, b), vg(dirty_a, dirty_b)
  assert np.asarray(rows(dirty_a, dirty_b, mask, direction=direction))[~mask].tolist() == [0] * 3
  np.testing.assert_array_equal(dirty[0], clean[0])
  for g, h in zip(dirty[1], clean[1]):
    np.testing.assert_array_equal(g, h)
    assert np.all(np.asarray(g)[~mask] == 0.0)


# ------------------------------------------------------------------------------------------------
# Gradients.


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gradients_match_float64_autodiff(rng, direction):
  a, b = random_logits(rng, (N, V)), random_logits(rng, (N, V))
  mask = rng.random(N) > 0.2
  cot = rng.standard_normal(N)
  f = lambda x, y: (rows(x, y, mask, direction=direction, beta=0.3, temperature=0.8)
                    * cot.astype(np.float32)).sum()
  got = jax.jit(jax.grad(f, (0, 1)))(a, b)
  with x64():
    g64 = lambda x, y: (jnp.where(mask, plain64(x, y, direction, 0.3, 0.8), 0.0) * cot).sum()
    want = jax.grad(g64, (0, 1))(np.float64(a), np.float64(b))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gradients_with_banned_entries_are_those_without_them(rng, direction):
  a, b = random_logits(rng, (N, V)), random_logits(rng, (N, V))
  banned = np.zeros(V, bool)
  banned[[0, 8, 17, 26]] = True  # first entry of tiles 0 and 1, mid tile 2, the last entry
  a[:, banned], b[:, banned] = -np.inf, -np.inf
  ga, gb = jax.jit(jax.grad(lambda x, y: rows(x, y, direction=direction).sum(), (0, 1)))(a, b)
  assert np.all(np.asarray(ga)[:, banned] == 0.0) and np.all(np.asarray(gb)[:, banned] == 0.0)
  with x64():
    want = jax.grad(lambda x, y: plain64(x, y, direction).sum(), (0, 1))(
        np.float64(a[:, ~banned]), np.float64(b[:, ~banned]))
  np.testing.assert_allclose(np.asarray(ga)[:, ~banned], want[0], rtol=1e-4, atol=2e-6)
  np.testing.assert_allclose(np.asarray(gb)[:, ~banned], want[1], rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("direction", ["reverse", "forward"])  # js takes reverse's operands
def test_no_reference_gradient_when_not_asked(rng, direction):
  a, b = random_logits(rng, (N, V)), random_logits(rng, (N, V))
  f = lambda ref_grad: jax.jit(jax.value_and_grad(
      lambda x, y: rows(x, y, direction=direction, ref_grad=ref_grad).sum(), (0, 1)))(a, b)
  (v1, (ga1, _)), (v0, (ga0, gb0)) = f(True), f(False)
  assert v0 == v1
  np.testing.assert_array_equal(ga0, ga1)
  assert np.all(np.asarray(gb0) == 0.0)


def test_equals_the_chunked_kernel_with_every_convention(rng):
  """Values, gradients and NaN/inf patterns agree with the chunked kernel's."""
  a, b = with_banned_entries(rng)
  a[7] = -np.inf
  b[8] = -np.inf
  a[9, 4] = np.nan
  mask = np.ones(N, bool)
  mask[6] = False
  a[6] = np.nan
  cot = jnp.asarray(rng.standard_normal(N), jnp.float32)
  for direction in DIRECTIONS:
    spec = spec_for(direction, beta=0.3, temperature=0.9)
    run = lambda fn: jax.jit(lambda x, y: (fn(x, y), jax.grad(
        lambda x, y: (fn(x, y) * cot).sum(), (0, 1))(x, y)))(a, b)
    mine = run(lambda x, y: pallas_div.divergence_rows(x, y, jnp.asarray(mask), spec, TILES))
    theirs = run(lambda x, y: chunked_rows(x, y, jnp.asarray(mask), spec))
    np.testing.assert_allclose(mine[0], theirs[0], rtol=2e-5, atol=2e-6, err_msg=direction)
    for g, h in zip(mine[1], theirs[1]):
      np.testing.assert_allclose(g, h, rtol=2e-5, atol=2e-6, err_msg=direction)


def test_jit_vmap_and_default_tiles(rng):
  a, b = random_logits(rng, (3, 5, 40)), random_logits(rng, (3, 5, 40))
  mask = np.ones(5, bool)
  eager = [rows(a[i], b[i], mask) for i in range(3)]
  batched = jax.jit(jax.vmap(lambda x, y: rows(x, y, mask)))(a, b)
  np.testing.assert_allclose(batched, np.stack(eager), rtol=1e-6)
  untiled = rows(a[0], b[0], mask, tiles=None)  # the interpreter's defaults: one tile
  np.testing.assert_allclose(untiled, eager[0], rtol=1e-6)
  g = jax.jit(jax.vmap(jax.grad(lambda x, y: rows(x, y, mask).sum())))(a, b)
  np.testing.assert_allclose(g[1], jax.jit(jax.grad(lambda x: rows(x, b[1], mask).sum()))(a[1]),
                             rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# What it refuses, and bad input.


def test_unsupported_inputs_raise_not_implemented(rng):
  a = random_logits(rng, (4, 9))
  mask = jnp.ones(4, bool)
  spec = spec_for(v=9)
  with x64():
    with pytest.raises(NotImplementedError, match="float64"):
      pallas_div.divergence_rows(np.float64(a), np.float64(a), mask, spec)
  for field in ("softcap", "ref_softcap"):
    with pytest.raises(NotImplementedError, match="softcap"):
      pallas_div.divergence_rows(a, a, mask, dataclasses.replace(spec, **{field: 30.0}))
  with pytest.raises(NotImplementedError, match="beta"):
    pallas_div.divergence_rows(a, a, mask, dataclasses.replace(spec, direction="js", beta=0.0))
  # Unset caps are fine.
  np.testing.assert_array_equal(
      pallas_div.divergence_rows(a, a, mask, dataclasses.replace(spec, softcap=None)), 0.0)


@pytest.mark.parametrize("kwargs", [{"rows": 3}, {"vocab": 0}, {"num_warps": 6},
                                    {"num_stages": 0}, {"vocab": 8.0}])
def test_bad_tiles_raise(kwargs):
  with pytest.raises(ValueError, match="Tiles"):
    Tiles(**kwargs)


def test_bad_shapes_raise(rng):
  a = random_logits(rng, (4, 9))
  with pytest.raises(ValueError, match="shape"):
    pallas_div.divergence_rows(a, a[:3], jnp.ones(4, bool), spec_for(v=9))
  with pytest.raises(ValueError, match="empty"):
    pallas_div.divergence_rows(a[:, :0], a[:, :0], jnp.ones(4, bool), spec_for(v=0))
  assert pallas_div.divergence_rows(a[:0], a[:0], jnp.ones(0, bool), spec_for(v=9)).shape == (0,)


def test_tile_table_lookup():
  assert pallas_tiles.family("NVIDIA H100 80GB HBM3") == "h100"
  assert pallas_tiles.family("NVIDIA H200") == "h200"
  assert pallas_tiles.lookup("NVIDIA H100 80GB HBM3", 131072) == pallas_tiles.GPU_DEFAULT
  assert pallas_tiles.lookup(None, 10, interpret=True) == pallas_tiles.INTERPRET_DEFAULT
  assert Tiles(rows=16, vocab=4096).fit(3, 1000) == Tiles(rows=4, vocab=1024)


def test_log_mix_ratio_is_accurate_across_delta():
  """log(wc + w e^delta) against float64, relative, near 0 and far out, w near 0 and 1."""
  delta = np.concatenate([-np.logspace(-8, 2, 40), [0.0], np.logspace(-8, 2, 40)])
  for w in (1e-7, 0.3, 1 - 1e-7):
    f = jax.jit(pallas_kernels.log_mix_ratio, static_argnums=(1, 2, 3))
    got = f(jnp.asarray(delta, jnp.float32), float(np.log(w)), float(np.log1p(-w)), w)
    want = np.log1p(w * np.expm1(delta))  # float64 is exact enough in this form throughout
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-30, err_msg=str(w))
  ends = f(jnp.array([-np.inf, np.inf, np.nan]), float(np.log(0.3)), float(np.log1p(-0.3)),
           0.3)
  np.testing.assert_allclose(ends[:2], [np.log1p(-0.3), np.inf])
  assert np.isnan(ends[2])


# ------------------------------------------------------------------------------------------------
# The GPU kernels, lowered for CUDA on this CPU.

TRITON = "__gpu$xla.gpu.triton"


@pytest.mark.parametrize("direction", ["reverse", "js"])
def test_exports_for_cuda_with_the_triton_kernels(direction):
  n, v = 16, 128256  # Llama 3's vocabulary: not a power of two
  spec = spec_for(direction, v=v)
  sds = (jax.ShapeDtypeStruct((n, v), jnp.bfloat16),) * 2 + (jax.ShapeDtypeStruct((n,), bool),)
  forward = lambda a, b, m: pallas_div.divergence_rows(a, b, m, spec)
  loss = lambda a, b, m: pallas_div.divergence_rows(a, b, m, spec).mean()
  checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]
  kernels = {"reverse": (1, 2), "js": (2, 3)}[direction]  # (forward, value and gradient)
  for fn, count in zip((forward, jax.value_and_grad(loss, (0, 1))), kernels):
    with cuda_target():
      exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*sds)
    module = exported.mlir_module()
    assert module.count(TRITON) == count
  with pytest.raises(ValueError, match="custom_call"), cuda_target():  # disabled on purpose only
    jax.export.export(jax.jit(forward), platforms=["cuda"])(*sds)


@pytest.mark.parametrize("direction, reduction, kernels", [
    ("reverse", "mean", 2),  # the row statistics, the student gradient
    ("js", None, 3)])  # the statistics, the mixture sums (forward); the gradient (backward)
def test_fused_head_exports_for_cuda_with_the_triton_kernels(direction, reduction, kernels):
  """fused_linear_kl(implementation="pallas"): value and gradient lowered for CUDA hold the
  block step's kernels, once per block loop."""
  import klagg_jax as ka
  n, d, v = 16, 8, 128256
  sds = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16), jax.ShapeDtypeStruct((d, v), jnp.bfloat16))

  def loss(h, w, rh, rw):
    return ka.fused_linear_kl(h, w, rh, rw, direction=direction, reduction=reduction,
                              implementation="pallas").sum()

  checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]
  with cuda_target():
    exported = jax.export.export(jax.jit(jax.value_and_grad(loss, (0, 1))), platforms=["cuda"],
                                 disabled_checks=checks)(*sds, *sds)
  assert exported.mlir_module().count(TRITON) == kernels


# ------------------------------------------------------------------------------------------------
# The fused heads' block step.


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_block_step_equals_the_chunked_block_step(rng, direction):
  from klagg_jax._ops.divergence import base as _divergence
  a, b = with_banned_entries(rng)
  a[4] = 0.0  # a zeroed (masked) row, as the heads hand them over
  b[4] = 0.0
  spec = spec_for(direction, beta=0.3)

  def both(module):
    def f(x, y):
      div, stats = module.block_forward(x, y, spec)
      return div, stats, module.block_backward(x, y, stats, spec)
    return jax.jit(f)(jnp.asarray(a), jnp.asarray(b))

  mine, theirs = both(pallas_div), both(_divergence)
  for got, want in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=direction)
  assert mine[0][4] == 0.0 and np.all(np.asarray(mine[2][0])[4] == 0.0)
  # The fused heads ask for the student's gradient only: the same array, none for the reference.
  student, ref_grad = jax.jit(lambda x, y, stats: pallas_div.block_backward(
      x, y, stats, spec, ref_grad=False))(jnp.asarray(a), jnp.asarray(b), mine[1])
  assert ref_grad is None
  np.testing.assert_array_equal(student, mine[2][0])


# ------------------------------------------------------------------------------------------------
# The TPU (Mosaic) kernels: through Pallas' TPU interpret mode, and lowered for TPU.


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_tpu_kernels_in_tpu_interpret_mode_equal_the_checked_kernels(rng, kind):
  """37 rows in blocks of 16 and 300 entries in tiles of 128: both last blocks ragged."""
  from jax.experimental.pallas import tpu as pltpu
  from klagg_jax._ops.divergence import pallas_tpu
  n, v = 37, 300
  x, y = random_logits(rng, (n, v)), random_logits(rng, (n, v))
  x[:, 5], y[:, 5] = -np.inf, -np.inf
  x[3, 140:] = -np.inf
  mask = (rng.random(n) > 0.2).astype(np.int32)
  mask[7] = 0
  x[7] = np.nan  # masked garbage
  k = pallas_kernels.Kernel(kind, 0.3, 0.8, Tiles(rows=16, vocab=128))
  tpu = pltpu.InterpretParams()
  stats = pallas_tpu.row_stats(x, y, mask, k, interpret=tpu)
  want = pallas_kernels.row_stats(x, y, mask, k, interpret=True)
  lx, ly = (jnp.asarray(rng.standard_normal(n), jnp.float32) for _ in range(2))
  w = jnp.asarray(rng.standard_normal(n), jnp.float32)
  row_stats = (lx, ly) + tuple(jnp.asarray(rng.random(n), jnp.float32)
                               for _ in range(2 if kind == "js" else 1))
  pairs = [(stats, want),
           (pallas_tpu.row_grads(x, y, mask, w, row_stats, k, interpret=tpu),
            pallas_kernels.row_grads(x, y, mask, w, row_stats, k, interpret=True))]
  if kind == "js":
    pairs.append((pallas_tpu.mix_sums(x, y, mask, lx, ly, k, interpret=tpu),
                  pallas_kernels.mix_sums(x, y, mask, lx, ly, k, interpret=True)))
  for got, ref_out in pairs:
    for g, h in zip(got, ref_out):
      np.testing.assert_allclose(g, h, rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(pairs[1][0][0])[7] == 0.0)


def test_tpu_fit_aligns_blocks_or_takes_the_whole_axis():
  from klagg_jax._ops.divergence import pallas_tpu
  t, blocks = Tiles(rows=64, vocab=2048), pallas_tpu.Blocks
  assert pallas_tpu.fit(t, 1000, 128256) == blocks(64, 2048)
  assert pallas_tpu.fit(t, 11, 100) == blocks(11, 100)
  assert pallas_tpu.fit(Tiles(rows=4, vocab=8), 37, 300) == blocks(16, 128)
  assert pallas_tpu.fit(t, 40, 1000) == blocks(40, 1000)  # whole axes
  assert pallas_tpu.fit(Tiles(rows=32, vocab=256), 40, 1000) == blocks(32, 256)


def test_exports_for_tpu_with_the_mosaic_kernels():
  n, v = 64, 128256
  spec = spec_for("js", v=v)
  sds = (jax.ShapeDtypeStruct((n, v), jnp.bfloat16),) * 2 + (jax.ShapeDtypeStruct((n,), bool),)
  loss = lambda a, b, m: pallas_div.divergence_rows(a, b, m, spec).mean()
  exported = jax.export.export(jax.jit(jax.value_and_grad(loss, (0, 1))), platforms=["tpu"])(
      *sds)
  assert exported.mlir_module().count("tpu_custom_call") == 3  # stats, mix, gradients
