"""Benchmark suite: klagg_jax against its peers and the hardware floor, time and memory.

    python benchmarks/run.py               # full grid (make bench)
    python benchmarks/run.py --quick       # one shape, a few minutes on 2 CPU cores (bench-quick)
    python benchmarks/run.py --tiny        # seconds; what tests/test_benchmarks.py runs
    python benchmarks/run.py --gpu         # the accelerator suite (benchmarks/gpu_check.sh runs it)
    python benchmarks/run.py --gpu --tiny  # the same rows at tiny shapes: a dry run on a CPU

Workloads (the rows of one case are timed interleaved, see `_harness.py`; rows in `_workloads.py`):

- `kl`: per-position KL forward, `[N, V]` logits -> `[N]`.
- `barrier`: value and gradient w.r.t. logits of the per-sequence barrier (rmse, p95, soft_p95).
- `fused`: value and gradient w.r.t. hidden and weight of the mean KL from hidden states `[N, D]`
  and kernels `[D, V]`: `fused_linear_kl` against materialize-then-KL, and the top-k variant.
- `topk`: value and gradient of a stored-teacher distillation loss (forward KL): `kl_topk` on k
  stored log-probs against `kl_per_position` on full teacher logits and the peers' truncated top-k.
- `agg`: value and gradient of each aggregator alone over `[B, T]`, as a share of the KL cost.
- `fused_js`: value and gradient w.r.t. hidden and weight of the mean JSD (beta 0.5) from hidden
  states and `[V, D]` weights, Liger-Kernel's `LigerFusedLinearJSD` setting (accelerator suite).

Floors, in the same run and case: one jitted pass of exp over both inputs, summed (compute
floor), and one read of both (memory floor); "x exp floor" is a row's median over the exp floor's.
Computed floors from rates measured in the same run (`_floors.py`): bytes moved over the
bandwidth of a large copy ("x byte floor", kl and barrier), matmul FLOPs over the rate of a large
matmul ("x FLOP floor", fused workloads).

klagg rows at other implementations (`implementation="xla"`, `"pallas"`: `--implementations`)
sit beside the default (kl, barrier; for fused_js at `reduction="mean"`, with the float32 and
the bfloat16 accumulator); one the library does not know yet is a skipped row. With `"pallas"`,
a row calls the Pallas kernel's entry point directly (kl), and `--pallas-tiles` registers the
tile table rows of a `pallas_sweep.py` run first.

PyTorch-side peers run where JAX runs: torch on the host beside a CPU JAX; torch eager,
`torch.compile` and Liger-Kernel on the GPU beside a GPU JAX. A peer that cannot run here is a
skipped row with a note, never an error.

Prints a markdown table on stdout and writes it with JSON (and a PNG plot when matplotlib is
installed) to `<out>/<device-kind>-<date>[-quick|-tiny].{json,md,png}`, `<out>` being
`benchmarks/out/` (ignored by git) unless `--out` names another (committed results:
`--out benchmarks/results`). The md and JSON files are rewritten after every case, so a run cut
short keeps what it measured; `--budget-s` bounds the whole run (rows that would start later are
reported as skipped).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# On a GPU, JAX's default preallocation (75 % of the device) would leave the PyTorch peers too
# little memory: grow on demand instead. Read when the backend starts, so set before any JAX use.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import _device_inputs  # noqa: E402
import _floors  # noqa: E402
import _harness as H  # noqa: E402
import _inputs  # noqa: E402
import _workloads as W  # noqa: E402
import peers_host  # noqa: E402
import peers_torch  # noqa: E402

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
TITLES = {
    "kl": "Per-position KL, forward",
    "barrier": "Barrier forward + backward (gradient w.r.t. logits)",
    "fused": "From hidden states, forward + backward (gradient w.r.t. hidden and weight)",
    "topk": "Distillation from a stored teacher (forward KL), forward + backward",
    "agg": "Aggregator alone (value and gradient over [B, T]) against the KL cost",
    "fused_js": "Fused LM head, JSD from hidden states, forward + backward (gradient w.r.t. "
                "hidden and weight)",
}
CPU_WORKLOADS = ("kl", "barrier", "fused", "topk", "agg")
# Relative agreement a row must show with its group's reference (max abs difference over the
# reference's max abs value, on 4096 evenly spaced entries of the value and of every gradient).
TOLERANCE = {"f32": 1e-3, "bf16": 5e-2}


@dataclasses.dataclass(frozen=True)
class Config:
  """What to run.

  `bf16`: the workloads that also run in bfloat16; `fused_topk`: the k of the
  `fused_linear_kl_topk` rows; `rss_workloads`: those whose numpy/torch rows get a peak-RSS probe;
  `budget_s`: per case, fewer timed rounds (never below 3) when `repeats` would take longer;
  `total_budget_s`: for the whole run, rows that would start later are skipped.
  `chunks` / `xla`: extra klagg rows at forced `chunk_size`s / at `implementation="xla"` (kl and
  barrier); `implementations`: extra klagg rows at each `implementation=` named (kl, barrier,
  and fused_js at `reduction="mean"`; a name the library does not know yet gives a skipped
  row), and for `"pallas"` a row calling the Pallas kernel's entry point directly (kl). `pallas_tiles`: a `pallas_sweep.py` JSON whose
  table rows are registered before the run. `fused_js_shapes` are (N, D, V) for the `fused_js` workload, run in `fused_js_dtypes`
  with `fused_js_beta` and extra rows at `fused_js_chunks`. `copy_bytes` and `matmul_size` size
  the passes that measure the bandwidth and matmul rate of the computed floors.
  """

  shapes: tuple[tuple[int, int], ...]
  dtypes: tuple[str, ...] = ("f32", "bf16")
  bf16: tuple[str, ...] = ("kl", "barrier", "fused", "topk")
  workloads: tuple[str, ...] = CPU_WORKLOADS
  aggs: tuple[str, ...] = ("rmse", "p95", "soft_p95")
  chunks: tuple[int, ...] = ()
  xla: bool = False
  implementations: tuple[str, ...] = ()
  pallas_tiles: str | None = None
  fused_js_shapes: tuple[tuple[int, int, int], ...] = ()
  fused_js_dtypes: tuple[str, ...] = ("bf16",)
  fused_js_beta: float = 0.5
  fused_js_chunks: tuple[int, ...] = ()
  copy_bytes: int = 256 * 2**20
  matmul_size: int = 1024
  total_budget_s: float | None = None
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
              repeats=2, warmup=1, workloads=W.WORKLOADS, chunks=(16,), xla=True,
              fused_js_shapes=((32, 16, 512),), copy_bytes=2**20,
              matmul_size=128)
# The accelerator suite: the per-position KL and the rmse barrier at N = 8192, V = 131072 (bf16,
# f32) and Liger-Kernel's fused JSD setting (BT = 8192, H = 4096, V = 128256, bf16, beta 0.5).
# bf16 first: when the budget runs out, the f32 rows are the ones lost.
GPU = Config(shapes=((8192, 131072),), dtypes=("bf16", "f32"), bf16=("kl", "barrier"),
             workloads=("kl", "barrier", "fused_js"), aggs=("rmse",), chunks=(512, 2048, 8192),
             xla=True, implementations=("pallas",), fused_js_shapes=((8192, 4096, 128256),), fused_js_chunks=(1024, 4096, 8192),
             rss_workloads=(), repeats=10, warmup=2, budget_s=15.0, copy_bytes=2**30,
             matmul_size=8192, total_budget_s=150.0)
# The same rows at shapes a CPU runs in seconds (`gpu_check.sh --dry-run`).
GPU_TINY = dataclasses.replace(GPU, shapes=((256, 2048),), seq_len=64, chunks=(32, 128, 256),
                               fused_js_shapes=((64, 32, 1024),), fused_js_chunks=(32,),
                               repeats=2, warmup=1, budget_s=2.0, copy_bytes=4 * 2**20,
                               matmul_size=256, total_budget_s=60.0)


def make_cases(cfg: Config) -> list[W.Case]:
  """Every case, ordered so that cases sharing inputs are adjacent (inputs are made once)."""
  cases = []
  variants = {"chunks": list(cfg.chunks), "xla": cfg.xla,
              "implementations": list(cfg.implementations)}
  for dtype in cfg.dtypes:
    for n, v in cfg.shapes:
      base, nv = {"n": n, "v": v, "dtype": dtype}, {"n": n, "v": v}
      run = [w for w in cfg.workloads if dtype == "f32" or w in cfg.bf16]
      if "kl" in run:
        cases.append(W.Case("kl", "logits", nv, {**base, **variants}))
      if "barrier" in run:
        t = min(cfg.seq_len, n)
        cases += [W.Case("barrier", "logits", nv, {**base, "agg": a, "t": t, **variants})
                  for a in cfg.aggs]
      if "topk" in run:
        cases.append(W.Case("topk", "logits", nv, {**base, "ks": list(cfg.topk)}))
      if "fused" in run:
        d = cfg.hidden_dim
        params = {**base, "d": d, "ks": list(cfg.fused_topk)}
        cases.append(W.Case("fused", "hidden", {**nv, "d": d}, params))
    if "fused_js" in cfg.workloads and dtype in cfg.fused_js_dtypes:
      for n, d, v in cfg.fused_js_shapes:
        params = {"n": n, "d": d, "v": v, "dtype": dtype, "beta": cfg.fused_js_beta,
                  "chunks": list(cfg.fused_js_chunks),
                  "implementations": list(cfg.implementations)}
        cases.append(W.Case("fused_js", "hidden_vd", {"n": n, "v": v, "d": d}, params))
  if "agg" in cfg.workloads:
    for t in cfg.agg_lengths:
      b = max(cfg.agg_positions // t, 1)
      cases.append(W.Case("agg", "positions", {"b": b, "t": t}, {"b": b, "t": t, "dtype": "f32"}))
  return cases


class _Inputs:
  """Device inputs of the current case, kept while consecutive cases share them.

  On the CPU they are made by `_inputs` (numpy, the numbers the peak-RSS probes rebuild); on an
  accelerator by `_device_inputs` (`jax.random`, where they are used).
  """

  MAKERS = {"logits": _inputs.logits_pair, "hidden": _inputs.hidden_pair,
            "hidden_vd": lambda **a: _inputs.hidden_pair(**a, layout="vd"),
            "positions": _inputs.positions}
  DEVICE_MAKERS = {"logits": _device_inputs.logits_pair, "hidden": _device_inputs.hidden_pair,
                   "hidden_vd": lambda **a: _device_inputs.hidden_pair(**a, layout="vd")}

  def __init__(self, on_device: bool = False) -> None:
    self.key: Any = None
    self.arrays: dict[str, jax.Array] = {}
    self.on_device = on_device

  def get(self, case: W.Case) -> dict[str, jax.Array]:
    key = (case.inputs, tuple(sorted(case.input_args.items())), case.params["dtype"])
    if key != self.key:
      self.arrays = {}  # free the previous inputs first
      if self.on_device and case.inputs in self.DEVICE_MAKERS:
        maker = self.DEVICE_MAKERS[case.inputs]
        self.arrays = maker(**case.input_args, dtype=case.params["dtype"])
        self.key = key
        return self.arrays
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


def _prepare_all(impls: list[H.Impl],
                 budget: H.Budget) -> tuple[list[Any], dict[str, dict[str, Any]]]:
  prepared, fields = [], {}
  for impl in impls:
    if budget.spent():
      fields[impl.name] = {"status": "skipped", "note": budget.note()}
      log(f"    {impl.name}: skipped ({budget.note()})")
      continue
    host = impl.runner == "host"
    free = H.host_available_bytes() if host else H.device_available_bytes()
    p = H.prepare(impl, int(0.85 * free))
    if isinstance(p, dict):
      fields[impl.name] = p
      log(f"    {impl.name}: {p['status']} ({p['note']})")
      continue
    prepared.append(p)
    if impl.runner == "jit":
      temp = p.fields.get("temp_bytes")
      mem = "" if temp is None else f", temp {temp / 2**20:.1f} MiB"
      log(f"    {impl.name}: compiled in {p.fields['compile_s']:.2f} s{mem}")
  return prepared, fields


def stand_ins(case: W.Case) -> dict[str, jax.ShapeDtypeStruct]:
  """Shape-only inputs of a case: enough to list its rows without making any array."""
  a, dtype = case.input_args, DTYPES[case.params["dtype"]]
  n, v, d = a.get("n"), a.get("v"), a.get("d")
  shapes = {
      "logits": {"logits": (n, v), "ref_logits": (n, v)},
      "hidden": {"hidden": (n, d), "weight": (d, v), "ref_hidden": (n, d), "ref_weight": (d, v)},
      "hidden_vd": {"hidden": (n, d), "weight": (v, d), "ref_hidden": (n, d),
                    "ref_weight": (v, d)},
      "positions": {"x": (a.get("b"), a.get("t"))},
  }[case.inputs]
  return {k: jax.ShapeDtypeStruct(shape, dtype) for k, shape in shapes.items()}


def skipped_case(case: W.Case, note: str) -> list[H.Result]:
  """Every row of a case that will not run, as skipped rows with `note`.

  Row names come from the row builders, which build nothing until a row is prepared.
  """
  try:
    impls = W.ROWS[case.workload](case, stand_ins(case))
  except Exception:  # noqa: BLE001 - a builder that needs more: one row for the case
    impls = [H.Impl("(all rows)", "klagg", lambda: None)]
  return [H.Result(case.workload, case.label, i.name, i.family, case.params, "skipped", note,
                   runner=i.runner) for i in impls]


def computed_floor(case: W.Case, rates: _floors.Rates) -> H.Result | None:
  """The case's floor formed from the run's measured rates, as a "computed" row (or None)."""
  try:
    floor = rates.case_floor(case.workload, case.params)
  except Exception as e:  # noqa: BLE001 - a failed rate measurement loses the ratio, not the run
    log(f"    computed floor failed: {type(e).__name__}: {e}")
    return None
  if floor is None:
    return None
  seconds, how = floor
  name = ("floor: FLOPs / matmul rate" if case.workload in ("fused", "fused_js")
          else "floor: bytes / copy bandwidth")
  return H.Result(case.workload, case.label, name, "floor", case.params, "computed",
                  f"computed, not timed: {how}", median_s=seconds, min_s=seconds, x_hw_floor=1.0)


def run_case(case: W.Case, dev: dict[str, jax.Array], cfg: Config, rss: bool,
             budget: H.Budget | None = None,
             rates: _floors.Rates | None = None) -> list[H.Result]:
  """Prepare, time and measure every row of one case (skipping those the budget leaves out)."""
  budget = budget or H.Budget(None)
  impls = W.ROWS[case.workload](case, dev)
  prepared, fields = _prepare_all(impls, budget)
  fields.update(H.time_interleaved(prepared, warmup=cfg.warmup, repeats=cfg.repeats,
                                   budget_s=cfg.budget_s, log=log, budget=budget))
  del prepared
  W.end_case()
  if any(i.runner == "cuda" for i in impls):
    peers_torch.release("cuda")
  timed_floor = W.MATMUL_FLOOR if case.workload in ("fused", "fused_js") else W.EXP_FLOOR
  floor_s = fields.get(timed_floor, {}).get("median_s")
  hw = computed_floor(case, rates) if rates is not None else None
  tolerance = TOLERANCE[case.params["dtype"]]
  results = [hw] if hw is not None else []
  for impl in impls:
    f = dict(fields[impl.name])
    f["runner"] = impl.runner
    ok = f["status"] == "ok"
    if ok and floor_s:
      f["x_floor"] = f["median_s"] / floor_s
    if ok and hw is not None:
      f["x_hw_floor"] = f["median_s"] / hw.median_s
    if ok and f.get("max_rel_diff") is not None:
      f["tolerance"], f["agrees"] = tolerance, bool(f["max_rel_diff"] <= tolerance)
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
      if r.x_hw_floor:
        extra += f", {r.x_hw_floor:.2f}x {'FLOP' if 'fused' in r.workload else 'byte'} floor"
      if r.device_peak_bytes is not None:
        extra += f", CUDA peak +{r.device_peak_bytes / 2**20:.1f} MiB"
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


def agreement(results: list[H.Result]) -> list[str]:
  """One line per case with compared rows: do they agree with their reference within tolerance?"""
  lines = []
  for case in dict.fromkeys((r.workload, r.case) for r in results):
    rows = [r for r in results if (r.workload, r.case) == case and r.agrees is not None]
    if not rows:
      continue
    bad = [f"{r.impl} ({r.max_rel_diff:.1e})" for r in rows if not r.agrees]
    tol = rows[0].tolerance
    verdict = f"DISAGREE: {', '.join(bad)}" if bad else "all agree"
    lines.append(f"- {case[0]} {case[1]}: {len(rows)} rows compared, tolerance {tol:g}: {verdict}")
  return lines


def markdown(env: dict[str, Any], results: list[H.Result], captions: dict[str, str],
             rates: dict[str, Any] | None = None) -> str:
  """The run's header, then one table per workload under its caption, then the agreement checks."""
  versions = (f"jax {env['jax']}, jaxlib {env['jaxlib']}, optax {env['optax']}, "
              f"numpy {env['numpy']}, torch {env['torch'] or 'not installed'}")
  if env.get("torch_cuda"):
    versions += f" (CUDA {env['torch_cuda']})"
  elif env["torch"]:
    versions += f" ({env['torch_threads']} threads)"
  versions += f", liger-kernel {env.get('liger_kernel') or 'not installed'}"
  lines = [
      f"Device: {env['device_kind']} ({env['platform']}, {env['device_count']} device(s)); "
      f"CPU: {env['cpu_model']}, {env['cpu_count']} cores; {env['date']}",
      f"{versions}, klagg_jax {env['klagg_jax']} (commit {env.get('git_commit', 'unknown')}); "
      f"XLA_FLAGS={env['xla_flags'] or '(none)'}; "
      f"`{env['command']}`",
      "",
  ]
  if env.get("peers"):
    said = [p if note is None else f"{p} skipped ({note})" for p, note in env["peers"].items()]
    lines += ["PyTorch-side peers: " + "; ".join(said) + ".", ""]
  if rates and rates.get("copy_bandwidth_bytes_per_s"):
    line = (f"Measured in this run: copy bandwidth {rates['copy_bandwidth_bytes_per_s'] / 1e9:.4g} "
            f"GB/s (`x + 1` over {rates['copy_bytes'] / 2**20:.0f} MiB of float32, read + write)")
    for dt, rate in rates.get("matmul_flops_per_s", {}).items():
      line += f"; {dt} matmul {rate / 1e12:.4g} TFLOP/s ({rates['matmul_size']}^3)"
    if rates.get("spec_bandwidth_bytes_per_s"):
      line += (f". The {rates['spec_card']}'s spec bandwidth: "
               f"{rates['spec_bandwidth_bytes_per_s'] / 1e12:.3g} TB/s, the byte floors' notes "
               "give the time at that rate too")
    lines += [line + ".", ""]
  ratios = {"agg": ("share of KL", None), "fused": ("x matmul floor", "x FLOP floor"),
            "fused_js": ("x matmul floor", "x FLOP floor")}
  for w in W.WORKLOADS:
    rows = [r for r in results if r.workload == w]
    if not rows:
      continue
    ratio, hw = ratios.get(w, ("x exp floor", "x byte floor"))
    lines += [f"### {TITLES[w]}", ""] + ([captions[w], ""] if w in captions else [])
    lines += [f"| case | implementation | median ms | min ms | {ratio} | {hw or '-'} "
              "| compile s | XLA temp MiB | peak RSS MiB | CUDA peak MiB | max rel diff | note |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
      note = r.note if r.status in ("ok", "computed") else f"{r.status}: {r.note}"
      if r.agrees is False:
        note = "; ".join(x for x in (f"DISAGREES (tolerance {r.tolerance:g})", note) if x)
      compile_s = r.compile_s if r.runner == "jit" else r.first_call_s
      cells = (
          r.case, r.impl, _fmt(r.median_s, ".4g", 1e3), _fmt(r.min_s, ".4g", 1e3),
          _fmt(r.x_floor, ".1%" if w == "agg" else ".2f"), _fmt(r.x_hw_floor, ".2f"),
          _fmt(compile_s, ".2f"), _fmt(r.temp_bytes, ".1f", 2**-20),
          _fmt(r.peak_rss_bytes, ".1f", 2**-20), _fmt(r.device_peak_bytes, ".1f", 2**-20),
          _fmt(r.max_rel_diff, ".1e"), note)
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  checks = agreement(results)
  if checks:
    lines += ["### Agreement", "",
              "Each row against its group's reference (the first JAX peer, jax.numpy): max abs "
              "difference over the reference's max abs value, on 4096 evenly spaced entries of "
              "the value and of every gradient.", "", *checks, ""]
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
  size.add_argument("--quick", action="store_true", help="subset: N=2048 V=32768, 2-4 min")
  size.add_argument("--tiny", action="store_true", help="tiny shapes, seconds (for tests)")
  p.add_argument("--gpu", action="store_true",
                 help="the accelerator suite (with --tiny: its rows at tiny shapes, a dry run)")
  p.add_argument("--shapes", help="comma-separated NxV, e.g. 2048x32768,4096x32768")
  p.add_argument("--dtypes", help="comma-separated from f32,bf16 (then for every workload)")
  p.add_argument("--workloads", help=f"comma-separated from {','.join(W.WORKLOADS)}")
  p.add_argument("--repeats", type=int, help="timed rounds, fixed (default: 10, fewer if slow)")
  p.add_argument("--warmup", type=int, help="untimed calls per row first (>= 1)")
  p.add_argument("--budget-s", type=float,
                 help="wall-clock budget of the whole run; later rows are skipped")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch and Liger rows")
  p.add_argument("--implementations",
                 help="comma-separated extra klagg implementation= rows (kl, barrier, fused_js), "
                      "e.g. pallas")
  p.add_argument("--pallas-tiles", type=Path,
                 help="a pallas_sweep.py JSON whose tile table rows are used by the pallas rows")
  p.add_argument("--torch-compile", action="store_true",
                 help="run the torch.compile rows on a CPU too (slow to compile)")
  p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocess probes")
  p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
  p.add_argument("--out", type=Path, default=H.HERE / "out",
                 help="directory for the outputs (default: benchmarks/out, ignored by git)")
  p.add_argument("--suffix", default=None,
                 help="file name suffix after the date (default: -quick, -tiny or none); "
                      "one that starts with '-' takes the --suffix=-x form")
  return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> Config:
  """The preset (--tiny, --quick, --gpu [--tiny] or full) with the command line's overrides."""
  if args.gpu:
    if args.quick:
      raise SystemExit("--gpu takes --tiny (a dry run) or nothing, not --quick")
    cfg = GPU_TINY if args.tiny else GPU
  else:
    cfg = TINY if args.tiny else QUICK if args.quick else FULL
  if args.shapes:
    shapes = tuple(tuple(int(s) for s in x.lower().split("x")) for x in args.shapes.split(","))
    cfg = dataclasses.replace(cfg, shapes=shapes)
  if args.dtypes:
    dtypes = tuple(args.dtypes.split(","))
    if set(dtypes) - set(DTYPES):
      raise SystemExit(f"--dtypes: expected some of {','.join(DTYPES)}, got {args.dtypes}")
    cfg = dataclasses.replace(cfg, dtypes=dtypes, bf16=W.WORKLOADS, fused_js_dtypes=dtypes)
  if args.workloads:
    workloads = tuple(args.workloads.split(","))
    if set(workloads) - set(W.WORKLOADS):
      raise SystemExit(f"--workloads: expected some of {','.join(W.WORKLOADS)}, "
                       f"got {args.workloads}")
    cfg = dataclasses.replace(cfg, workloads=workloads)
  if args.implementations is not None:
    cfg = dataclasses.replace(cfg, implementations=tuple(
        x for x in args.implementations.split(",") if x))
  if args.pallas_tiles is not None:
    cfg = dataclasses.replace(cfg, pallas_tiles=str(args.pallas_tiles))
  if args.repeats:
    cfg = dataclasses.replace(cfg, repeats=args.repeats, budget_s=None)
  if args.warmup:
    cfg = dataclasses.replace(cfg, warmup=max(1, args.warmup))
  if args.budget_s is not None:
    if args.budget_s < 0:
      raise SystemExit(f"--budget-s: expected seconds >= 0, got {args.budget_s}")
    cfg = dataclasses.replace(cfg, total_budget_s=args.budget_s)
  return cfg


def write(stem: Path, data: dict[str, Any], table: str) -> list[str]:
  """The run so far as `<stem>.json` and `<stem>.md` (rewritten after every case)."""
  stem.parent.mkdir(parents=True, exist_ok=True)
  row_env = {k: data["env"].get(k) for k in ROW_ENV}
  rows = [{**dataclasses.asdict(r), **row_env} for r in data["results"]]
  stem.with_suffix(".json").write_text(json.dumps({**data, "results": rows}, indent=1) + "\n")
  stem.with_suffix(".md").write_text(table + "\n")
  return [str(stem.with_suffix(".json")), str(stem.with_suffix(".md"))]


# Recorded in every JSON row too, so a row read alone says where and with what it was measured.
ROW_ENV = ("device_kind", "jax", "jaxlib", "torch", "torch_cuda", "liger_kernel", "date")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Run the suite; returns what it wrote to JSON, with the paths written under "files"."""
  args = parse_args(argv)
  cfg = config_from(args)
  platform = jax.devices()[0].platform
  if args.gpu and platform == "cpu" and not args.tiny:
    raise SystemExit("--gpu: jax.devices()[0] is a CPU; run --gpu --tiny for a dry run here")
  # --no-torch imports nothing of PyTorch: it is also the fallback when a PyTorch peer crashed.
  available = (peers_torch.Available(None, False, None) if args.no_torch
               else peers_torch.detect())
  peer_plan = peers_torch.plan(platform, available, no_torch=args.no_torch,
                               force_compile=args.torch_compile)
  W.set_peers(peer_plan)
  for peer, note in peer_plan.items():
    log(f"note: {peer} rows {'run' if note is None else 'skipped (' + note + ')'}")
  env = H.environment(None if args.no_torch else available.torch)
  env["peers"] = peer_plan
  log(f"{env['device_kind']} | jax {env['jax']} | {env['cpu_model']} x{env['cpu_count']}")
  budget = H.Budget(cfg.total_budget_s)
  rates = _floors.Rates(copy_bytes=cfg.copy_bytes, matmul_size=cfg.matmul_size,
                        device_kind=jax.devices()[0].device_kind)
  if cfg.pallas_tiles:
    log(f"pallas tiles: {W.register_pallas_tiles(cfg.pallas_tiles)}")
  suffix = args.suffix if args.suffix is not None else (
      "-tiny" if args.tiny else "-quick" if args.quick else "")
  stem = H.result_stem(args.out, H.device_slug(), env["date"], suffix)
  captions = {"fused": "x matmul floor: over the two forward matmuls alone "
                       "(`hidden @ weight`, `ref_hidden @ ref_weight`); x FLOP floor: over "
                       "8 N D V FLOPs (four such matmuls) at the matmul rate measured in this run.",
              "fused_js": "x matmul floor: over the two forward matmuls alone; x FLOP floor: "
                          "over 8 N D V FLOPs at the matmul rate measured in this run. Weights "
                          "`[V, D]` (Liger's layout); klagg `weight_layout=\"vd\"`.",
              "kl": "x byte floor: over one read of both inputs at the copy bandwidth "
                    "measured in this run.",
              "barrier": "x byte floor: over one read of both inputs and one write of the "
                         "gradient at the copy bandwidth measured in this run."}
  cases = make_cases(cfg)
  inputs = _Inputs(on_device=platform != "cpu")
  results: list[H.Result] = []
  start = time.perf_counter()

  def snapshot() -> tuple[dict[str, Any], str]:
    data = {"env": env, "config": dataclasses.asdict(cfg), "captions": captions,
            "rates": rates.summary(), "results": results}
    return data, markdown(env, results, captions, rates.summary())

  for i, case in enumerate(cases, 1):
    elapsed = time.perf_counter() - start
    log(f"[{i}/{len(cases)}] {case.workload} {case.label} ({elapsed:.0f} s elapsed)")
    if budget.spent():
      log(f"    skipped: {budget.note()}")
      results += skipped_case(case, budget.note())
      continue
    try:
      dev = inputs.get(case)
      results += run_case(case, dev, cfg, rss=not args.no_rss, budget=budget, rates=rates)
    except Exception as e:  # noqa: BLE001 - one broken case (inputs, OOM) must not end the run
      note = f"case: {type(e).__name__}: {e}"[:300]
      log(f"    ERROR {note}")
      results += [dataclasses.replace(r, status="error", note=note)
                  for r in skipped_case(case, note)]
      inputs = _Inputs(on_device=platform != "cpu")
    write(stem, *snapshot())
  del inputs
  results, agg_caption = with_kl_share(results)
  captions["agg"] = agg_caption
  data, table = snapshot()
  print(table)
  files = write(stem, data, table)
  if not args.no_plot and plot(results, stem.with_suffix(".png")):
    files.append(str(stem.with_suffix(".png")))
  log(f"done in {time.perf_counter() - start:.0f} s; wrote {', '.join(files)}")
  return {**data, "results": [{**dataclasses.asdict(r), **{k: env.get(k) for k in ROW_ENV}}
                              for r in results], "files": files}


if __name__ == "__main__":
  main()
