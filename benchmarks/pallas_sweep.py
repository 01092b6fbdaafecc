"""Tile sweep of the Pallas divergence kernel: the rows of its tile table for this card.

    python benchmarks/pallas_sweep.py                     # a GPU: N=8192, V=131072, bf16, < 3 min
    python benchmarks/pallas_sweep.py --tiny              # a CPU dry run through the interpreter
    python benchmarks/pallas_sweep.py --out benchmarks/results --budget-s 150

For each candidate ``Tiles`` (vocabulary tile x warps x pipeline stages, one row per program),
the forward (reverse KL per row, ``[N, V]`` -> ``[N]``) and the value and gradient of the mean
(gradient into the student only, the distillation setting) are compiled and timed, interleaved
with the chunked kernel at the same shape. Bytes model (``N V`` entries of the input dtype per
array): the forward reads both inputs once (2 arrays); value and gradient read both twice and
write one gradient (5 arrays). Effective bandwidth = bytes / median time, beside the card's spec
bandwidth where it is known (``_floors.SPEC_BANDWIDTH``).

Writes ``<out>/pallas-sweep-<device>-<date>[-tiny].{json,md}``: every timed row, the best tiles
(least forward + backward time) and ``table``, the rows for
``klagg_jax._ops.divergence.pallas_tiles.TABLE`` (``run.py --pallas-tiles`` registers them).
Candidates that would start after ``--budget-s`` are skipped and said so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _floors  # noqa: E402
import _harness as H  # noqa: E402
from _floors import timed_calls  # noqa: E402

from klagg_jax._chunked import Chunking  # noqa: E402
from klagg_jax._ops.divergence.base import Spec  # noqa: E402
from klagg_jax._ops.divergence.chunked import divergence_rows as chunked_rows  # noqa: E402
from klagg_jax._ops.divergence import pallas as pallas_div  # noqa: E402
from klagg_jax._ops.divergence import pallas_tiles  # noqa: E402
from klagg_jax._ops.divergence.pallas_tiles import Tiles  # noqa: E402

GPU_GRID = [Tiles(rows=1, vocab=v, num_warps=w, num_stages=s)
            for v in (2048, 4096, 8192, 16384) for w in (4, 8, 16) for s in (2, 3)]
TINY_GRID = [Tiles(rows=8, vocab=128, num_warps=1, num_stages=1),
             Tiles(rows=4, vocab=256, num_warps=1, num_stages=1)]


def _time(fn, args, warmup: int, repeats: int) -> tuple[float, float, Any]:
  """(compile seconds, median seconds, first output) of ``jit(fn)`` on ``args``."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  out = jax.block_until_ready(compiled(*args))
  times = timed_calls(compiled, args, repeats, warmup - 1)
  return compile_s, float(np.median(times)), out


