"""examples/distill_topk.py runs end to end for a few steps, and its table says what it claims."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distill_topk.py"


def test_distill_topk_example_runs_and_tracks_the_true_kl(tmp_path):
  out = tmp_path / "teacher.npz"
  env = {**os.environ, "KLAGG_EXAMPLE_STEPS": "2", "JAX_PLATFORMS": "cpu",  # a checkout, any box
         "PYTHONPATH": os.pathsep.join([str(EXAMPLE.parents[1]), os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.run([sys.executable, str(EXAMPLE), "--out", str(out)], capture_output=True,
                        text=True, env=env, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([-+\d.]+) \|$", proc.stdout, re.M)
  assert [int(r[0]) for r in rows] == [0, 1, 2]
  for _, topk_loss, true_kl, _ in rows:
    assert 0 <= float(topk_loss) <= float(true_kl)  # a lower bound of the full-vocabulary KL
  assert float(rows[-1][1]) < float(rows[0][1])  # training lowers the loss
  assert "132 B" in proc.stdout  # bytes stored per token: 32 x (2 + 2) + 4
  # The teacher's pass from hidden states stores what topk_logprobs of its logits would.
  same = re.search(r"same indices (\w+), max \|difference\| = (\S+)", proc.stdout)
  assert same and same.group(1) == "True" and float(same.group(2)) < 1e-5
  stored = np.load(out)
  assert stored["logprobs"].shape == stored["indices"].shape == (64, 32, 32)
  assert stored["tail"].shape == (64, 32) and stored["tokens"].shape == (64, 32)
