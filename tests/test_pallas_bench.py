"""The benchmark pieces the Pallas kernel adds: spec-bandwidth floors, implementation rows, tiles.

Nothing is timed here; ``make bench-gpu-dry`` runs the sweep and the rows at tiny sizes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _floors  # noqa: E402
import _harness  # noqa: E402
import _workloads  # noqa: E402
import run as bench_run  # noqa: E402

from klagg_jax._ops.divergence import pallas_tiles  # noqa: E402


@pytest.mark.parametrize("kind, want", [
    ("NVIDIA H100 80GB HBM3", (3.35e12, "H100 SXM")),
    ("NVIDIA H200", (4.8e12, "H200")),
    ("NVIDIA A100-SXM4-80GB", (2.0e12, "A100 80GB")),
    ("NVIDIA H100 PCIe", None),
    ("NVIDIA A100-SXM4-40GB", None),
    ("cpu", None),
    (None, None),
])
def test_spec_bandwidth_of_known_cards(kind, want):
  assert _floors.spec_bandwidth(kind) == want


def test_byte_floor_states_the_spec_bandwidth_beside_the_copy():
  params = {"n": 8192, "v": 131072, "dtype": "bf16"}
  rates = _floors.Rates(copy_bytes=1, matmul_size=1, device_kind="NVIDIA H100 80GB HBM3",
                        bandwidth=2.27e12)
  seconds, note = rates.case_floor("kl", params)
  np.testing.assert_allclose(seconds, 2 * 8192 * 131072 * 2 / 2.27e12)
  assert "2270 GB/s (x + 1 pass)" in note
  assert f"{2 * 8192 * 131072 * 2 / 3.35e12 * 1e3:.4g} ms at the H100 SXM's spec 3.35 TB/s" in note
  assert rates.summary()["spec_card"] == "H100 SXM"
  unknown = _floors.Rates(copy_bytes=1, matmul_size=1, device_kind="cpu", bandwidth=1e10)
  assert "spec" not in unknown.case_floor("kl", params)[1]
  assert unknown.summary()["spec_bandwidth_bytes_per_s"] is None


def test_implementation_rows_and_their_absence():
  variants = _workloads.klagg_variants({"xla": True, "implementations": ["xla", "pallas"],
                                        "chunks": [8]})
  assert [s for s, _ in variants] == [" implementation='xla'", " implementation='pallas'",
                                      " chunk_size=8"]
  _workloads.known_implementation({"implementation": "xla"})
  with pytest.raises(_harness.Unavailable, match="not-an-implementation"):
    _workloads.known_implementation({"implementation": "not-an-implementation"})
  cases = bench_run.make_cases(bench_run.GPU_TINY)
  assert all(c.params["implementations"] == ["pallas"] for c in cases
             if c.workload in ("kl", "barrier"))
  kl = _workloads.pallas_entry()
  a = jnp.asarray(np.random.default_rng(0).standard_normal((3, 40)), jnp.float32)
  assert np.all(np.asarray(kl(a, a)) == 0.0)


def test_sweep_json_registers_tile_rows(tmp_path, monkeypatch):
  monkeypatch.setattr(pallas_tiles, "TABLE", {})
  path = tmp_path / "sweep.json"
  tiles = {"rows": 1, "vocab": 8192, "num_warps": 16, "num_stages": 3}
  path.write_text(json.dumps({"table": [{"family": "h100", "vocab_bucket": 262144,
                                         "tiles": tiles}]}))
  assert "1 row(s)" in _workloads.register_pallas_tiles(str(path))
  assert pallas_tiles.lookup("NVIDIA H100 80GB HBM3", 131072) == pallas_tiles.Tiles(**tiles)
  assert pallas_tiles.lookup("NVIDIA H200", 131072) == pallas_tiles.GPU_DEFAULT
  assert "not registered" in _workloads.register_pallas_tiles(str(tmp_path / "missing.json"))
