"""The fused LM head's block size and accumulator against time and memory, at one shape.

    python benchmarks/fused_sweep.py                       # Liger-Kernel's setting (a GPU)
    python benchmarks/fused_sweep.py --n 512 --d 64 --v 4096 --dtype float32   # a CPU check

Value and gradient (w.r.t. hidden and weight) of ``fused_linear_kl(direction="js",
reduction="mean", weight_layout="vd")`` for each ``chunk_size`` x ``accum_dtype``: median time,
and XLA's compiled memory analysis (temp bytes, and output bytes: the gradients themselves).
Prints a markdown table; the block-size defaults in ``klagg_jax/_config.py`` cite it.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import klagg_jax as ka
from _harness import git_commit


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=8192)
  p.add_argument("--d", type=int, default=4096)
  p.add_argument("--v", type=int, default=128256)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--chunks", default="0,512,1024,2048", help="0: the library's default")
  p.add_argument("--accum", default="float32,bfloat16")
  p.add_argument("--repeats", type=int, default=10)
  args = p.parse_args()
  dtype = jnp.dtype(args.dtype)
  keys = jax.random.split(jax.random.key(0), 4)
  h, rh = (jax.random.normal(k, (args.n, args.d), dtype) for k in keys[:2])
  w, rw = ((jax.random.normal(k, (args.v, args.d), jnp.float32) / args.d ** 0.5).astype(dtype)
           for k in keys[2:])
  print(f"{jax.devices()[0].device_kind}, klagg_jax {ka.__version__} (commit {git_commit()}), "
        f"jax {jax.__version__}, N={args.n} D={args.d} "
        f"V={args.v} {dtype.name}, js beta=0.5, reduction='mean'")
  print("| chunk_size | accum_dtype | median ms | temp MiB | output MiB | loss |")
  print("|---:|---|---:|---:|---:|---:|")
  for chunk in (int(c) for c in args.chunks.split(",")):
    for accum in args.accum.split(","):
      kw = dict(direction="js", reduction="mean", weight_layout="vd",
                accum_dtype=jnp.dtype(accum), chunk_size=chunk or None)
      f = jax.jit(jax.value_and_grad(  # every array an argument: nothing to constant-fold
          lambda h, w, rh, rw: ka.fused_linear_kl(h, w, rh, rw, **kw), argnums=(0, 1)))
      compiled = f.lower(h, w, rh, rw).compile()
      mem = compiled.memory_analysis()
      loss, _ = jax.block_until_ready(compiled(h, w, rh, rw))
      times = []
      for _ in range(args.repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(h, w, rh, rw))
        times.append(time.perf_counter() - t)
      print(f"| {chunk or 'default'} | {accum} | {np.median(times) * 1e3:.1f} | "
            f"{mem.temp_size_in_bytes / 2**20:.0f} | {mem.output_size_in_bytes / 2**20:.0f} | "
            f"{float(loss):.6f} |", flush=True)


if __name__ == "__main__":
  main()
