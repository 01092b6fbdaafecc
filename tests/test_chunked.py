"""The row-chunk loop: every row once, accumulations counted once, chunk-size validation."""

import jax.numpy as jnp
import numpy as np
import pytest

from klagg_jax import _chunked


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 10])
def test_rows_and_accumulators_cover_each_row_once(chunk):
  x = jnp.arange(10.0)[:, None] * jnp.ones((10, 3))

  def body(part, fresh, total):
    (rows,) = part
    return total + jnp.where(fresh[:, None], rows, 0.0).sum(0), [rows.sum(-1) * 2.0]

  total, (out,) = _chunked.scan_row_chunks(body, (x,), chunk, jnp.zeros(3))
  np.testing.assert_array_equal(out, np.arange(10.0) * 6.0)
  np.testing.assert_array_equal(total, np.full(3, 45.0))


def test_bf16_rows_survive_the_integer_view():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((9, 5)), jnp.bfloat16)
  _, (out,) = _chunked.scan_row_chunks(lambda p, f, c: (c, [p[0]]), (x,), 4)
  np.testing.assert_array_equal(out, x)


def test_chunk_size_resolution():
  assert _chunked.resolve_chunk_rows(None, 10, 32768) >= 1
  assert _chunked.resolve_chunk_rows(64, 10, 5) == 10
  for bad in (0, -3, 2.0, True, "8"):
    with pytest.raises(ValueError, match="chunk_size"):
      _chunked.resolve_chunk_rows(bad, 10, 5)
