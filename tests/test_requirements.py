"""requirements.txt provides every third-party module the package imports; optional ones are declared and lazy."""
import ast
import importlib.metadata
import pathlib
import re
import sys

from mixreorg_jax import optional_deps

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIRST_PARTY = {"mixreorg_jax", "configs"}


def imports(path: pathlib.Path):
  """-> [(top-level module, at module level?)] of every import statement in the file."""
  tree = ast.parse(path.read_text(), str(path))
  top_level = {id(node) for node in tree.body}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and not node.level:
      names = [node.module]
    else:
      continue
    found += [(name.split(".")[0], id(node) in top_level) for name in names]
  return found


def required_distributions():
  """Normalised distribution names pinned in requirements.txt."""
  names = set()
  for line in (ROOT / "requirements.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      names.add(re.split(r"[<>=\[;~ ]", line)[0].lower().replace("_", "-"))
  return names


def test_every_imported_module_is_required_or_declared_optional():
  provided = importlib.metadata.packages_distributions()
  required = required_distributions()
  missing, eager_optional = [], []
  for path in sorted([*ROOT.glob("mixreorg_jax/**/*.py"), *ROOT.glob("configs/**/*.py")]):
    for module, at_top in imports(path):
      if module in sys.stdlib_module_names or module in FIRST_PARTY or module == "__future__":
        continue
      if module in optional_deps.OPTIONAL:
        if at_top:
          eager_optional.append(f"{path.relative_to(ROOT)}: {module}")
        continue
      dists = {d.lower().replace("_", "-") for d in provided.get(module, [])}
      if not dists & required:
        missing.append(f"{path.relative_to(ROOT)}: {module} (distributions {sorted(dists) or 'unknown'})")
  assert not missing, "imported but not in requirements.txt: " + "; ".join(missing)
  assert not eager_optional, "optional modules imported at module level: " + "; ".join(eager_optional)


def test_optional_modules_are_not_required():
  # An optional module that requirements.txt installs anyway belongs in requirements.txt's list, not OPTIONAL.
  provided = importlib.metadata.packages_distributions()
  required = required_distributions()
  for module in optional_deps.OPTIONAL:
    assert not {d.lower() for d in provided.get(module, [])} & required, module


def test_missing_optional_module_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError.
  try:
    optional_deps.require("torch", "Reading x.pth")
  except ImportError as e:
    message = str(e)
  else:
    raise AssertionError("no ImportError")
  assert message.startswith("Reading x.pth needs torch") and "pip install torch==2.13.0" in message
  assert "\n" not in message
