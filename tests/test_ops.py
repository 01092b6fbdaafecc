"""The kernel layer: registry, import graph, exactness, soft-capping, eager caching, transforms.

Every case that exercises an op's implementations runs once per registered implementation
(``IMPLEMENTATIONS`` of the op's api module), so a new implementation is tested by registering it.
"""

import ast
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import klagg_jax as ka
from klagg_jax import _reference as ref
from klagg_jax._ops import registry
from klagg_jax._ops.divergence import api as divergence_api
from klagg_jax._ops.fused import api as fused_api
from klagg_jax._ops.topk import api as topk_api
from tests.helpers import cap64, plain64, refused, to_f64, x64

DIV_IMPLS = sorted(divergence_api.IMPLEMENTATIONS)
TOPK_IMPLS = sorted(topk_api.IMPLEMENTATIONS)
FUSED_IMPLS = sorted(fused_api.IMPLEMENTATIONS)
DIRECTIONS = ("reverse", "forward", "js")
PACKAGE = Path(ka.__file__).parent


# ------------------------------------------------------------------------------------------------
# Structure.


def _module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
  """klagg_jax modules ``path`` imports at module level (a package import counts as the package)."""
  found = set()
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("klagg_jax"):
      for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        found.add(sub if sub in modules else node.module)
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("klagg_jax"))
  return found


def test_the_package_import_graph_is_acyclic():
  files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {m: _imports(p, set(files)) - {m} for m, p in files.items() if m != "klagg_jax"}
  graph = {m: {d for d in deps if d != "klagg_jax"} for m, deps in graph.items()}
  state: dict[str, int] = {}

  def visit(m, path):
    if state.get(m) == 1:
      raise AssertionError(f"import cycle: {' -> '.join(path + [m])}")
    if state.get(m) == 2:
      return
    state[m] = 1
    for d in graph.get(m, ()):
      visit(d, path + [m])
    state[m] = 2

  for m in graph:
    visit(m, [])
  assert "klagg_jax._ops.divergence.chunked" in graph  # the walk saw the op packages


def test_xla_implementations_import_nothing_of_the_kernels():
  for op in ("divergence", "topk", "fused"):
    deps = _imports(PACKAGE / "_ops" / op / "xla.py", set())
    assert not any(d.endswith(".chunked") or d.endswith("_chunked") for d in deps), (op, deps)


def test_unknown_implementation_names_the_valid_ones():
  with pytest.raises(ValueError, match="'chunked', 'xla'"):
    ka.kl_per_position(jnp.zeros((2, 3)), jnp.zeros((2, 3)), implementation="nope")
  with pytest.raises(ValueError, match="non-empty"):
    ka.kl_topk(jnp.zeros((2, 3)), jnp.zeros((2, 1)), jnp.zeros((2, 1), int), implementation=())


def test_a_sequence_falls_through_implementations_that_cannot_run():
  def cannot(x):
    raise NotImplementedError("needs a GPU")

  impls = {"first": cannot, "second": lambda x: x + 1}
  assert registry.call("divergence", ("first", "second"), impls, 1) == 2
  with pytest.raises(NotImplementedError, match="needs a GPU"):
    registry.call("divergence", ("first",), impls, 1)


