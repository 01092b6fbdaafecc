"""Per-device memory of every kernel on 1, 2, 4 and 8 simulated devices, at one global shape.

Compile only: the inputs are ``jax.ShapeDtypeStruct``s carrying their ``NamedSharding``, so
nothing is allocated, and every number is XLA's ``memory_analysis()`` of the compiled SPMD
program, which describes one device (temp + arguments + outputs). The meshes are built the
classic way, ``jax.sharding.Mesh(devices, ("data", "model"))`` with Auto axes, and the functions
are jitted with no ``partition=`` and no annotation: GSPMD partitions them. Layouts: ``batch``
(the batch over every device, a ``d x 1`` mesh), ``vocab`` (the vocabulary over every device, a
``1 x d`` mesh: a tensor-parallel head), ``both`` (``data x model`` = 1x1, 1x2, 2x2, 2x4).
Workloads, float32 (gradients with respect to the student's arrays):

* ``kl_per_position`` forward; ``kl_barrier`` (rmse, per sequence) gradient;
* ``fused_linear_kl`` gradient w.r.t. hidden ``[B, T, D]`` and the LM-head weight ``[D, V]``
  (weight split over ``model``, replicated over ``data`` as in data parallelism), per position
  (``reduction=None``) and ``reduction="mean"``;
* ``topk_logprobs`` (k = 64) forward, ``kl_topk`` gradient, ``fused_linear_kl_topk`` gradient
  (``reduction="mean"``);
* for contrast, the barrier gradient written in plain ``jax.numpy`` (two ``log_softmax``, an
  ``exp``, a product, a sum) under the same GSPMD.

The simulated devices are set up before JAX is imported, so run this file directly:

    python benchmarks/sharding_memory.py [--b 8] [--t 1024] [--v 32768] [--d 1024] [--json out]
"""

from __future__ import annotations

import os
import sys

if "jax" in sys.modules:
  raise RuntimeError("benchmarks/sharding_memory.py must set up its devices before JAX is "
                     "imported: run it as a script.")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import klagg_jax as ka  # noqa: E402
from _harness import git_commit  # noqa: E402

MESHES = {1: (1, 1), 2: (1, 2), 4: (2, 2), 8: (2, 4)}  # devices -> (data, model), "both"
LAYOUTS = ("batch", "vocab", "both")
F32 = jnp.float32
MIB = float(1 << 20)
K = 64


@dataclasses.dataclass(frozen=True)
class Row:
  """Per-device bytes of one compiled program."""
  workload: str
  layout: str
  devices: int
  temp: int
  arguments: int
  outputs: int

  @property
  def total(self) -> int:
    return self.temp + self.arguments + self.outputs


def mesh_for(layout: str, devices: int) -> jax.sharding.Mesh:
  shape = {"batch": (devices, 1), "vocab": (1, devices), "both": MESHES[devices]}[layout]
  return jax.sharding.Mesh(np.array(jax.devices()[:devices]).reshape(shape), ("data", "model"))


def _plain_kl(a, r):
  lp, lr = jax.nn.log_softmax(a), jax.nn.log_softmax(jax.lax.stop_gradient(r))
  return (jnp.exp(lp) * (lp - lr)).sum(-1)


