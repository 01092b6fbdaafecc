"""The table of docs/bad-input.md ("What you get on bad input"), walked cell by cell.

Each cell of the table is registered here with its exact text and a check of the
behaviour it states; ``test_readme_table_is_the_tested_table`` keeps that page and this file
equal, and ``test_cell`` runs every check. Extend this file when a function joins the table.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import klagg_jax as ka
from klagg_jax import _reference as ref

README = pathlib.Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"
SECTION = "# What you get on bad input"
COLUMNS = ("`kl_per_position`", "`fused_linear_kl`", "`kl_topk`", "aggregators", "`kl_barrier`",
           "`kl_estimate`")
NOT_APPLICABLE = "—"
DIRECTIONS = ("reverse", "forward", "js")
AGG_NAMES = ("mean", "rmse", "max", "p95", "soft_p95", "cvar95", "smooth_max", "power_mean")

CELLS: dict[tuple[str, str], tuple[str, Callable[[], None] | None, bool]] = {}


def cell(row: str, column: str, text: str):
  """Registers the check of one README cell (its row label, column header and exact text)."""
  assert column in COLUMNS, column

  def register(fn):
    CELLS[(row, column)] = (text, fn)
    return fn

  return register


def not_applicable(row: str, *columns: str) -> None:
  for column in columns:
    CELLS[(row, column)] = (NOT_APPLICABLE, None)


def readme_table() -> dict[tuple[str, str], str]:
  section = README.read_text().split(SECTION + "\n", 1)[1].split("\n## ", 1)[0]
  # The section's first table: its contiguous block of "|" lines.
  table_text = section[section.index("\n|") + 1:].split("\n\n", 1)[0]
  lines = table_text.splitlines()
  assert all(ln.startswith("|") for ln in lines), lines
  split = lambda ln: [c.strip() for c in ln.strip().strip("|").split("|")]
  header = split(lines[0])[1:]
  assert tuple(header) == COLUMNS, header
  table = {}
  for ln in lines[2:]:
    row, *cells = split(ln)
    assert len(cells) == len(COLUMNS), ln
    table.update({(row, col): text for col, text in zip(COLUMNS, cells)})
  return table


# ------------------------------------------------------------------------------------------------
# Shared inputs: small shapes, a position with a NaN, a mask that hides it.

B, T, V, D, K = 2, 3, 7, 4, 3


def logits_pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return (2 * rng.standard_normal((B, T, V))).astype(np.float32), \
      (2 * rng.standard_normal((B, T, V))).astype(np.float32)


def head(seed: int = 0):
  rng = np.random.default_rng(seed)
  h = rng.standard_normal((B, T, D)).astype(np.float32)
  w = rng.standard_normal((D, V)).astype(np.float32)
  return h, w, (0.5 * h).astype(np.float32), (w[:, ::-1]).copy()


def mask_without(i: int, j: int) -> np.ndarray:
  m = np.ones((B, T), bool)
  m[i, j] = False
  return m


def assert_nan_only_at(x, i: int, j: int) -> None:
  x = np.asarray(x)
  assert np.isnan(x[i, j]), x
  others = np.ones(x.shape, bool)
  others[i, j] = False
  assert np.isfinite(x[others]).all(), x


def assert_zero_and_zero_grad_at(value, grads, i: int, j: int) -> None:
  assert np.asarray(value)[i, j] == 0.0
  for g in grads:
    g = np.asarray(g, np.float32)
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(g[i, j], 0.0)


# ------------------------------------------------------------------------------------------------
# NaN at a valid position.

ROW = "NaN at a valid position"


@cell(ROW, "`kl_per_position`", "NaN (every direction, chunked or not, static or traced "
      "temperature)")
def kl_per_position_nan_at_a_valid_position_is_nan():
  a, b = logits_pair()
  nan_a, nan_b = a.copy(), b.copy()
  nan_a[1, 2, 0] = nan_b[1, 2, 0] = np.nan
  for bad_a, bad_b in ((nan_a, b), (a, nan_b)):  # in the student, then in the reference
    for direction in DIRECTIONS:
      for chunk_size in (None, 1):
        assert_nan_only_at(ka.kl_per_position(bad_a, bad_b, direction=direction,
                                              chunk_size=chunk_size), 1, 2)
      traced = jax.jit(lambda x, y, t: ka.kl_per_position(x, y, direction=direction,
                                                          temperature=t))
      assert_nan_only_at(traced(bad_a, bad_b, 1.5), 1, 2)


@cell(ROW, "`fused_linear_kl`", "NaN")
def fused_nan_at_a_valid_position_is_nan():
  h, w, rh, rw = head()
  h = h.copy()
  h[1, 2, 0] = np.nan
  for direction in DIRECTIONS:
    assert_nan_only_at(ka.fused_linear_kl(h, w, rh, rw, direction=direction), 1, 2)
    assert_nan_only_at(ka.fused_linear_kl(rh, rw, h, w, direction=direction), 1, 2)


@cell(ROW, "`kl_topk`", "NaN")
def topk_nan_at_a_valid_position_is_nan():
  a, b = logits_pair()
  lp, idx, tail = ka.topk_logprobs(b, K)
  bad = a.copy()
  bad[1, 2, 0] = np.nan
  bad_lp = lp.at[1, 2, 0].set(jnp.nan)
  for direction in DIRECTIONS:
    assert_nan_only_at(ka.kl_topk(bad, lp, idx, ref_tail=tail, direction=direction), 1, 2)
    assert_nan_only_at(ka.kl_topk(a, bad_lp, idx, ref_tail=tail, direction=direction), 1, 2)


@cell(ROW, "aggregators", "NaN")
def aggregators_nan_at_a_valid_position_is_nan():
  x = np.abs(np.random.default_rng(0).standard_normal((B, T))).astype(np.float32)
  x[1, 2] = np.nan
  for how in AGG_NAMES:
    kw = {"p": 2.0} if how == "power_mean" else {}
    got = np.asarray(ka.aggregate(x, how, **kw))
    assert np.isnan(got[1]) and np.isfinite(got[0]), how
    assert np.isnan(ka.aggregate(x, how, axis=None, **kw)), how


@cell(ROW, "`kl_barrier`", "NaN loss and metrics")
def barrier_nan_at_a_valid_position_is_nan():
  a, b = logits_pair()
  a[1, 2, 0] = np.nan
  for axis in (-1, None):
    loss, m = ka.kl_barrier(a, b, agg="rmse", tau=0.0, axis=axis)
    assert np.isnan(loss)
    assert all(np.isnan(m[k]) for k in ("div", "kl_mean", "kl_rmse", "kl_p95", "kl_max")), m


@cell(ROW, "`kl_estimate`", "NaN")
def estimate_nan_at_a_valid_position_is_nan():
  logp = np.full((B, T), -1.0, np.float32)
  bad = logp.copy()
  bad[1, 2] = np.nan
  for estimator in ("k1", "k2", "k3"):
    assert_nan_only_at(ka.kl_estimate(bad, logp, estimator=estimator), 1, 2)
    assert_nan_only_at(ka.kl_estimate(logp, bad, estimator=estimator, max_log_ratio=None), 1, 2)


# ------------------------------------------------------------------------------------------------
# NaN at a masked position: padding garbage.

ROW = "NaN at a masked position"


@cell(ROW, "`kl_per_position`", "0, zero gradient")
def kl_per_position_nan_masked_is_zero():
  a, b = logits_pair()
  a[1, 2] = np.nan
  b[1, 2, 3] = np.nan
  m = mask_without(1, 2)
  for direction in DIRECTIONS:
    for chunk_size in (None, 1):
      f = lambda x, y: ka.kl_per_position(x, y, direction=direction, where=m,
                                          chunk_size=chunk_size)
      grads = jax.grad(lambda x, y: f(x, y).sum(), (0, 1))(a, b)
      assert_zero_and_zero_grad_at(f(a, b), grads, 1, 2)


@cell(ROW, "`fused_linear_kl`", "0, zero gradient")
def fused_nan_masked_is_zero():
  h, w, rh, rw = head()
  h[1, 2] = np.nan
  rh[1, 2, 0] = np.nan
  m = mask_without(1, 2)
  f = lambda x, y: ka.fused_linear_kl(x, w, y, rw, where=m)
  grads = jax.grad(lambda x, y: f(x, y).sum(), (0, 1))(h, rh)
  assert_zero_and_zero_grad_at(f(h, rh), grads, 1, 2)


@cell(ROW, "`kl_topk`", "0, zero gradient")
def topk_nan_masked_is_zero():
  a, b = logits_pair()
  lp, idx, tail = ka.topk_logprobs(b, K)
  a[1, 2] = np.nan
  lp = lp.at[1, 2].set(jnp.nan)
  m = mask_without(1, 2)
  f = lambda x: ka.kl_topk(x, lp, idx, ref_tail=tail, where=m)
  assert_zero_and_zero_grad_at(f(a), [jax.grad(lambda x: f(x).sum())(a)], 1, 2)


@cell(ROW, "aggregators", "ignored: the value without it, zero gradient")
def aggregators_nan_masked_is_ignored():
  x = np.abs(np.random.default_rng(0).standard_normal((B, T))).astype(np.float32)
  dirty = x.copy()
  dirty[1, 2] = np.nan
  m = mask_without(1, 2)
  for how in AGG_NAMES:
    kw = {"p": 2.0} if how == "power_mean" else {}
    for axis in (-1, None):
      f = lambda v: ka.aggregate(v, how, where=m, axis=axis, **kw)
      np.testing.assert_array_equal(f(dirty), f(x), err_msg=how)
      g = jax.grad(lambda v: f(v).sum())(dirty)
      assert g[1, 2] == 0.0 and np.isfinite(g).all(), how


@cell(ROW, "`kl_barrier`", "ignored, zero gradient")
def barrier_nan_masked_is_ignored():
  a, b = logits_pair()
  dirty = a.copy()
  dirty[1, 2] = np.nan
  m = mask_without(1, 2)
  f = lambda x: ka.kl_barrier(x, b, where=m, agg="p95", tau=0.0)
  (loss, metrics), g = jax.value_and_grad(f, has_aux=True)(dirty)
  clean_loss, clean_metrics = f(a)
  assert loss == clean_loss and all(metrics[k] == clean_metrics[k] for k in metrics)
  assert np.isfinite(g).all()
  np.testing.assert_array_equal(g[1, 2], 0.0)


@cell(ROW, "`kl_estimate`", "0, zero gradient")
def estimate_nan_masked_is_zero():
  logp = np.full((B, T), -1.0, np.float32)
  bad = logp.copy()
  bad[1, 2] = np.nan
  m = mask_without(1, 2)
  f = lambda x, y: ka.kl_estimate(x, y, where=m)
  grads = jax.grad(lambda x, y: f(x, y).sum(), (0, 1))(bad, bad)
  assert_zero_and_zero_grad_at(f(bad, bad), grads, 1, 2)


# ------------------------------------------------------------------------------------------------
# A -inf entry: a banned vocabulary entry (0 log 0 = 0), or a log-prob of 0.

ROW = "`-inf` entry"
KERNEL_INF = "0 log 0 = 0: finite, finite gradient"


def banned(x: np.ndarray, entries=(0, 4)) -> np.ndarray:
  x = x.copy()
  x[..., list(entries)] = -np.inf
  return x


@cell(ROW, "`kl_per_position`", KERNEL_INF)
def kl_per_position_inf_entry_is_zero_mass():
  a, b = logits_pair()
  keep = [v for v in range(V) if v not in (0, 4)]
  for direction in DIRECTIONS:
    for chunk_size in (None, 1):
      f = lambda x, y: ka.kl_per_position(x, y, direction=direction, chunk_size=chunk_size)
      got = f(banned(a), banned(b))
      want = ref.kl_per_position(a[..., keep], b[..., keep], direction)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
      for g in jax.grad(lambda x, y: f(x, y).sum(), (0, 1))(banned(a), banned(b)):
        assert np.isfinite(g).all()


@cell(ROW, "`fused_linear_kl`", KERNEL_INF)
def fused_inf_entry_is_zero_mass():
  h, w, rh, rw = head()
  bias = banned(np.zeros(V, np.float32))
  f = lambda x, bb: ka.fused_linear_kl(x, w, rh, rw, bias=bb, ref_bias=bias)
  got = f(h, bias)
  keep = [v for v in range(V) if v not in (0, 4)]
  want = ref.kl_per_position((h @ w)[..., keep], (rh @ rw)[..., keep])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  for g in jax.grad(lambda x, bb: f(x, bb).sum(), (0, 1))(h, bias):
    assert np.isfinite(g).all()


@cell(ROW, "`kl_topk`", KERNEL_INF)
def topk_inf_entry_is_zero_mass():
  a, b = logits_pair()
  lp, idx, tail = ka.topk_logprobs(banned(b), V)  # k = V: the full-vocabulary KL
  for direction in DIRECTIONS:
    f = lambda x: ka.kl_topk(x, lp, idx, ref_tail=tail, direction=direction)
    np.testing.assert_allclose(
        f(banned(a)), ka.kl_per_position(banned(a), banned(b), direction=direction),
        rtol=1e-5, atol=1e-6)
    assert np.isfinite(jax.grad(lambda x: f(x).sum())(banned(a))).all()


@cell(ROW, "aggregators", "`+inf` KL: `+inf` in mean, rmse, max, cvar, smooth_max, power_mean")
def aggregators_of_an_infinite_kl_are_infinite():
  x = jnp.array([[0.5, 1.0, jnp.inf], [0.5, 1.0, 2.0]])
  for how in ("mean", "rmse", "max", "cvar95", "smooth_max", "power_mean"):
    kw = {"p": 2.0} if how == "power_mean" else {}
    got = ka.aggregate(x, how, **kw)
    assert got[0] == jnp.inf and np.isfinite(got[1]), how


@cell(ROW, "`kl_barrier`", "finite, finite gradient")
def barrier_inf_entry_is_finite():
  a, b = logits_pair()
  loss, g = jax.value_and_grad(lambda x: ka.kl_barrier(x, banned(b), tau=0.0)[0])(banned(a))
  assert np.isfinite(loss) and np.isfinite(g).all()


@cell(ROW, "`kl_estimate`", "clipped to ±`max_log_ratio`: finite (`+inf` with None); both `-inf`: 0, zero gradient")
def estimate_inf_logprob_is_clipped():
  logp = np.array([[-1.0, -np.inf, -1.0]], np.float32)
  ref_logp = np.array([[-np.inf, -1.0, -1.0]], np.float32)
  got, g = jax.value_and_grad(lambda x: ka.kl_estimate(x, ref_logp).sum())(logp)
  np.testing.assert_allclose(ka.kl_estimate(logp, ref_logp)[0, :2],
                             [np.exp(-20.0) + 19.0, np.expm1(20.0) - 20.0], rtol=1e-6)
  assert np.isfinite(got) and np.isfinite(g).all()
  unclipped = ka.kl_estimate(logp, ref_logp, max_log_ratio=None)
  np.testing.assert_array_equal(unclipped[0, :2], np.inf)
  both = np.full((1, 2), -np.inf, np.float32)  # a token of probability 0 under both models
  for clip in (20.0, None):
    for estimator in ("k1", "k2", "k3"):
      f = lambda x: ka.kl_estimate(x, both, estimator=estimator, max_log_ratio=clip).sum()
      value, g = jax.value_and_grad(f)(both)
      assert value == 0.0 and (np.asarray(g) == 0.0).all()


# ------------------------------------------------------------------------------------------------
# A row that is entirely -inf: no mass at all.

ROW = "all `-inf` row"
KERNEL_EMPTY_ROW = "reverse: student 0, reference `+inf` (forward: swapped; js: finite)"


def empty_rows(a: np.ndarray, b: np.ndarray):
  """Position [0, 1]: the student's row all -inf; position [1, 0]: the reference's."""
  a, b = a.copy(), b.copy()
  a[0, 1] = -np.inf
  b[1, 0] = -np.inf
  return a, b


def assert_empty_row_convention(got, direction: str) -> None:
  got = np.asarray(got)
  first, second = ((0, 1), (1, 0)) if direction == "reverse" else ((1, 0), (0, 1))
  if direction == "js":
    np.testing.assert_allclose(got[0, 1], 0.5 * np.log(2.0), rtol=1e-6)  # beta = 0.5
    np.testing.assert_allclose(got[1, 0], 0.5 * np.log(2.0), rtol=1e-6)
  else:
    assert got[first] == 0.0 and got[second] == np.inf, got
  assert np.isfinite(np.delete(got.reshape(-1), [1, T])).all()


@cell(ROW, "`kl_per_position`", KERNEL_EMPTY_ROW)
def kl_per_position_empty_rows():
  a, b = empty_rows(*logits_pair())
  for direction in DIRECTIONS:
    for chunk_size in (None, 1):
      assert_empty_row_convention(
          ka.kl_per_position(a, b, direction=direction, chunk_size=chunk_size), direction)


@cell(ROW, "`fused_linear_kl`", KERNEL_EMPTY_ROW)
def fused_empty_rows():
  """An all -inf bias empties every row of one side."""
  h, w, rh, rw = head()
  empty = np.full(V, -np.inf, np.float32)
  for direction in DIRECTIONS:
    student_empty = ka.fused_linear_kl(h, w, rh, rw, bias=empty, direction=direction)
    ref_empty = ka.fused_linear_kl(h, w, rh, rw, ref_bias=empty, direction=direction)
    if direction == "js":
      np.testing.assert_allclose(student_empty, 0.5 * np.log(2.0), rtol=1e-6)
      np.testing.assert_allclose(ref_empty, 0.5 * np.log(2.0), rtol=1e-6)
    else:
      zero, inf = (student_empty, ref_empty) if direction == "reverse" else (ref_empty,
                                                                              student_empty)
      np.testing.assert_array_equal(zero, 0.0)
      np.testing.assert_array_equal(inf, np.inf)


@cell(ROW, "`kl_topk`", KERNEL_EMPTY_ROW)
def topk_empty_rows():
  a, b = empty_rows(*logits_pair())
  lp, idx, tail = ka.topk_logprobs(b, K)
  for direction in DIRECTIONS:
    assert_empty_row_convention(ka.kl_topk(a, lp, idx, ref_tail=tail, direction=direction),
                                direction)


not_applicable(ROW, "aggregators", "`kl_estimate`")


@cell(ROW, "`kl_barrier`", "as `kl_per_position`: a `+inf` KL gives a `+inf` loss")
def barrier_empty_rows():
  a, b = logits_pair()
  student_empty, ref_empty = empty_rows(a, b)
  loss, g = jax.value_and_grad(lambda x: ka.kl_barrier(x, b, tau=0.0)[0])(student_empty)
  assert np.isfinite(loss) and np.isfinite(g).all()
  assert ka.kl_barrier(a, ref_empty, tau=0.0)[0] == np.inf


# ------------------------------------------------------------------------------------------------
# Empty selection: every position masked.

ROW = "empty selection"
NONE = np.zeros((B, T), bool)


@cell(ROW, "`kl_per_position`", "all 0, zero gradient")
def kl_per_position_empty_selection():
  a, b = logits_pair()
  a[:] = np.nan
  f = lambda x: ka.kl_per_position(x, b, where=NONE)
  np.testing.assert_array_equal(f(a), 0.0)
  np.testing.assert_array_equal(jax.grad(lambda x: f(x).sum())(a), 0.0)


@cell(ROW, "`fused_linear_kl`", "all 0, zero gradient")
def fused_empty_selection():
  h, w, rh, rw = head()
  f = lambda x, ww: ka.fused_linear_kl(x, ww, rh, rw, where=NONE)
  np.testing.assert_array_equal(f(h, w), 0.0)
  for g in jax.grad(lambda x, ww: f(x, ww).sum(), (0, 1))(h, w):
    np.testing.assert_array_equal(g, 0.0)


@cell(ROW, "`kl_topk`", "all 0, zero gradient")
def topk_empty_selection():
  a, b = logits_pair()
  lp, idx, tail = ka.topk_logprobs(b, K)
  f = lambda x: ka.kl_topk(x, lp, idx, ref_tail=tail, where=NONE)
  np.testing.assert_array_equal(f(a), 0.0)
  np.testing.assert_array_equal(jax.grad(lambda x: f(x).sum())(a), 0.0)


@cell(ROW, "aggregators", "0, zero gradient")
def aggregators_empty_selection():
  x = np.full((B, T), np.nan, np.float32)
  for how in AGG_NAMES:
    kw = {"p": 2.0} if how == "power_mean" else {}
    for axis in (-1, None):
      value, g = jax.value_and_grad(
          lambda v: ka.aggregate(v, how, where=NONE, axis=axis, **kw).sum())(x)
      assert value == 0.0, how
      np.testing.assert_array_equal(g, 0.0)


@cell(ROW, "`kl_barrier`", "loss 0, metrics 0, zero gradient")
def barrier_empty_selection():
  a, b = logits_pair()
  (loss, m), g = jax.value_and_grad(
      lambda x: ka.kl_barrier(x, b, where=NONE, tau=0.0), has_aux=True)(a)
  assert loss == 0.0 and all(v == 0.0 for v in m.values())
  np.testing.assert_array_equal(g, 0.0)


@cell(ROW, "`kl_estimate`", "all 0, zero gradient")
def estimate_empty_selection():
  x = np.full((B, T), np.nan, np.float32)
  f = lambda v: ka.kl_estimate(v, v, where=NONE)
  np.testing.assert_array_equal(f(x), 0.0)
  np.testing.assert_array_equal(jax.grad(lambda v: f(v).sum())(x), 0.0)


# ------------------------------------------------------------------------------------------------
# Zero-length position axis.

ROW = "zero-length axis"
EMPTY_RESULT = "`[B, 0]` result, zero gradient"


@cell(ROW, "`kl_per_position`", EMPTY_RESULT)
def kl_per_position_zero_length():
  a = jnp.zeros((B, 0, V))
  f = lambda x: ka.kl_per_position(x, a)
  assert f(a).shape == (B, 0) and f(a).dtype == jnp.float32
  assert jax.grad(lambda x: f(x).sum())(a).shape == (B, 0, V)


@cell(ROW, "`fused_linear_kl`", EMPTY_RESULT)
def fused_zero_length():
  _, w, _, rw = head()
  h = jnp.zeros((B, 0, D))
  f = lambda x, ww: ka.fused_linear_kl(x, ww, h, rw)
  assert f(h, w).shape == (B, 0) and f(h, w).dtype == jnp.float32
  gh, gw = jax.grad(lambda x, ww: f(x, ww).sum(), (0, 1))(h, w)
  assert gh.shape == (B, 0, D)
  np.testing.assert_array_equal(gw, 0.0)


@cell(ROW, "`kl_topk`", EMPTY_RESULT)
def topk_zero_length():
  a = jnp.zeros((B, 0, V))
  lp, idx, tail = ka.topk_logprobs(a, K)
  f = lambda x: ka.kl_topk(x, lp, idx, ref_tail=tail)
  assert f(a).shape == (B, 0)
  assert jax.grad(lambda x: f(x).sum())(a).shape == (B, 0, V)


@cell(ROW, "aggregators", "0, zero gradient")
def aggregators_zero_length():
  for how in AGG_NAMES:
    kw = {"p": 2.0} if how == "power_mean" else {}
    value, g = jax.value_and_grad(lambda v: ka.aggregate(v, how, **kw).sum())(jnp.zeros((B, 0)))
    assert value == 0.0 and g.shape == (B, 0), how
    assert ka.aggregate(jnp.zeros((B, 0)), how, axis=None, **kw) == 0.0


@cell(ROW, "`kl_barrier`", "loss 0, metrics 0, zero gradient")
def barrier_zero_length():
  a = jnp.zeros((B, 0, V))
  (loss, m), g = jax.value_and_grad(lambda x: ka.kl_barrier(x, a, tau=0.0), has_aux=True)(a)
  assert loss == 0.0 and all(v == 0.0 for v in m.values()) and g.shape == (B, 0, V)


@cell(ROW, "`kl_estimate`", EMPTY_RESULT)
def estimate_zero_length():
  x = jnp.zeros((B, 0))
  assert ka.kl_estimate(x, x).shape == (B, 0)
  assert jax.grad(lambda v: ka.kl_estimate(v, x).sum())(x).shape == (B, 0)


# ------------------------------------------------------------------------------------------------
# Bad static input: a ValueError while tracing, naming what was seen.

ROW = "bad static input"
RAISES = "`ValueError` at trace time"


def raises(match: str, fn: Callable[[], object]) -> None:
  with pytest.raises(ValueError, match=match):
    jax.jit(fn)()  # while tracing: nothing has run


@cell(ROW, "`kl_per_position`", RAISES)
def kl_per_position_bad_static_input():
  a = jnp.zeros((B, T, V))
  raises(r"Shape mismatch.*\(2, 3, 7\).*\(2, 3, 8\)",
         lambda: ka.kl_per_position(a, jnp.zeros((B, T, V + 1))))
  raises("empty vocabulary", lambda: ka.kl_per_position(a[..., :0], a[..., :0]))
  raises(r"\.astype\(bool\)", lambda: ka.kl_per_position(a, a, where=jnp.ones((B, T))))


@cell(ROW, "`fused_linear_kl`", RAISES)
def fused_bad_static_input():
  h, w, rh, rw = head()
  raises("weight", lambda: ka.fused_linear_kl(h, w[:2], rh, rw))
  raises("Unknown direction", lambda: ka.fused_linear_kl(h, w, rh, rw, direction="up"))


@cell(ROW, "`kl_topk`", RAISES)
def topk_bad_static_input():
  a, b = logits_pair()
  lp, idx, tail = ka.topk_logprobs(b, K)
  raises(r"Shape mismatch: ref_indices has shape \(2, 3, 2\)",
         lambda: ka.kl_topk(a, lp, idx[..., :2], ref_tail=tail))
  raises("beta", lambda: ka.kl_topk(a, lp, idx, ref_tail=tail, direction="js", beta=2.0))


@cell(ROW, "aggregators", RAISES)
def aggregators_bad_static_input():
  x = jnp.ones((B, T))
  raises("Unknown aggregator 'median'", lambda: ka.aggregate(x, "median"))
  raises(r"\.astype\(bool\)", lambda: ka.mean(x, where=jnp.ones((B, T), jnp.int32)))
  raises("out of range", lambda: ka.rmse(x, axis=2))


@cell(ROW, "`kl_barrier`", RAISES)
def barrier_bad_static_input():
  a = jnp.zeros((B, T, V))
  raises(r"axis must be -1 \(per sequence; 1, the position axis", lambda: ka.kl_barrier(
      a, a, axis=0))
  raises("Unknown hinge", lambda: ka.kl_barrier(a, a, hinge="cubic"))


@cell(ROW, "`kl_estimate`", RAISES)
def estimate_bad_static_input():
  lp = jnp.zeros((B, T, 32000))
  raises("full-vocabulary", lambda: ka.kl_estimate(lp, lp))
  raises("Unknown estimator", lambda: ka.kl_estimate(lp[..., 0], lp[..., 0], estimator="k4"))


# ------------------------------------------------------------------------------------------------
# The walk.


def test_readme_table_is_the_tested_table():
  assert readme_table() == {key: text for key, (text, _) in CELLS.items()}


@pytest.mark.parametrize("key", [
    pytest.param(key, id=f"{key[0]} / {key[1].strip('`')}")
    for key, (_, check) in CELLS.items() if check is not None])
def test_cell(key):
  CELLS[key][1]()
