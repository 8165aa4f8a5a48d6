"""pallas_kernels is a leaf: no module of it imports lola_jax (at the top or inside a function)."""

import ast
import pathlib

import pallas_kernels


def first_party_imports(path: pathlib.Path):
  """(line, module) of every import statement of `path`, nested ones included."""
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      yield from ((node.lineno, alias.name) for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      yield node.lineno, node.module


def test_pallas_kernels_imports_nothing_from_lola_jax():
  root = pathlib.Path(pallas_kernels.__file__).parent
  files = sorted(root.rglob("*.py"))
  assert len(files) >= 10  # the package itself was found (common, equations, three ops)
  upward = [
    f"{path.relative_to(root)}:{line} imports {module}"
    for path in files
    for line, module in first_party_imports(path)
    if module == "lola_jax" or module.startswith("lola_jax.")
  ]
  assert not upward, upward
