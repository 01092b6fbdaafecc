"""Two processes, one global mesh: every kernel across hosts gives one process's answer.

The module starts two worker processes once (this file run as a script), which join with
``jax.distributed.initialize`` on localhost (a free port, CPU, 2 devices each, gloo collectives)
into a global 2 x 2 mesh of ``("data", "model")``, ``data`` spanning the processes. Each worker
runs every kernel on global arrays laid out over the batch, the vocabulary or both (the
vocabulary-only layout splits it across the processes), under ``jit`` on the classic (``Auto``)
mesh (and through ``Partition``, ``shard_map``, for both splits), gathers the results and compares them with the
same computation on its own unsharded inputs, then writes one JSON record per case. Every case
is its own test here, reading that one cached run. A worker that cannot join (no coordination
service, no gloo) or runs past the time cap fails every case with what it saw; nothing hangs.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
import traceback

KERNELS = ("kl_per_position", "kl_barrier", "topk_logprobs", "kl_topk", "fused_linear_kl",
           "fused_linear_kl_topk", "fused_linear_topk_logprobs")
# (batch mesh axis, vocabulary mesh axis); "data" spans the two processes, "model" is local.
LAYOUTS = {"batch": ("data", None), "vocab": (None, "data"), "both": ("data", "model")}
# Under jit on the classic mesh for every layout; through Partition (shard_map) for both splits.
RUNS = [(layout, "gspmd") for layout in LAYOUTS] + [("both", "partition")]
CASES = [f"{kernel}-{layout}-{mode}" for layout, mode in RUNS for kernel in KERNELS]
PROCESSES, LOCAL_DEVICES = 2, 2
TIME_CAP_S = 240  # the workers are killed past this; about 30 s on 2 idle cores
INIT_TIMEOUT_S = 60

B, T, V, D, K = 4, 4, 128, 64, 5
# The teacher's pass from hidden states runs at a vocabulary of two tiles.
WIDE_V, WIDE_D = 8192, 512


def moved_limit(vocab: int, d: int) -> int:
  """No collective may move this many elements: one device's block of the logits or hidden
  states (top-k candidates, [N, k] outputs and per-row statistics are far smaller)."""
  return min(B * T * vocab // (PROCESSES * LOCAL_DEVICES), B * T * d // PROCESSES)


# ------------------------------------------------------------------------------------------------
# The worker (this file as a script).


def _worker(rank: int, port: int, out: pathlib.Path) -> None:
  record: dict = {"rank": rank}
  path = out / f"rank{rank}.json"
  try:
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(f"localhost:{port}", num_processes=PROCESSES, process_id=rank,
                               initialization_timeout=INIT_TIMEOUT_S)
    record.update(process_count=jax.process_count(), device_count=jax.device_count())
    record["cases"] = _run_cases()
  except Exception:  # noqa: BLE001 -- reported to the parent, which fails with it
    record["error"] = traceback.format_exc()[-3000:]
  path.write_text(json.dumps(record))
  if "error" in record:
    sys.exit(1)


def _inputs():
  import numpy as np

  rng = np.random.default_rng(0)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
  return dict(a=2 * f(B, T, V), b=2 * f(B, T, V), mask=rng.random((B, T)) > 0.25, w=f(B, T),
              h=f(B, T, D), rh=f(B, T, D), wt=f(D, V) / 2, rwt=f(D, V) / 2,
              wide_h=f(B, T, WIDE_D), wide_wt=f(WIDE_D, WIDE_V) / 4, wide_bias=f(WIDE_V))


def _kernels(partition):
  """name -> (function, argument names, spec of each argument as (batch?, vocab?) axes)."""
  import jax

  import klagg_jax as ka

  p = {"partition": partition}

  def kl(a, b, mask):
    return ka.kl_per_position(a, b, where=mask, direction="js", **p)

  def barrier(a, b, mask):
    return jax.value_and_grad(lambda a: ka.kl_barrier(a, b, where=mask, agg="p95", tau=0.05,
                                                      **p)[0])(a)

  def topk(b):
    return ka.topk_logprobs(b, K, **p)

  def kl_topk(a, lp, idx, tail, mask, w):
    return jax.value_and_grad(lambda a: (ka.kl_topk(a, lp, idx, tail, where=mask, **p)
                                         * w).sum())(a)

  def fused(h, wt, rh, rwt, mask, w):
    return jax.value_and_grad(lambda h, wt: (ka.fused_linear_kl(
        h, wt, rh, rwt, where=mask, direction="forward", **p) * w).sum(), (0, 1))(h, wt)

  def fused_topk(h, wt, lp, idx, tail, mask):
    return jax.value_and_grad(lambda h, wt: ka.fused_linear_kl_topk(
        h, wt, lp, idx, tail, where=mask, reduction="mean", **p), (0, 1))(h, wt)

  def fused_topk_logprobs(h, wt, bias):
    return ka.fused_linear_topk_logprobs(h, wt, K, bias=bias, softcap=30.0, **p)

  logits, rows, pos = ("b", None, "v"), ("b", None, None), ("b", None)
  return {
      "kl_per_position": (kl, dict(a=logits, b=logits, mask=pos)),
      "kl_barrier": (barrier, dict(a=logits, b=logits, mask=pos)),
      "topk_logprobs": (topk, dict(b=logits)),
      "kl_topk": (kl_topk, dict(a=logits, lp=rows, idx=rows, tail=pos, mask=pos, w=pos)),
      "fused_linear_kl": (fused, dict(h=rows, wt=(None, "v"), rh=rows, rwt=(None, "v"),
                                      mask=pos, w=pos)),
      "fused_linear_kl_topk": (fused_topk, dict(h=rows, wt=(None, "v"), lp=rows, idx=rows,
                                                tail=pos, mask=pos)),
      "fused_linear_topk_logprobs": (fused_topk_logprobs, dict(
          wide_h=rows, wide_wt=(None, "v"), wide_bias=("v",))),
  }


def _moved_elements(hlo: str) -> list[int]:
  """Element counts of the results of data-moving collectives in compiled HLO text."""
  counts = []
  for m in re.finditer(r"=\s*(.*?)\s(all-gather|all-to-all|collective-permute)(-start)?\(", hlo):
    for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", m.group(1)):
      counts.append(math.prod(int(s) for s in dims.split(",") if s))
  return counts


def _run_cases() -> dict:
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import klagg_jax as ka

  host = _inputs()
  lp, idx, tail = (np.asarray(x) for x in jax.jit(ka.topk_logprobs, static_argnums=1)(
      host["b"], K))
  host.update(lp=lp, idx=idx, tail=tail)
  mesh = jax.make_mesh((PROCESSES, LOCAL_DEVICES), ("data", "model"),
                       axis_types=(AxisType.Auto,) * 2)
  assert {d.process_index for d in mesh.devices[:, 0]} == {0, 1}, mesh.devices  # data spans
  wants = {name: jax.jit(fn)(*(host[a] for a in specs))
           for name, (fn, specs) in _kernels(None).items()}
  results = {}
  for layout, mode in RUNS:
    bs, vs = LAYOUTS[layout]
    partition = ka.Partition(mesh, batch_axis=bs, vocab_axis=vs) if mode == "partition" else None
    for name, (fn, specs) in _kernels(partition).items():
      case, start = f"{name}-{layout}-{mode}", time.perf_counter()
      try:
        args = []
        for arg, spec in specs.items():
          entries = [{"b": bs, "v": vs, None: None}[s] for s in spec]
          x = host[arg]
          args.append(jax.make_array_from_callback(
              x.shape, NamedSharding(mesh, P(*entries)), lambda i, x=x: x[i]))
        compiled = jax.jit(fn).lower(*args).compile()
        got = compiled(*args)
        moved = _moved_elements(compiled.as_text())
        # Nothing logits- or hidden-sized crosses devices: per-row statistics and top-k
        # candidates only.
        wide = name == "fused_linear_topk_logprobs"
        limit = moved_limit(WIDE_V, WIDE_D) if wide else moved_limit(V, D)
        assert all(n < limit for n in moved), (limit, moved)
        got = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), got)
        want = wants[name]
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
          if np.issubdtype(np.asarray(w).dtype, np.integer):
            np.testing.assert_array_equal(g, w)
          else:
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        results[case] = {"ok": True}
      except Exception:  # noqa: BLE001 -- one case's failure is that case's report
        results[case] = {"ok": False, "error": traceback.format_exc()[-3000:]}
      results[case]["seconds"] = round(time.perf_counter() - start, 2)
  return results


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3]))
  sys.exit(0)


# ------------------------------------------------------------------------------------------------
# The tests: one cached two-process run per module.

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_workers(out: pathlib.Path) -> dict:
  """Runs the two workers to completion or the time cap; returns their records and logs."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  # The workers' device count comes from jax_num_cpu_devices, not a caller's XLA_FLAGS.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  logs = [out / f"rank{rank}.log" for rank in range(PROCESSES)]
  files = [log.open("w") for log in logs]
  procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(port), str(out)],
                            cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
           for rank, f in enumerate(files)]
  deadline, why = time.monotonic() + TIME_CAP_S, None
  # A worker that dies leaves the other waiting in a collective: stop it shortly after.
  while any(p.poll() is None for p in procs):
    failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
    if time.monotonic() > deadline or failed:
      if not failed:
        why = f"the workers ran past the {TIME_CAP_S} s cap and were killed"
      else:
        why = f"worker {failed[0]} exited with code {procs[failed[0]].returncode}"
        time.sleep(2.0)
      for p in procs:
        if p.poll() is None:
          p.kill()
      break
    time.sleep(0.2)
  for p, f in zip(procs, files):
    p.wait()
    f.close()
  records = []
  for rank in range(PROCESSES):
    path = out / f"rank{rank}.json"
    records.append(json.loads(path.read_text()) if path.exists() else None)
  return {"records": records, "why": why, "logs": [_log_tail(log) for log in logs]}


