"""The release path: the version comes from the package metadata, and the artifact checks bite.

The wheel itself is built, installed into a fresh venv and run by ``make dist-check`` (a CI step
after the suite, ``tools/check_dist.py``); here its content rules are checked on made-up archive
listings, so a rule that lets a test folder into the wheel fails here.
"""

import importlib.metadata
import importlib.util
import pathlib
import re
import tomllib

import pytest

import klagg_jax as ka
from klagg_jax import _version

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
VERSION = tomllib.loads(PYPROJECT.read_text())["project"]["version"]


def load_check_dist():
  spec = importlib.util.spec_from_file_location("check_dist", ROOT / "tools" / "check_dist.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


check_dist = load_check_dist()

GOOD_WHEEL = [
    "klagg_jax/__init__.py", "klagg_jax/_barrier.py", "klagg_jax/py.typed",
    f"klagg_jax-{VERSION}.dist-info/METADATA", f"klagg_jax-{VERSION}.dist-info/WHEEL",
    f"klagg_jax-{VERSION}.dist-info/RECORD",
]
SDIST_ROOT = f"klagg_jax-{VERSION}"
GOOD_SDIST = [SDIST_ROOT] + [f"{SDIST_ROOT}/{name}" for name in (
    "PKG-INFO", "README.md", "pyproject.toml", "setup.cfg", "MANIFEST.in", "klagg_jax",
    "klagg_jax/__init__.py", "klagg_jax/py.typed", "klagg_jax.egg-info/PKG-INFO")]


def test_version_is_the_installed_metadata_version():
  try:
    installed = importlib.metadata.version("klagg-jax")
  except importlib.metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
    installed = VERSION
  assert ka.__version__ == installed
  assert re.fullmatch(r"\d+(\.\d+)*([ab]|rc)?\d*(\.post\d+)?(\.dev\d+)?(\+[\w.]+)?",
                      ka.__version__)


def test_version_falls_back_to_pyproject_in_an_uninstalled_source_tree():
  assert _version.find_version("klagg-jax-not-installed", PYPROJECT) == VERSION


def test_version_reads_the_project_table_not_another_tables_version(tmp_path):
  pyproject = tmp_path / "pyproject.toml"
  pyproject.write_text('[tool.other]\nversion = "9.9"\n\n[project]\nname = "x"\nversion = "1.2.3"\n'
                       '\n[tool.more]\nversion = "8.8"\n')
  assert _version.find_version("klagg-jax-not-installed", pyproject) == "1.2.3"


@pytest.mark.parametrize("content", [None, "", '[project]\nname = "x"\n', 'version = "1.0"\n'])
def test_version_is_unknown_without_metadata_or_project_version(tmp_path, content):
  pyproject = tmp_path / "pyproject.toml"
  if content is not None:
    pyproject.write_text(content)
  assert _version.find_version("klagg-jax-not-installed", pyproject) == "0+unknown"
  assert _version.find_version("klagg-jax-not-installed", None) == "0+unknown"


def test_check_dist_reads_the_pyproject_version():
  assert check_dist.project_version(PYPROJECT) == VERSION


def test_wheel_rules_accept_the_package_and_its_metadata():
  assert check_dist.wheel_problems(GOOD_WHEEL, VERSION) == []


@pytest.mark.parametrize("extra", ["tests/test_api.py", "benchmarks/run.py",
                                   "experiments/loops/run.py", "examples/fused_heal.py",
                                   "klagg_jax/tests/test_x.py", "conftest.py"])
def test_wheel_rules_reject_tests_benchmarks_experiments_and_strays(extra):
  problems = check_dist.wheel_problems(GOOD_WHEEL + [extra], VERSION)
  assert len(problems) == 1 and extra in problems[0]


def test_wheel_rules_require_py_typed():
  problems = check_dist.wheel_problems([n for n in GOOD_WHEEL if "py.typed" not in n], VERSION)
  assert problems == ["wheel lacks klagg_jax/py.typed"]


def test_sdist_rules_accept_the_library_and_reject_tests():
  assert check_dist.sdist_problems(GOOD_SDIST, VERSION) == []
  problems = check_dist.sdist_problems(GOOD_SDIST + [f"{SDIST_ROOT}/tests/test_api.py"], VERSION)
  assert len(problems) == 1 and "tests/test_api.py" in problems[0]
  problems = check_dist.sdist_problems([n for n in GOOD_SDIST if not n.endswith("README.md")],
                                       VERSION)
  assert problems == [f"sdist lacks {SDIST_ROOT}/README.md"]


def test_package_data_ships_py_typed():
  assert (ROOT / "klagg_jax" / "py.typed").is_file()
  assert "py.typed" in tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"][
      "package-data"]["klagg_jax"]


def test_every_module_compiles_without_warnings():
  """Invalid escapes in docstrings (``\\m`` of LaTeX) warn on Python 3.11 and are a
  SyntaxWarning from 3.12 on: an error where warnings are errors. Math docstrings are raw."""
  import warnings
  root = pathlib.Path(__file__).resolve().parents[1]
  for path in sorted((root / "klagg_jax").rglob("*.py")):
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      compile(path.read_text(), str(path), "exec")
