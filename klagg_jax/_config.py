"""Defaults that depend on the device: one small table, read where the computation is lowered.

The kernels loop over blocks of positions. How many rows a block should hold depends on the
device the inputs live on: on a CPU, a block that stays in the cache across the kernel's passes;
on a GPU or TPU, blocks large enough to fill the device (XLA's GPU fusions stream the rows of a
block without materializing its ``[rows, V]`` temporaries, so the bytes below are a bound on
the *logical* block, not on memory actually allocated).

The choice is made with :func:`jax.lax.platform_dependent`, so it follows the platform the
computation is lowered for (the inputs' devices), not ``jax.default_backend()``: ``topk_logprobs``
run on the host CPU of a GPU machine takes the CPU blocks. When every platform would run the same
plan (small inputs, or a ``chunk_size`` given), one plan is traced and no branch is staged out.

Measurements behind the numbers (BENCHMARKS.md has the tables):

* CPU (a 2-core AMD EPYC; ``benchmarks/results/grid/cpu-2026-11-24.md``): 2 MiB float32 blocks
  for the divergences (a block that fits L2 across the passes: 2.8x faster than jax.numpy at
  N=2048, V=32768); 32 MiB for the fused head, whose blocks feed matmuls (256-row chunks at
  V=32768 were 2x faster than 64-row ones in a sweep with no committed result file).
* GPU (an H200, N=8192, V=131072, bf16; quoted from measurements with no committed result file):
  128-row blocks were the slowest of six sizes tried; every size from 512 rows up was faster, and
  one block of all 8192 rows gave the fastest gradient (3.9 ms against 5.5 ms at 2048 rows, 16 MiB
  of temp). The committed H100 run agrees (``benchmarks/results/gpu/``: the barrier gradient at
  8192-row blocks 5.2 ms, at 512 rows 7.2 ms). Hence a 4 GiB logical budget: one block up to
  N * V = 2^30.
* GPU, fused LM head (an H100, Liger-Kernel's setting: N=8192, D=4096, V=128256, bf16, JSD,
  reduction="mean"; ``benchmarks/results/gpu/nvidia-h100-80gb-hbm3-2026-11-27.md`` and
  ``benchmarks/results/gpu/fused-sweep-h100-2026-11-27.md``): 1024-row blocks took 74.4 ms with
  3.0 GB of temp, 2048 rows 73.5 ms with 4.0 GB, one block 68.2 ms with 12.0 GB (Liger-Kernel:
  128 ms); in a second run 1024 rows took 73.0 ms and 2048 68.2. Hence 640 MiB logical blocks:
  1024 rows at V=128k, 1 GiB less temp for about 7 % of the time.
* CPU, whole-array KL (``benchmarks/results/default-vs-plain-cpu-*.md``): from 4096 rows up,
  XLA:CPU compiles a softmax-and-reduce expression over ``[N, V]`` with no select and one output
  into a single YNNPACK fusion that streams the rows (0 bytes of temp); below that, and for any
  expression with a select, it emits one loop per reduction. There the block loop (about 4 ns
  per entry pair at every V) took 1.4x to 2x the time of plain jax.numpy (about 2 ns) at
  N=32768, V=4096; the select-free expression took 1.04x (value) and 0.94x (gradient).
* TPU: unmeasured; the GPU's reasoning (large blocks, fused streaming) is assumed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import jax

_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True)
class PlatformConfig:
  """Block sizes and workarounds for one platform.

  Attributes:
    name: the platform's name, as ``jax.lax.platform_dependent`` knows it.
    block_bytes: bytes of one logical float32 ``[rows, V]`` block of the divergence kernels.
    fused_block_bytes: the same for the fused LM-head kernels (their blocks feed matmuls).
    int_view_16bit: slice and store 16-bit floats through a same-width integer view (XLA:CPU
      converts a whole bf16 operand to float32 to slice it, and a whole bf16 buffer to update it).
    whole_min_rows: from this many rows up, the KL kernels without a soft-cap run as one
      whole-array expression with no select, which the compiler streams in one fused pass (no
      ``[N, V]`` temporary): ``"chunked"`` instead of its row-block loop, ``"xla"`` instead of
      its exact formulas; None: never. A row whose result is NaN there (a NaN, an ``-inf``
      entry, masked garbage) sends ``"chunked"``'s whole call to the loop and ``"xla"``'s row
      to the exact formulas, which keep the conventions.
  """
  name: str
  block_bytes: int
  fused_block_bytes: int
  int_view_16bit: bool = False
  whole_min_rows: int | None = None

  def rows(self, vocab: int, *, fused: bool = False) -> int:
    """Rows of a ``[rows, vocab]`` float32 block within this platform's budget (at least 1)."""
    budget = self.fused_block_bytes if fused else self.block_bytes
    return max(1, budget // (4 * max(vocab, 1)))


CPU = PlatformConfig("cpu", block_bytes=1 << 21, fused_block_bytes=1 << 25, int_view_16bit=True,
                     whole_min_rows=4096)
GPU = PlatformConfig("gpu", block_bytes=1 << 32, fused_block_bytes=5 << 27)
TPU = PlatformConfig("tpu", block_bytes=1 << 32, fused_block_bytes=5 << 27)

# Platform names as the lowering knows them; anything else takes the GPU's reasoning.
PLATFORMS: dict[str, PlatformConfig] = {"cpu": CPU, "cuda": GPU, "rocm": GPU, "tpu": TPU}
DEFAULT = GPU


# Which implementation ``implementation=None`` runs, per platform and op: the first of the list
# that can run (klagg_jax._ops.registry). Only memory-bounded implementations belong here (never
# one that holds [N, V] float32 residuals, as "xla" does): "chunked" was the faster of the two
# wherever measured (CPU; GPU at the device-sized blocks above). A "pallas" kernel goes first on
# the platforms it supports.
ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "cpu": {"divergence": ("chunked",), "topk": ("chunked",), "fused": ("chunked",)},
    "gpu": {"divergence": ("chunked",), "topk": ("chunked",), "fused": ("chunked",)},
    "tpu": {"divergence": ("chunked",), "topk": ("chunked",), "fused": ("chunked",)},
}


