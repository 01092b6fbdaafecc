"""The benchmark suite cannot rot: its peers agree, and its harness runs on a tiny shape.

Nothing here is timed against a bound; speed lives in `benchmarks/run.py` output only.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))

import _device_inputs  # noqa: E402
import _floors  # noqa: E402
import _harness  # noqa: E402
import _inputs  # noqa: E402
import _workloads  # noqa: E402
import peers  # noqa: E402
import peers_host  # noqa: E402
import peers_torch  # noqa: E402
import run as bench_run  # noqa: E402

HAS_TORCH = peers_host.torch_version() is not None
ROOT = BENCH.parent


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
  """Skips that are facts of the environment, not rot: numpy's missing bf16, a peer that cannot
  run here (peers_torch.plan's notes), a klagg argument this checkout does not have yet."""
  note = r["note"]
  peer_notes = ("torch not importable", "accelerators only", "CUDA only", "not importable",
                "host peer")
  return ("numpy has no bfloat16" in note
          or (r["family"] in ("numpy", "torch", "liger") and any(x in note for x in peer_notes))
          or "argument here" in note)


def test_harness_runs_every_workload_on_a_tiny_shape(tmp_path, capsys):
  # f32 matmuls pinned to full precision: the fused rows are compared at 1e-4 (TF32 on GPUs).
  with jax.default_matmul_precision("highest"):
    data = bench_run.main(["--tiny", "--no-rss", "--repeats", "1", "--out", str(tmp_path)])
  table = capsys.readouterr().out
  results = data["results"]
  assert {r["workload"] for r in results} == set(bench_run.W.WORKLOADS)
  bad = [(r["workload"], r["case"], r["impl"], r["status"], r["note"]) for r in results
         if r["status"] not in ("ok", "computed") and not _allowed_skip(r)]
  assert not bad, bad
  for r in results:
    if r["status"] == "ok":
      assert r["median_s"] > 0 and len(r["times_s"]) == 1
      if r["runner"] == "jit":
        assert r["temp_bytes"] is not None and r["compile_s"] is not None
      if r["max_rel_diff"] is not None:
        tol = 1e-4 if r["params"]["dtype"] == "f32" else 5e-2
        assert r["max_rel_diff"] < tol, (r["workload"], r["case"], r["impl"], r["max_rel_diff"])
        assert r["agrees"] is True
    if r["status"] == "computed":  # the floors formed from this run's measured rates
      assert r["median_s"] > 0 and r["x_hw_floor"] == 1.0 and r["workload"] in (
          "kl", "barrier", "fused", "fused_js")
  computed = {(r["workload"], r["case"]) for r in results if r["status"] == "computed"}
  assert computed == {(r["workload"], r["case"]) for r in results
                      if r["workload"] in ("kl", "barrier", "fused", "fused_js")}
  names = ["floor: exp (compute)", "floor: read (memory)", "klagg", "jax.numpy", "optax", "numpy",
           "klagg kl_barrier", "klagg fused_linear_kl", "klagg kl_topk k=4",
           "klagg chunk_size=16", "klagg kl_barrier chunk_size=16",
           "floor: bytes / copy bandwidth", "floor: FLOPs / matmul rate",
           "klagg fused_linear_kl (per position, mean)", "torch.compile", "liger KLDivLoss",
           "liger FusedLinearJSD"] + ["torch"] * HAS_TORCH
  for name in names:
    assert f"| {name} |" in table
  for header in ("x exp floor", "x byte floor", "x FLOP floor", "CUDA peak MiB", "### Agreement"):
    assert header in table
  assert data["env"]["cpu_model"] and set(data["env"]["peers"]) == {"torch", "torch.compile",
                                                                     "liger"}
  written = json.loads(Path(data["files"][0]).read_text())
  assert written["env"]["jax"] == jax.__version__ and len(written["results"]) == len(results)
  for row in written["results"]:  # each row says where and with what it was measured
    assert row["device_kind"] == jax.devices()[0].device_kind and row["jax"] == jax.__version__
    assert {"jaxlib", "torch", "liger_kernel"} <= set(row)
  want = f"{_harness.device_slug()}-{data['env']['date'][:10]}-tiny.json"
  assert Path(data["files"][0]).name == want


# ------------------------------------------------------------------------- accelerator code paths


@pytest.mark.parametrize("kind, want", [
    ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
    ("NVIDIA H200", "nvidia-h200"),
    ("TPU v5 lite", "tpu-v5-lite"),
    ("cpu", "cpu"),
    ("  A/B__c ", "a-b-c"),
])
def test_result_file_is_named_after_device_kind_and_date(kind, want):
  assert _harness.slug(kind) == want
  stem = _harness.result_stem(Path("out"), want, "2026-11-27T17:40:00+00:00")
  assert stem == Path("out") / f"{want}-2026-11-27"
  tiny = _harness.result_stem(Path("o"), want, "2026-11-27", "-tiny")
  assert tiny.name == f"{want}-2026-11-27-tiny"


def test_result_stem_rejects_a_date_that_is_not_iso():
  with pytest.raises(ValueError, match="YYYY-MM-DD"):
    _harness.result_stem(Path("o"), "cpu", "27/11/2026")


def test_byte_floor_reproduces_the_h200_forward_floor():
  """bf16 forward at N=8192, V=131072 reads 4.29 GB: 1.355 ms at 3.17 TB/s (the H200 table)."""
  params = {"n": 8192, "v": 131072, "dtype": "bf16"}
  assert _floors.bytes_moved("kl", params) == 2 * 8192 * 131072 * 2
  assert _floors.bytes_moved("barrier", params) == 3 * 8192 * 131072 * 2
  assert _floors.bytes_moved("barrier", {**params, "dtype": "f32"}) == 3 * 8192 * 131072 * 4
  assert _floors.bytes_moved("topk", params) is None
  np.testing.assert_allclose(_floors.floor_s(2 * 8192 * 131072 * 2, 3.1705e12), 1.355e-3, rtol=1e-3)


def test_flop_floor_counts_four_matmuls():
  params = {"n": 8192, "d": 4096, "v": 128256, "dtype": "bf16"}
  assert _floors.matmul_flops(params) == 4 * 2 * 8192 * 4096 * 128256
  rates = _floors.Rates(copy_bytes=1, matmul_size=1, bandwidth=2e12, matmul={"bf16": (8e14, 1.0)})
  seconds, note = rates.case_floor("fused_js", params)
  np.testing.assert_allclose(seconds, 8 * 8192 * 4096 * 128256 / 8e14)
  assert "TFLOP" in note and "bf16" in note
  seconds, note = rates.case_floor("barrier", {"n": 4, "v": 8, "dtype": "f32"})
  assert seconds == 3 * 4 * 8 * 4 / 2e12 and "GB/s" in note
  assert rates.case_floor("agg", {"b": 1, "t": 4, "dtype": "f32"}) is None


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan")])
def test_floor_refuses_a_rate_that_is_not_positive(rate):
  with pytest.raises(ValueError, match="rate must be > 0"):
    _floors.floor_s(1.0, rate)


def test_rates_are_measured_once_per_run():
  rates = _floors.Rates(copy_bytes=2**16, matmul_size=16)
  bw = rates.bytes_per_s()
  assert bw > 0 and rates.bytes_per_s() == bw  # kept, not measured again
  flops = rates.flops_per_s("f32")
  assert flops > 0 and rates.flops_per_s("f32") == flops
  summary = rates.summary()
  assert summary["copy_bandwidth_bytes_per_s"] == bw
  assert summary["matmul_flops_per_s"] == {"f32": flops}


_NONE = peers_torch.Available(torch=None, torch_cuda=False, liger=None)
_CPU_TORCH = peers_torch.Available(torch="2.13.0+cpu", torch_cuda=False, liger=None)
_GPU_ALL = peers_torch.Available(torch="2.11.0+cu130", torch_cuda=True, liger="0.8.5")


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_peer_plan_without_torch_skips_every_peer_with_a_note(platform):
  notes = peers_torch.plan(platform, _NONE)
  assert set(notes) == {"torch", "torch.compile", "liger"}
  assert all("torch not importable" in n for n in notes.values())


def test_peer_plan_on_cpu_runs_torch_on_the_host_only():
  notes = peers_torch.plan("cpu", _CPU_TORCH)
  assert notes["torch"] is None
  assert "accelerators only" in notes["torch.compile"] and "CUDA only" in notes["liger"]
  assert peers_torch.plan("cpu", _CPU_TORCH, force_compile=True)["torch.compile"] is None


def test_peer_plan_on_gpu():
  assert peers_torch.plan("gpu", _GPU_ALL) == {"torch": None, "torch.compile": None, "liger": None}
  no_liger = dataclasses.replace(_GPU_ALL, liger=None)
  notes = peers_torch.plan("gpu", no_liger)
  assert notes["torch"] is None and notes["torch.compile"] is None
  assert "liger-kernel not importable" in notes["liger"]
  # A CPU-only torch beside a GPU JAX would time the host: every PyTorch-side row is skipped.
  assert all("cannot run on this gpu" in n for n in peers_torch.plan("gpu", _CPU_TORCH).values())
  assert all("cannot run on this tpu" in n for n in peers_torch.plan("tpu", _GPU_ALL).values())
  assert set(peers_torch.plan("gpu", _GPU_ALL, no_torch=True).values()) == {"--no-torch"}


def test_peer_detection_matches_what_imports_here():
  found = peers_torch.detect()
  assert found.torch == peers_host.torch_version()
  if found.torch is None:
    assert not found.torch_cuda


def test_budget_with_a_fake_clock():
  now = [100.0]
  budget = _harness.Budget(10.0, clock=lambda: now[0])
  assert budget.left() == 10.0 and not budget.spent()
  now[0] = 107.5
  assert budget.left() == 2.5
  now[0] = 111.0
  assert budget.left() == 0.0 and budget.spent() and "10 s spent after 11 s" in budget.note()
  assert _harness.Budget(None).left() == float("inf")
  with pytest.raises(ValueError, match="budget"):
    _harness.Budget(-1.0)


def test_spent_budget_skips_rows_not_yet_warmed_up():
  now = [0.0]

  def clock():
    now[0] += 6.0  # every look at the clock: 6 s later
    return now[0]

  budget = _harness.Budget(10.0, clock=clock)  # start at 6; first check 12 (left 4), then 18
  rows = [_harness._Prepared(_harness.Impl(name, "numpy", lambda: None, runner="host"),
                             lambda: np.ones(3), {}) for name in ("first", "second")]
  fields = _harness.time_interleaved(rows, warmup=1, repeats=10, log=lambda m: None,
                                     budget=budget)
  assert fields["first"]["status"] == "ok" and len(fields["first"]["times_s"]) == 3  # the minimum
  assert fields["second"]["status"] == "skipped"
  assert "global time budget" in fields["second"]["note"]


def test_spent_budget_skips_every_case_and_still_writes_the_files(tmp_path):
  data = bench_run.main(["--tiny", "--budget-s", "0", "--no-rss", "--no-plot",
                         "--out", str(tmp_path)])
  results = data["results"]
  assert results and all(r["status"] == "skipped" for r in results)
  assert all("global time budget of 0 s spent" in r["note"] for r in results)
  assert {r["workload"] for r in results} == set(bench_run.W.WORKLOADS)
  assert "| klagg | " in Path(data["files"][1]).read_text()  # rows named, not one per case
  assert [Path(f).suffix for f in data["files"]] == [".json", ".md"]


def test_gpu_preset_measures_the_issue_shapes():
  cfg = bench_run.config_from(bench_run.parse_args(["--gpu"]))
  cases = bench_run.make_cases(cfg)
  got = [(c.workload, c.params["dtype"], c.params.get("agg")) for c in cases]
  assert got == [("kl", "bf16", None), ("barrier", "bf16", "rmse"), ("fused_js", "bf16", None),
                 ("kl", "f32", None), ("barrier", "f32", "rmse")]
  for c in cases:
    if c.workload == "fused_js":
      assert (c.params["n"], c.params["d"], c.params["v"], c.params["beta"]) == (
          8192, 4096, 128256, 0.5)
      assert c.params["implementations"] == ["pallas"]  # the Pallas block step beside chunked
    else:
      assert (c.params["n"], c.params["v"], c.params["xla"]) == (8192, 131072, True)
      assert c.params["chunks"] and c.params.get("t", 512) == 512
  assert cfg.total_budget_s is not None
  with pytest.raises(SystemExit, match="--tiny"):
    bench_run.config_from(bench_run.parse_args(["--gpu", "--quick"]))


@pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="the refusal is for CPU hosts")
def test_gpu_preset_refuses_a_cpu_without_tiny():
  with pytest.raises(SystemExit, match="--gpu --tiny"):
    bench_run.main(["--gpu"])


