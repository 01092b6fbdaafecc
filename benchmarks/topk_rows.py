"""Benchmark rows for distillation from a stored teacher: `kl_topk` and `fused_linear_kl_topk`.

    python benchmarks/topk_rows.py [--n 2048] [--v 32768] [--d 512] [--ks 32,256] [--quick]

Self-contained (only jax, numpy and klagg_jax), so `run.py` can call `topk_rows(n, v, ...)` and
merge the rows into its tables. Every row is the value and gradient of a mean forward-KL
distillation loss, timed the same way as the rest of the suite (JAX's `docs/benchmarking.md`):
inputs placed on the device first, each function lowered and compiled apart from its runs (both
times kept), warm-up calls, then timed calls each ending in `block_until_ready`; medians and
minima. Memory: XLA's `memory_analysis()` temporary bytes of the compiled function (deterministic;
the inputs and outputs are not counted), and the bytes a pipeline stores for the teacher.

Rows, at one (N, V) and for each k:
- `kl_per_position (full)`: `kl_per_position(logits, ref_logits, direction="forward")`, the full
  teacher logits `[N, V]` stored; gradient w.r.t. the student's logits.
- `kl_topk k=K`: `kl_topk(logits, logprobs, indices, ref_tail=tail)` on what `topk_logprobs`
  stores; gradient w.r.t. the student's logits.
- `fused_linear_kl_topk k=K`: from hidden states `[N, D]` and an LM head `[D, V]`; gradient
  w.r.t. both, the `[N, V]` logits never materialized.
- `hidden @ weight -> kl_topk k=K`: the same loss with the logits materialized, the fused row's
  reference (same numbers).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import klagg_jax as ka
from _floors import timed_calls
from _harness import git_commit


def _measure(fn: Callable, args: Sequence[Any], *, warmup: int, repeats: int) -> dict[str, Any]:
  """Lower, compile, warm up and time ``jax.jit(fn)(*args)``; memory from XLA's analysis."""
  t0 = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  times = timed_calls(compiled, args, repeats, warmup)
  return {
      "median_s": statistics.median(times), "min_s": min(times), "times_s": tuple(times),
      "lower_s": t1 - t0, "compile_s": t2 - t1,
      "temp_bytes": None if mem is None else int(mem.temp_size_in_bytes),
      "output_bytes": None if mem is None else int(mem.output_size_in_bytes),
  }


def _inputs(n: int, v: int, d: int, seed: int = 0) -> dict[str, jax.Array]:
  """Student logits and hidden states, a teacher's logits; float32, on the device."""
  rng = np.random.default_rng(seed)
  hidden = rng.standard_normal((n, d), np.float32)
  weight = (rng.standard_normal((d, v), np.float32) / np.sqrt(d)).astype(np.float32)
  logits = (2.0 * rng.standard_normal((n, v), np.float32))
  ref_logits = (2.0 * rng.standard_normal((n, v), np.float32))
  return {name: jax.device_put(x) for name, x in
          (("hidden", hidden), ("weight", weight), ("logits", logits), ("ref_logits", ref_logits))}