def implementations(op: str, config: PlatformConfig, *,
                    available: tuple[str, ...]) -> tuple[str, ...]:
  """The default order of ``op``'s implementations on ``config``'s platform (registered only)."""
  return tuple(name for name in ORDER[config.name][op] if name in available)


def per_platform(plan: Callable[[PlatformConfig], Hashable],
                 run: Callable[..., _T], *args: Any) -> _T:
  """``run(plan(config), *args)`` for the config of the platform the computation is lowered for.

  Platforms whose plans are equal share one traced branch; when all are equal no branch is
  staged out at all.

  Args:
    plan: maps a platform's config to a hashable plan (e.g. a chunk size).
    run: ``run(plan, *args)``, traced once per distinct plan.
    *args: arrays (pytrees) passed to ``run``.

  Returns:
    What ``run`` returns (every plan's branch must return the same types).
  """
  plans = {name: plan(cfg) for name, cfg in PLATFORMS.items()}
  default_plan = plan(DEFAULT)
  distinct = set(plans.values()) | {default_plan}
  if len(distinct) == 1:
    return run(default_plan, *args)
  branch = {p: functools.partial(run, p) for p in distinct}
  return jax.lax.platform_dependent(*args, default=branch[default_plan],
                                    **{name: branch[p] for name, p in plans.items()})


def whole_or_blocked(n: int, whole: Callable[..., _T], blocked: Callable[..., _T],
                     *args: Any) -> _T:
  """``whole(*args)`` on platforms whose ``whole_min_rows`` admits ``n`` rows, else ``blocked``.

  The one rule for the whole-array (select-free, streamed) KL expressions, shared by the
  implementations that have one.
  """
  def plan(config: PlatformConfig) -> bool:
    return config.whole_min_rows is not None and n >= config.whole_min_rows

  return per_platform(plan, lambda use_whole, *xs: (whole if use_whole else blocked)(*xs), *args)
