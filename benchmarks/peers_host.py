"""numpy and PyTorch peers, and the fresh-process peak-RSS probe that runs them.

Same direction and dtype rules as `peers.py`: reverse KL(student || ref) per position, bf16 inputs
upcast to float32 before any arithmetic. This module must not import JAX: run as a script it is the
clean subprocess in which `_harness.peak_rss` measures one call's peak resident memory.

PyTorch is a peer, never a dependency: it is imported lazily and callers skip its rows when
`torch_version()` is None.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

TAU = 0.5  # same as peers.TAU (not imported: that module imports JAX)


def torch_version() -> str | None:
  """PyTorch's version, or None when it is not importable."""
  try:
    import torch
  except ImportError:
    return None
  return torch.__version__


# ------------------------------------------------------------------------------------------- numpy


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - np.max(x, axis=-1, keepdims=True)
  return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def numpy_kl(logits: np.ndarray, ref_logits: np.ndarray) -> np.ndarray:
  """Reverse KL per position in numpy float32. `[..., V] -> [...]`."""
  logp = _np_log_softmax(np.asarray(logits, np.float32))
  logr = _np_log_softmax(np.asarray(ref_logits, np.float32))
  return np.sum(np.exp(logp) * (logp - logr), axis=-1)


# ------------------------------------------------------------------------------------------- torch


def as_torch(x: Any, dtype: str):
  """A CPU tensor of `x` (numpy array or CPU jax array, zero-copy where possible) in `dtype`."""
  import torch

  if isinstance(x, np.ndarray):
    t = torch.from_numpy(x if x.flags.writeable else x.copy())
  else:
    t = torch.from_dlpack(x)
  want = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
  return t if t.dtype == want else t.to(want)


def torch_kl(logits, ref_logits):
  """`F.kl_div(log r, log p, log_target=True)` summed over V = KL(p || r), in float32."""
  import torch.nn.functional as F

  logp = F.log_softmax(logits.float(), dim=-1)
  logr = F.log_softmax(ref_logits.float(), dim=-1)
  # kl_div(input, target) = exp(target) * (target - input): the student is the target.
  return F.kl_div(logr, logp, reduction="none", log_target=True).sum(dim=-1)


def _torch_agg(name: str) -> Callable:
  import torch

  if name == "rmse":
    return lambda kl: torch.sqrt(torch.mean(kl * kl, dim=-1))
  if name == "p95":
    return lambda kl: torch.quantile(kl, 0.95, dim=-1)
  raise ValueError(f"no torch aggregator {name!r}")


def torch_barrier_grad(logits, ref_logits, *, agg: str, t: int):
  """Loss and gradient w.r.t. logits of `mean_b relu(agg_t(kl) - TAU)` over `[N // t, t, V]`."""
  import torch

  n, v = logits.shape
  x = logits.detach().requires_grad_(True)
  kl = torch_kl(x.view(n // t, t, v), ref_logits.view(n // t, t, v))
  loss = torch.relu(_torch_agg(agg)(kl) - TAU).mean()
  loss.backward()
  return loss.detach(), x.grad


def torch_fused_grad(hidden, weight, ref_hidden, ref_weight):
  """Materialize-then-KL from hidden states: mean KL and its gradient w.r.t. hidden and weight."""
  import torch

  h = hidden.detach().requires_grad_(True)
  w = weight.detach().requires_grad_(True)
  with torch.no_grad():
    ref = ref_hidden @ ref_weight
  loss = torch_kl(h @ w, ref).mean()
  loss.backward()
  return loss.detach(), h.grad, w.grad


# ---------------------------------------------------------------------------------------- registry


def build(workload: str, impl: str, arrays: dict[str, Any],
          params: dict[str, Any]) -> tuple[Callable, tuple]:
  """The host implementation `impl` ("numpy" or "torch") of `workload`, as `(fn, args)`.

  `arrays` holds the workload's inputs (numpy arrays, or CPU jax arrays for torch); `params` the
  case's `dtype` and workload options (`t`, `agg`).
  """
  dtype = params["dtype"]
  if impl == "numpy" and workload == "kl":
    if dtype != "f32":
      raise NotImplementedError("numpy has no bfloat16 arithmetic")
    return numpy_kl, (np.asarray(arrays["logits"]), np.asarray(arrays["ref_logits"]))
  if impl == "torch":
    import torch

    if workload == "kl":
      args = (as_torch(arrays["logits"], dtype), as_torch(arrays["ref_logits"], dtype))
      return torch.no_grad()(torch_kl), args
    if workload == "barrier":
      args = (as_torch(arrays["logits"], dtype), as_torch(arrays["ref_logits"], dtype))
      return (lambda a, b: torch_barrier_grad(a, b, agg=params["agg"], t=params["t"])), args
    if workload == "fused":
      names = ("hidden", "weight", "ref_hidden", "ref_weight")
      return torch_fused_grad, tuple(as_torch(arrays[k], dtype) for k in names)
  raise NotImplementedError(f"no {impl} implementation of {workload}")


# --------------------------------------------------------------------------------------- RSS probe


def _status_kib(key: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1])
  raise KeyError(key)


def probe(spec: dict[str, Any]) -> dict[str, Any]:
  """Make the inputs, run the call once to warm up, reset the RSS high-water mark, run it again.

  Returns `rss_before` (resident bytes at the reset) and `peak_rss` (VmHWM after the call), so
  `peak_rss - rss_before` is what the call itself needed.
  """
  import _inputs  # sibling module: this file runs as a script from benchmarks/

  maker = {"logits": _inputs.logits_pair, "hidden": _inputs.hidden_pair}[spec["inputs"]]
  arrays = maker(**spec["input_args"])
  fn, args = build(spec["workload"], spec["impl"], arrays, spec["params"])
  fn(*args)
  reset = True
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    reset = False
  before = _status_kib("VmRSS") * 1024
  fn(*args)
  return {"rss_before": before, "peak_rss": _status_kib("VmHWM") * 1024, "hwm_reset": reset}


if __name__ == "__main__":
  print(json.dumps(probe(json.loads(sys.argv[1]))))
