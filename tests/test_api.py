"""The public face: __all__ is what README's API table and docs/api.md list, each name documented."""

import inspect
import pathlib
import re

import klagg_jax as ka

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def readme_api_names() -> set[str]:
  text = README.read_text()
  section = text.split("## API", 1)[1].split("\n## ", 1)[0]
  return set(re.findall(r"^\| `ka\.(\w+)", section, flags=re.M))


def test_readme_api_table_matches_all():
  assert readme_api_names() == set(ka.__all__)


def test_every_public_name_is_importable_and_documented():
  for name in ka.__all__:
    obj = getattr(ka, name)
    doc = inspect.getdoc(obj) or ""
    assert "Returns" in doc and "Args" in doc, name


def test_api_reference_documents_every_public_name():
  text = (ROOT / "docs" / "api.md").read_text()
  documented = set(re.findall(r"^\.\. auto(?:function|class):: (\w+)$", text, flags=re.M))
  assert documented == set(ka.__all__)
