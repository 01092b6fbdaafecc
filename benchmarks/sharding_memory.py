"""Per-device memory of the sharded kernels on 1, 2, 4 and 8 simulated devices, at one global shape.

Compile only: the inputs are ``jax.ShapeDtypeStruct``s carrying their ``NamedSharding``, so
nothing is allocated, and every number is XLA's ``memory_analysis()`` of the compiled SPMD
program, which describes one device. The mesh is ``data x model`` (1x1, 1x2, 2x2, 2x4); the batch
is split over ``data`` and the vocabulary over ``model``. Workloads, float32:

* ``kl_barrier`` gradient (rmse, ``axis=-1``) with respect to the student logits ``[B, T, V]``.
  Its ``[N, V]`` gradient is an output and its inputs are arguments: those fall as 1/devices.
  Its temp is the kernel's ``[chunk, V / model]`` blocks, whose rows are chosen to keep a block
  at a fixed byte budget: a small per-device constant by design, not a share of ``[N, V]``.
* For contrast, the same gradient written in plain ``jax.numpy`` (two ``log_softmax``, an
  ``exp``, a product, a sum) and partitioned by GSPMD: its ``[N, V]`` temporaries are split
  like its inputs, so its temp falls as 1/devices from a much higher start.
* And ``kl_barrier`` partitioned by GSPMD alone (``Auto`` axes, no ``partition=``): its chunk
  loop slices the batch-sharded position axis at a traced offset, so GSPMD all-gathers the
  logits first, which shows up as temp: the reason the library partitions with ``shard_map``.
* ``fused_linear_kl`` gradient with respect to ``hidden [B, T, D]`` and the LM-head ``weight
  [D, V]``, sharded over ``model`` (a tensor-parallel head) and replicated over ``data``, as in
  data parallelism: weight-sized memory (the weights, the weight gradient and its float32
  accumulator in temp) falls with the ``model`` axis only, hidden-sized memory with ``data``.
  The rows "tensor-parallel only" use a ``1 x devices`` mesh, where all of it falls.

The simulated devices are set up before JAX is imported, so run this file directly:

    python benchmarks/sharding_memory.py [--n 8192] [--v 32768] [--d 1024] [--json out.json]
"""

from __future__ import annotations

import os
import sys

if "jax" in sys.modules:
  raise RuntimeError("benchmarks/sharding_memory.py must set up its devices before JAX is "
                     "imported: run it as a script.")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import klagg_jax as ka  # noqa: E402

MESHES = {1: (1, 1), 2: (1, 2), 4: (2, 2), 8: (2, 4)}  # devices -> (data, model)
F32 = jnp.float32
MIB = float(1 << 20)


@dataclasses.dataclass(frozen=True)
class Row:
  """Per-device bytes of one compiled program."""
  workload: str
  devices: int
  mesh: str
  temp: int
  arguments: int
  outputs: int

  @property
  def total(self) -> int:
    return self.temp + self.arguments + self.outputs


def _memory(fn, args, workload: str, devices: int, mesh: str) -> Row:
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  return Row(workload, devices, mesh, int(stats.temp_size_in_bytes),
             int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes))


def _mesh(devices: int, auto: bool = False) -> jax.sharding.Mesh:
  kind = AxisType.Auto if auto else AxisType.Explicit
  return jax.make_mesh(MESHES[devices], ("data", "model"), axis_types=(kind, kind),
                       devices=jax.devices()[:devices])


def _struct(shape, mesh, spec):
  return jax.ShapeDtypeStruct(shape, F32, sharding=NamedSharding(mesh, spec))


def _plain_kl(a, r):
  lp, lr = jax.nn.log_softmax(a), jax.nn.log_softmax(jax.lax.stop_gradient(r))
  return (jnp.exp(lp) * (lp - lr)).sum(-1)


def barrier_rows(devices: int, b: int, t: int, v: int) -> list[Row]:
  """``kl_barrier`` gradient (explicit axes: shard_map), plain jax.numpy, and GSPMD alone."""
  label = "x".join(map(str, MESHES[devices]))
  rows = []
  for name, auto in (("kl_barrier grad", False), ("plain jax.numpy grad, GSPMD", True),
                     ("kl_barrier grad, GSPMD alone (Auto axes)", True)):
    mesh = _mesh(devices, auto)
    logits = _struct((b, t, v), mesh, P("data", None, "model"))
    if name.startswith("plain"):
      loss = lambda a, r: ka.hinge(ka.rmse(_plain_kl(a, r)), 0.0).mean()
    else:
      loss = lambda a, r: ka.kl_barrier(a, r, agg="rmse", tau=0.0)[0]
    rows.append(_memory(jax.grad(loss), (logits, logits), name, devices, label))
  return rows


def fused_rows(devices: int, b: int, t: int, d: int, v: int) -> list[Row]:
  """``fused_linear_kl`` gradient with respect to hidden and a vocabulary-sharded weight."""
  rows = []
  for name, shape in (("fused_linear_kl grad (hidden, weight)", MESHES[devices]),
                      ("fused_linear_kl grad, tensor-parallel only", (1, devices))):
    mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Explicit,) * 2,
                         devices=jax.devices()[:devices])
    hidden = _struct((b, t, d), mesh, P("data", None, None))
    weight = _struct((d, v), mesh, P(None, "model"))

    def grad(h, w, rh, rw):
      return jax.grad(lambda h, w: ka.fused_linear_kl(h, w, rh, rw).sum(), (0, 1))(h, w)

    rows.append(_memory(grad, (hidden, weight, hidden, weight), name, devices,
                        "x".join(map(str, shape))))
  return rows


def table(rows: list[Row]) -> str:
  """A markdown table with MiB per device and the total relative to one device."""
  lines = ["| workload | devices | mesh (data x model) | temp | arguments | outputs | total | "
           "total x devices / total at 1 |", "|---|---|---|---|---|---|---|---|"]
  base = {r.workload: r.total for r in rows if r.devices == 1}
  for r in rows:
    scaled = r.total * r.devices / base[r.workload]
    lines.append(f"| {r.workload} | {r.devices} | {r.mesh} | {r.temp / MIB:.1f} MiB | "
                 f"{r.arguments / MIB:.1f} MiB | {r.outputs / MIB:.1f} MiB | "
                 f"{r.total / MIB:.1f} MiB | {scaled:.2f} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=8192, help="positions B * T (B = 8)")
  parser.add_argument("--v", type=int, default=32768, help="vocabulary size")
  parser.add_argument("--d", type=int, default=1024, help="hidden size (fused_linear_kl)")
  parser.add_argument("--json", help="also write the rows here")
  args = parser.parse_args(argv)
  b = 8
  t = args.n // b
  rows = []
  for devices in MESHES:
    rows += barrier_rows(devices, b, t, args.v)
  for devices in MESHES:
    rows += fused_rows(devices, b, t, args.d, args.v)
  order = list(dict.fromkeys(r.workload for r in rows))
  rows.sort(key=lambda r: (order.index(r.workload), r.devices))
  dev = jax.devices()[0]
  print(f"jax {jax.__version__}, {dev.platform} ({dev.device_kind}), simulated devices; "
        f"B = {b}, T = {t}, V = {args.v}, D = {args.d}, float32; per-device bytes from "
        "memory_analysis().\n")
  print(table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump([dataclasses.asdict(r) | {"total": r.total} for r in rows], f, indent=1)


if __name__ == "__main__":
  main()
