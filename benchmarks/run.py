"""Benchmark suite: klagg_jax against its peers and the hardware floor, time and memory.

    python benchmarks/run.py           # full grid (make bench)
    python benchmarks/run.py --quick   # subset, under 3 minutes on 2 CPU cores (make bench-quick)
    python benchmarks/run.py --tiny    # seconds; what tests/test_benchmarks.py runs

Workloads (the rows of one case are timed interleaved, see `_harness.py`; rows in `_workloads.py`):

- `kl`: per-position KL forward, `[N, V]` logits -> `[N]`.
- `barrier`: value and gradient w.r.t. logits of the per-sequence barrier (rmse, p95, soft_p95).
- `fused`: value and gradient w.r.t. hidden and weight of the mean KL from hidden states `[N, D]`
  and kernels `[D, V]`: `fused_linear_kl` against materialize-then-KL, and the top-k variant.
- `topk`: value and gradient of a stored-teacher distillation loss (forward KL): `kl_topk` on k
  stored log-probs against `kl_per_position` on full teacher logits and the peers' truncated top-k.
- `agg`: value and gradient of each aggregator alone over `[B, T]`, as a share of the KL cost.

Floors, in the same run and case: one jitted pass of exp over both inputs, summed (compute
floor), and one read of both (memory floor); "x exp floor" is a row's median over the exp floor's.
Prints a markdown table on stdout and writes it with JSON (and a PNG plot when matplotlib is
installed) to `benchmarks/results/<device>-<date>[-quick|-tiny].{json,md,png}`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import _harness as H
import _inputs
import _workloads as W
import peers_host

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
TITLES = {
    "kl": "Per-position KL, forward",
    "barrier": "Barrier forward + backward (gradient w.r.t. logits)",
    "fused": "From hidden states, forward + backward (gradient w.r.t. hidden and weight)",
    "topk": "Distillation from a stored teacher (forward KL), forward + backward",
    "agg": "Aggregator alone (value and gradient over [B, T]) against the KL cost",
}


@dataclasses.dataclass(frozen=True)
class Config:
  """What to run.

  `bf16`: the workloads that also run in bfloat16; `fused_topk`: the k of the
  `fused_linear_kl_topk` rows; `rss_workloads`: those whose numpy/torch rows get a peak-RSS probe;
  `budget_s`: per case, fewer timed rounds (never below 3) when `repeats` would take longer.
  """

  shapes: tuple[tuple[int, int], ...]
  dtypes: tuple[str, ...] = ("f32", "bf16")
  bf16: tuple[str, ...] = ("kl", "barrier", "fused", "topk")
  workloads: tuple[str, ...] = W.WORKLOADS
  aggs: tuple[str, ...] = ("rmse", "p95", "soft_p95")
  seq_len: int = 512
  hidden_dim: int = 512
  topk: tuple[int, ...] = (32, 256)
  fused_topk: tuple[int, ...] = (32, 256)
  agg_lengths: tuple[int, ...] = (512, 4096, 32768)
  agg_positions: int = 32768
  rss_workloads: tuple[str, ...] = W.WORKLOADS
  repeats: int = 10
  warmup: int = 2
  budget_s: float | None = 60.0


FULL = Config(shapes=((2048, 32768), (2048, 131072), (8192, 32768), (8192, 131072)))
# One shape; fused rows at D=256 without their top-k variants; RSS probes on the kl rows only.
QUICK = dataclasses.replace(FULL, shapes=((2048, 32768),), bf16=("kl",), hidden_dim=256,
                            fused_topk=(), rss_workloads=("kl",), repeats=5, warmup=1,
                            budget_s=20.0)
# Every code path, few compiles: p95 takes the same path as rmse.
TINY = Config(shapes=((64, 512),), bf16=("kl",), aggs=("rmse", "soft_p95"), seq_len=16,
              hidden_dim=16, topk=(4,), fused_topk=(4,), agg_lengths=(32,), agg_positions=128,
              repeats=2, warmup=1)


def make_cases(cfg: Config) -> list[W.Case]:
  """Every case, ordered so that cases sharing inputs are adjacent (inputs are made once)."""
  cases = []
  for dtype in cfg.dtypes:
    for n, v in cfg.shapes:
      base, nv = {"n": n, "v": v, "dtype": dtype}, {"n": n, "v": v}
      run = [w for w in cfg.workloads if dtype == "f32" or w in cfg.bf16]
      if "kl" in run:
        cases.append(W.Case("kl", "logits", nv, base))
      if "barrier" in run:
        t = min(cfg.seq_len, n)
        cases += [W.Case("barrier", "logits", nv, {**base, "agg": a, "t": t}) for a in cfg.aggs]
      if "topk" in run:
        cases.append(W.Case("topk", "logits", nv, {**base, "ks": list(cfg.topk)}))
      if "fused" in run:
        d = cfg.hidden_dim
        params = {**base, "d": d, "ks": list(cfg.fused_topk)}
        cases.append(W.Case("fused", "hidden", {**nv, "d": d}, params))
  if "agg" in cfg.workloads:
    for t in cfg.agg_lengths:
      b = max(cfg.agg_positions // t, 1)
      cases.append(W.Case("agg", "positions", {"b": b, "t": t}, {"b": b, "t": t, "dtype": "f32"}))
  return cases


class _Inputs:
  """Device inputs of the current case, kept while consecutive cases share them."""

  MAKERS = {"logits": _inputs.logits_pair, "hidden": _inputs.hidden_pair,
            "positions": _inputs.positions}

  def __init__(self) -> None:
    self.key: Any = None
    self.arrays: dict[str, jax.Array] = {}

  def get(self, case: W.Case) -> dict[str, jax.Array]:
    key = (case.inputs, tuple(sorted(case.input_args.items())), case.params["dtype"])
    if key != self.key:
      self.arrays = {}  # free the previous inputs first
      host = self.MAKERS[case.inputs](**case.input_args)
      dtype = DTYPES[case.params["dtype"]]
      while host:  # one host array less at each step: peak 3 of the 4 [N, V] arrays
        k, x = host.popitem()
        self.arrays[k] = jax.block_until_ready(jax.device_put(x.astype(dtype)))
        del x
      self.key = key
    return self.arrays


# ----------------------------------------------------------------------------------------- running


def log(msg: str) -> None:
  """A progress line on stderr (stdout carries the table)."""
  print(msg, file=sys.stderr, flush=True)


def _prepare_all(impls: list[H.Impl]) -> tuple[list[Any], dict[str, dict[str, Any]]]:
  prepared, fields = [], {}
  for impl in impls:
    host = impl.family in H.HOST_FAMILIES
    free = H.host_available_bytes() if host else H.device_available_bytes()
    p = H.prepare(impl, int(0.85 * free))
    if isinstance(p, dict):
      fields[impl.name] = p
      log(f"    {impl.name}: {p['status']} ({p['note']})")
      continue
    prepared.append(p)
    if not host:
      temp = p.fields.get("temp_bytes")
      mem = "" if temp is None else f", temp {temp / 2**20:.1f} MiB"
      log(f"    {impl.name}: compiled in {p.fields['compile_s']:.2f} s{mem}")
  return prepared, fields


def run_case(case: W.Case, dev: dict[str, jax.Array], cfg: Config, rss: bool) -> list[H.Result]:
  """Prepare, time and measure every row of one case."""
  impls = W.ROWS[case.workload](case, dev)
  prepared, fields = _prepare_all(impls)
  fields.update(H.time_interleaved(prepared, warmup=cfg.warmup, repeats=cfg.repeats,
                                   budget_s=cfg.budget_s, log=log))
  del prepared
  floor = fields.get(W.MATMUL_FLOOR if case.workload == "fused" else W.EXP_FLOOR, {})
  floor_s = floor.get("median_s")
  tolerance = 1e-3 if case.params["dtype"] == "f32" else 5e-2
  results = []
  for impl in impls:
    f = dict(fields[impl.name])
    ok = f["status"] == "ok"
    if ok and floor_s:
      f["x_floor"] = f["median_s"] / floor_s
    if ok and rss and impl.rss_spec is not None and case.workload in cfg.rss_workloads:
      input_bytes = sum(x.size * 4 for x in dev.values())  # the probe makes its own f32 inputs
      if impl.host_bytes + input_bytes > 0.85 * H.host_available_bytes():
        f["note"] = "RSS probe skipped: not enough free memory"
      else:
        f["peak_rss_bytes"], note = H.peak_rss(impl.rss_spec)
        f["note"] = "; ".join(x for x in (f.get("note", ""), note) if x)
    r = H.Result(case.workload, case.label, impl.name, impl.family, case.params, **f)
    results.append(r)
    if ok:
      extra = f", {r.x_floor:.2f}x floor" if r.x_floor else ""
      if r.peak_rss_bytes is not None:
        extra += f", peak RSS +{r.peak_rss_bytes / 2**20:.1f} MiB"
      log(f"    {r.impl}: median {r.median_s * 1e3:.3g} ms, min {r.min_s * 1e3:.3g} ms{extra}")
      if r.max_rel_diff is not None and r.max_rel_diff > tolerance:
        log(f"    WARNING {r.impl} differs from its reference: max rel diff {r.max_rel_diff:.2g}")
  return results


def with_kl_share(results: list[H.Result]) -> tuple[list[H.Result], str]:
  """Agg rows with `x_floor` set to their share of the KL barrier's cost for as many positions.

  The barrier row is the f32 rmse one (klagg, else jax.numpy) of the smallest case in the run;
  its median per position, times B x T, is the denominator (KL cost is linear in positions).
  Returns the rows and a caption saying which barrier row it was.
  """
  for impl in ("klagg kl_barrier", "jax.numpy"):
    ref = [r for r in results if r.workload == "barrier" and r.impl == impl and r.status == "ok"
           and r.params["agg"] == "rmse" and r.params["dtype"] == "f32"]
    if ref:
      break
  else:
    return results, "share of KL: no f32 rmse barrier row in this run to compare with."
  ref_row = min(ref, key=lambda r: (r.params["n"] * r.params["v"], r.params["v"]))
  per_position = ref_row.median_s / ref_row.params["n"]
  out = [dataclasses.replace(r, x_floor=r.median_s / (per_position * r.params["b"] * r.params["t"]))
         if r.workload == "agg" and r.status == "ok" else r for r in results]
  caption = (f"share of KL: the aggregator's median over that of `{impl}` (rmse, forward + "
             f"backward, {ref_row.case}) per position, times B x T.")
  return out, caption


# ------------------------------------------------------------------------------------------ output


def _fmt(x: float | None, spec: str, scale: float = 1.0) -> str:
  return "" if x is None else format(x * scale, spec)


def markdown(env: dict[str, Any], results: list[H.Result], captions: dict[str, str]) -> str:
  """The run's header, then one table per workload under its caption."""
  lines = [
      f"Device: {env['device_kind']} ({env['platform']}, {env['device_count']} device(s)); "
      f"CPU: {env['cpu_model']}, {env['cpu_count']} cores; {env['date']}",
      f"jax {env['jax']}, jaxlib {env['jaxlib']}, optax {env['optax']}, numpy {env['numpy']}, "
      f"torch {env['torch'] or 'not installed'} ({env['torch_threads']} threads), "
      f"klagg_jax {env['klagg_jax']}; XLA_FLAGS={env['xla_flags'] or '(none)'}; `{env['command']}`",
      "",
  ]
  ratios = {"agg": "share of KL", "fused": "x matmul floor"}
  for w in W.WORKLOADS:
    rows = [r for r in results if r.workload == w]
    if not rows:
      continue
    lines += [f"### {TITLES[w]}", ""] + ([captions[w], ""] if w in captions else [])
    lines += [f"| case | implementation | median ms | min ms | {ratios.get(w, 'x exp floor')} "
              "| compile s | XLA temp MiB | peak RSS MiB | max rel diff | note |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
      note = r.note if r.status == "ok" else f"{r.status}: {r.note}"
      ratio = _fmt(r.x_floor, ".1%" if w == "agg" else ".2f")
      lines.append(
          f"| {r.case} | {r.impl} | {_fmt(r.median_s, '.4g', 1e3)} | {_fmt(r.min_s, '.4g', 1e3)} "
          f"| {ratio} | {_fmt(r.compile_s, '.2f')} | {_fmt(r.temp_bytes, '.1f', 2**-20)} "
          f"| {_fmt(r.peak_rss_bytes, '.1f', 2**-20)} | {_fmt(r.max_rel_diff, '.1e')} | {note} |")
    lines.append("")
  return "\n".join(lines)


def plot(results: list[H.Result], path: Path) -> bool:
  """Median time against V per implementation (log-log), a panel per workload, dtype and N."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  ok = [r for r in results if r.status == "ok" and "v" in r.params]
  def key(r):
    return r.workload, r.params.get("agg", ""), r.params["dtype"], r.params["n"]

  panels = list(dict.fromkeys(map(key, ok)))  # in run order
  if not panels:
    return False
  colors = {name: plt.cm.tab20(i % 20) for i, name in enumerate(dict.fromkeys(r.impl for r in ok))}
  cols = min(3, len(panels))
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
  for ax, panel in zip(axes.flat, panels):
    sel = [r for r in ok if key(r) == panel]
    for name in dict.fromkeys(r.impl for r in sel):
      pts = sorted((r.params["v"], r.median_s * 1e3) for r in sel if r.impl == name)
      style = "--" if name.startswith("floor") else "-"
      ax.plot(*zip(*pts), style, marker="o", color=colors[name], label=name)
    title = " ".join(str(x) for x in panel[:3] if x) + f" N={panel[3]}"
    ax.set(xscale="log", yscale="log", xlabel="V", ylabel="median ms", title=title)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


# -------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  size = p.add_mutually_exclusive_group()
  size.add_argument("--quick", action="store_true", help="subset: N=2048 V=32768, < 3 min")
  size.add_argument("--tiny", action="store_true", help="tiny shapes, seconds (for tests)")
  p.add_argument("--shapes", help="comma-separated NxV, e.g. 2048x32768,4096x32768")
  p.add_argument("--dtypes", help="comma-separated from f32,bf16 (then for every workload)")
  p.add_argument("--workloads", help=f"comma-separated from {','.join(W.WORKLOADS)}")
  p.add_argument("--repeats", type=int, help="timed rounds, fixed (default: 10, fewer if slow)")
  p.add_argument("--warmup", type=int, help="untimed calls per row first (>= 1)")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
  p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocess probes")
  p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
  p.add_argument("--out", type=Path, default=H.HERE / "results", help="directory for the outputs")
  return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> Config:
  """The preset (--tiny, --quick or full) with the command line's overrides."""
  cfg = TINY if args.tiny else QUICK if args.quick else FULL
  if args.shapes:
    shapes = tuple(tuple(int(s) for s in x.lower().split("x")) for x in args.shapes.split(","))
    cfg = dataclasses.replace(cfg, shapes=shapes)
  if args.dtypes:
    dtypes = tuple(args.dtypes.split(","))
    if set(dtypes) - set(DTYPES):
      raise SystemExit(f"--dtypes: expected some of {','.join(DTYPES)}, got {args.dtypes}")
    cfg = dataclasses.replace(cfg, dtypes=dtypes, bf16=W.WORKLOADS)
  if args.workloads:
    workloads = tuple(args.workloads.split(","))
    if set(workloads) - set(W.WORKLOADS):
      raise SystemExit(f"--workloads: expected some of {','.join(W.WORKLOADS)}, "
                       f"got {args.workloads}")
    cfg = dataclasses.replace(cfg, workloads=workloads)
  if args.repeats:
    cfg = dataclasses.replace(cfg, repeats=args.repeats, budget_s=None)
  if args.warmup:
    cfg = dataclasses.replace(cfg, warmup=max(1, args.warmup))
  return cfg


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Run the suite; returns what it wrote to JSON, with the paths written under "files"."""
  args = parse_args(argv)
  cfg = config_from(args)
  torch_version = None if args.no_torch else peers_host.torch_version()
  torch_note = "--no-torch" if args.no_torch else None if torch_version else "torch not importable"
  W.skip_torch(torch_note)
  if torch_note:
    log(f"note: PyTorch rows skipped ({torch_note})")
  env = H.environment(torch_version)
  log(f"{env['device_kind']} | jax {env['jax']} | {env['cpu_model']} x{env['cpu_count']}")
  cases = make_cases(cfg)
  inputs, results, start = _Inputs(), [], time.perf_counter()
  for i, case in enumerate(cases, 1):
    elapsed = time.perf_counter() - start
    log(f"[{i}/{len(cases)}] {case.workload} {case.label} ({elapsed:.0f} s elapsed)")
    results += run_case(case, inputs.get(case), cfg, rss=not args.no_rss)
  del inputs
  results, agg_caption = with_kl_share(results)
  captions = {"fused": "x matmul floor: over the two forward matmuls alone "
                       "(`hidden @ weight`, `ref_hidden @ ref_weight`).",
              "agg": agg_caption}
  table = markdown(env, results, captions)
  print(table)

  suffix = "-tiny" if args.tiny else "-quick" if args.quick else ""
  args.out.mkdir(parents=True, exist_ok=True)
  stem = args.out / f"{H.device_slug()}-{env['date'][:10]}{suffix}"
  data = {"env": env, "config": dataclasses.asdict(cfg), "captions": captions,
          "results": [dataclasses.asdict(r) for r in results]}
  stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
  stem.with_suffix(".md").write_text(table + "\n")
  files = [str(stem.with_suffix(".json")), str(stem.with_suffix(".md"))]
  if not args.no_plot and plot(results, stem.with_suffix(".png")):
    files.append(str(stem.with_suffix(".png")))
  log(f"done in {time.perf_counter() - start:.0f} s; wrote {', '.join(files)}")
  return {**data, "files": files}


if __name__ == "__main__":
  main()
