"""Where the forward kernel's time goes: an ablation against the exp and read floors.

The chunked reverse-KL forward makes, per chunk of rows, three passes over the two ``[chunk, V]``
blocks: the row maxima (reads only), then the log-normalizers with one exp per entry on each side
and the tilted sum (fused with them by XLA). This script times the floors and the kernel with its
passes cut off one by one, all in the same loop machinery and the same run, so the differences
say what each pass costs:

    python benchmarks/profile_forward.py [--n 2048] [--v 32768] [--repeats 9]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import klagg_jax as ka
from klagg_jax._ops.divergence import base as _divergence
from klagg_jax import _config
from klagg_jax._chunked import scan_row_chunks


def _chunked(block, chunk):
  def run(a, b):
    return scan_row_chunks(lambda p, f, c: (c, [block(p[0], p[1])]), (a, b), chunk)[1][0]
  return jax.jit(run)


def stages(chunk):
  """name -> jitted function of (a, b): the floors, then the kernel built up pass by pass."""
  def maxima(x, y):
    return x.max(-1) + y.max(-1)

  def normalizers(x, y):
    return _divergence.log_normalizer(x) + _divergence.log_normalizer(y)

  def full(x, y):
    return _divergence.block_forward(x, y, _divergence.Spec("reverse", 0.5, 1.0, None))[0]

  return {
      "read floor (sum both, one pass)": jax.jit(lambda a, b: a.sum() + b.sum()),
      "exp floor (exp both, one pass)": jax.jit(lambda a, b: jnp.exp(a).sum() + jnp.exp(b).sum()),
      "chunked: row maxima only": _chunked(maxima, chunk),
      "chunked: + log-normalizers (2 exps)": _chunked(normalizers, chunk),
      "chunked: full reverse KL": _chunked(full, chunk),
      "ka.kl_per_position (default)": jax.jit(ka.kl_per_position),
  }


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--n", type=int, default=2048)
  parser.add_argument("--v", type=int, default=32768)
  parser.add_argument("--repeats", type=int, default=9)
  args = parser.parse_args()
  keys = jax.random.split(jax.random.key(0))
  a = jax.random.normal(keys[0], (args.n, args.v)) * 2
  b = jax.random.normal(keys[1], (args.n, args.v)) * 2
  chunk = min(args.n, _config.CPU.rows(args.v))  # the CPU block of the default plan
  fns = stages(chunk)
  for f in fns.values():
    jax.block_until_ready(f(a, b))
  times = {name: [] for name in fns}
  for _ in range(args.repeats):  # interleaved, so drift hits every row alike
    for name, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(a, b))
      times[name].append(time.perf_counter() - t0)
  floor = np.median(times["exp floor (exp both, one pass)"])
  gb = 2 * args.n * args.v * 4 / 1e9
  print(f"N={args.n} V={args.v} f32, chunk={chunk} rows, {jax.devices()[0].device_kind}, "
        f"median of {args.repeats}\n")
  print("| stage | median ms | min ms | x exp floor | GB/s of input |")
  print("|---|---|---|---|---|")
  for name, ts in times.items():
    med = np.median(ts)
    print(f"| {name} | {med * 1e3:.1f} | {min(ts) * 1e3:.1f} | {med / floor:.2f} | "
          f"{gb / med:.1f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
