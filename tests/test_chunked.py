"""The row-block loop: every row once, accumulations counted once, plans, chunk-size validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klagg_jax import _chunked, _config


@pytest.mark.parametrize("n", [10, 13, 16])
@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 10, 100])
def test_rows_and_accumulators_cover_each_row_once(n, chunk):
  x = jnp.arange(float(n))[:, None] * jnp.ones((n, 3))

  def body(part, fresh, total):
    (rows,) = part
    return total + jnp.where(fresh[:, None], rows, 0.0).sum(0), [rows.sum(-1) * 2.0]

  total, (out,) = _chunked.scan_row_chunks(body, (x,), chunk, jnp.zeros(3))
  np.testing.assert_array_equal(out, np.arange(n) * 6.0)
  np.testing.assert_array_equal(total, np.full(3, n * (n - 1) / 2))


@pytest.mark.parametrize("n, max_rows, want", [
    (16, 16, (16, True)),      # one block
    (16, 100, (16, True)),
    (16, 5, (4, True)),        # largest divisor within the budget
    (24, 7, (6, True)),        # 6, the largest divisor; 3 would lose a factor of 2 anyway
    (8000, 128, (64, True)),
    (13, 10, (10, False)),     # prime: no divisor near the budget, contiguous blocks
    (13, 4, (1, True)),        # within a factor 8 of the budget: still interleaved
    (2 * 4099, 128, (128, False)),
])
def test_plan_takes_a_divisor_near_the_budget(n, max_rows, want):
  rows, interleaved = _chunked.plan_rows(n, max_rows)
  assert (rows, interleaved) == want
  assert rows <= max(1, max_rows) or rows == n
  if interleaved:
    assert n % rows == 0 and 8 * rows >= min(max_rows, n)
    fitting = [d for d in range(1, max_rows + 1) if n % d == 0]
    # Either the largest divisor, or one at least half as large that keeps all factors of 2.
    assert rows == fitting[-1] or (2 * rows >= fitting[-1] and (rows & -rows) == (n & -n))
  else:
    assert rows == max_rows


def test_plan_prefers_blocks_that_keep_the_factors_of_two():
  # 8000 = 2^6 * 125: blocks of 64 rows keep 2^6, so 8 devices splitting the rows split every block.
  assert _chunked.plan_rows(8000, 100) == (64, True)
  assert _chunked.plan_rows(8192, 2048) == (2048, True)


def test_bf16_rows_survive_the_integer_view():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((9, 5)), jnp.bfloat16)
  _, (out,) = _chunked.scan_row_chunks(lambda p, f, c: (c, [p[0]]), (x,), 4)
  np.testing.assert_array_equal(out, x)


def test_chunk_size_validation():
  assert _chunked.chunking(None, 32768).rows is None
  assert _chunked.chunking(np.int64(64), 5).rows == 64
  for bad in (0, -3, 2.0, True, "8"):
    with pytest.raises(ValueError, match="chunk_size"):
      _chunked.chunking(bad, 5)


def test_default_blocks_follow_the_platform_config():
  cpu = _chunked.Chunking(None, 32768).max_rows(_config.CPU)
  gpu = _chunked.Chunking(None, 131072).max_rows(_config.GPU)
  assert cpu == (1 << 21) // (4 * 32768) == 16
  assert gpu == 8192  # one block of N = 8192 at V = 131072 (the H200 measurement)
  assert _chunked.Chunking(7, 32768).max_rows(_config.GPU) == 7


def test_platforms_with_equal_plans_stage_no_branch():
  x = jnp.ones((4, 3))
  body = lambda p, f, c: (c, [p[0].sum(-1)])
  jaxpr = jax.make_jaxpr(lambda x: _chunked.scan_row_chunks(body, (x,), 2)[1])(x)
  assert "platform_index" not in str(jaxpr)
  big = jax.ShapeDtypeStruct((64, 65536), jnp.float32)  # CPU: 8-row blocks; GPU: one block
  jaxpr = jax.make_jaxpr(
      lambda x: _chunked.scan_row_chunks(body, (x,), _chunked.Chunking(None, 65536))[1])(big)
  assert "platform_index" in str(jaxpr)