def test_runs_write_to_an_ignored_directory_by_default():
  assert bench_run.parse_args([]).out == BENCH / "out"
  ignored = (ROOT / ".gitignore").read_text().splitlines()
  assert "benchmarks/out/" in ignored and ".whl/" in ignored


def test_klagg_keyword_detection():
  assert _workloads.has_kwarg("kl_per_position", "chunk_size")
  assert not _workloads.has_kwarg("kl_per_position", "no_such_argument")
  assert not _workloads.has_kwarg("no_such_function", "chunk_size")
  with pytest.raises(_harness.Unavailable, match="no no_such_argument= argument"):
    _workloads.ka_with("kl_barrier", {"no_such_argument": 1})


def test_device_inputs_have_the_host_inputs_shapes():
  a = _device_inputs.logits_pair(4, 8, "bf16")
  assert a["logits"].shape == a["ref_logits"].shape == (4, 8)
  assert a["logits"].dtype == jnp.bfloat16
  again = _device_inputs.logits_pair(4, 8, "bf16")
  np.testing.assert_array_equal(np.asarray(a["logits"], np.float32),
                                np.asarray(again["logits"], np.float32))
  h = _device_inputs.hidden_pair(3, 10, 5, "f32", layout="vd")
  host = _inputs.hidden_pair(3, 10, 5, layout="vd")
  assert {k: x.shape for k, x in h.items()} == {k: x.shape for k, x in host.items()}
  assert h["weight"].shape == (10, 5)
  with pytest.raises(ValueError, match="layout"):
    _device_inputs.hidden_pair(3, 10, 5, "f32", layout="xy")


