"""The quiet console: a CLI's --help prints only help; native start-up output goes nowhere near the console."""
import subprocess
import sys

from tests import test_train_common as common


def test_help_prints_only_help():
  result = subprocess.run([sys.executable, "-m", "mixreorg_jax.train", "--help"], cwd=common.REPO,
                          env=dict(common.SUBPROCESS_ENV, TF_CPP_MIN_LOG_LEVEL="0"), capture_output=True, text=True,
                          timeout=300)
  assert result.stdout.startswith("Pretrains MixReorg")
  assert result.stderr == "", result.stderr[-2000:]  # TF's and XLA's banners (cudart, oneDNN) were held back.
