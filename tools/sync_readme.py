"""Copies committed result tables into the README and docs/, verbatim.

Each block of README.md or of a docs/*.md page between the lines

    <!-- BEGIN results/real/summarization/summary.md -->
    <!-- END results/real/summarization/summary.md -->

is replaced by that file's content (the path is relative to the repository root), so the
pages show each committed `summary.md` and `samples.md` as `report.py` wrote it
(tests/experiments/test_report.py checks they do). Run after committing new runs with
`report.py --copy_runs`:

    python tools/sync_readme.py              # README.md and every docs/*.md
    python tools/sync_readme.py docs/results.md   # only the pages named

Every page is read and filled before any is written (a block naming a missing file
stops it with nothing changed), and each changed page is written to a temporary name
and renamed: never a half-written page.
"""

from __future__ import annotations

import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"(<!-- BEGIN (\S+) -->\n)(.*?)(<!-- END \2 -->)", re.S)


def sync(text: str, root: str = ROOT) -> str:
  """The page's text with every marked block replaced by its file's content."""
  def fill(m: re.Match) -> str:
    path = os.path.join(root, m.group(2))
    if not os.path.isfile(path):
      raise FileNotFoundError(f"block names {m.group(2)!r}, which is not a file "
                              f"under {root}")
    with open(path) as f:
      body = f.read()
    return m.group(1) + body + ("" if body.endswith("\n") else "\n") + m.group(4)
  return BLOCK.sub(fill, text)


def pages(root: str = ROOT) -> list[str]:
  """README.md and every docs/*.md under root: the pages that may hold blocks."""
  docs = sorted(glob.glob(os.path.join(root, "docs", "*.md")))
  return [os.path.join(root, "README.md")] + docs


def sync_pages(paths: list[str], root: str = ROOT) -> list[tuple[str, int, bool]]:
  """Fills the blocks of every page; returns (page, blocks, changed) per page."""
  todo = []
  for page in paths:  # every page filled before any is written
    with open(page) as f:
      text = f.read()
    try:
      new = sync(text, root)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{page}: {e}") from None
    todo.append((page, text, new))
  for page, text, new in todo:
    if new != text:
      tmp = page + ".tmp"
      with open(tmp, "w") as f:
        f.write(new)
      os.replace(tmp, page)  # never a half-written page
  return [(page, len(BLOCK.findall(text)), new != text) for page, text, new in todo]


def main(argv: list[str]) -> None:
  for page, blocks, changed in sync_pages(argv or pages()):
    print(f"{os.path.relpath(page)}: {blocks} blocks, "
          f"{'updated' if changed else 'already up to date'}")


if __name__ == "__main__":
  main(sys.argv[1:])
