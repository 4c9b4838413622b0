"""The package's import graph, read with `ast`: imports run downward through the layers, with no circles, nothing
imports configs/, and the zero-shot protocol loads no TensorFlow."""
import ast
import os

PACKAGE = "mixreorg_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

# Top to bottom (STYLE.md): a module may import its own layer and the layers below it.
LAYERS = (
    ("entry points", ("train", "evaluate", "segment", "tools")),
    ("evaluators", ("evaluator",)),
    ("the training step", ("train_step", "optim")),
    ("the method", ("mixreorg", "mixing", "losses", "zeroshot", "inference")),
    ("data and sharding", ("data", "sharding", "checkpoint_io")),
    ("models", ("models",)),
    ("utilities", ("micro_batch", "seg_metrics", "visualize", "console", "optional_deps", "workdir")),
)


def modules():
  """name (relative to the package, "data.synthetic") -> path of every module of the package."""
  found = {}
  for directory, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        relative = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        found[relative.removesuffix(".__init__") if relative != "__init__" else ""] = path
  return found


def imports(path, top_level_only=False):
  """The absolute module names a file imports ("mixreorg_jax.data.synthetic", "tensorflow", ...)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  nodes = tree.body if top_level_only else ast.walk(tree)
  names = set()
  for node in nodes:
    if top_level_only and isinstance(node, ast.If):  # `if __name__ == "__main__":` blocks at the top level.
      nodes_in = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    else:
      nodes_in = [node]
    for n in nodes_in:
      if isinstance(n, ast.Import):
        names.update(alias.name for alias in n.names)
      elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
        names.add(n.module)
        names.update(f"{n.module}.{alias.name}" for alias in n.names)
  return names


def package_edges(all_modules, top_level_only=False):
  """module -> the package modules it imports (relative names; `from mixreorg_jax import x` is module x)."""
  edges = {}
  for name, path in all_modules.items():
    targets = set()
    for imported in imports(path, top_level_only):
      if imported.startswith(PACKAGE + "."):
        relative = imported[len(PACKAGE) + 1:]
        if relative in all_modules and relative != name:
          targets.add(relative)
    edges[name] = targets
  return edges


def layer(name):
  for rank, (_, prefixes) in enumerate(LAYERS):
    if any(name == p or name.startswith(p + ".") for p in prefixes):
      return rank
  raise AssertionError(f"mixreorg_jax.{name} is in no layer of tests/test_layers.py: add it to one.")


def test_imports_run_downward():
  all_modules = modules()
  edges = package_edges(all_modules)
  upward = [f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
            for a, targets in edges.items() if a for b in sorted(targets) if layer(b) < layer(a)]
  assert not upward, "\n".join(upward)


def test_no_circular_imports():
  edges = package_edges(modules())
  state, cycles = {}, []

  def visit(name, path):
    state[name] = "open"
    for target in sorted(edges[name]):
      if state.get(target) == "open":
        cycles.append(" -> ".join(path[path.index(target):] + [target]))
      elif target not in state:
        visit(target, path + [target])
    state[name] = "done"

  for name in sorted(edges):
    if name not in state:
      visit(name, [name])
  assert not cycles, "\n".join(cycles)


def test_nothing_in_the_package_imports_configs():
  found = {name for name, path in modules().items()
           if any(i == "configs" or i.startswith("configs.") for i in imports(path))}
  assert not found, sorted(found)


def test_the_zero_shot_protocol_loads_no_tensorflow():
  """zeroshot and everything it imports at module level (what loads with it) import no TensorFlow."""
  all_modules = modules()
  edges = package_edges(all_modules, top_level_only=True)
  seen, todo = set(), ["zeroshot"]
  while todo:
    name = todo.pop()
    if name not in seen:
      seen.add(name)
      todo.extend(edges[name])
      # A package module loads its package's __init__ first.
      todo.extend(p for p in (name.rsplit(".", 1)[0],) if "." in name and p in all_modules)
  loading_tf = sorted(n for n in seen if any(i.split(".")[0] == "tensorflow"
                                             for i in imports(all_modules[n], top_level_only=True)))
  assert not loading_tf, loading_tf
