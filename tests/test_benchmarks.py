"""The benchmark suite cannot rot: its peers agree, and its harness runs on a tiny shape.

Nothing here is timed against a bound; speed lives in `benchmarks/run.py` output only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _harness  # noqa: E402
import _inputs  # noqa: E402
import peers  # noqa: E402
import peers_host  # noqa: E402
import run as bench_run  # noqa: E402

HAS_TORCH = peers_host.torch_version() is not None


def _reverse_kl64(logits: np.ndarray, ref_logits: np.ndarray) -> np.ndarray:
  """KL(softmax(logits) || softmax(ref_logits)) per position, float64."""

  def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  logp, logr = log_softmax(logits), log_softmax(ref_logits)
  return (np.exp(logp) * (logp - logr)).sum(-1)


@pytest.fixture(scope="module")
def pair():
  return _inputs.logits_pair(32, 97, seed=3)


def test_kl_peers_agree_with_float64_reverse_kl(pair):
  a, b = pair["logits"], pair["ref_logits"]
  want = _reverse_kl64(a, b)
  got = {
      "jax.numpy": np.asarray(peers.jnp_kl(jnp.asarray(a), jnp.asarray(b))),
      "optax": np.asarray(peers.optax_kl(jnp.asarray(a), jnp.asarray(b))),
      "numpy": peers_host.numpy_kl(a, b),
  }
  if HAS_TORCH:
    import torch

    got["torch"] = peers_host.torch_kl(torch.from_numpy(a), torch.from_numpy(b)).numpy()
  assert np.all(want > 0.1)  # a real divergence, not a trivial 0 = 0
  for name, x in got.items():
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_kl_peers_direction_is_reverse():
  """The student p is the one summed over: KL(p || r) != KL(r || p) here; peers give the former."""
  p_logits = np.array([[4.0, 0.0, 0.0]], np.float32)
  r_logits = np.array([[0.0, 0.0, 0.0]], np.float32)
  want = _reverse_kl64(p_logits, r_logits)
  assert abs(want - _reverse_kl64(r_logits, p_logits)).item() > 0.1
  got = peers.optax_kl(jnp.asarray(p_logits), jnp.asarray(r_logits))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(peers_host.numpy_kl(p_logits, r_logits), want, rtol=1e-5)


@pytest.mark.parametrize("agg", ["rmse", "p95"])
def test_barrier_peers_agree_in_value_and_grad(pair, agg):
  a, b, t = pair["logits"], pair["ref_logits"], 8
  agg_fn = peers.PEER_AGGS[agg]
  ref_loss, ref_grad = jax.value_and_grad(peers.barrier_loss(peers.jnp_kl, agg_fn, t))(a, b)
  loss, grad = jax.value_and_grad(peers.barrier_loss(peers.optax_kl, agg_fn, t))(a, b)
  assert ref_loss > 0 and np.abs(ref_grad).max() > 0  # the hinge fires on these inputs
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-8)
  kl = _reverse_kl64(a, b).reshape(-1, t)
  div = np.sqrt((kl**2).mean(-1)) if agg == "rmse" else np.percentile(kl, 95, axis=-1)
  np.testing.assert_allclose(ref_loss, np.maximum(div - peers.TAU, 0).mean(), rtol=1e-5)
  if HAS_TORCH:
    params = {"dtype": "f32", "agg": agg, "t": t}
    fn, args = peers_host.build("barrier", "torch", dict(pair), params)
    t_loss, t_grad = fn(*args)
    np.testing.assert_allclose(t_loss.numpy(), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(t_grad.numpy(), ref_grad, rtol=1e-4, atol=1e-8)


@pytest.mark.skipif(not HAS_TORCH, reason="torch not importable")
def test_fused_peers_agree():
  inputs = _inputs.hidden_pair(16, 40, 8, seed=1)
  h, w, rh, rw = (inputs[k] for k in ("hidden", "weight", "ref_hidden", "ref_weight"))
  loss, (gh, gw) = jax.value_and_grad(
      lambda h, w: jnp.mean(peers.jnp_kl(h @ w, jax.lax.stop_gradient(rh @ rw))), argnums=(0, 1)
  )(h, w)
  fn, args = peers_host.build("fused", "torch", inputs, {"dtype": "f32"})
  t_loss, t_gh, t_gw = fn(*args)
  np.testing.assert_allclose(t_loss.numpy(), loss, rtol=1e-5)
  np.testing.assert_allclose(t_gh.numpy(), gh, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(t_gw.numpy(), gw, rtol=1e-4, atol=1e-7)


def test_truncated_topk_peer_matches_definition(pair):
  a, b, k = pair["logits"], pair["ref_logits"], 5
  lp, idx = jax.lax.top_k(jax.nn.log_softmax(jnp.asarray(b)), k)
  got = peers.jnp_truncated_topk_kl(jnp.asarray(a), lp, idx)
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(a)))
  lp, idx = np.asarray(lp), np.asarray(idx)
  want = np.maximum((np.exp(lp) * (lp - np.take_along_axis(logp, idx, -1))).sum(-1), 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_floors_compute_what_they_say(pair):
  a, b = pair["logits"], pair["ref_logits"]
  np.testing.assert_allclose(peers.exp_floor(a, b), np.exp(a).sum() + np.exp(b).sum(), rtol=1e-5)
  np.testing.assert_allclose(peers.read_floor(a, b), a.sum() + b.sum(), rtol=1e-4, atol=1e-2)


def test_peak_rss_probe_sees_the_call():
  shape = {"n": 256, "v": 4096}
  spec = {"workload": "kl", "impl": "numpy", "inputs": "logits", "input_args": shape,
          "params": {**shape, "dtype": "f32"}}
  extra, note = _harness.peak_rss(spec)
  assert note == ""
  assert extra is not None and extra >= 4 * 256 * 4096  # at least one [N, V] float32 temporary


def _allowed_skip(r: dict) -> bool:
  """Skips that are facts of the environment, not rot."""
  return "numpy has no bfloat16" in r["note"] or (not HAS_TORCH and r["family"] == "torch")


def test_harness_runs_every_workload_on_a_tiny_shape(tmp_path, capsys):
  data = bench_run.main(["--tiny", "--no-rss", "--repeats", "1", "--out", str(tmp_path)])
  table = capsys.readouterr().out
  results = data["results"]
  assert {r["workload"] for r in results} == set(bench_run.W.WORKLOADS)
  bad = [(r["workload"], r["case"], r["impl"], r["status"], r["note"]) for r in results
         if r["status"] != "ok" and not _allowed_skip(r)]
  assert not bad, bad
  for r in results:
    if r["status"] == "ok":
      assert r["median_s"] > 0 and len(r["times_s"]) == 1
      if r["family"] not in _harness.HOST_FAMILIES:
        assert r["temp_bytes"] is not None and r["compile_s"] is not None
      if r["max_rel_diff"] is not None:
        assert r["max_rel_diff"] < 1e-4, (r["workload"], r["case"], r["impl"], r["max_rel_diff"])
  names = ["floor: exp (compute)", "floor: read (memory)", "klagg", "jax.numpy", "optax", "numpy",
           "klagg kl_barrier", "klagg fused_linear_kl", "klagg kl_topk k=4"] + ["torch"] * HAS_TORCH
  for name in names:
    assert f"| {name} |" in table
  assert "x exp floor" in table and data["env"]["cpu_model"]
  written = json.loads(Path(data["files"][0]).read_text())
  assert written["env"]["jax"] == jax.__version__ and len(written["results"]) == len(results)