def workloads(b: int, t: int, v: int, d: int):
  """name -> (function, [(shape, dtype, spec)] of its arguments)."""
  logits, hidden, weight = ((b, t, v), F32, P("data", None, "model")), \
      ((b, t, d), F32, P("data", None, None)), ((d, v), F32, P(None, "model"))
  teacher = [((b, t, K), F32, P("data", None, None)), ((b, t, K), jnp.int32, P("data", None, None)),
             ((b, t), F32, P("data", None))]
  fused_grad = lambda f: jax.grad(f, (0, 1))
  return {
      "kl_per_position": (lambda a, r: ka.kl_per_position(a, r), [logits, logits]),
      "kl_barrier grad": (jax.grad(lambda a, r: ka.kl_barrier(a, r, agg="rmse", tau=0.0)[0]),
                          [logits, logits]),
      "plain jax.numpy barrier grad": (
          jax.grad(lambda a, r: ka.hinge(ka.rmse(_plain_kl(a, r)), 0.0).mean()),
          [logits, logits]),
      "fused_linear_kl grad": (fused_grad(
          lambda h, w, rh, rw: ka.fused_linear_kl(h, w, rh, rw).sum()),
          [hidden, weight, hidden, weight]),
      "fused_linear_kl mean grad": (fused_grad(
          lambda h, w, rh, rw: ka.fused_linear_kl(h, w, rh, rw, reduction="mean")),
          [hidden, weight, hidden, weight]),
      "topk_logprobs": (lambda r: ka.topk_logprobs(r, K), [logits]),
      "kl_topk grad": (jax.grad(lambda a, lp, i, tl: ka.kl_topk(a, lp, i, tl).sum()),
                       [logits, *teacher]),
      "fused_linear_kl_topk mean grad": (fused_grad(
          lambda h, w, lp, i, tl: ka.fused_linear_kl_topk(h, w, lp, i, tl, reduction="mean")),
          [hidden, weight, *teacher]),
  }


def measure(name: str, fn, arg_specs, layout: str, devices: int) -> Row:
  mesh = mesh_for(layout, devices)

  def spec_for(spec):  # a "batch" layout splits no vocabulary, a "vocab" layout no batch
    keep = {"batch": ("data",), "vocab": ("model",), "both": ("data", "model")}[layout]
    return P(*[e if e in keep else None for e in spec])

  args = [jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec_for(spec)))
          for shape, dtype, spec in arg_specs]
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  return Row(name, layout, devices, int(stats.temp_size_in_bytes),
             int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes))


def table(rows: list[Row]) -> str:
  """Total MiB per device at 1, 2, 4, 8 devices, and 8 devices' total over one device's."""
  lines = ["| workload | layout | 1 device | 2 | 4 | 8 | 8 devices / 1 (ideal 0.125) |",
           "|---|---|---:|---:|---:|---:|---:|"]
  keys = list(dict.fromkeys((r.workload, r.layout) for r in rows))
  for workload, layout in keys:
    per = {r.devices: r for r in rows if (r.workload, r.layout) == (workload, layout)}
    cells = " | ".join(f"{per[n].total / MIB:.0f}" for n in MESHES)
    lines.append(f"| {workload} | {layout} | {cells} | "
                 f"{per[8].total / per[1].total:.3f} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--b", type=int, default=8)
  parser.add_argument("--t", type=int, default=1024)
  parser.add_argument("--v", type=int, default=32768)
  parser.add_argument("--d", type=int, default=1024)
  parser.add_argument("--only", default="", help="comma-separated workload names")
  parser.add_argument("--json", help="also write the rows here")
  args = parser.parse_args(argv)
  rows = []
  for name, (fn, arg_specs) in workloads(args.b, args.t, args.v, args.d).items():
    if args.only and name not in args.only.split(","):
      continue
    for layout in LAYOUTS:
      for devices in MESHES:
        rows.append(measure(name, fn, arg_specs, layout, devices))
      print(table([r for r in rows if (r.workload, r.layout) == (name, layout)]).splitlines()[-1],
            flush=True)
  dev = jax.devices()[0]
  print(f"\nklagg_jax {ka.__version__} (commit {git_commit()}), jax {jax.__version__}, "
        f"{dev.platform}, simulated devices; B = {args.b}, T = {args.t}, "
        f"V = {args.v}, D = {args.d}, k = {K}, float32; classic Mesh (Auto axes), jit, no "
        "partition=; MiB per device (temp + arguments + outputs) from memory_analysis().\n")
  print(table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump([dataclasses.asdict(r) | {"total": r.total} for r in rows], f, indent=1)


if __name__ == "__main__":
  main()
