"""Deterministic benchmark inputs, made with numpy only.

Shared by the benchmark process and the fresh subprocesses that measure peak RSS (which must not
import JAX), so both see the same numbers for the same seed. Everything is float32 on the host;
callers cast to bfloat16 themselves.
"""

from __future__ import annotations

import numpy as np


def logits_pair(n: int, v: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Student and reference logits `[n, v]`, about 1 nat of reverse KL apart per position.

  Built in place so that the peak host memory is two `[n, v]` float32 arrays.
  """
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal((n, v), dtype=np.float32)
  logits *= 2.0
  ref = rng.standard_normal((n, v), dtype=np.float32)
  ref *= 1.5
  ref += logits
  return {"logits": logits, "ref_logits": ref}


def hidden_pair(n: int, v: int, d: int, seed: int = 0, layout: str = "dv") -> dict[str, np.ndarray]:
  """Hidden states `[n, d]` and kernels, student and reference.

  Kernels are `[d, v]` for layout "dv" (Flax Dense) and `[v, d]` for "vd" (PyTorch's Linear
  weight, Liger-Kernel's layout).
  """
  if layout not in ("dv", "vd"):
    raise ValueError(f"layout must be 'dv' or 'vd', got {layout!r}")
  rng = np.random.default_rng(seed)
  scale = np.float32(2.0 / np.sqrt(d))
  wshape = (d, v) if layout == "dv" else (v, d)
  hidden = rng.standard_normal((n, d), dtype=np.float32)
  weight = rng.standard_normal(wshape, dtype=np.float32) * scale
  ref_hidden = hidden + np.float32(0.5) * rng.standard_normal((n, d), dtype=np.float32)
  ref_weight = weight + np.float32(0.5) * scale * rng.standard_normal(wshape, dtype=np.float32)
  return {"hidden": hidden, "weight": weight, "ref_hidden": ref_hidden, "ref_weight": ref_weight}


def positions(b: int, t: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Per-position KL-like values `[b, t]`: non-negative, mostly small, with a few outliers."""
  rng = np.random.default_rng(seed)
  x = rng.exponential(0.2, size=(b, t)).astype(np.float32)
  spikes = rng.random((b, t)) < 0.02
  x[spikes] += rng.exponential(4.0, size=int(spikes.sum())).astype(np.float32)
  return {"x": x}
