"""The teacher's pass from hidden states: `fused_linear_topk_logprobs` against the materialized path.

    python benchmarks/fused_topk_logprobs.py [--shapes 4096x256x8192,8192x4096x128256] [--k 32]
        [--dtype float32] [--time] [--out benchmarks/results/STEM]   # writes STEM.json, STEM.md

Each shape is ``NxDxV``. Per shape, two rows:

- ``fused_linear_topk_logprobs``: the top-k log-probs, indices and tail from hidden states
  ``[N, D]`` and an LM head ``[D, V]`` (+ bias), vocabulary in tiles: never ``[N, V]``.
- ``topk_logprobs(hidden @ weight + bias)``: the same outputs with the logits materialized.

Memory is XLA's ``memory_analysis()`` of the compiled function (compile only: nothing is
allocated, so the large shapes cost compile time only); ``temp_vs_logits`` is the temp bytes over
those of one ``[N, V]`` float32 array. With ``--time`` both are also run (inputs placed on the
device first, compile apart, warm-up calls, then timed calls ending in ``block_until_ready``;
median and minimum of the repeats). Every row carries the versions, the commit and the device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import klagg_jax as ka

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402  (benchmarks/ is a folder of scripts)
from _floors import timed_calls  # noqa: E402


def functions(k: int):
  fused = lambda h, w, b: ka.fused_linear_topk_logprobs(h, w, k, bias=b)  # noqa: E731

  def plain(h, w, b):
    z = jnp.dot(h, w, preferred_element_type=jnp.float32) + b.astype(jnp.float32)[None]
    return ka.topk_logprobs(z, k)

  return {"fused_linear_topk_logprobs": fused, "topk_logprobs(hidden @ weight + bias)": plain}


def row(name, fn, n, d, v, k, dtype, timed, repeats):
  specs = [jax.ShapeDtypeStruct(s, dtype) for s in ((n, d), (d, v), (v,))]
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*specs).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  out = {"function": name, "n": n, "d": d, "v": v, "k": k, "dtype": jnp.dtype(dtype).name,
         "temp_bytes": mem.temp_size_in_bytes,
         "temp_vs_logits": round(mem.temp_size_in_bytes / (n * v * 4), 4),
         "compile_s": round(compile_s, 2)}
  if timed:
    rng = np.random.default_rng(0)
    args = [jax.device_put(jnp.asarray(rng.standard_normal(s.shape), dtype)) for s in specs]
    times = timed_calls(compiled, args, repeats)
    out.update(median_ms=round(1e3 * statistics.median(times), 3),
               min_ms=round(1e3 * min(times), 3))
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="4096x256x8192,8192x4096x128256")
  parser.add_argument("--k", type=int, default=32)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--time", action="store_true", help="also run and time each function")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", help="write the rows and the environment to OUT.json and OUT.md")
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  rows = []
  for shape in args.shapes.split(","):
    n, d, v = (int(x) for x in shape.split("x"))
    for name, fn in functions(args.k).items():
      rows.append(row(name, fn, n, d, v, args.k, dtype, args.time, args.repeats))
      r = rows[-1]
      timing = f", median {r['median_ms']} ms" if "median_ms" in r else ""
      print(f"N={n} D={d} V={v} k={args.k} {r['dtype']}: {name}: temp "
            f"{r['temp_bytes'] / 2**20:.1f} MiB = {r['temp_vs_logits']:.3f} x one [N, V] "
            f"float32 array{timing}", flush=True)
  env = _harness.environment(None)
  env["command"] = "python benchmarks/fused_topk_logprobs.py " + " ".join(argv or [])
  if args.out:
    Path(args.out + ".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    Path(args.out + ".md").write_text(_markdown(env, rows))


def _markdown(env: dict, rows: list) -> str:
  lines = ["# The teacher's pass: compiled temp of `fused_linear_topk_logprobs`", "",
           f"klagg_jax {env['klagg_jax']} (commit {env['git_commit']}), jax {env['jax']}, "
           f"{env['device_kind']}, {env['date']}. Command: `{env['command']}`.", "",
           "| function | N | D | V | k | dtype | temp MiB | temp / one [N, V] float32 |",
           "|---|---:|---:|---:|---:|---|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['function']} | {r['n']} | {r['d']} | {r['v']} | {r['k']} | {r['dtype']} "
                 f"| {r['temp_bytes'] / 2**20:.1f} | {r['temp_vs_logits']} |")
  return "\n".join(lines) + "\n"

if __name__ == "__main__":
  main(sys.argv[1:])
