"""Copies committed result tables into the README, verbatim.

Each block of the README between the lines

    <!-- BEGIN experiments/results/real/summarization/summary.md -->
    <!-- END experiments/results/real/summarization/summary.md -->

is replaced by that file's content (relative to the repository root), so the README
shows each committed `summary.md` as `report.py` wrote it (tests/test_report.py checks
it does). Run after committing new runs with `report.py --copy_runs`:

    python tools/sync_readme.py [README.md]
"""

from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"(<!-- BEGIN (\S+) -->\n)(.*?)(<!-- END \2 -->)", re.S)


def sync(text: str, root: str = ROOT) -> str:
  """The README text with every marked block replaced by its file's content."""
  def fill(m: re.Match) -> str:
    path = os.path.join(root, m.group(2))
    if not os.path.isfile(path):
      raise FileNotFoundError(f"README block names {m.group(2)!r}, which is not a file "
                              f"under {root}")
    with open(path) as f:
      body = f.read()
    return m.group(1) + body + ("" if body.endswith("\n") else "\n") + m.group(4)
  return BLOCK.sub(fill, text)


def main() -> None:
  readme = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "README.md")
  with open(readme) as f:
    text = f.read()
  new = sync(text)
  if new != text:
    tmp = readme + ".tmp"
    with open(tmp, "w") as f:
      f.write(new)
    os.replace(tmp, readme)  # never a half-written README
  print(f"{readme}: {len(BLOCK.findall(text))} blocks, "
        f"{'updated' if new != text else 'already up to date'}")


if __name__ == "__main__":
  main()
