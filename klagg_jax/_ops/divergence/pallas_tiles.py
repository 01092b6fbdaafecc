"""Tile sizes for the Pallas divergence kernels, as data: a small table with safe defaults.

A kernel program owns ``rows`` rows and walks the vocabulary in tiles of ``vocab`` entries; on
GPU, ``num_warps`` and ``num_stages`` go to Triton. The table is keyed on a device-kind family
and a vocabulary bucket, and ``benchmarks/pallas_sweep.py`` writes rows in its format. Every
size is a power of two, as Triton's block shapes must be; the TPU kernels align them to Mosaic's
``(16, 128)`` tile (or take a whole short axis) at call time. Only measured rows enter
``TABLE``: until a GPU sweep is recorded it is empty and the defaults below apply.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Block sizes of one Pallas divergence call (hashable: a static argument).

  Attributes:
    rows: rows per program (a power of two); the last program's rows past N are masked.
    vocab: vocabulary entries per tile (a power of two); the last tile past V is masked.
    num_warps: Triton warps per program (GPU only).
    num_stages: Triton software-pipelining stages of the vocabulary loop (GPU only).
  """
  rows: int = 1
  vocab: int = 4096
  num_warps: int = 8
  num_stages: int = 2

  def __post_init__(self) -> None:
    for name in ("rows", "vocab", "num_warps"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"Tiles.{name} must be a positive power of two; got {value!r}.")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"Tiles.num_stages must be a positive int; got {self.num_stages!r}.")

  def fit(self, n: int, v: int) -> "Tiles":
    """The same tiles, shrunk to the next power of two at or above ``n`` rows and ``v`` entries."""
    return dataclasses.replace(self, rows=min(self.rows, _pow2_at_least(n)),
                               vocab=min(self.vocab, _pow2_at_least(v)))


def _pow2_at_least(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


# Vocabulary buckets: the smallest bucket whose bound is >= V.
VOCAB_BUCKETS = (4096, 32768, 262144, None)

# (device-kind family, vocabulary bucket) -> Tiles. Unmeasured rows are the defaults below;
# measured ones come from benchmarks/pallas_sweep.py (its JSON output lists rows in this form).
TABLE: dict[tuple[str, int | None], Tiles] = {}

# Safe defaults per family: small enough for any GPU's registers at float32, large enough that
# a tile is several KB per row.
GPU_DEFAULT = Tiles(rows=1, vocab=4096, num_warps=8, num_stages=2)
# Mosaic (TPU): 64 x 2048 blocks, aligned to the bfloat16 (16, 128) tile; a few MiB of VMEM
# with their float32 temporaries. Unmeasured. (Warps and stages are Triton's: unused.)
TPU_DEFAULT = Tiles(rows=64, vocab=2048, num_warps=1, num_stages=1)
# The interpreter runs one grid step per loop iteration: fewer, larger steps are faster.
INTERPRET_DEFAULT = Tiles(rows=8, vocab=2048, num_warps=1, num_stages=1)


def family(device_kind: str) -> str:
  """A table key from a device kind: ``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``."""
  kind = device_kind.lower()
  for name in ("h200", "h100", "a100", "l40s", "b200", "gb200"):
    if name in kind:
      return name
  return "gpu"


def vocab_bucket(v: int) -> int | None:
  for bound in VOCAB_BUCKETS:
    if bound is None or v <= bound:
      return bound
  return None


def lookup(device_kind: str | None, v: int, *, interpret: bool = False,
           tpu: bool = False) -> Tiles:
  """Tiles for a call over ``v`` vocabulary entries on ``device_kind`` (None: unknown GPU).

  Args:
    device_kind: ``jax.Device.device_kind`` of the GPU the kernel runs on, or None.
    v: the vocabulary size the kernel sees (per shard when sharded).
    interpret: the CPU interpreter's tiles instead of a GPU's.
    tpu: the Mosaic kernels' tiles.

  Returns:
    The table's row for the device family and vocabulary bucket, else the family default.
  """
  if interpret:
    return INTERPRET_DEFAULT
  if tpu:
    return TABLE.get(("tpu", vocab_bucket(v)), TPU_DEFAULT)
  key = (family(device_kind or ""), vocab_bucket(v))
  return TABLE.get(key, GPU_DEFAULT)
