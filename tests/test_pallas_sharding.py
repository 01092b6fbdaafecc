"""The Pallas divergence kernels on 8 simulated devices: one device's answer, no logits moved.

A ``pallas_call`` is opaque to GSPMD; the kernels are wrapped in ``custom_partitioning`` so a
classic (``Auto``) mesh runs them per shard, ``Explicit`` meshes through a ``shard_map`` read off
the inputs' types, and the library's own ``shard_map`` path through ``Spec.vocab_axis``. Each
check compares value and gradients with the unsharded program and reads the compiled HLO: no
data-moving collective (all-gather, all-to-all, collective-permute) at all, and no all-reduce
as large as a logits share.

With fewer than 8 devices this module is one test that reruns it in a child process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; with 8 devices (a pytest run started that
way) the checks run directly.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from helpers import cuda_target
from klagg_jax._chunked import Chunking
from klagg_jax._ops.divergence.base import Spec
from klagg_jax._ops.divergence import pallas as pallas_div
from klagg_jax._ops.divergence.pallas_tiles import Tiles

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHILD = os.environ.get("KLAGG_PALLAS_SHARDING_CHILD") == "1"
N_DEV = 8
N, V = 16, 200
LOGITS_SHARE = N * V // N_DEV
TILES = Tiles(rows=2, vocab=16)  # per shard: >= 3 vocabulary tiles, the last ragged
LAYOUTS = {"batch": ("data", None), "vocab": (None, "model"), "both": ("data", "model")}


if jax.device_count() < N_DEV and not CHILD:

  def test_pallas_kernels_on_8_simulated_devices():
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = dict(os.environ, KLAGG_PALLAS_SHARDING_CHILD="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--tb=short", "-p", "no:cacheprovider",
         "-p", "no:benchmark", "-n", "0", __file__],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]

else:
  pytestmark = pytest.mark.skipif(jax.device_count() < N_DEV, reason="needs 8 devices")

  def make_mesh(axis_type):
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2,
                         devices=jax.devices()[:N_DEV])

  def data(seed=0):
    rng = np.random.default_rng(seed)
    a = (2 * rng.standard_normal((N, V))).astype(np.float32)
    b = (2 * rng.standard_normal((N, V))).astype(np.float32)
    a[:, 7], b[:, 7] = -np.inf, -np.inf
    mask = np.ones(N, bool)
    mask[[2, 9]] = False
    a[2] = np.nan  # masked garbage
    w = rng.standard_normal(N).astype(np.float32)
    return a, b, mask, w

  def spec(direction, vocab_axis=None):
    return Spec(direction=direction, beta=0.3, inv_temperature=1.25, chunks=Chunking(None, V),
                vocab_axis=vocab_axis)

  def loss(direction):
    def f(a, b, mask, w):
      return (pallas_div.divergence_rows(a, b, mask, spec(direction), TILES) * w).sum()
    return jax.value_and_grad(f, (0, 1))

  def moved_and_reduced(hlo: str) -> tuple[list[str], list[int]]:
    """(data-moving collectives, element counts of all-reduce results) in compiled HLO text."""
    moved = re.findall(r"\s(all-gather|all-to-all|collective-permute)(?:-start)?\(", hlo)
    sizes = []
    for m in re.finditer(r"=\s*(.*?)\sall-reduce(?:-start)?\(", hlo):
      for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", m.group(1)):
        sizes.append(int(np.prod([int(d) for d in dims.split(",") if d] or [1])))
    return moved, sizes

  def check(fn, args, want, what):
    compiled = jax.jit(fn).lower(*args).compile()
    moved, sizes = moved_and_reduced(compiled.as_text())
    assert not moved, f"{what}: {moved}"
    assert all(s < LOGITS_SHARE for s in sizes), f"{what}: all-reduce sizes {sizes}"
    got = compiled(*args)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, err_msg=what)
    for g, h, x in zip(got[1], want[1], args):
      np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6, err_msg=what)
      assert g.sharding.is_equivalent_to(x.sharding, 2), what

  def put(mesh, arrays, layout):
    a, b, mask, w = arrays
    logits, rows = NamedSharding(mesh, P(*layout)), NamedSharding(mesh, P(layout[0]))
    return (jax.device_put(a, logits), jax.device_put(b, logits), jax.device_put(mask, rows),
            jax.device_put(w, rows))

  def test_runs_on_8_devices():
    assert jax.device_count() >= N_DEV

  @pytest.mark.parametrize("direction,layout", [("reverse", "batch"), ("reverse", "vocab"),
                                                ("js", "both"), ("forward", "both")])
  def test_classic_mesh_runs_per_shard(direction, layout):
    mesh = make_mesh(AxisType.Auto)
    arrays = data()
    want = jax.jit(loss(direction))(*arrays)
    check(loss(direction), put(mesh, arrays, LAYOUTS[layout]), want, f"{direction} {layout}")

  @pytest.mark.parametrize("layout", ["batch", "both"])
  def test_explicit_mesh_runs_per_shard(layout):
    mesh = make_mesh(AxisType.Explicit)
    arrays = data(1)
    want = jax.jit(loss("reverse"))(*arrays)
    with jax.set_mesh(mesh):
      check(loss("reverse"), put(mesh, arrays, LAYOUTS[layout]), want, f"explicit {layout}")

  def test_inside_shard_map_with_a_vocabulary_axis():
    """The library's sharded path: per-device blocks, statistics merged over ``vocab_axis``."""
    mesh = make_mesh(AxisType.Auto)
    arrays = data(2)
    want = jax.jit(loss("js"))(*arrays)
    logits, rows = P("data", "model"), P("data")

    def local(a, b, mask):
      return pallas_div.divergence_rows(a, b, mask, spec("js", "model"), TILES)

    def f(a, b, mask, w):
      out = jax.shard_map(local, mesh=mesh, in_specs=(logits, logits, rows), out_specs=rows)(
          a, b, mask)
      return (out * w).sum()

    check(jax.value_and_grad(f, (0, 1)), put(mesh, arrays, LAYOUTS["both"]), want, "shard_map")

  def test_shard_map_program_exports_for_cuda_with_the_triton_kernels():
    """Sharded export goes through ``shard_map`` (``custom_partitioning``'s partitioner is a
    host callback, which ``jax.export`` cannot serialize)."""
    mesh = make_mesh(AxisType.Auto)
    n, v = 64, 128256
    local_spec = Spec(direction="reverse", beta=0.5, inv_temperature=1.0,
                      chunks=Chunking(None, v), vocab_axis="model")
    logits, rows = P("data", "model"), P("data")

    def f(a, b, mask):
      local = lambda a, b, m: pallas_div.divergence_rows(a, b, m, local_spec)
      return jax.shard_map(local, mesh=mesh, in_specs=(logits, logits, rows),
                           out_specs=rows)(a, b, mask).mean()

    sds = tuple(jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, p)) for s, d, p in (
        ((n, v), jnp.bfloat16, logits), ((n, v), jnp.bfloat16, logits), ((n,), bool, rows)))
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with cuda_target():
      exported = jax.export.export(jax.jit(jax.value_and_grad(f, (0, 1))), platforms=["cuda"],
                                   disabled_checks=checks)(*sds)
    module = exported.mlir_module()
    assert exported.nr_devices == N_DEV
    assert module.count("__gpu$xla.gpu.triton") == 2
    assert not re.search(r"all[-_]gather|all[-_]to[-_]all|collective[-_]permute", module)