def passes(rows_fn, spec: Spec, n: int):
  """(forward, value and gradient of the mean) of a ``divergence_rows``-like function."""
  mask = jnp.ones((n,), bool)
  forward = lambda a, b: rows_fn(a, b, mask, spec)
  both = jax.value_and_grad(lambda a, b: rows_fn(a, b, mask, spec).mean())
  return forward, both


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int)
  p.add_argument("--v", type=int)
  p.add_argument("--dtype", choices=("bf16", "f32"))
  p.add_argument("--tiny", action="store_true", help="tiny shapes and two candidates (a CPU)")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--budget-s", type=float, default=150.0)
  p.add_argument("--out", type=Path, default=H.HERE / "out")
  args = p.parse_args(argv)
  dev = jax.devices()[0]
  if dev.platform != "gpu" and not args.tiny:
    raise SystemExit("pallas_sweep.py times Triton kernels: run it on a GPU, or --tiny here")
  n = args.n or (64 if args.tiny else 8192)
  v = args.v or (1000 if args.tiny else 131072)
  dtype = args.dtype or ("f32" if args.tiny else "bf16")
  grid = TINY_GRID if args.tiny else GPU_GRID
  repeats = 2 if args.tiny else args.repeats
  start = time.perf_counter()
  ka, kb = jax.random.split(jax.random.key(0))
  a = (2 * jax.random.normal(ka, (n, v), jnp.float32)).astype(_floors.DTYPES[dtype])
  b = (2 * jax.random.normal(kb, (n, v), jnp.float32)).astype(_floors.DTYPES[dtype])
  spec = Spec("reverse", 0.5, 1.0, Chunking(None, v), ref_grad=False)
  itemsize = _floors.ITEMSIZE[dtype]
  model = {"forward": 2 * n * v * itemsize, "value+grad": 5 * n * v * itemsize}
  spec_bw = _floors.spec_bandwidth(dev.device_kind)
  env = H.environment(None)
  print(f"{dev.device_kind} | jax {jax.__version__} | N={n} V={v} {dtype} | "
        f"{len(grid)} candidates | budget {args.budget_s:.0f} s", flush=True)

  rows: list[dict[str, Any]] = []

  def measure(name: str, rows_fn, tiles: Tiles | None, want=None) -> dict[str, Any]:
    row: dict[str, Any] = {"impl": name, "tiles": dataclasses.asdict(tiles) if tiles else None}
    if time.perf_counter() - start > args.budget_s:
      row["status"] = "skipped (budget)"
      rows.append(row)
      return row
    try:
      for label, fn in zip(model, passes(rows_fn, spec, n)):
        compile_s, median_s, out = _time(fn, (a, b), 2, repeats)
        row[label] = {"compile_s": compile_s, "median_s": median_s,
                      "gb_per_s": model[label] / median_s / 1e9}
        if label == "forward":
          row["forward_out"] = out
      row["status"] = "ok"
      if want is not None:
        got = np.asarray(row["forward_out"], np.float64)
        ref = np.asarray(want, np.float64)
        row["max_rel_diff"] = float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))
    except Exception as e:  # noqa: BLE001 - one candidate failing (registers, shared memory)
      row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
    rows.append(row)
    line = f"  {name} {row['tiles'] or ''}: {row['status']}"
    if row["status"] == "ok":
      line += "".join(f" | {k} {row[k]['median_s'] * 1e3:.3f} ms ({row[k]['gb_per_s']:.0f} GB/s)"
                      for k in model)
    print(line, flush=True)
    return row

  baseline = measure("chunked", chunked_rows, None)
  want = baseline.get("forward_out")
  for tiles in grid:
    measure("pallas", lambda a, b, m, s, t=tiles: pallas_div.divergence_rows(a, b, m, s, t),
            tiles, want)
  ok = [r for r in rows if r["impl"] == "pallas" and r["status"] == "ok"]
  best = min(ok, key=lambda r: r["forward"]["median_s"] + r["value+grad"]["median_s"],
             default=None)
  table = []
  if best is not None and dev.platform == "gpu":  # the table is for GPUs; a dry run adds none
    table.append({"family": pallas_tiles.family(dev.device_kind),
                  "vocab_bucket": pallas_tiles.vocab_bucket(v), "tiles": best["tiles"]})
  for r in rows:
    r.pop("forward_out", None)
  data = {"env": env, "shape": {"n": n, "v": v, "dtype": dtype}, "bytes_model": model,
          "spec_bandwidth_bytes_per_s": spec_bw[0] if spec_bw else None,
          "spec_card": spec_bw[1] if spec_bw else None, "rows": rows, "best": best,
          "table": table, "elapsed_s": time.perf_counter() - start}
  stem = H.result_stem(args.out, H.device_slug(), env["date"], "-tiny" if args.tiny else "")
  stem = stem.with_name("pallas-sweep-" + stem.name)
  stem.parent.mkdir(parents=True, exist_ok=True)
  stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
  stem.with_suffix(".md").write_text(markdown(data) + "\n")
  print(markdown(data))
  print(f"wrote {stem}.json, {stem}.md in {data['elapsed_s']:.0f} s")
  data["files"] = [str(stem.with_suffix(".json")), str(stem.with_suffix(".md"))]
  return data


def markdown(data: dict[str, Any]) -> str:
  env, shape = data["env"], data["shape"]
  spec = (f"; spec bandwidth of the {data['spec_card']}: "
          f"{data['spec_bandwidth_bytes_per_s'] / 1e12:.3g} TB/s" if data["spec_card"] else "")
  lines = [f"Pallas divergence tile sweep: {env['device_kind']}, jax {env['jax']}, "
           f"{env['date']}; N={shape['n']} V={shape['v']} {shape['dtype']}, reverse KL{spec}.",
           "Bytes model: forward 2 N V, value + gradient 5 N V input-dtype entries.", "",
           "| implementation | rows | vocab | warps | stages | forward ms | GB/s | "
           "value+grad ms | GB/s | max rel diff | status |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
  for r in data["rows"]:
    t = r["tiles"] or {}
    cells = [r["impl"], t.get("rows", "-"), t.get("vocab", "-"), t.get("num_warps", "-"),
             t.get("num_stages", "-")]
    for k in ("forward", "value+grad"):
      cells += ([f"{r[k]['median_s'] * 1e3:.4g}", f"{r[k]['gb_per_s']:.0f}"] if k in r
                else ["-", "-"])
    cells += [f"{r['max_rel_diff']:.1e}" if "max_rel_diff" in r else "-", r["status"]]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  if data["table"]:
    lines += ["", "Tile table rows (`pallas_tiles.TABLE`):", ""]
    lines += [f"- `({t['family']!r}, {t['vocab_bucket']})`: `Tiles(**{t['tiles']})`"
              for t in data["table"]]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
