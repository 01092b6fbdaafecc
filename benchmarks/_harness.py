"""Measuring machinery: environment header, compile-then-time of interleaved rows, memory.

Method (JAX's `docs/benchmarking.md`, tokamax's `benchmarking.py`): inputs are placed on the device
before anything is timed; each JAX implementation is lowered and compiled apart from its runs, with
lower and compile times kept; then every implementation of one case is warmed up and timed in
rotation (round r starts at implementation r), so drift in a shared machine hits all of them alike.
Each timed call ends in `block_until_ready`. Medians and minima are reported.

Memory: XLA's `memory_analysis()` temp bytes for every JAX implementation (deterministic, known
before running, which is also how oversized cases are skipped instead of exhausting memory), and
peak resident memory of one call for numpy and PyTorch, measured in a fresh subprocess
(`peers_host.py`) with the high-water mark reset just before the call.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

HERE = Path(__file__).resolve().parent
HOST_FAMILIES = ("numpy", "torch")


class Unavailable(Exception):
  """An implementation that cannot run here (missing library name, unsupported dtype, no torch)."""


@dataclasses.dataclass(frozen=True)
class Impl:
  """One row of a case: how to build `(fn, args)`, lazily, and how to check and measure it.

  `family` is "floor", "klagg", "jax" (JAX peers), "numpy" or "torch". JAX families are jitted;
  host families are called as they are. `check` groups rows that compute the same numbers: each is
  compared with the first row of its group. `host_bytes` estimates a host row's peak memory (to skip
  what cannot fit) and `rss_spec` tells the subprocess probe how to rebuild it.
  """

  name: str
  family: str
  make: Callable[[], tuple[Callable, tuple]]
  check: str | None = None
  host_bytes: int = 0
  rss_spec: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Result:
  """One measured (or skipped) row. Times in seconds, memory in bytes, None where not applicable."""

  workload: str
  case: str
  impl: str
  family: str
  params: dict[str, Any]
  status: str  # "ok", "skipped" or "error"
  note: str = ""
  median_s: float | None = None
  min_s: float | None = None
  times_s: tuple[float, ...] = ()
  lower_s: float | None = None
  compile_s: float | None = None
  temp_bytes: int | None = None
  output_bytes: int | None = None
  peak_rss_bytes: int | None = None
  x_floor: float | None = None
  max_rel_diff: float | None = None


@dataclasses.dataclass
class _Prepared:
  impl: Impl
  call: Callable[[], Any]
  fields: dict[str, Any]
  times: list[float] = dataclasses.field(default_factory=list)
  sample: list[np.ndarray] | None = None


# ------------------------------------------------------------------------------------- environment


def cpu_model() -> str:
  """The CPU model name from /proc/cpuinfo (or `platform.processor()` elsewhere)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def environment(torch_version: str | None) -> dict[str, Any]:
  """Everything a row needs to be compared honestly: device, versions, CPU, date, command."""
  dev = jax.devices()[0]
  torch_threads = None
  if torch_version is not None:
    import torch

    torch_threads = torch.get_num_threads()
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device_kind": dev.device_kind,
      "platform": dev.platform,
      "device_count": jax.device_count(),
      "cpu_model": cpu_model(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": _version("jaxlib"),
      "optax": _version("optax"),
      "numpy": np.__version__,
      "klagg_jax": _version("klagg-jax"),
      "torch": torch_version,
      "torch_threads": torch_threads,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
  }


def device_slug() -> str:
  """A file-name-safe device name, e.g. "cpu" or "nvidia-a100-sxm4-40gb"."""
  dev = jax.devices()[0]
  kind = dev.device_kind if dev.platform != "cpu" else "cpu"
  return "".join(c if c.isalnum() else "-" for c in kind.lower()).strip("-")


def host_available_bytes() -> int:
  """MemAvailable from /proc/meminfo (a large number where it cannot be read)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 1 << 50


def device_available_bytes() -> int:
  """Free memory of the first device: its allocator's limit minus use, or host memory on CPU."""
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  return host_available_bytes()


# --------------------------------------------------------------------------------------- preparing


def _sample(leaf: Any, k: int = 4096) -> np.ndarray:
  """Up to k evenly spaced entries of a jax, numpy or torch array as float64, without a copy."""
  size = int(np.prod(leaf.shape))
  idx = np.linspace(0, max(size - 1, 0), min(size, k)).astype(np.int64)
  if hasattr(leaf, "detach"):  # torch
    import torch

    return leaf.detach().reshape(-1)[torch.from_numpy(idx)].float().numpy().astype(np.float64)
  return np.asarray(leaf).reshape(-1)[idx].astype(np.float64)


def _flatten(out: Any) -> list[Any]:
  if isinstance(out, (tuple, list)):
    return [leaf for item in out for leaf in _flatten(item)]
  return [out]


