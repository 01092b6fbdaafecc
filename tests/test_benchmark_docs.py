"""Numbers in the docs trace to committed result files, and result files say what they measured.

- Every number in BENCHMARKS.md's lead tables (one per device) occurs in the result file the
  paragraph above the table names.
- Every committed result of ``run.py`` records the klagg_jax version and the git commit (or says
  the commit is unknown); the harness writes both, "unknown" outside a git checkout.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e[+-]?\d+)?(?![\w.])")
RESULT_FILE = re.compile(r"`(benchmarks/results/[\w./-]+\.md)`")


def lead_tables() -> list[tuple[str, list[str]]]:
  """(result file, table lines) for each table of BENCHMARKS.md's first section."""
  text = (ROOT / "BENCHMARKS.md").read_text()
  lead = text.split("\n## ", 2)[1]
  assert lead.startswith("Latest results"), lead[:40]
  tables, named = [], None
  for para in lead.split("\n\n"):
    lines = para.strip().splitlines()
    if lines and all(ln.startswith("|") for ln in lines):
      assert named, f"a lead table names no result file above it: {lines[0]}"
      tables.append((named, lines))
      named = None
    else:
      found = RESULT_FILE.findall(para)
      named = found[0] if found else named
  return tables


def test_benchmarks_leads_with_one_table_per_device_each_naming_its_file():
  tables = lead_tables()
  files = [f for f, _ in tables]
  assert len(tables) >= 2 and len(set(files)) == len(files), files
  assert any("/gpu/" in f for f in files) and any("cpu-" in f for f in files), files


@pytest.mark.parametrize("result, lines", lead_tables(), ids=[f for f, _ in lead_tables()])
def test_lead_table_numbers_occur_in_their_result_file(result, lines):
  source = set(NUMBER.findall((ROOT / result).read_text()))
  for line in lines[2:]:
    cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
    for cell in cells[1:]:  # the first cell is the case's label
      missing = [n for n in NUMBER.findall(cell) if n not in source]
      assert not missing, f"{result} has no {missing} (BENCHMARKS.md: {line})"


def run_results() -> list[pathlib.Path]:
  return sorted(p for p in RESULTS.rglob("*.json") if isinstance(json.loads(p.read_text()), dict))


@pytest.mark.parametrize("path", run_results(), ids=lambda p: str(p.relative_to(RESULTS)))
def test_committed_results_record_version_and_commit(path):
  env = json.loads(path.read_text())["env"]
  assert env.get("klagg_jax") not in (None, "None", ""), env.get("klagg_jax")
  assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", env.get("git_commit", "")), env
  header = path.with_suffix(".md").read_text().split("\n", 3)[:3]
  assert any(re.search(r"klagg_jax \S+ \(commit ", ln) for ln in header), header


def test_every_result_file_is_in_the_index():
  index = (RESULTS / "README.md").read_text()
  for path in RESULTS.rglob("*"):
    if path.is_file() and path.name != "README.md":
      stem = path.relative_to(RESULTS).as_posix().rsplit(".", 1)[0]
      assert stem in index, f"benchmarks/results/README.md does not list {stem}"


def test_harness_records_version_and_commit(tmp_path):
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    import _harness as H
  finally:
    sys.path.remove(str(ROOT / "benchmarks"))
  import klagg_jax

  assert H.klagg_version() == klagg_jax.__version__
  assert H.git_commit(tmp_path) == "unknown"  # not a git checkout
  head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                        text=True)
  if head.returncode == 0:
    assert H.git_commit().split("+")[0] == head.stdout.strip()
  else:
    assert H.git_commit() == "unknown"
