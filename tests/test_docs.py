"""The documents stand alone: every link and file they name exists, and they cite nothing private.

Walks README.md, BENCHMARKS.md, experiments/loops/EXPERIMENTS.md and any markdown under docs/:
markdown links ``[text](target)`` (relative to the document, as GitHub resolves them; anchors
``#...`` against the document's headings) and file references in code (``examples/foo.py``,
``python benchmarks/run.py``, ``results/loops.png``: a token with a ``/`` that ends in a file
extension or a ``/``), resolved against the repository root or the document's folder. Brace
lists (``{md,json}``) are expanded and ``*`` is globbed; a placeholder (``<date>``) or a path
the repository ignores (an output folder in ``.gitignore``) is not checked.
"""

import fnmatch
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "experiments" / "loops" / "EXPERIMENTS.md",
        *sorted((ROOT / "docs").rglob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
EXTENSIONS = ("py", "md", "png", "json", "txt", "toml", "npz", "sh", "cfg", "ini", "yaml", "yml",
              "csv", "ipynb", "in")
PATH = re.compile(r"(?<![\w./-])((?:\.{1,2}/)?[\w.-]+(?:/[\w.*{},<>-]+)+/?)")


def ignored_patterns() -> list[str]:
  lines = (ROOT / ".gitignore").read_text().splitlines()
  return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def is_ignored(rel: str) -> bool:
  parts = rel.strip("/").split("/")
  for pattern in ignored_patterns():
    for i in range(1, len(parts) + 1):
      prefix = "/".join(parts[:i])
      if fnmatch.fnmatch(prefix, pattern) or ("/" not in pattern and
                                              fnmatch.fnmatch(parts[i - 1], pattern)):
        return True
  return False


def expand_braces(token: str) -> list[str]:
  match = re.search(r"\{([^{}]*)\}", token)
  if not match:
    return [token]
  return [expanded for option in match.group(1).split(",")
          for expanded in expand_braces(token[:match.start()] + option + token[match.end():])]


def code_paths(text: str) -> list[str]:
  """File references in fenced blocks and inline code: tokens with a / ending in .ext or /."""
  chunks = FENCE.findall(text) + INLINE_CODE.findall(FENCE.sub("", text))
  found = []
  for chunk in chunks:
    for token in PATH.findall(chunk):
      token = token.rstrip(".,:;")
      if "://" in token or "<" in token or ">" in token:
        continue
      tail = token.rstrip("/").rsplit("/", 1)[-1]
      if token.endswith("/") or tail.rsplit(".", 1)[-1].rstrip("*}") in EXTENSIONS or (
          "{" in tail and any(e in tail for e in EXTENSIONS)) or tail.endswith(".*"):
        found.append(token)
  return found


def resolves(doc: pathlib.Path, rel: str) -> bool:
  for base in (doc.parent, ROOT):
    for candidate in expand_braces(rel):
      if "*" in candidate:
        if not any(base.glob(candidate.rstrip("/"))):
          break
      elif not (base / candidate).exists():
        break
    else:
      return True
  return False


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[`*_]", "", heading.strip().lower())
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
  return {slug(h) for h in re.findall(r"^#{1,6}\s+(.*?)\s*#*$", FENCE.sub("", text), re.M)}


def doc_id(doc: pathlib.Path) -> str:
  return str(doc.relative_to(ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_markdown_links_resolve(doc):
  text = doc.read_text()
  broken = []
  for target in LINK.findall(FENCE.sub("", text)):
    if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    if not path:
      if anchor not in anchors(text):
        broken.append(target)
    elif not (doc.parent / path).exists():
      broken.append(target)
  assert not broken, f"{doc_id(doc)}: links to nothing: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_code_file_references_exist(doc):
  refs = code_paths(doc.read_text())
  in_doc_dir = lambda r: str((doc.parent / r).relative_to(ROOT))
  missing = [r for r in refs
             if not (is_ignored(r) or is_ignored(in_doc_dir(r)) or resolves(doc, r))]
  assert not missing, f"{doc_id(doc)}: names files that are not in the repository: {missing}"


# What a reader of the repository cannot follow: issue numbers, notes and pages that are not in
# it, and words about how the project is made rather than what it is. (Spelled with \s+ so that
# this file does not match itself.)
PRIVATE = re.compile(r"\bissues?\s*#?\d+|\bdesign\s+note\b|\bseed/\d", re.I)
HOW_MADE = re.compile(r"\bSPEC\.md\b|\binternal\s+text\b|\bsteering\s+side\b|\bthis\s+session\b|"
                      r"\bother\s+sessions\b|\bcoordinator\b", re.I)
CHECKED = (DOCS + [ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "results" / "README.md"]
           + sorted((ROOT / "klagg_jax").rglob("*.py")) + sorted((ROOT / "examples").glob("*.py"))
           + sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "docs").glob("*.py"))
           + sorted((ROOT / "experiments").rglob("*.py"))
           + [ROOT / "Makefile", ROOT / "pyproject.toml", ROOT / ".ci" / "run"])


@pytest.mark.parametrize("path", CHECKED, ids=doc_id)
def test_documents_cite_no_issue_numbers_or_unpublished_notes(path):
  text = path.read_text()
  hits = [m.group(0) for m in PRIVATE.finditer(text)]
  hits += [m.group(0) for m in HOW_MADE.finditer(text)]
  assert not hits, f"{doc_id(path)} cites what a reader of the repository cannot find: {hits}"


def test_path_finder_finds_what_the_docs_name():
  text = ("Run `python benchmarks/run.py --quick` or see `results/loops.png`, "
          "`benchmarks/results/{grid,bf16}/`, `x / T`, `loop/trait`.\n"
          "```bash\npython examples/fused_heal.py  # and docs/diag.png\n```\n")
  assert code_paths(text) == ["examples/fused_heal.py", "docs/diag.png", "benchmarks/run.py",
                              "results/loops.png", "benchmarks/results/{grid,bf16}/"]
  assert expand_braces("a/{b,c}.{md,json}") == ["a/b.md", "a/b.json", "a/c.md", "a/c.json"]
  assert not resolves(ROOT / "README.md", "examples/no_such_example.py")
  assert resolves(ROOT / "experiments" / "loops" / "EXPERIMENTS.md", "results/decide.png")
  assert is_ignored("experiments/loops/cache/") and not is_ignored("examples/fused_heal.py")
