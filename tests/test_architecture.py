"""The layering of docs/architecture.md, read from the imports of every first-party source file.

  experiments                                          (4)
  lola_jax.{training, evaluation, generate, convert, pretrained}   (3)
  lola_jax.model, lola_jax.sharding, lola_jax.data     (2)
  lola_jax.core (and the lola_jax package itself)      (1)
  pallas_kernels                                       (0)

A module may import its own layer and the layers below, never above; `pallas_kernels` imports
nothing of `lola_jax`; `sharding` and `data` import no other first-party package; no first-party
import sits inside a function (optional dependencies are third-party and may); no module uses a
private name (leading underscore) of another first-party module; the module-level imports form
no cycle. Imports are parsed with `ast`, nothing is imported.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("pallas_kernels", "lola_jax", "experiments")
# Longest prefix wins.
LAYERS = {
  "pallas_kernels": 0,
  "lola_jax": 1,
  "lola_jax.core": 1,
  "lola_jax.model": 2,
  "lola_jax.sharding": 2,
  "lola_jax.data": 2,
  "lola_jax.training": 3,
  "lola_jax.evaluation": 3,
  "lola_jax.generate": 3,
  "lola_jax.convert": 3,
  "lola_jax.pretrained": 3,
  "experiments": 4,
}
# Utilities every upper layer uses: they import no other first-party package.
INDEPENDENT = ("lola_jax.sharding", "lola_jax.data")
# First-party imports allowed inside a function: (module, imported) pairs, each with its reason.
FUNCTION_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {}


def _modules():
  """{module name: path} of every .py file under the first-party packages."""
  out = {}
  for package in PACKAGES:
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, package)):
      dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
      for name in filenames:
        if name.endswith(".py"):
          rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[: -len(".py")]
          parts = rel.split(os.sep)
          if parts[-1] == "__init__":
            parts = parts[:-1]
          out[".".join(parts)] = os.path.join(dirpath, name)
  return out


MODULES = _modules()


def _first_party(name: str) -> bool:
  return name.split(".")[0] in PACKAGES


def _resolve(module: str, node: ast.ImportFrom) -> str:
  """The absolute module an ImportFrom reads from (relative imports resolved)."""
  if not node.level:
    return node.module or ""
  is_package = MODULES[module].endswith("__init__.py")
  base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
  return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str):
  """(imported module, names or None, line, inside a function) of every first-party import."""
  tree = ast.parse(open(MODULES[module]).read(), MODULES[module])
  out = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      if isinstance(child, ast.Import):
        for alias in child.names:
          if _first_party(alias.name):
            out.append((alias.name, None, child.lineno, in_function))
      elif isinstance(child, ast.ImportFrom):
        source = _resolve(module, child)
        if _first_party(source):
          for alias in child.names:
            sub = f"{source}.{alias.name}"
            target = sub if sub in MODULES else source
            out.append((target, None if target == sub else alias.name, child.lineno, in_function))
      visit(child, nested)

  visit(tree, False)
  return out


def _layer(module: str) -> int:
  keys = [k for k in LAYERS if module == k or module.startswith(k + ".")]
  if not keys:
    raise AssertionError(f"{module} belongs to no layer of tests/test_architecture.py")
  return LAYERS[max(keys, key=len)]


def _package(module: str) -> str:
  keys = [k for k in LAYERS if module == k or module.startswith(k + ".")]
  return max(keys, key=len)


def test_every_module_has_a_layer():
  for module in MODULES:
    _layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
  for target, _, line, _ in _imports(module):
    assert _layer(target) <= _layer(module), (
      f"{module}:{line} imports {target} (layer {_layer(target)} > {_layer(module)})"
    )


def test_pallas_kernels_is_a_leaf():
  for module in MODULES:
    if module.startswith("pallas_kernels"):
      for target, _, line, _ in _imports(module):
        assert target.startswith("pallas_kernels"), f"{module}:{line} imports {target}"


def test_independent_utilities_import_no_other_package():
  for module in MODULES:
    own = [p for p in INDEPENDENT if module == p or module.startswith(p + ".")]
    for target, _, line, _ in _imports(module) if own else ():
      assert target == own[0] or target.startswith(own[0] + "."), f"{module}:{line} -> {target}"


def test_no_first_party_import_inside_a_function():
  found = [
    f"{module}:{line} imports {target}"
    for module in MODULES
    for target, _, line, inside in _imports(module)
    if inside and (module, target) not in FUNCTION_IMPORTS_ALLOWED
  ]
  assert not found, "move these to the top of the module (or the shared piece down):\n" + "\n".join(
    found
  )


def test_no_private_names_of_other_modules():
  found = []
  for module in MODULES:
    tree = ast.parse(open(MODULES[module]).read())
    aliases = {}  # local name -> first-party module it binds
    for target, name, line, _ in _imports(module):
      if name is not None and name.startswith("_") and _package(target) != _package(module):
        found.append(f"{module}:{line} imports {target}.{name}")
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for a in node.names:
          if _first_party(a.name) and a.asname:
            aliases[a.asname] = a.name
      elif isinstance(node, ast.ImportFrom):
        source = _resolve(module, node)
        for a in node.names:
          if f"{source}.{a.name}" in MODULES:
            aliases[a.asname or a.name] = f"{source}.{a.name}"
    for node in ast.walk(tree):
      if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and _package(aliases[node.value.id]) != _package(module)
      ):
        found.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
  assert not found, "\n".join(found)


def test_no_import_cycles():
  graph = {
    m: {t for t, _, _, inside in _imports(m) if not inside and t in MODULES} - {m} for m in MODULES
  }
  # A package's __init__ importing its own submodules is how packages re-export: not a cycle.
  for m, targets in graph.items():
    if MODULES[m].endswith("__init__.py"):
      graph[m] = {t for t in targets if not t.startswith(m + ".")}
  state: dict[str, int] = {}

  def visit(m, path):
    state[m] = 1
    for t in sorted(graph[m]):
      if state.get(t) == 1:
        cycle = path[path.index(t) :] + [t]
        raise AssertionError("import cycle: " + " -> ".join(cycle))
      if t not in state:
        visit(t, path + [t])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