def _log_tail(path: pathlib.Path) -> str:
  """The end of a worker's log, without native stack frames."""
  lines = path.read_text(errors="replace").splitlines() if path.exists() else []
  return "\n".join(line for line in lines if not line.startswith("    @"))[-3000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The two workers' records, from one run per test session.

  Under pytest-xdist this module's tests may land on several pytest workers: the first to
  claim the shared directory runs the two processes, the others wait for its result file.
  """
  base = tmp_path_factory.getbasetemp()
  shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "multihost"
  shared.mkdir(exist_ok=True)
  result = shared / "result.json"
  try:
    os.close(os.open(shared / "claimed", os.O_CREAT | os.O_EXCL))
  except FileExistsError:
    deadline = time.monotonic() + TIME_CAP_S + 60
    while not result.exists() and time.monotonic() < deadline:
      time.sleep(0.5)
    if not result.exists():
      return {"records": [None] * PROCESSES, "why": "another pytest worker's run never finished",
              "logs": []}
    return json.loads(result.read_text())
  record = _start_workers(shared)
  partial = shared / "result.partial"
  partial.write_text(json.dumps(record))
  partial.rename(result)  # atomic: a waiting worker never reads half a file
  return record


def _usable(run) -> list[dict]:
  """Both workers' records, or a failure saying why they are missing."""
  if run["why"] or any(r is None or "error" in r for r in run["records"]):
    details = [run["why"] or ""]
    for rank, r in enumerate(run["records"]):
      details.append(f"rank {rank}: " + ("no record" if r is None else r.get("error", "ok")))
    details += [f"log {i}: {log}" for i, log in enumerate(run["logs"])]
    pytest.fail("The two-process run did not complete (coordination service on localhost, "
                "gloo CPU collectives):\n" + "\n".join(details))
  return run["records"]


def test_two_processes_form_one_global_mesh(run):
  for record in _usable(run):
    assert record["process_count"] == PROCESSES
    assert record["device_count"] == PROCESSES * LOCAL_DEVICES
    assert set(record["cases"]) == set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_kernel_across_processes_matches_one_process(run, case):
  for record in _usable(run):
    result = record["cases"][case]
    assert result["ok"], f"rank {record['rank']}:\n{result['error']}"
