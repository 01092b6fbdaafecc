"""Measuring machinery: environment header, compile-then-time of interleaved rows, memory.

Method (JAX's `docs/benchmarking.md`, tokamax's `benchmarking.py`): inputs are placed on the device
before anything is timed; each JAX implementation is lowered and compiled apart from its runs, with
lower and compile times kept; then every implementation of one case is warmed up and timed in
rotation (round r starts at implementation r), so drift in a shared machine hits all of them alike.
Each timed call ends in `block_until_ready`. Medians and minima are reported.

Memory: XLA's `memory_analysis()` temp bytes for every JAX implementation (deterministic, known
before running, which is also how oversized cases are skipped instead of exhausting memory), and
peak resident memory of one call for numpy and PyTorch on the host, measured in a fresh subprocess
(`peers_host.py`) with the high-water mark reset just before the call. PyTorch on a GPU: the
peak its CUDA allocator held during one call, above what it held before the call (related to
XLA's temp bytes, not equal: PyTorch counts the outputs, XLA does not).

A run can have a global time budget (`Budget`): rows and cases that would start after it is spent
are reported as skipped, so a run on a lent machine ends on time with what it measured.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import math
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
RUNNERS = ("jit", "host", "cuda")


class Unavailable(Exception):
  """An implementation that cannot run here (missing library name, unsupported dtype, no torch)."""


@dataclasses.dataclass(frozen=True)
class Impl:
  """One row of a case: how to build `(fn, args)`, lazily, and how to check and measure it.

  `family` is "floor", "klagg", "jax" (JAX peers), "numpy", "torch" or "liger". `runner` says how
  a row is called: "jit" (JAX, lowered and compiled first), "host" (numpy or PyTorch on the CPU,
  called as is) or "cuda" (PyTorch on a GPU, each call ended by `torch.cuda.synchronize`, memory
  from its allocator). `check` groups rows that compute the same numbers: each is compared with the
  first JAX row of its group. `host_bytes` estimates a host row's peak memory (to skip what cannot
  fit) and `rss_spec` tells the subprocess probe how to rebuild it.
  """

  name: str
  family: str
  make: Callable[[], tuple[Callable, tuple]]
  check: str | None = None
  host_bytes: int = 0
  rss_spec: dict[str, Any] | None = None
  runner: str = "jit"


@dataclasses.dataclass(frozen=True)
class Result:
  """One measured (or skipped) row. Times in seconds, memory in bytes, None where not applicable.

  `status` "computed" marks a floor formed from the run's measured rates, not timed
  (`_floors.Rates`): its `median_s` is that floor. `x_floor` is over the case's timed floor row
  (exp pass, or the two forward matmuls), `x_hw_floor` over its computed floor. `agrees` is
  `max_rel_diff <= tolerance`.
  """

  workload: str
  case: str
  impl: str
  family: str
  params: dict[str, Any]
  status: str  # "ok", "skipped", "error" or "computed"
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
  runner: str = "jit"
  first_call_s: float | None = None
  device_peak_bytes: int | None = None
  x_hw_floor: float | None = None
  tolerance: float | None = None
  agrees: bool | None = None


class Budget:
  """A global wall-clock budget for a run, started at construction.

  `None` means no limit. `clock` is injectable so tests need not sleep.
  """

  def __init__(self, total_s: float | None, clock: Callable[[], float] = time.perf_counter):
    if total_s is not None and total_s < 0:
      raise ValueError(f"budget must be >= 0 seconds or None, got {total_s}")
    self.total_s, self.clock, self.start = total_s, clock, clock()

  def elapsed(self) -> float:
    return self.clock() - self.start

  def left(self) -> float:
    """Seconds left (infinite without a limit; never below 0)."""
    return math.inf if self.total_s is None else max(self.total_s - self.elapsed(), 0.0)

  def spent(self) -> bool:
    return self.left() <= 0

  def note(self) -> str:
    return f"global time budget of {self.total_s:g} s spent after {self.elapsed():.0f} s"


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


def klagg_version() -> str:
  """The measured package's version, also when it runs from a source tree that is not installed."""
  from klagg_jax._version import find_version

  return find_version()


def git_commit(root: Path = Path(__file__).resolve().parents[1]) -> str:
  """The checkout's commit (``+dirty`` when tracked files differ from it); "unknown" outside git."""
  try:
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                          text=True, timeout=10)
    if head.returncode != 0:
      return "unknown"
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def environment(torch_version: str | None) -> dict[str, Any]:
  """Everything a row needs to be compared honestly: device, versions, CPU, date, command."""
  dev = jax.devices()[0]
  torch_threads = torch_cuda = None
  if torch_version is not None:
    import torch

    torch_threads = torch.get_num_threads()
    torch_cuda = torch.version.cuda if torch.cuda.is_available() else None
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
      "klagg_jax": klagg_version(),
      "git_commit": git_commit(),
      "torch": torch_version,
      "torch_threads": torch_threads,
      "torch_cuda": torch_cuda,
      "liger_kernel": _version("liger-kernel"),
      "triton": _version("triton"),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
  }


def slug(kind: str) -> str:
  """A file-name-safe form of a device kind: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3".

  Lower case; every run of characters other than letters and digits becomes one "-".
  """
  out = "".join(c if c.isalnum() else "-" for c in kind.lower())
  while "--" in out:
    out = out.replace("--", "-")
  return out.strip("-") or "unknown"


def device_slug() -> str:
  """The slug of `jax.devices()[0].device_kind` ("cpu" on the host platform)."""
  dev = jax.devices()[0]
  return slug(dev.device_kind if dev.platform != "cpu" else "cpu")