def test_sample_gathers_evenly_spaced_entries_of_device_arrays():
  x = jnp.arange(10000, dtype=jnp.float32).reshape(100, 100).astype(jnp.bfloat16)
  got = _harness._sample(x)
  want = np.asarray(x, np.float64).reshape(-1)[np.linspace(0, 9999, 4096).astype(np.int64)]
  np.testing.assert_array_equal(got, want)
  assert got.dtype == np.float64


def _js64(logits, ref_logits, beta):
  def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  lq, lr = log_softmax(logits), log_softmax(ref_logits)
  m = (1 - beta) * np.exp(lq) + beta * np.exp(lr)
  return beta * (np.exp(lr) * (lr - np.log(m))).sum(-1) + (1 - beta) * (
      np.exp(lq) * (lq - np.log(m))).sum(-1)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_js_peers_agree_with_float64_generalized_jsd(pair, beta):
  a, b = pair["logits"], pair["ref_logits"]
  want = _js64(a, b, beta)
  assert np.all(want > 0.01)
  np.testing.assert_allclose(peers.jnp_js(jnp.asarray(a), jnp.asarray(b), beta), want, rtol=1e-5)
  if HAS_TORCH:
    import torch

    got = peers_torch.js_per_position(torch.from_numpy(a), torch.from_numpy(b), beta)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