def test_a_sequence_of_names_is_accepted_by_the_public_functions(rng):
  a, b = (jnp.asarray(rng.normal(size=(3, 7)), jnp.float32) for _ in range(2))
  got = ka.kl_per_position(a, b, implementation=("chunked", "xla"))
  np.testing.assert_allclose(got, ref.kl_per_position(a, b), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Exactness: every implementation against the float64 truth.


@pytest.mark.parametrize("impl", DIV_IMPLS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_identical_inputs_give_exact_zero_and_zero_gradient(impl, direction, rng):
  a = jnp.asarray(rng.normal(size=(4, 9)) * 5, jnp.float32)
  f = lambda x, y: ka.kl_per_position(x, y, direction=direction, implementation=impl).sum()
  value, grads = jax.value_and_grad(f, (0, 1))(a, a)
  assert value == 0.0
  assert all((g == 0).all() for g in grads)
  shifted = ka.kl_per_position(a * 6.0, a * 6.0 + 3.0, direction=direction, implementation=impl)
  assert (shifted >= 0).all()  # a constant shift changes nothing; rounding never goes below 0


@pytest.mark.parametrize("impl", DIV_IMPLS)
def test_negative_rounding_is_clamped_and_nan_passes(impl):
  a = jnp.asarray([[0.0, jnp.nan, 1.0], [1.0, 2.0, 3.0]], jnp.float32)
  out = ka.kl_per_position(a, a + 1.0, implementation=impl)
  assert np.isnan(out[0]) and out[1] >= 0


@pytest.mark.parametrize("impl", DIV_IMPLS)
@pytest.mark.parametrize("beta", [1e-7, 0.5, 1 - 1e-6])
def test_js_matches_float64_at_extreme_beta(impl, beta, rng):
  a, b = (rng.normal(size=(6, 40)) * 3 for _ in range(2))
  got = ka.kl_per_position(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                           direction="js", beta=beta, implementation=impl)
  a32, b32 = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (a, b))
  np.testing.assert_allclose(got, ref.kl_per_position(a32, b32, "js", beta=beta), rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Soft-capping: equal to capping first, in value and gradient.


def _np_cap(z, cap):
  with np.errstate(invalid="ignore"):
    return np.where(z == -np.inf, -np.inf, cap * np.tanh(z / cap))


def _logits_with_inf(rng, shape, scale=20.0):
  x = rng.normal(size=shape) * scale
  x[..., 0] = -np.inf  # a masked vocabulary entry on both sides
  return x


def _softcap_impl(impl):
  """The implementation to test soft-capping with: the Pallas kernel has no soft-cap, and must
  say so (NotImplementedError, so a sequence falls through to the next implementation)."""
  if impl != "pallas":
    return impl
  with pytest.raises(NotImplementedError, match="softcap"):
    ka.kl_per_position(jnp.zeros((2, 3)), jnp.zeros((2, 3)), softcap=2.0, implementation=impl)
  return (impl, "chunked")


@pytest.mark.parametrize("impl", DIV_IMPLS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_softcap_equals_capping_first(impl, direction, rng):
  a, b = _logits_with_inf(rng, (3, 8)), _logits_with_inf(rng, (3, 8))
  cap, ref_cap, temp = 5.0, 7.0, 0.8
  f = lambda x, y: ka.kl_per_position(x, y, direction=direction, softcap=cap,
                                      ref_softcap=ref_cap, temperature=temp, chunk_size=2,
                                      implementation=_softcap_impl(impl))
  a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  value, vjp = jax.vjp(f, a32, b32)
  w = jnp.asarray(rng.uniform(size=3), jnp.float32)
  grads = vjp(w)
  with jax.enable_x64(True):
    g = lambda x, y: plain64(cap64(x, cap) / temp, cap64(y, ref_cap) / temp, direction)
    a64, b64 = (jnp.asarray(np.asarray(t, np.float64)) for t in (a32, b32))
    want, want_vjp = jax.vjp(g, a64, b64)
    want_grads = want_vjp(jnp.asarray(np.asarray(w, np.float64)))
  np.testing.assert_allclose(value, want, rtol=2e-5, atol=1e-6)
  for got, exp in zip(grads, want_grads):
    np.testing.assert_allclose(got, exp, rtol=2e-4, atol=1e-6)
    assert (np.asarray(got)[:, 0] == 0).all()  # -inf entries stay -inf: no gradient there


@pytest.mark.parametrize("impl", DIV_IMPLS)
def test_an_infinite_ref_softcap_leaves_the_reference_uncapped(impl, rng):
  a, b = (rng.normal(size=(2, 6)) * 9 for _ in range(2))
  got = ka.kl_per_position(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), softcap=4.0,
                           ref_softcap=float("inf"), implementation=_softcap_impl(impl))
  want = ref.kl_per_position(4.0 * np.tanh(a / 4.0), b)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, "30", True])