def prepare(impl: Impl, budget_bytes: int) -> _Prepared | dict[str, Any]:
  """Build, lower and compile one implementation; a dict of Result fields when it cannot run."""
  try:
    fn, args = impl.make()
  except Unavailable as e:
    return {"status": "skipped", "note": str(e)}
  except Exception as e:  # noqa: BLE001 - a broken row is reported, the run goes on
    return {"status": "error", "note": f"build: {type(e).__name__}: {e}"[:300]}
  if impl.family in HOST_FAMILIES:
    if impl.host_bytes > budget_bytes:
      gib = (impl.host_bytes / 2**30, budget_bytes / 2**30)
      return {"status": "skipped", "note": "needs ~%.1f GiB, %.1f GiB free" % gib}
    return _Prepared(impl, lambda: fn(*args), {})
  try:
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  except Exception as e:  # noqa: BLE001
    return {"status": "error", "note": f"compile: {type(e).__name__}: {e}"[:300]}
  fields: dict[str, Any] = {"lower_s": t1 - t0, "compile_s": t2 - t1}
  mem = compiled.memory_analysis()
  if mem is not None:
    fields["temp_bytes"] = int(mem.temp_size_in_bytes)
    fields["output_bytes"] = int(mem.output_size_in_bytes)
    need = fields["temp_bytes"] + fields["output_bytes"]
    if need > budget_bytes:
      gib = (need / 2**30, budget_bytes / 2**30)
      note = "needs %.1f GiB, %.1f GiB free (compiled only)" % gib
      return {**fields, "status": "skipped", "note": note}
  return _Prepared(impl, lambda: jax.block_until_ready(compiled(*args)), fields)


# ------------------------------------------------------------------------------------------ timing


def time_interleaved(
    prepared: list[_Prepared],
    *,
    warmup: int,
    repeats: int,
    log: Callable[[str], None],
    budget_s: float | None = None,
    min_repeats: int = 3,
) -> dict[str, dict[str, Any]]:
  """Warm up every implementation, then time them in rotation; Result fields by implementation name.

  With `budget_s`, the number of rounds is cut to what fits in that many seconds (judged from the
  last warm-up call of each row), but never below `min_repeats`.

  The first warm-up output of each row is sampled and compared with its `check` group's reference
  (the group's first JAX peer, else its first row): `max_rel_diff` is the max abs difference over
  the reference's max abs value, worst leaf.
  """
  failed: dict[str, dict[str, Any]] = {}
  alive, round_s = [], 0.0
  for p in prepared:
    try:
      t0 = time.perf_counter()
      out = p.call()
      p.sample = [_sample(leaf) for leaf in _flatten(out)]
      del out
      for _ in range(warmup - 1):
        t0 = time.perf_counter()
        p.call()
      round_s += time.perf_counter() - t0
      alive.append(p)
    except Exception as e:  # noqa: BLE001
      failed[p.impl.name] = {"status": "error", "note": f"run: {type(e).__name__}: {e}"[:300]}
  if budget_s is not None and round_s > 0:
    repeats = max(min_repeats, min(repeats, int(budget_s / round_s)))
  log(f"    timing {len(alive)} rows x {repeats} rounds (~{round_s:.2g} s a round)")
  for r in range(repeats):
    k = r % len(alive) if alive else 0
    for p in alive[k:] + alive[:k]:
      t0 = time.perf_counter()
      p.call()
      p.times.append(time.perf_counter() - t0)
    if round_s > 2:
      log(f"    round {r + 1}/{repeats} done")
  refs: dict[str, list[np.ndarray]] = {}
  for p in sorted(alive, key=lambda p: p.impl.family != "jax"):  # JAX peers are the reference
    if p.impl.check is not None:
      refs.setdefault(p.impl.check, p.sample)
  fields = dict(failed)
  for p in alive:
    f = {**p.fields, "status": "ok", "times_s": tuple(p.times)}
    f["median_s"], f["min_s"] = float(np.median(p.times)), float(np.min(p.times))
    ref = refs.get(p.impl.check) if p.impl.check is not None else None
    if ref is not None and ref is not p.sample and len(ref) == len(p.sample):
      diffs = [np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30) for a, b in zip(p.sample, ref)]
      f["max_rel_diff"] = float(max(diffs))
    fields[p.impl.name] = f
  return fields


# --------------------------------------------------------------------------------------------- RSS


def peak_rss(spec: dict[str, Any], timeout: float = 900.0) -> tuple[int | None, str]:
  """Peak extra resident bytes of one warm call, measured in a fresh process; (bytes, note)."""
  cmd = [sys.executable, str(HERE / "peers_host.py"), json.dumps(spec)]
  # A fixed mmap threshold stops glibc from raising it after the warm-up call frees its buffers,
  # which would serve the measured call from already-resident heap and hide its peak.
  env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE, env=env,
                          check=False)
  except subprocess.TimeoutExpired:
    return None, "rss probe timed out"
  if proc.returncode != 0:
    return None, f"rss probe failed: {proc.stderr.strip().splitlines()[-1:]}"
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  note = "" if out["hwm_reset"] else "RSS high-water mark not resettable: peak since start"
  return out["peak_rss"] - out["rss_before"], note
