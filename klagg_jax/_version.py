"""The package's version: the installed distribution's metadata, so it is never stated twice.

``pyproject.toml`` is the one place the version is written. An installed package (a wheel, or
``pip install -e .``) reads it back from its metadata; a source tree put on ``sys.path`` without
being installed reads it from the ``pyproject.toml`` beside the package; anything else reports
``0+unknown`` rather than a number that may be wrong.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import re

DISTRIBUTION = "klagg-jax"
UNKNOWN = "0+unknown"
_PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"


def find_version(distribution: str = DISTRIBUTION,
                 pyproject: pathlib.Path | None = _PYPROJECT) -> str:
  """The version of ``distribution``: installed metadata, else ``pyproject``, else ``0+unknown``.

  Args:
    distribution: the distribution name to look up in the installed packages' metadata.
    pyproject: a ``pyproject.toml`` to read ``[project] version`` from when ``distribution`` is
      not installed (a source tree on ``sys.path``); None skips it.

  Returns:
    The version string, e.g. ``"0.1.0"``; ``"0+unknown"`` (a valid PEP 440 version lower than
    any release) when neither source has it.

  Raises:
    Nothing: a missing or unreadable ``pyproject`` falls through to ``"0+unknown"``.
  """
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    pass
  if pyproject is not None:
    try:
      text = pyproject.read_text(encoding="utf-8")
    except OSError:
      text = ""
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, flags=re.M | re.S)
    if project is not None:
      found = re.search(r"^version\s*=\s*[\"']([^\"']+)[\"']", project.group(1), flags=re.M)
      if found is not None:
        return found.group(1)
  return UNKNOWN


__version__ = find_version()
