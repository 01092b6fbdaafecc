"""Hardware floors from rates measured in the same run: bytes / copy bandwidth, FLOPs / matmul rate.

A workload that must read its inputs (and write a gradient as large) cannot beat

    byte floor = bytes moved / B,   B = 2 S / t_copy,

where t_copy is the median time of one elementwise pass `x + 1` over an S-byte float32 array
(S bytes read and S written, hence 2 S: the bandwidth of a large device-to-device copy, counting
read and write bytes). A fused LM-head loss with its gradient w.r.t. hidden and weight cannot beat

    FLOP floor = 8 N D V / R,   R = 2 M^3 / t_matmul,

four `[N, D] x [D, V]`-sized matmuls (student and reference logits, then d hidden and d weight),
with R the rate of one large `[M, M] x [M, M]` matmul in the case's dtype. Both rates are
measured once per run (`Rates`), so every ratio compares numbers from one device and one run.

The copy pass is itself an XLA kernel and sits below the card's bandwidth (2.27 TB/s on an H100
SXM, whose memory is specified at 3.35 TB/s), so the byte floors also state the time at the
card's spec-sheet bandwidth where the card is known (`SPEC_BANDWIDTH`): the floor no kernel can
beat, beside the one an XLA copy reaches.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
ITEMSIZE = {"f32": 4, "bf16": 2}


# -------------------------------------------------------------------------------------- arithmetic


def bytes_moved(workload: str, params: dict[str, Any]) -> int | None:
  """Bytes a case must move at least: one read of both `[N, V]` inputs, plus one write of the
  `[N, V]` gradient for gradient workloads. None where no byte floor is defined.

  Args:
    workload: "kl" (forward: read 2) or "barrier" (value and gradient: read 2, write 1).
    params: the case's `n`, `v` and `dtype` ("f32" or "bf16").

  Returns:
    The byte count, or None for other workloads.
  """
  arrays = {"kl": 2, "barrier": 3}.get(workload)
  if arrays is None:
    return None
  return arrays * params["n"] * params["v"] * ITEMSIZE[params["dtype"]]


# Spec-sheet memory bandwidth (bytes per second) of known cards, matched on the lower-cased
# device kind: (substrings that must all appear, substrings that must not, bandwidth, label).
# NVIDIA's datasheets: H100 SXM5 3.35 TB/s (the PCIe and NVL cards differ), H200 4.8 TB/s,
# A100 80GB 2.0 TB/s (SXM4 2.04, PCIe 1.94).
SPEC_BANDWIDTH: tuple[tuple[tuple[str, ...], tuple[str, ...], float, str], ...] = (
    (("h200",), (), 4.8e12, "H200"),
    (("h100",), ("pcie", "nvl"), 3.35e12, "H100 SXM"),
    (("a100", "80gb"), (), 2.0e12, "A100 80GB"),
)


def spec_bandwidth(device_kind: str | None) -> tuple[float, str] | None:
  """(bytes per second, card) of the spec-sheet bandwidth of `device_kind`, or None if unknown.

  Args:
    device_kind: `jax.Device.device_kind`, e.g. "NVIDIA H100 80GB HBM3".

  Returns:
    The first matching row of `SPEC_BANDWIDTH` as (bandwidth, label), else None.
  """
  kind = (device_kind or "").lower()
  for need, avoid, bandwidth, label in SPEC_BANDWIDTH:
    if all(x in kind for x in need) and not any(x in kind for x in avoid):
      return bandwidth, label
  return None


def matmul_flops(params: dict[str, Any]) -> int:
  """FLOPs of the four matmuls a fused LM-head loss and its gradient need: 4 x 2 N D V."""
  return 8 * params["n"] * params["d"] * params["v"]


def floor_s(amount: float, rate: float) -> float:
  """Seconds to move `amount` bytes (or do `amount` FLOPs) at `rate` per second.

  Raises:
    ValueError: a rate that is not positive (a failed measurement must not read as a floor).
  """
  if not rate > 0:
    raise ValueError(f"rate must be > 0, got {rate}")
  return amount / rate


# ------------------------------------------------------------------------------------- measurement


def timed_calls(compiled: Callable, args: Any, repeats: int, warmup: int = 2) -> list[float]:
  """Seconds of each of `repeats` calls of a compiled function, after `warmup` untimed ones
  (every call ends in `block_until_ready`)."""
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return times


def _median_time(fn: Callable, args: tuple, repeats: int, warmup: int = 2) -> float:
  return float(np.median(timed_calls(jax.jit(fn).lower(*args).compile(), args, repeats, warmup)))


def copy_bandwidth(nbytes: int, repeats: int = 20) -> tuple[float, float]:
  """Bytes per second of one `x + 1` pass over an `nbytes` float32 array, counting read and write.

  Returns:
    `(bandwidth, median seconds)`.
  """
  x = jax.block_until_ready(jnp.zeros((max(nbytes // 4, 1),), jnp.float32))
  t = _median_time(lambda x: x + 1, (x,), repeats)
  return 2 * x.size * 4 / t, t


def matmul_rate(m: int, dtype: str, repeats: int = 10) -> tuple[float, float]:
  """FLOP per second of one `[m, m] x [m, m]` matmul in `dtype`, inputs random.

  Returns:
    `(rate, median seconds)`.
  """
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (m, m), jnp.float32).astype(DTYPES[dtype])
  b = jax.random.normal(k2, (m, m), jnp.float32).astype(DTYPES[dtype])
  t = _median_time(jnp.matmul, jax.block_until_ready((a, b)), repeats)
  return 2 * m**3 / t, t


@dataclasses.dataclass
class Rates:
  """The run's measured rates, each measured once on first use and kept for the run.

  `copy_bytes` is the size of the array of the bandwidth pass, `matmul_size` the M of the
  matmul-rate pass.
  """

  copy_bytes: int
  matmul_size: int
  device_kind: str | None = None
  bandwidth: float | None = None
  copy_s: float | None = None
  matmul: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)

  def bytes_per_s(self) -> float:
    if self.bandwidth is None:
      self.bandwidth, self.copy_s = copy_bandwidth(self.copy_bytes)
    return self.bandwidth

  def flops_per_s(self, dtype: str) -> float:
    if dtype not in self.matmul:
      self.matmul[dtype] = matmul_rate(self.matmul_size, dtype)
    return self.matmul[dtype][0]

  def summary(self) -> dict[str, Any]:
    """What was measured, for the JSON header (and the card's spec bandwidth, when known)."""
    spec = spec_bandwidth(self.device_kind)
    return {
        "spec_bandwidth_bytes_per_s": spec[0] if spec else None,
        "spec_card": spec[1] if spec else None,
        "copy_bytes": self.copy_bytes, "copy_median_s": self.copy_s,
        "copy_bandwidth_bytes_per_s": self.bandwidth, "matmul_size": self.matmul_size,
        "matmul_flops_per_s": {k: v[0] for k, v in self.matmul.items()},
        "matmul_median_s": {k: v[1] for k, v in self.matmul.items()},
    }

  def case_floor(self, workload: str, params: dict[str, Any]) -> tuple[float, str] | None:
    """The case's floor in seconds and a note saying how it was formed, or None.

    kl / barrier: byte floor; fused / fused_js: FLOP floor; other workloads: None.
    """
    nbytes = bytes_moved(workload, params)
    if nbytes is not None:
      bw = self.bytes_per_s()
      how = f"{nbytes / 1e9:.4g} GB at {bw / 1e9:.4g} GB/s (x + 1 pass)"
      spec = spec_bandwidth(self.device_kind)
      if spec is not None:
        how += (f"; {floor_s(nbytes, spec[0]) * 1e3:.4g} ms at the {spec[1]}'s spec "
                f"{spec[0] / 1e12:.3g} TB/s")
      return floor_s(nbytes, bw), how
    if workload in ("fused", "fused_js"):
      flops, rate = matmul_flops(params), self.flops_per_s(params["dtype"])
      how = (f"8NDV = {flops / 1e12:.4g} TFLOP at {rate / 1e12:.4g} TFLOP/s "
             f"({params['dtype']} matmul)")
      return floor_s(flops, rate), how
    return None
