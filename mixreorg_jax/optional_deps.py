"""The optional dependencies: modules that a few features use and requirements.txt does not install.

Everything else the package imports comes from requirements.txt (tests/test_requirements.py checks it). A module
listed here is imported only inside the function that needs it, through `require`, so that the rest of the
package works without it and the feature that needs it fails with one line that says what to install.
"""
import importlib
from types import ModuleType

# module -> (what needs it, what to install). The pins are those of requirements-test.txt.
OPTIONAL = {
    "torch": ("reading PyTorch checkpoints (NVlabs .pth files, pytorch_model.bin) and the transformers "
              "comparisons of tools/bench_step.py and tools/bench_eval.py", "torch==2.13.0 (the CPU build is enough)"),
    "transformers": ("the transformers comparisons of tools/bench_step.py and tools/bench_eval.py",
                     "transformers==5.24.0 torch==2.13.0"),
    "nltk": ("a better noun tagger for the multi-label prompts (data/nouns.py falls back to lemminflect's lexicon "
             "without it)", "nltk plus its averaged_perceptron_tagger data"),
}


def require(module: str, feature: str) -> ModuleType:
  """Imports optional `module` (a key of OPTIONAL) for `feature`, or raises ImportError saying what to install."""
  if module not in OPTIONAL:
    raise KeyError(f"{module!r} is not an optional dependency; list it in OPTIONAL or in requirements.txt.")
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ImportError(f"{feature} needs {module}, which requirements.txt does not install: "
                      f"pip install {OPTIONAL[module][1]}") from None
