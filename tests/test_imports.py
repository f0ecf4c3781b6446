"""The module structure: no import cycles among dualjax modules, and every module imports alone."""

import ast
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PKG = REPO / "dualjax"


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for p in sorted(PKG.rglob("*.py")):
    parts = p.relative_to(REPO).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = p
  return out


def _imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
  """dualjax modules that `name` imports, at any depth (function-level imports count too)."""
  out = set()
  is_pkg = path.name == "__init__.py"
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = name.split(".") if is_pkg else name.split(".")[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    else:
      continue
    for t in targets:
      while t and t not in modules and "." in t:
        t = t.rsplit(".", 1)[0]
      if t in modules and t != name:
        out.add(t)
  return out


def test_no_import_cycles():
  modules = _modules()
  graph = {m: _imports(m, p, modules) for m, p in modules.items()}
  state: dict[str, int] = {}
  stack: list[str] = []
  cycles = []

  def visit(u):
    state[u] = 1
    stack.append(u)
    for v in sorted(graph[u]):
      if state.get(v) == 1:
        cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
      elif not state.get(v):
        visit(v)
    stack.pop()
    state[u] = 2

  for m in sorted(graph):
    if not state.get(m):
      visit(m)
  assert not cycles, "import cycles: " + "; ".join(cycles)
  assert len(modules) > 20  # the walk found the package


def test_every_module_imports_in_a_fresh_interpreter():
  """All modules in one fresh interpreter; each entry point also as the first import of its own."""
  names = sorted(_modules())
  code = ("import importlib, sys\n"
          "for n in sys.argv[1:]:\n"
          "  importlib.import_module(n)\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", code, *names], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  # Entry points import alone (each is the first dualjax module its process imports).
  for entry in ("dualjax.main", "dualjax.evaluate", "dualjax.prepare"):
    r = subprocess.run([sys.executable, "-c", f"import {entry}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, (entry, r.stderr[-3000:])