def test_softcap_must_be_a_static_positive_number(bad):
  with pytest.raises(ValueError, match="softcap"):
    ka.kl_per_position(jnp.zeros((2, 3)), jnp.zeros((2, 3)), softcap=bad)


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_fused_softcap_equals_capping_first(impl, direction, rng):
  n, d, v, cap = 6, 4, 9, 3.0
  h, rh = (jnp.asarray(rng.normal(size=(n, d)), jnp.float32) for _ in range(2))
  w, rw = (jnp.asarray(rng.normal(size=(d, v)) * 3, jnp.float32) for _ in range(2))
  bias = np.asarray(rng.normal(size=v), np.float32)
  bias[1] = -np.inf  # a banned vocabulary entry
  bias = jnp.asarray(bias)
  f = lambda h, w, b: ka.fused_linear_kl(h, w, rh, rw, bias=b, ref_bias=bias, direction=direction,
                                         softcap=cap, chunk_size=4, implementation=impl).sum()
  value, grads = jax.value_and_grad(f, (0, 1, 2))(h, w, bias)
  with jax.enable_x64(True):
    c64 = lambda t: jnp.asarray(np.asarray(t, np.float64))
    def g(h, w, b):
      z, zr = h @ w + b[None, :], c64(rh) @ c64(rw) + c64(bias)[None, :]
      return plain64(cap64(z, cap), cap64(zr, cap), direction).sum()
    want, want_grads = jax.value_and_grad(g, (0, 1, 2))(c64(h), c64(w), c64(bias))
  np.testing.assert_allclose(value, want, rtol=2e-5)
  for got, exp in zip(grads, want_grads):
    exp = np.where(np.isfinite(exp), exp, 0.0)  # the banned entry's bias has no gradient
    np.testing.assert_allclose(got, exp, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("impl", TOPK_IMPLS)
def test_topk_softcap_equals_capping_first(impl, rng):
  t, s = _logits_with_inf(rng, (4, 10)), _logits_with_inf(rng, (4, 10))
  lp, idx, tail = ka.topk_logprobs(jnp.asarray(t, jnp.float32), 3, softcap=6.0,
                                   implementation=impl)
  want_lp, want_idx, want_tail = ref.topk_logprobs(_np_cap(t, 6.0), 3)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(lp, want_lp, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tail, want_tail, rtol=1e-5, atol=1e-6)
  for direction in DIRECTIONS:
    got = ka.kl_topk(jnp.asarray(s, jnp.float32), lp, idx, tail, direction=direction,
                     softcap=6.0, implementation=impl)
    want = ref.kl_topk(_np_cap(s, 6.0), lp, idx, tail, direction=direction)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  h = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 10)) * 4, jnp.float32)
  got = ka.fused_linear_kl_topk(h, w, lp, idx, tail, softcap=6.0, implementation=impl)
  want = ref.kl_topk(6.0 * np.tanh(np.asarray(h @ w, np.float64) / 6.0), lp, idx, tail)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The fused heads' findings.


def test_float16_fused_weight_gradient_keeps_small_cotangents_normal(rng):
  n, d, v = 8192, 32, 512
  h = jnp.asarray(rng.normal(size=(n, d)), jnp.float16)
  w = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float16)
  rw = (w.astype(jnp.float32) * 1.01).astype(jnp.float16)  # student near reference
  f = lambda w: ka.fused_linear_kl(h, w, h, rw).mean()
  got = jax.jit(jax.grad(f))(w).astype(jnp.float32)
  f32 = lambda w: ka.fused_linear_kl(h.astype(jnp.float32), w, h.astype(jnp.float32),
                                     rw.astype(jnp.float32)).mean()
  want = jax.jit(jax.grad(f32))(w.astype(jnp.float32))
  assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-2


@pytest.mark.parametrize("impl", FUSED_IMPLS)
def test_fused_masked_nan_rows_give_finite_weight_gradients(impl, rng):
  h = np.asarray(rng.normal(size=(4, 3)), np.float32)
  h[2] = np.nan
  mask = jnp.asarray([True, True, False, True])
  w = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  for topk in (False, True):
    if topk:
      lp, idx, tail = ka.topk_logprobs(jnp.asarray(rng.normal(size=(4, 5)), jnp.float32), 2)
      f = lambda h, w: ka.fused_linear_kl_topk(h, w, lp, idx, tail, where=mask,
                                               implementation=impl).sum()
      if refused("fused", impl, "topk", lambda: f(jnp.asarray(h), w)):
        continue
    else:
      f = lambda h, w: ka.fused_linear_kl(h, w, jnp.ones((4, 3)), w * 2, where=mask,
                                          implementation=impl).sum()
    dh, dw = jax.grad(f, (0, 1))(jnp.asarray(h), w)
    assert np.isfinite(dw).all() and (dh[2] == 0).all()


