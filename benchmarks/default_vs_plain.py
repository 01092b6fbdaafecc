"""The default divergence kernel against plain jax.numpy, value and gradient, interleaved.

For each shape, three jitted rows compute the float32 reverse KL per position and its sum's
gradient with respect to the student's logits: ``default`` (``kl_per_position`` with
``implementation=None``), ``xla`` (``implementation="xla"``) and ``plain`` (``jax.nn.log_softmax``
on both sides, ``sum(p * (lp - lq))``). Every row is compiled first, then the rows are timed in
rotation, one call each per repeat, so drift on a shared machine hits all of them alike. Medians
of the repeats and their ratios to plain are written to ``benchmarks/results/`` as JSON and
markdown, with the load average before and after.

Usage::

  nice -n 0 python benchmarks/default_vs_plain.py [--repeats 7] [--shapes 32768x4096,2048x32768]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import klagg_jax as ka

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _harness  # noqa: E402  (benchmarks/ is a folder of scripts)

HERE = Path(__file__).resolve().parent
GRID = ((32768, 4096), (8192, 8192), (8192, 32768), (2048, 32768), (512, 131072))
ROWS = ("default", "xla", "plain")


def plain_kl(logits, ref_logits):
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  lq = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def _value_and_grad(fn):
  value = jax.jit(fn)
  grad = jax.jit(jax.grad(lambda a, b: fn(a, b).sum()))
  return value, grad


def make_rows():
  return {
      "default": _value_and_grad(lambda a, b: ka.kl_per_position(a, b)),
      "xla": _value_and_grad(lambda a, b: ka.kl_per_position(a, b, implementation="xla")),
      "plain": _value_and_grad(plain_kl),
  }


def measure(n: int, v: int, repeats: int) -> dict:
  key_a, key_b = jax.random.split(jax.random.key(n * 7 + v))
  a = jax.random.normal(key_a, (n, v), jnp.float32) * 3.0
  b = a + jax.random.normal(key_b, (n, v), jnp.float32)
  a, b = jax.block_until_ready((a, b))
  rows = make_rows()
  compiled = {}
  for name, (value, grad) in rows.items():
    for kind, fn in (("value", value), ("grad", grad)):
      exe = fn.lower(a, b).compile()
      mem = exe.memory_analysis()
      compiled[(name, kind)] = (exe, None if mem is None else int(mem.temp_size_in_bytes))
      jax.block_until_ready(exe(a, b))  # warm up
  times = {key: [] for key in compiled}
  keys = list(compiled)
  for r in range(repeats):
    for i in range(len(keys)):
      key = keys[(i + r) % len(keys)]
      exe = compiled[key][0]
      t0 = time.perf_counter()
      jax.block_until_ready(exe(a, b))
      times[key].append(time.perf_counter() - t0)
  out = {"N": n, "V": v, "rows": {}}
  for kind in ("value", "grad"):
    base = statistics.median(times[("plain", kind)])
    for name in ROWS:
      med = statistics.median(times[(name, kind)])
      out["rows"][f"{name}/{kind}"] = {
          "median_s": med, "times_s": times[(name, kind)], "x_plain": med / base,
          "temp_bytes": compiled[(name, kind)][1]}
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--shapes", default=",".join(f"{n}x{v}" for n, v in GRID),
                      help="comma-separated NxV")
  parser.add_argument("--out", default=None, help="result file stem (default: dated)")
  args = parser.parse_args()
  shapes = [tuple(int(t) for t in s.split("x")) for s in args.shapes.split(",")]
  env = _harness.environment(None)
  header = {
      "klagg_jax": env["klagg_jax"], "commit": env["git_commit"],
      "jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
      "platform": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
      "date": env["date"], "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
      "repeats": args.repeats, "load_before": list(os.getloadavg()),
  }
  results = []
  for n, v in shapes:
    results.append(measure(n, v, args.repeats))
    print(_row_lines(results[-1]), flush=True)
  header["load_after"] = list(os.getloadavg())
  stem = args.out or f"default-vs-plain-{jax.default_backend()}-{datetime.date.today()}"
  out_dir = HERE / "results"
  (out_dir / f"{stem}.json").write_text(json.dumps({"env": env, "header": header, "results": results},
                                                   indent=1) + "\n")
  (out_dir / f"{stem}.md").write_text(_markdown(header, results))
  print(f"wrote {out_dir / stem}.{{json,md}}")


def _row_lines(res: dict) -> str:
  cells = [f"N={res['N']} V={res['V']}"]
  for kind in ("value", "grad"):
    cells.append(kind + ": " + ", ".join(
        f"{name} {res['rows'][f'{name}/{kind}']['median_s'] * 1e3:.1f} ms "
        f"({res['rows'][f'{name}/{kind}']['x_plain']:.2f}x)" for name in ROWS))
  return " | ".join(cells)


def _markdown(header: dict, results: list) -> str:
  lines = [
      "# Default divergence kernel vs plain jax.numpy (float32 reverse KL)", "",
      f"klagg_jax {header['klagg_jax']} (commit {header['commit']}), jax {header['jax']}, "
      f"{header['device']} ({header['platform']}, {header['cpus']} CPUs), {header['date']}.",
      f"Load average before {header['load_before'][0]:.2f}, after {header['load_after'][0]:.2f}"
      " (a shared machine: ratios from one interleaved run are what compare).", "",
      f"Command: `{header['command']}`; medians of {header['repeats']} interleaved repeats. "
      "Gradient: of the sum, with respect to the student's logits.", "",
      "| N | V | value default | value xla | value plain | default / plain | xla / plain "
      "| grad default | grad xla | grad plain | default / plain | xla / plain |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for res in results:
    r = res["rows"]
    cells = [str(res["N"]), str(res["V"])]
    for kind in ("value", "grad"):
      cells += [f"{r[f'{name}/{kind}']['median_s'] * 1e3:.1f} ms" for name in ROWS]
      cells += [f"{r[f'{name}/{kind}']['x_plain']:.2f}x" for name in ("default", "xla")]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
