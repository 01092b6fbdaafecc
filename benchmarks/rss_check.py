"""Cross-checks XLA's compiled temp bytes with the peak RSS of a fresh process.

On CPU, XLA can fuse work into one call whose inner buffers ``memory_analysis()`` does not
count, so each JAX implementation here runs alone in a new process: inputs are made and placed
first, the peak-RSS counter is reset (``5`` into ``/proc/self/clear_refs``), the compiled
function runs once, and the rise of ``VmHWM`` above the resident size before the run is
reported next to ``temp_size_in_bytes`` (Linux with glibc only: ``malloc_trim`` first returns
the freed input-generation buffers, so the rise is the call's own).

    python benchmarks/rss_check.py [--n 2048] [--v 32768] [--d 512]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys

CASES = ("plain_grad", "klagg_grad", "fused_grad", "plain_fwd", "klagg_fwd")


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"{field} not in /proc/self/status")


def _child(case: str, n: int, v: int, d: int) -> dict:
  import jax
  import jax.numpy as jnp

  import klagg_jax as ka

  def plain_kl(a, b):
    lp, lr = jax.nn.log_softmax(a), jax.nn.log_softmax(b)
    return (jnp.exp(lp) * (lp - lr)).sum(-1)

  keys = jax.random.split(jax.random.key(0), 4)
  if case == "fused_grad":
    args = (jax.random.normal(keys[0], (n, d)), jax.random.normal(keys[1], (d, v)) / d ** 0.5,
            jax.random.normal(keys[2], (n, d)), jax.random.normal(keys[3], (d, v)) / d ** 0.5)
    fn = jax.grad(lambda h, w, rh, rw: ka.rmse(ka.fused_linear_kl(h, w, rh, rw)), (0, 1))
  else:
    args = (jax.random.normal(keys[0], (n, v)), jax.random.normal(keys[1], (n, v)))
    fns = {
        "plain_grad": jax.grad(lambda a, b: ka.rmse(plain_kl(a, jax.lax.stop_gradient(b)))),
        "klagg_grad": jax.grad(lambda a, b: ka.kl_barrier(a[None], b[None], agg="rmse")[0]),
        "plain_fwd": plain_kl,
        "klagg_fwd": ka.kl_per_position,
    }
    fn = fns[case]
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(args)
  analysis = compiled.memory_analysis()
  jax.block_until_ready(compiled(*args))  # warm-up: one-time allocations happen here
  # Freed buffers (input generation, warm-up) would otherwise stay resident and hide the call's own peak.
  ctypes.CDLL("libc.so.6").malloc_trim(0)
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  before = _status_kib("VmRSS")
  out = jax.block_until_ready(compiled(*args))
  peak = _status_kib("VmHWM")
  del out
  return {"case": case, "xla_temp_mib": analysis.temp_size_in_bytes / 2 ** 20,
          "xla_output_mib": analysis.output_size_in_bytes / 2 ** 20,
          "rss_rise_mib": (peak - before) / 1024}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--n", type=int, default=2048)
  parser.add_argument("--v", type=int, default=32768)
  parser.add_argument("--d", type=int, default=512)
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(_child(args.child, args.n, args.v, args.d)))
    return 0
  one = args.n * args.v * 4 / 2 ** 20
  print(f"N={args.n} V={args.v} D={args.d}; one [N, V] float32 array = {one:.0f} MiB\n")
  print("| case | XLA temp (MiB) | XLA output (MiB) | peak RSS rise in the call (MiB) |")
  print("|---|---|---|---|")
  for case in CASES:
    cmd = [sys.executable, __file__, "--child", case, "--n", str(args.n), "--v", str(args.v),
           "--d", str(args.d)]
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    print(f"| {case} | {r['xla_temp_mib']:.1f} | {r['xla_output_mib']:.1f} | "
          f"{r['rss_rise_mib']:.1f} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
