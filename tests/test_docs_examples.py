"""Every Python block of the README and the guide pages runs, and prints what the page says.

The blocks of one page run in order in one namespace, as a reader would paste them. A block whose
first line is ``# sketch: <reason>`` is only compiled (it calls names the page does not define,
e.g. the user's own model); a block whose first line is ``# runs in tests/<file>.py ...`` is
compiled here and run by that file, which must name the page. A ```` ```text ```` block right
after a Python block is that block's expected standard output, compared line by line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
SKETCH = re.compile(r"# sketch: \S")
RUNS_IN = re.compile(r"# runs in (tests/\w+\.py)")


@dataclasses.dataclass
class Block:
  code: str
  line: int
  expected: str | None = None


def python_blocks(text: str) -> list[Block]:
  """The page's Python blocks in order, each with the text block that follows it, if any."""
  blocks: list[Block] = []
  previous_end, previous = None, None
  for m in FENCE.finditer(text):
    lang, body = m.group(1), m.group(2)
    if lang == "text" and previous is not None and not text[previous_end:m.start()].strip():
      previous.expected = body
    if lang == "python":
      previous = Block(body, text[:m.start()].count("\n") + 1)
      blocks.append(previous)
    elif lang != "text":
      previous = None
    previous_end = m.end()
  return blocks


def rel(path: pathlib.Path) -> str:
  return str(path.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_python_blocks_run_and_print_what_the_page_shows(page):
  ns: dict = {"__name__": "__docs__"}
  for block in python_blocks(page.read_text()):
    where = f"{rel(page)}, block at line {block.line}"
    first = block.code.splitlines()[0] if block.code.strip() else ""
    code = compile(block.code, where, "exec")
    if SKETCH.match(first):
      continue
    runs_in = RUNS_IN.match(first)
    if runs_in:
      runner = ROOT / runs_in.group(1)
      assert rel(page) in runner.read_text(), f"{where}: {runner.name} does not run {rel(page)}"
      continue
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(code, ns)  # noqa: S102 -- the page's own example
    if block.expected is not None:
      got = [ln.rstrip() for ln in out.getvalue().strip("\n").splitlines()]
      want = [ln.rstrip() for ln in block.expected.strip("\n").splitlines()]
      assert got == want, f"{where} printed {got}, the page shows {want}"


def test_every_page_with_code_has_a_block_that_runs():
  """A page's examples are not all sketches: at least one block per page runs, here or elsewhere."""
  for page in PAGES:
    blocks = python_blocks(page.read_text())
    if blocks:
      assert any(not SKETCH.match(b.code.splitlines()[0]) for b in blocks), rel(page)


def test_block_parser_pairs_output_and_skips_other_languages():
  text = ("```python\nprint(1)\n```\n\n```text\n1\n```\n\nprose\n\n```text\nnot output\n```\n"
          "```bash\nls\n```\n```python\n# sketch: calls your model\nmodel()\n```\n")
  blocks = python_blocks(text)
  assert [(b.code, b.expected) for b in blocks] == [
      ("print(1)\n", "1\n"), ("# sketch: calls your model\nmodel()\n", None)]