# ------------------------------------------------------------------------------------------------
# Top-k ties and check_topk's index range.


@pytest.mark.parametrize("impl", sorted(topk_api.LOGPROBS_IMPLEMENTATIONS))
def test_topk_ties_treat_negative_zero_as_zero(impl):
  x = jnp.asarray([[-0.0, 0.0, -1.0, 0.0]], jnp.float32)
  _, idx, _ = ka.topk_logprobs(x, 2, implementation=impl)
  np.testing.assert_array_equal(idx, [[0, 1]])


@pytest.mark.parametrize("dtype,vocab", [(np.uint8, 256), (np.int16, 32768), (np.uint16, 65536)])
def test_check_topk_accepts_indices_up_to_the_dtype_range(dtype, vocab):
  lp = jnp.log(jnp.full((2, 2), 0.25, jnp.float32))
  idx = jnp.asarray(np.array([[0, vocab - 1], [1, 2]], dtype))
  ka.check_topk(lp, idx, vocab=vocab)  # eager: raises at once if a check fails


# ------------------------------------------------------------------------------------------------
# Transforms and eager calls.


@pytest.mark.parametrize("fn", ["kl_per_position", "kl_topk", "fused_rows", "fused_mean"])
def test_forward_mode_on_the_chunked_kernels_names_the_xla_implementation(fn, rng):
  a = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(5, 5)), jnp.float32)
  lp, idx, tail = ka.topk_logprobs(a, 2)
  f = {"kl_per_position": lambda x: ka.kl_per_position(x, a),
       "kl_topk": lambda x: ka.kl_topk(x, lp, idx, tail),
       "fused_rows": lambda x: ka.fused_linear_kl(x, w, a, w),
       "fused_mean": lambda x: ka.fused_linear_kl(x, w, a, w, reduction="mean")}[fn]
  with pytest.raises(TypeError, match='implementation="xla"'):
    jax.jvp(f, (a,), (a,))


def test_hessian_works_on_the_default_kernel(rng):
  a, b = (jnp.asarray(rng.normal(size=(2, 4)), jnp.float32) for _ in range(2))
  hess = [jax.hessian(lambda x: ka.kl_per_position(x, b, implementation=i).sum())(a)
          for i in (None, "xla")]
  np.testing.assert_allclose(hess[0], hess[1], rtol=1e-4, atol=1e-6)


def test_three_identical_eager_calls_trace_once(monkeypatch, rng):
  traces = []
  inner = divergence_api.IMPLEMENTATIONS["chunked"]
  monkeypatch.setitem(divergence_api.IMPLEMENTATIONS, "chunked",
                      lambda *args: traces.append(1) or inner(*args))
  a, b = (jnp.asarray(rng.normal(size=(3, 5, 17)), jnp.float32) for _ in range(2))
  outs = [ka.kl_per_position(a, b, implementation="chunked", temperature=0.7) for _ in range(3)]
  assert len(traces) == 1
  np.testing.assert_allclose(outs[0], ref.kl_per_position(a, b, temperature=0.7), rtol=1e-5)


def test_eager_gradients_run_the_kernel_compiled_and_trace_it_once(monkeypatch, rng):
  # Without a jit around it, jax.grad would run the kernel's passes one primitive at a time.
  traces = []
  inner = divergence_api.IMPLEMENTATIONS["chunked"]
  monkeypatch.setitem(divergence_api.IMPLEMENTATIONS, "chunked",
                      lambda *args: traces.append(1) or inner(*args))
  a, b = (jnp.asarray(rng.normal(size=(6, 17)), jnp.float32) for _ in range(2))
  loss = lambda x: ka.kl_per_position(x, b, implementation="chunked", temperature=0.7).sum()
  grads = [jax.grad(loss)(a) for _ in range(3)]
  assert len(traces) == 1
  eqns = jax.make_jaxpr(jax.grad(loss))(a).jaxpr.eqns
  assert any(e.primitive.name in ("jit", "pjit") for e in eqns)  # compiled calls, not primitives
  with x64():
    want = jax.grad(lambda x: plain64(x / 0.7, to_f64(b) / 0.7, "reverse").sum())(to_f64(a))
  np.testing.assert_allclose(grads[2], want, rtol=1e-5, atol=1e-6)