def test_fused_js_materialized_peer_agrees_with_float64_and_torch():
  inputs = _inputs.hidden_pair(16, 40, 8, seed=2, layout="vd")
  h, w, rh, rw = (inputs[k] for k in ("hidden", "weight", "ref_hidden", "ref_weight"))
  f64 = lambda x: x.astype(np.float64)  # noqa: E731
  want = _js64(f64(h) @ f64(w).T, f64(rh) @ f64(rw).T, 0.5).mean()
  with jax.default_matmul_precision("highest"):
    loss, (gh, gw) = jax.value_and_grad(
        lambda h, w: peers.fused_js_materialized(h, w, rh, rw, 0.5), argnums=(0, 1))(h, w)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert np.abs(gh).max() > 0 and np.abs(gw).max() > 0
  if HAS_TORCH:
    tensors = {k: peers_host.as_torch(x, "f32") for k, x in inputs.items()}
    fn, args = peers_torch.build("fused_js", "torch", tensors, {"beta": 0.5})
    t_loss, t_gh, t_gw = fn(*args)
    np.testing.assert_allclose(t_loss.numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(t_gh.numpy(), gh, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(t_gw.numpy(), gw, rtol=1e-4, atol=1e-7)


@pytest.mark.skipif(not HAS_TORCH, reason="torch not importable")
def test_torch_barrier_row_equals_the_jax_peer(pair):
  params = {"dtype": "f32", "agg": "rmse", "t": 8}
  tensors = {k: peers_host.as_torch(x, "f32") for k, x in pair.items()}
  fn, args = peers_torch.build("barrier", "torch", tensors, params)
  loss, grad = fn(*args)
  want_loss, want_grad = jax.value_and_grad(
      peers.barrier_loss(peers.jnp_kl, peers.rmse, 8))(pair["logits"], pair["ref_logits"])
  np.testing.assert_allclose(loss.numpy(), want_loss, rtol=1e-5)
  np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-4, atol=1e-8)


def test_liger_has_no_barrier_row():
  with pytest.raises(NotImplementedError, match="no liger row for barrier"):
    peers_torch.build("barrier", "liger", {}, {"agg": "rmse", "t": 8})


def test_cuda_rows_are_synchronized_measured_and_release_memory_when_they_fail(monkeypatch):
  """The GPU-only branch of the harness, run on a CPU with PyTorch's CUDA calls faked."""
  calls = []
  monkeypatch.setattr(peers_torch, "synchronize", lambda device: calls.append(("sync", device)))
  monkeypatch.setattr(peers_torch, "release", lambda device: calls.append(("release", device)))
  monkeypatch.setattr(peers_torch, "cuda_peak_bytes", lambda call: (call(), 1234)[1])

  def out_of_memory():
    raise RuntimeError("CUDA out of memory")

  ok = _harness.Impl("ok", "torch", lambda: (lambda x: 2 * x, (np.ones(3),)), runner="cuda")
  bad = _harness.Impl("oom", "torch", lambda: (out_of_memory, ()), runner="cuda")
  prepared = [_harness.prepare(impl, 1 << 40) for impl in (ok, bad)]
  fields = _harness.time_interleaved(prepared, warmup=1, repeats=2, log=lambda m: None)
  assert fields["ok"]["status"] == "ok" and len(fields["ok"]["times_s"]) == 2
  assert fields["ok"]["device_peak_bytes"] == 1234 and fields["ok"]["first_call_s"] > 0
  assert fields["oom"]["status"] == "error" and "CUDA out of memory" in fields["oom"]["note"]
  assert ("sync", "cuda") in calls and ("release", "cuda") in calls
