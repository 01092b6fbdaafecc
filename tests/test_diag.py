"""The synthetic study's table (a 4-token loop in 60 positions): python -m klagg_jax.diag."""

import subprocess
import sys

import pytest

from klagg_jax import diag

SEED = {"incoherent loop": {"mean": 0.379, "rmse": 1.527, "p95": 3.777, "max": 8.081},
        "sep ratio (loop/trait)": {"mean": 20.6, "rmse": 57.7, "p95": 77.0, "max": 85.4}}


def test_reproduces_the_seed_table():
  rows = diag.table(diag.per_position_kl())
  for name, cols in SEED.items():
    digits = 1 if name.startswith("sep") else 3
    for col, want in cols.items():
      assert round(rows[name][col], digits) == want, (name, col, rows[name][col])
  fired = lambda name: [c for c in diag.COLUMNS if rows[name][c] > 0.5]
  assert fired("coherent trait") == []
  assert "mean" not in fired("incoherent loop") and "rmse" in fired("incoherent loop")


def test_cli_prints_table_and_writes_plot(tmp_path):
  pytest.importorskip("matplotlib")
  png = tmp_path / "diag.png"
  out = subprocess.run([sys.executable, "-m", "klagg_jax.diag", "--tau", "1.0", "--plot", str(png)],
                       check=True, capture_output=True, text=True).stdout
  assert "| incoherent loop | 0.379 | 1.527 | 3.777 | 8.081 |" in out
  assert "20.6x | 57.7x | 77.0x | 85.4x" in out
  assert "tau = 1" in out
  assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_readme_quotes_the_current_table():
  import pathlib
  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  table = diag.render(diag.table(diag.per_position_kl()), 0.5).split("\n\n")[0]
  for row in table.splitlines()[2:]:
    assert row in readme, row


def test_table_refuses_an_array_that_spans_processes():
  """The table is read back to this host: an array with shards on other processes (here a
  stand-in: one process cannot build one) gets an error saying what to gather."""

  class GlobalArray:
    is_fully_addressable = False

  kl = diag.per_position_kl()
  kl["incoherent loop"] = GlobalArray()
  with pytest.raises(ValueError, match="spans several processes.*process_allgather"):
    diag.table(kl)
