"""PyTorch peers on any device (eager, `torch.compile`, Liger-Kernel), and which of them can run.

The same functions run on the host (CPU tensors) and on a GPU (CUDA tensors that share the JAX
inputs' memory through DLPack); the caller chooses the device by the tensors it passes. Every peer
computes klagg's numbers: reverse KL(student || ref) per position for the `kl` and `barrier`
workloads, the generalized Jensen-Shannon divergence of the `fused_js` workload

    m = (1 - beta) p + beta r,  JS_beta = beta KL(r || m) + (1 - beta) KL(p || m),

(p the student, r the reference: TRL's and Liger-Kernel's convention, klagg's `direction="js"`),
16-bit inputs upcast to float32 before any arithmetic.

Like `peers_host.py`, this module does not import JAX or torch at import time: PyTorch and
Liger-Kernel are peers, never dependencies, and a missing one turns into skipped rows with a note
(`plan`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
from collections.abc import Callable
from typing import Any

import peers_host

TAU = peers_host.TAU

# Peer names, as `plan` keys them.
TORCH, COMPILE, LIGER = "torch", "torch.compile", "liger"


# ---------------------------------------------------------------------------------------- selection


@dataclasses.dataclass(frozen=True)
class Available:
  """What this process can run: versions of the optional peers and whether torch sees CUDA."""

  torch: str | None
  torch_cuda: bool
  liger: str | None


def detect() -> Available:
  """Probe torch (and its CUDA) and Liger-Kernel without failing when either is missing.

  Liger-Kernel is looked up by metadata and module spec only: importing it initializes Triton,
  which the row that uses it does lazily.
  """
  version = peers_host.torch_version()
  cuda = False
  if version is not None:
    import torch

    cuda = bool(torch.cuda.is_available())
  liger = None
  if importlib.util.find_spec("liger_kernel") is not None:
    try:
      liger = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
      liger = "unknown"
  return Available(version, cuda, liger)


def plan(platform: str, available: Available, *, no_torch: bool = False,
         force_compile: bool = False) -> dict[str, str | None]:
  """Which PyTorch-side peers run next to JAX on `platform`: `{peer: None, or why it is skipped}`.

  Peers are `"torch"` (eager), `"torch.compile"` and `"liger"` (Liger-Kernel's `LigerKLDIVLoss`
  and `LigerFusedLinearJSD`). On an accelerator a peer runs on it or not at all: a CPU-only
  torch would time another machine. On the CPU, torch eager runs on the host; `torch.compile`
  only when forced (Inductor's C++ compile takes minutes on a small CPU); Liger-Kernel never
  (Triton kernels, CUDA only).

  Args:
    platform: `jax.devices()[0].platform` ("cpu", "gpu", "tpu", ...).
    available: what `detect()` found.
    no_torch: the user asked for no PyTorch rows.
    force_compile: run `torch.compile` rows on the CPU too.

  Returns:
    A dict with the three peers as keys and None (runs) or the note of its skipped rows.
  """
  if no_torch:
    return dict.fromkeys((TORCH, COMPILE, LIGER), "--no-torch")
  if available.torch is None:
    note = "torch not importable (the `bench` extra installs it)"
    return dict.fromkeys((TORCH, COMPILE, LIGER), note)
  on_cpu = platform == "cpu"
  if not on_cpu and not (platform == "gpu" and available.torch_cuda):
    note = f"torch {available.torch} cannot run on this {platform}: a host row would time the CPU"
    return dict.fromkeys((TORCH, COMPILE, LIGER), note)
  out: dict[str, str | None] = {TORCH: None, COMPILE: None, LIGER: None}
  if on_cpu and not force_compile:
    out[COMPILE] = "torch.compile rows run on accelerators only (--torch-compile forces them)"
  if on_cpu:
    out[LIGER] = "Liger-Kernel runs on CUDA only"
  elif available.liger is None:
    out[LIGER] = "liger-kernel not importable (see BENCHMARKS.md, 'On a GPU')"
  return out


# ------------------------------------------------------------------------------------- the kernels


def _log_softmax(x):
  import torch.nn.functional as F

  return F.log_softmax(x.float(), dim=-1)


def kl(logits, ref_logits):
  """Reverse KL per position, `[..., V] -> [...]` float32 (`peers_host.torch_kl`)."""
  return peers_host.torch_kl(logits, ref_logits)


def barrier_loss(logits, ref_logits, *, agg: str, t: int):
  """`mean_b relu(agg_t(kl) - TAU)` over `[N // t, t, V]`; the reference gets no gradient."""
  import torch

  n, v = logits.shape
  k = kl(logits.view(n // t, t, v), ref_logits.detach().view(n // t, t, v))
  return torch.relu(peers_host._torch_agg(agg)(k) - TAU).mean()


def js_per_position(logits, ref_logits, beta: float):
  """Generalized JSD per position, `[..., V] -> [...]` float32, 0 < beta < 1."""
  import torch

  logq, logr = _log_softmax(logits), _log_softmax(ref_logits)
  logm = torch.logaddexp(logq + math.log1p(-beta), logr + math.log(beta))
  return (beta * (logr.exp() * (logr - logm)).sum(-1)
          + (1 - beta) * (logq.exp() * (logq - logm)).sum(-1))


def value_and_grad(loss_fn: Callable, wrt: tuple[int, ...]) -> Callable:
  """`f(*args) -> (loss, *grads w.r.t. args[i] for i in wrt)`, as `jax.value_and_grad` flattens.

  The differentiated arguments are detached leaves made afresh at each call, so repeated calls
  accumulate nothing.
  """
  import torch

  def f(*args):
    args = list(args)
    leaves = []
    for i in wrt:
      args[i] = args[i].detach().requires_grad_(True)
      leaves.append(args[i])
    loss = loss_fn(*args)
    grads = torch.autograd.grad(loss, leaves)
    return (loss.detach(), *grads)

  return f


def fused_js_loss(hidden, weight, ref_hidden, ref_weight, *, beta: float):
  """Materialized JSD from hidden states, weights `[V, D]` (Liger's layout), mean over positions."""
  import torch

  logits = hidden @ weight.T
  with torch.no_grad():
    ref = ref_hidden @ ref_weight.T
  return js_per_position(logits, ref, beta).mean()


def liger_kl() -> Callable:
  """`LigerKLDIVLoss(reduction="none", log_target=True)(log r, log p)` summed over V, as
  `kl(logits, ref_logits)`.

  Liger's loss takes log-probabilities (the log_softmax is PyTorch's) and has no per-row
  reduction: "none" returns `[N, V]`, summed here to the per-position KL(p || r).
  """
  from liger_kernel.transformers import LigerKLDIVLoss

  loss = LigerKLDIVLoss(reduction="none", log_target=True)
  return lambda logits, ref_logits: loss(_log_softmax(ref_logits), _log_softmax(logits)).sum(-1)


def liger_fused_js(beta: float) -> Callable:
  """Liger's `LigerFusedLinearJSD(jsd_beta=beta)` as `loss(hidden, weight, ref_hidden, ref_weight)`.

  Weights in Liger's layout `[V, D]`; the loss is the mean over positions (no labels to ignore).
  """
  from liger_kernel.transformers import LigerFusedLinearJSD

  jsd = LigerFusedLinearJSD(jsd_beta=beta)
  return lambda h, w, rh, rw: jsd(h, w, rh, rw, None)


# ---------------------------------------------------------------------------------------- registry


# The (workload, peer) rows that exist.
ROWS = frozenset({("kl", TORCH), ("kl", COMPILE), ("kl", LIGER), ("barrier", TORCH),
                  ("barrier", COMPILE), ("fused", TORCH), ("fused_js", TORCH),
                  ("fused_js", LIGER)})


def build(workload: str, peer: str, tensors: dict[str, Any],
          params: dict[str, Any]) -> tuple[Callable, tuple]:
  """The PyTorch-side row `peer` of `workload` as `(fn, args)`, on the tensors' device.

  Args:
    workload: "kl", "barrier", "fused" or "fused_js".
    peer: "torch", "torch.compile" or "liger".
    tensors: the case's inputs as torch tensors, in the case's dtype.
    params: the case's options (`agg`, `t` for the barrier; `beta` for fused_js).

  Returns:
    `(fn, args)`; `fn(*args)` returns what the JAX rows of the case return, flattened:
    the per-position divergence, or `(loss, *grads)`.

  Raises:
    NotImplementedError: no such row (e.g. Liger has no barrier row).
  """
  if (workload, peer) not in ROWS:
    raise NotImplementedError(f"no {peer} row for {workload}")
  import torch

  compile_ = (lambda f: torch.compile(f, dynamic=False)) if peer == COMPILE else (lambda f: f)
  if workload == "kl":
    args = (tensors["logits"], tensors["ref_logits"])
    if peer == LIGER:
      return torch.no_grad()(liger_kl()), args
    return torch.no_grad()(compile_(kl)), args
  if workload == "barrier":
    agg, t = params["agg"], params["t"]
    loss = compile_(lambda x, r: barrier_loss(x, r, agg=agg, t=t))
    return value_and_grad(loss, (0,)), (tensors["logits"], tensors["ref_logits"])
  if workload == "fused":
    args = tuple(tensors[k] for k in ("hidden", "weight", "ref_hidden", "ref_weight"))
    return peers_host.torch_fused_grad, args
  if workload == "fused_js":
    beta = params["beta"]
    args = tuple(tensors[k] for k in ("hidden", "weight", "ref_hidden", "ref_weight"))
    if peer == LIGER:
      return value_and_grad(liger_fused_js(beta), (0, 1)), args
    return value_and_grad(lambda h, w, rh, rw: fused_js_loss(h, w, rh, rw, beta=beta), (0, 1)), args
  raise NotImplementedError(f"no {peer} row for {workload}")


def synchronize(device_type: str) -> None:
  """Wait for the device's queued work (a no-op on the host)."""
  if device_type == "cuda":
    import torch

    torch.cuda.synchronize()


def release(device_type: str) -> None:
  """Hand PyTorch's cached device memory back, so the next JAX case can grow into it."""
  if device_type == "cuda":
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def cuda_peak_bytes(call: Callable[[], Any]) -> int:
  """Peak bytes PyTorch's CUDA allocator held during one `call()`, above what it held before."""
  import torch

  torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()
  before = torch.cuda.memory_allocated()
  out = call()
  torch.cuda.synchronize()
  peak = torch.cuda.max_memory_allocated() - before
  del out
  return int(peak)