def result_stem(out: Path, kind_slug: str, date: str, suffix: str = "") -> Path:
  """Where a run's files go, without extension: `<out>/<device-kind-slug>-<YYYY-MM-DD><suffix>`.

  Args:
    out: the output directory.
    kind_slug: `slug(device kind)`.
    date: an ISO date or timestamp; its first 10 characters are kept.
    suffix: "" for a full or accelerator run, "-quick", "-tiny", ...

  Raises:
    ValueError: a date that does not start with YYYY-MM-DD.
  """
  day = date[:10]
  if len(day) != 10 or day[4] != "-" or day[7] != "-" or not day.replace("-", "").isdigit():
    raise ValueError(f"date must start with YYYY-MM-DD, got {date!r}")
  return Path(out) / f"{kind_slug}-{day}{suffix}"


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
  """Up to k evenly spaced entries of a jax, numpy or torch array as float64.

  The entries are gathered where the array lives, so only they cross to the host.
  """
  size = int(np.prod(leaf.shape))
  idx = np.linspace(0, max(size - 1, 0), min(size, k)).astype(np.int64)
  if hasattr(leaf, "detach"):  # torch, on any device
    import torch

    picked = leaf.detach().reshape(-1)[torch.as_tensor(idx, device=leaf.device)]
    return picked.float().cpu().numpy().astype(np.float64)
  if isinstance(leaf, jax.Array):
    return np.asarray(leaf.reshape(-1)[idx].astype(np.float32)).astype(np.float64)
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
  if impl.runner == "host":
    if impl.host_bytes > budget_bytes:
      gib = (impl.host_bytes / 2**30, budget_bytes / 2**30)
      return {"status": "skipped", "note": "needs ~%.1f GiB, %.1f GiB free" % gib}
    return _Prepared(impl, lambda: fn(*args), {})
  if impl.runner == "cuda":
    import peers_torch

    def call():
      out = fn(*args)
      peers_torch.synchronize("cuda")
      return out

    return _Prepared(impl, call, {})
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


def _after_failure(p: _Prepared) -> None:
  """After a PyTorch CUDA row fails (out of memory, say), hand its cached memory back."""
  if p.impl.runner == "cuda":
    import peers_torch

    try:
      peers_torch.release("cuda")
    except Exception:  # noqa: BLE001 - best effort: the row is already reported
      pass


def time_interleaved(
    prepared: list[_Prepared],
    *,
    warmup: int,
    repeats: int,
    log: Callable[[str], None],
    budget_s: float | None = None,
    min_repeats: int = 3,
    budget: Budget | None = None,
) -> dict[str, dict[str, Any]]:
  """Warm up every implementation, then time them in rotation; Result fields by implementation name.

  With `budget_s`, the number of rounds is cut to what fits in that many seconds (judged from the
  last warm-up call of each row), but never below `min_repeats`. With a global `budget`, rows not
  yet warmed up when it is spent are skipped, and the rounds are cut to the time it has left
  (again never below `min_repeats` for the rows that were warmed up).

  The time of each row's first call is kept (`first_call_s`: for `torch.compile` rows, that is
  where compilation happens). PyTorch rows on CUDA get `device_peak_bytes` from one more call.

  The first warm-up output of each row is sampled and compared with its `check` group's reference
  (the group's first JAX peer, else its first row): `max_rel_diff` is the max abs difference over
  the reference's max abs value, worst leaf.
  """
  failed: dict[str, dict[str, Any]] = {}
  alive, round_s = [], 0.0
  for p in prepared:
    if budget is not None and budget.spent():
      failed[p.impl.name] = {**p.fields, "status": "skipped", "note": budget.note()}
      continue
    try:
      t0 = time.perf_counter()
      out = p.call()
      p.fields["first_call_s"] = time.perf_counter() - t0
      p.sample = [_sample(leaf) for leaf in _flatten(out)]
      del out
      for _ in range(warmup - 1):
        t0 = time.perf_counter()
        p.call()
      round_s += time.perf_counter() - t0
      alive.append(p)
    except Exception as e:  # noqa: BLE001
      note = f"run: {type(e).__name__}: {e}"[:300]
      failed[p.impl.name] = {**p.fields, "status": "error", "note": note}
      _after_failure(p)
  if budget is not None and budget.total_s is not None:
    budget_s = budget.left() if budget_s is None else min(budget_s, budget.left())
  if budget_s is not None and round_s > 0:
    repeats = max(min_repeats, min(repeats, int(budget_s / round_s)))
  log(f"    timing {len(alive)} rows x {repeats} rounds (~{round_s:.2g} s a round)")
  for r in range(repeats):
    k = r % len(alive) if alive else 0
    for p in alive[k:] + alive[:k]:
      try:
        t0 = time.perf_counter()
        p.call()
        p.times.append(time.perf_counter() - t0)
      except Exception as e:  # noqa: BLE001 - e.g. out of memory at a later call: drop the row
        note = f"run (timed round {r + 1}): {type(e).__name__}: {e}"[:300]
        failed[p.impl.name] = {**p.fields, "status": "error", "note": note}
        alive.remove(p)
        _after_failure(p)
    if round_s > 2:
      log(f"    round {r + 1}/{repeats} done")
  refs: dict[str, list[np.ndarray]] = {}
  for p in sorted(alive, key=lambda p: p.impl.family != "jax"):  # JAX peers are the reference
    if p.impl.check is not None:
      refs.setdefault(p.impl.check, p.sample)
  fields = dict(failed)
  for p in alive:
    if p.impl.runner == "cuda":
      import peers_torch

      try:
        p.fields["device_peak_bytes"] = peers_torch.cuda_peak_bytes(p.call)
      except Exception as e:  # noqa: BLE001 - the timing stands; the memory is reported missing
        p.fields["note"] = f"memory probe: {type(e).__name__}: {e}"[:200]
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
