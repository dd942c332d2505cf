"""The package's import layering: rooms import only rooms below them, nothing imports a CLI, no cycles.

Every import counts, also the ones inside functions (lazy imports) and `importlib.import_module`
calls with a literal module name.
"""

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parent.parent / "longgen_jax"
# Rank of each room: a module may import its own room and rooms of lower rank only.
RANK = {"attention": 0, "parallel": 1, "data": 1, "model": 2, "weights": 3, "training": 4, "evaluation": 5}
CLIS = {"train", "convert", "sample", "evaluate"}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PKG.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path) -> set[str]:
  """longgen_jax modules `path` imports anywhere in its body."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("longgen_jax"):
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    elif isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith("longgen_jax"))
    elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args
          and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("longgen_jax")):
      out.add(node.args[0].value)
  return out


def graph() -> dict[str, set[str]]:
  modules = {module_name(p): p for p in PKG.rglob("*.py")}
  declared = _registry_modules()
  edges = {}
  for name, path in modules.items():
    targets = imports_of(path) | (declared if name == "longgen_jax.attention.registry" else set())
    edges[name] = {t for t in targets if t in modules and t != name}
  return edges


def _registry_modules() -> set[str]:
  """The kernel modules the registry imports by name (declared as strings in its table)."""
  from longgen_jax.attention import registry
  return {i.module for i in registry._IMPLS.values() if i.module}  # pylint: disable=protected-access


def room(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def violations(edges: dict[str, set[str]]) -> list[str]:
  bad = []
  for src, targets in edges.items():
    for dst in targets:
      if room(dst) in CLIS:
        bad.append(f"{src} imports the CLI {dst}")
      elif room(src) in RANK and room(dst) in RANK and room(dst) != room(src) and RANK[room(dst)] >= RANK[room(src)]:
        bad.append(f"{src} ({room(src)}) imports {dst} ({room(dst)})")
      elif room(src) in RANK and room(dst) not in RANK:
        bad.append(f"{src} imports {dst}, outside the rooms")
  return bad


def cycles_in(edges: dict[str, set[str]]) -> list[str]:
  state, stack, cycles = {}, [], []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in edges.get(node, ()):
      if nxt.startswith(node + "."):  # a package re-exporting its own submodule
        continue
      if state.get(nxt) == "open":
        cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for node in list(edges):
    if node not in state:
      visit(node)
  return cycles


def test_rooms_import_only_rooms_below_them_and_no_cli():
  bad = violations(graph())
  assert not bad, "\n".join(bad)


def test_no_import_cycles_lazy_imports_included():
  cycles = cycles_in(graph())
  assert not cycles, "\n".join(cycles)


def test_the_layer_checker_sees_violations(tmp_path):
  src = tmp_path / "m.py"
  src.write_text("def f():\n  from longgen_jax.train import main\n  import longgen_jax.model.llama\n"
                 "  importlib.import_module('longgen_jax.weights')\n")
  assert imports_of(src) >= {"longgen_jax.train", "longgen_jax.model.llama", "longgen_jax.weights"}
  fake = {"longgen_jax.attention.pallas_gpu": {"longgen_jax.model.llama"},
          "longgen_jax.training.loop": {"longgen_jax.evaluate"},
          "longgen_jax.model.a": {"longgen_jax.model.b"}, "longgen_jax.model.b": {"longgen_jax.model.a"}}
  assert len(violations(fake)) == 2 and cycles_in(fake) == ["longgen_jax.model.a -> longgen_jax.model.b -> longgen_jax.model.a"]
