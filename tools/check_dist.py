"""Checks the release artifacts in dist/: contents, then a clean install of the wheel that runs.

    python tools/check_dist.py [--dist dist] [--keep]

1. Exactly one wheel and one sdist of the version that ``pyproject.toml`` states.
2. The wheel holds the package and its metadata only: ``klagg_jax/py.typed`` is there, and no
   ``tests/``, ``benchmarks/``, ``experiments/`` or ``examples/``. The sdist holds the package,
   ``pyproject.toml`` and ``README.md``, and none of those four folders either (they live in the
   repository: their tests read the README, the benchmarks and the examples, which an sdist of
   the library does not carry).
3. A fresh virtual environment in a temporary folder outside the source tree, the wheel
   installed into it by pip with its declared dependencies (so a dependency missing from the
   metadata fails here), then, from that folder in isolated mode (``python -I``: no PYTHONPATH,
   no current directory on ``sys.path``), a smoke run: ``klagg_jax`` is imported from that
   environment's site-packages (not from this checkout), ``__version__`` is the wheel's,
   ``py.typed`` sits beside it, and a jitted ``kl_barrier`` matches a float64 numpy computation
   of the same loss.

Prints the time of each step; exits non-zero with the reason on the first failure.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterable

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "klagg_jax"
NOT_SHIPPED = ("tests", "benchmarks", "experiments", "examples")

SMOKE = r"""
import pathlib, sys, sysconfig
import numpy as np
import jax
import jax.numpy as jnp
import klagg_jax as ka

site = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()
pkg = pathlib.Path(ka.__file__).resolve().parent
assert pkg.parent == site, f"klagg_jax imported from {pkg}, not from {site}"
assert (pkg / "py.typed").is_file(), "py.typed missing from the installed package"
assert ka.__version__ == sys.argv[1], (ka.__version__, sys.argv[1])

rng = np.random.default_rng(0)
logits, ref = rng.normal(size=(2, 2, 5, 11)) * 2.0
mask = np.arange(5) < np.array([[5], [3]])
loss, metrics = jax.jit(lambda a, b, m: ka.kl_barrier(a, b, where=m, agg="rmse", tau=0.2,
                                                      lam=2.0))(
    jnp.asarray(logits, jnp.float32), jnp.asarray(ref, jnp.float32), mask)

def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))

lp, lr = log_softmax(logits), log_softmax(ref)
kl = (np.exp(lp) * (lp - lr)).sum(-1)                       # [2, 5], KL(student || ref)
rmse = [np.sqrt(np.mean(kl[s][mask[s]] ** 2) + 1e-8) for s in range(2)]
want = 2.0 * np.mean([max(r - 0.2, 0.0) for r in rmse])
assert want > 0 and abs(float(loss) - want) <= 1e-4 * want, (float(loss), want)
print(f"klagg_jax {ka.__version__} from {pkg}: jit(kl_barrier) = {float(loss):.6f} "
      f"(float64 numpy {want:.6f}); jax {jax.__version__} on {jax.devices()[0].platform}")
"""


def project_version(pyproject: pathlib.Path = ROOT / "pyproject.toml") -> str:
  """``[project] version`` of ``pyproject``."""
  text = pyproject.read_text(encoding="utf-8")
  project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, flags=re.M | re.S)
  found = project and re.search(r"^version\s*=\s*[\"']([^\"']+)[\"']", project.group(1), re.M)
  if not found:
    raise SystemExit(f"no [project] version in {pyproject}")
  return found.group(1)


def wheel_problems(names: Iterable[str], version: str) -> list[str]:
  """What is wrong with a wheel whose archive holds ``names``; empty when nothing is."""
  names = list(names)
  dist_info = f"{PACKAGE}-{version}.dist-info/"
  problems = []
  for required in (f"{PACKAGE}/__init__.py", f"{PACKAGE}/py.typed", dist_info + "METADATA"):
    if required not in names:
      problems.append(f"wheel lacks {required}")
  for name in names:
    top = name.split("/", 1)[0]
    if top not in (PACKAGE, dist_info.rstrip("/")):
      problems.append(f"wheel carries {name} (only {PACKAGE}/ and its dist-info belong)")
    elif any(part in NOT_SHIPPED for part in name.split("/")[:-1]):
      problems.append(f"wheel carries {name}")
  return problems


def sdist_problems(names: Iterable[str], version: str) -> list[str]:
  """What is wrong with an sdist whose archive holds ``names``; empty when nothing is."""
  names = list(names)
  root = f"{PACKAGE}-{version}/"
  problems = []
  for required in ("pyproject.toml", "README.md", f"{PACKAGE}/__init__.py", f"{PACKAGE}/py.typed"):
    if root + required not in names:
      problems.append(f"sdist lacks {root + required}")
  for name in names:
    if not name.startswith(root) and name != root.rstrip("/"):
      problems.append(f"sdist member {name} is outside {root}")
    elif any(part in NOT_SHIPPED for part in name[len(root):].split("/")):
      problems.append(f"sdist carries {name}")
  return problems


def run(cmd: list[str], **kwargs) -> None:
  proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
  if proc.returncode != 0:
    raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
  if proc.stdout.strip():
    print(proc.stdout.rstrip())


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--dist", type=pathlib.Path, default=ROOT / "dist")
  parser.add_argument("--keep", action="store_true", help="keep the temporary environment")
  args = parser.parse_args(argv)
  version = project_version()
  wheels = sorted(args.dist.glob(f"{PACKAGE}-*.whl"))
  sdists = sorted(args.dist.glob(f"{PACKAGE}-*.tar.gz"))
  expected = (f"{PACKAGE}-{version}-py3-none-any.whl", f"{PACKAGE}-{version}.tar.gz")
  if [p.name for p in wheels] != [expected[0]] or [p.name for p in sdists] != [expected[1]]:
    raise SystemExit(f"expected exactly {expected} in {args.dist}; found "
                     f"{[p.name for p in wheels + sdists]} (run make dist)")
  wheel, sdist = wheels[0], sdists[0]

  with zipfile.ZipFile(wheel) as z:
    problems = wheel_problems(z.namelist(), version)
  with tarfile.open(sdist) as t:
    problems += sdist_problems(t.getnames(), version)
  if problems:
    raise SystemExit("\n".join(problems))
  print(f"contents ok: {wheel.name} ({wheel.stat().st_size // 1024} KiB), "
        f"{sdist.name} ({sdist.stat().st_size // 1024} KiB)")

  work = pathlib.Path(tempfile.mkdtemp(prefix="klagg-wheel-"))
  if work.resolve().is_relative_to(ROOT):
    raise SystemExit(f"temporary folder {work} is inside the source tree {ROOT}")
  venv = work / "venv"
  py = venv / "bin" / "python"
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME",
                                                            "VIRTUAL_ENV")}
  env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
  try:
    t0 = time.perf_counter()
    run([sys.executable, "-m", "venv", str(venv)], cwd=work, env=env)
    t1 = time.perf_counter()
    run([str(py), "-m", "pip", "install", "--quiet", str(wheel.resolve())],
        cwd=work, env=env)
    t2 = time.perf_counter()
    run([str(py), "-I", "-c", SMOKE, version], cwd=work, env=env)
    t3 = time.perf_counter()
  finally:
    if args.keep:
      print(f"kept {venv}")
    else:
      shutil.rmtree(work, ignore_errors=True)
  print(f"fresh venv {t1 - t0:.1f} s, pip install of the wheel and its dependencies "
        f"{t2 - t1:.1f} s, smoke run {t3 - t2:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
