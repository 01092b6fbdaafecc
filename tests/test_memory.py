"""Memory bounds of the kernels, from XLA's compiled memory analysis (deterministic; no timing).

Shapes are the kernels' stated targets (N = 4096, V = 32768; the fused case at N = 8192):
lowering with ShapeDtypeStructs compiles without allocating or running anything, so the big
shapes cost only compile time. The bounds are those of the CPU block budgets (klagg_jax._config)
and of XLA:CPU's buffer assignment: the whole module is CPU-only (GPU memory is measured by the
benchmarks).
"""

import jax
import jax.numpy as jnp
import pytest

import klagg_jax as ka

F32 = jnp.float32
pytestmark = pytest.mark.cpu_only


def temp_bytes(fn, *shapes):
  specs = [jax.ShapeDtypeStruct(s, F32) for s in shapes]
  return jax.jit(fn).lower(*specs).compile().memory_analysis().temp_size_in_bytes


def plain_kl(a, b):
  lp, lr = jax.nn.log_softmax(a), jax.nn.log_softmax(b)
  return (jnp.exp(lp) * (lp - lr)).sum(-1)


def test_barrier_gradient_temp_is_under_15_percent_of_plain():
  n, v = 4096, 32768
  plain = jax.grad(lambda a, b: ka.rmse(plain_kl(a, jax.lax.stop_gradient(b))))
  ours = jax.grad(lambda a, b: ka.kl_barrier(a[None], b[None], agg="rmse", tau=0.0)[0])
  assert temp_bytes(ours, (n, v), (n, v)) <= 0.15 * temp_bytes(plain, (n, v), (n, v))


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_fused_gradient_temp_is_under_a_quarter_of_one_logits_array(softcap):
  n, v, d = 8192, 32768, 512
  grad = jax.grad(lambda h, w, rh, rw: ka.fused_linear_kl(h, w, rh, rw, softcap=softcap).sum(),
                  (0, 1))
  assert temp_bytes(grad, (n, d), (d, v), (n, d), (d, v)) < 0.25 * n * v * 4


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_fused_scalar_gradient_temp_is_under_15_percent_of_one_logits_array(softcap):
  """reduction="mean": d weight accumulated in float32 plus one block's logits, never [N, V]."""
  n, v, d = 8192, 32768, 512
  grad = jax.grad(lambda h, w, rh, rw: ka.fused_linear_kl(h, w, rh, rw, reduction="mean",
                                                          softcap=softcap), (0, 1))
  assert temp_bytes(grad, (n, d), (d, v), (n, d), (d, v)) <= 0.15 * n * v * 4


def test_low_precision_inputs_are_not_upcast_whole():
  """bf16 logits are upcast per chunk: no float32 copy of an [N, V] input (36 MiB here before)."""
  n, v = 512, 8192
  specs = [jax.ShapeDtypeStruct((n, v), jnp.bfloat16)] * 2
  temp = jax.jit(ka.kl_per_position).lower(*specs).compile().memory_analysis().temp_size_in_bytes
  # At most a 2-byte view per input (XLA:CPU cannot slice bf16 natively) plus chunk buffers.
  assert temp <= 2 * n * v * 2 + (8 << 20)


@pytest.mark.parametrize("path", ["barrier", "topk"])
def test_low_precision_gradients_are_written_without_float32_copies(path):
  """No float32 [N, V] array anywhere in the compiled bf16 gradient. XLA:CPU once updated the
  bf16 gradient buffer per chunk by converting all of it to float32 and back: quadratic in N."""
  n, v = 512, 4096
  spec = jax.ShapeDtypeStruct((n, v), jnp.bfloat16)
  if path == "barrier":
    fn = lambda a, b: ka.kl_barrier(a.reshape(4, 128, v), b.reshape(4, 128, v), agg="rmse")[0]
  else:
    fn = lambda a, b: ka.kl_topk(a, *ka.topk_logprobs(b, 8)[:2]).sum()
  hlo = jax.jit(jax.grad(fn)).lower(spec, spec).compile().as_text()
  assert f"f32[{n},{v}]" not in hlo
