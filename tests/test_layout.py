"""The house rules of the package, measured from its code (docs/layout.md): rooms by
role whose imports run one way, files and functions of a readable size, few
modules at the top, one alias per module."""

from __future__ import annotations

import ast
import collections
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pdl_jax"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80
MAX_TOP_LEVEL_MODULES = 6
# Rooms that must not import the rooms named: the house drawn from the imports.
FORBIDDEN = {
    "models": ("train", "data", "eval", "cli"),
    "tokenizers": ("models", "train", "data", "eval", "cli"),
    "losses": ("train", "eval", "cli"),
    "data": ("losses", "train", "eval", "cli"),
    "eval": ("train", "cli"),
    "train": ("cli",),
}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
  """The package modules `path` imports (anywhere in it, function bodies too)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pdl_jax"):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        out.add(full if full in modules else node.module)
    elif isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith("pdl_jax"))
  return {m for m in out if m in modules}


def room(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 2 or (len(parts) == 2 and
                                        (PACKAGE / parts[1]).is_dir()) else ""


def test_no_file_is_over_the_limit():
  long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
          if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
  assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_function_is_over_the_limit():
  long = {}
  for p in PACKAGE.rglob("*.py"):
    for node in ast.walk(ast.parse(p.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES:
          long[f"{p.relative_to(ROOT)}:{node.name}"] = n
  assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_few_modules_at_the_top():
  top = sorted(p.name for p in PACKAGE.glob("*.py"))
  assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_imports_run_one_way():
  modules = package_modules()
  bad = []
  for name, path in modules.items():
    for target in imports_of(path, modules):
      if room(target) in FORBIDDEN.get(room(name), ()):
        bad.append(f"{name} imports {target}")
  assert not bad, bad


def test_no_import_cycle():
  modules = package_modules()
  graph = {m: imports_of(p, modules) - {m} for m, p in modules.items()}
  # A package's __init__ is imported with each of its modules: not an edge back.
  for m in graph:
    graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for t in sorted(graph[m]):
      if state.get(t) == "open":
        cycles.append(stack[stack.index(t):] + [t])
      elif t not in state:
        visit(t)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)
  assert not cycles, cycles


def test_one_alias_per_module():
  """Every file imports a package module under the same name (none of one letter)."""
  names = collections.defaultdict(set)
  files = [p for d in ("pdl_jax", "tests", "experiments", "tools")
           for p in (ROOT / d).rglob("*.py")]
  modules = package_modules()
  for p in files:
    for node in ast.walk(ast.parse(p.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pdl_jax"):
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          if full in modules:
            names[full].add(alias.asname or alias.name)
  several = {m: sorted(a) for m, a in names.items() if len(a) > 1}
  short = {m: sorted(a) for m, a in names.items() if any(len(x) == 1 for x in a)}
  assert not several, several
  assert not short, short


@pytest.mark.parametrize("rule", sorted(FORBIDDEN))
def test_the_rule_can_fail(rule, tmp_path):
  """The import check sees an import inside a function body (the rule is live)."""
  path = tmp_path / "m.py"
  path.write_text(f"def f():\n  from pdl_jax.{FORBIDDEN[rule][0]} import x\n")
  modules = {f"pdl_jax.{FORBIDDEN[rule][0]}": path}
  assert imports_of(path, modules) == {f"pdl_jax.{FORBIDDEN[rule][0]}"}
