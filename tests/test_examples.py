"""The examples run end to end (two steps each, in a fresh process) and print their table."""

import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("flax")

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"  # run from a checkout: the subprocess imports klagg_jax from ROOT
STEPS = 2


def run_example(name: str) -> str:
  env = dict(os.environ, KLAGG_EXAMPLE_STEPS=str(STEPS), JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, str(EXAMPLES / name)], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def table_rows(out: str) -> list[list[float]]:
  rows = [line for line in out.splitlines() if re.match(r"\| \d+ \|", line)]
  return [[float(cell) for cell in row.strip("|").split("|")] for row in rows]


@pytest.mark.parametrize("name",
                         ["flax_nnx_heal.py", "fused_heal.py", "gemma_packed_heal.py"])
def test_example_prints_a_finite_per_step_table(name):
  out = run_example(name)
  assert "g_bar/g_nll" in out
  rows = table_rows(out)
  assert [int(r[0]) for r in rows] == list(range(STEPS))
  assert all(math.isfinite(v) for r in rows for v in r)
  # Step 0: the student is the base's copy, so the divergence and the barrier's pull are 0.
  div = rows[0][out.splitlines()[1].split("|").index(" div (rmse) ") - 1]
  assert div == 0.0 and rows[0][-1] == 0.0
  nll = [r[1] for r in rows]
  assert nll[-1] < nll[0]
  if name == "fused_heal.py":
    diff = float(re.search(r"max \|fused - kl_per_position\(logits\)\| = (\S+)", out).group(1))
    assert diff < 1e-5
  if name == "gemma_packed_heal.py":
    capped = re.search(r"max \|fused softcap - kl_per_position\(capped logits\)\| = (\S+)", out)
    packed = re.search(r"max \|packed per-segment rmse - unpacked\| = (\S+)", out)
    assert float(capped.group(1)) < 1e-5 and float(packed.group(1)) < 1e-5