def topk_rows(n: int, v: int, ks: Sequence[int] = (32, 256), quick: bool = False, *,
              d: int = 512, fused: bool = True) -> list[dict[str, Any]]:
  """Times and memory of the top-k distillation losses against the full-logits KL at (N, V).

  Args:
    n: positions.
    v: vocabulary size.
    ks: stored entries per position, one `kl_topk` (and fused) row each.
    quick: 1 warm-up and 3 timed calls instead of 2 and 7.
    d: hidden size of the fused rows.
    fused: include the `fused_linear_kl_topk` rows and their materialized reference.

  Returns:
    One dict per row: `impl`, `k`, `n`, `v`, `d`, `median_s`, `min_s`, `times_s`, `lower_s`,
    `compile_s`, `temp_bytes`, `output_bytes`, `stored_bytes_per_token` (what the pipeline keeps
    of the teacher per position), `max_abs_diff` (fused row against its materialized reference,
    loss and gradients), `device_kind`, `jax`, `klagg_jax`, `git_commit`, `python`.
  """
  warmup, repeats = (1, 3) if quick else (2, 7)
  x = _inputs(n, v, d)
  env = {"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
         "klagg_jax": ka.__version__, "git_commit": git_commit(),
         "python": platform.python_version(), "n": n, "v": v}
  rows = []

  def add(impl, k, fn, args, stored, d_=None):
    rows.append({"impl": impl, "k": k, "d": d_, "stored_bytes_per_token": stored, **env,
                 **_measure(fn, args, warmup=warmup, repeats=repeats)})

  full = jax.value_and_grad(lambda a, r: jnp.mean(
      ka.kl_per_position(a, jax.lax.stop_gradient(r), direction="forward")))
  add("kl_per_position (full)", None, full, (x["logits"], x["ref_logits"]), 4 * v)
  for k in ks:
    lp, idx, tail = jax.block_until_ready(
        jax.jit(lambda r, k=k: ka.topk_logprobs(r, k))(x["ref_logits"]))
    stored = 4 * k + 4 * k + 4  # float32 log-probs, int32 indices, float32 tail
    topk = jax.value_and_grad(lambda a, lp, idx, tail: jnp.mean(
        ka.kl_topk(a, lp, idx, ref_tail=tail)))
    add(f"kl_topk k={k}", k, topk, (x["logits"], lp, idx, tail), stored)
    if not fused:
      continue
    fused_loss = jax.value_and_grad(lambda h, w, lp, idx, tail: jnp.mean(
        ka.fused_linear_kl_topk(h, w, lp, idx, ref_tail=tail)), argnums=(0, 1))
    plain_loss = jax.value_and_grad(lambda h, w, lp, idx, tail: jnp.mean(
        ka.kl_topk(h @ w, lp, idx, ref_tail=tail)), argnums=(0, 1))
    args = (x["hidden"], x["weight"], lp, idx, tail)
    add(f"fused_linear_kl_topk k={k}", k, fused_loss, args, stored, d)
    add(f"hidden @ weight -> kl_topk k={k}", k, plain_loss, args, stored, d)
    got, want = jax.jit(fused_loss)(*args), jax.jit(plain_loss)(*args)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    rows[-2]["max_abs_diff"] = diff
  return rows


def markdown(rows: list[dict[str, Any]]) -> str:
  """The rows as a markdown table (times in ms, memory in MiB)."""
  mib = lambda b: "" if b is None else f"{b / 2**20:,.1f}"  # noqa: E731
  lines = ["| impl | N | V | D | median ms | min ms | compile s | XLA temp MiB | "
           "teacher bytes / token |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['impl']} | {r['n']} | {r['v']} | {r['d'] or ''} | "
                 f"{1e3 * r['median_s']:,.1f} | {1e3 * r['min_s']:,.1f} | {r['compile_s']:.2f} | "
                 f"{mib(r['temp_bytes'])} | {r['stored_bytes_per_token']:,} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=2048)
  parser.add_argument("--v", type=int, default=32768)
  parser.add_argument("--d", type=int, default=512)
  parser.add_argument("--ks", default="32,256")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--no-fused", action="store_true")
  args = parser.parse_args()
  ks = tuple(int(k) for k in args.ks.split(","))
  rows = topk_rows(args.n, args.v, ks, args.quick, d=args.d, fused=not args.no_fused)
  print(f"{rows[0]['device_kind']}, jax {rows[0]['jax']}, python {rows[0]['python']}")
  print(markdown(rows))
  for r in rows:
    if "max_abs_diff" in r:
      print(f"{r['impl']}: max |fused - materialized| over loss and gradients = "
            f"{r['max_abs_diff']:.2e}")


if __name__ == "__main__":
  main()
