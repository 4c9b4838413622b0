"""The quiet console: a CLI's --help prints only help; native start-up output goes nowhere near the console; a
library's INFO and warnings go to the log file only."""
import logging
import os
import subprocess
import sys

import orbax.checkpoint

from mixreorg_jax import console
from tests import test_train_common as common


def test_help_prints_only_help():
  result = subprocess.run([sys.executable, "-m", "mixreorg_jax.train", "--help"], cwd=common.REPO,
                          env=dict(common.SUBPROCESS_ENV, TF_CPP_MIN_LOG_LEVEL="0"), capture_output=True, text=True,
                          timeout=300)
  assert result.stdout.startswith("Pretrains MixReorg")
  assert result.stderr == "", result.stderr[-2000:]  # TF's and XLA's banners (cudart, oneDNN) were held back.


def test_console_shows_our_records_and_everyones_errors_not_a_librarys_info_or_warnings():
  orbax_file = orbax.checkpoint.__file__
  ours = os.path.join(console.PACKAGE_DIR, "train.py")

  def shown(level, pathname, name="absl", message="m", **extra):
    record = logging.LogRecord(name, level, pathname, 1, message, (), None)
    record.__dict__.update(extra)
    return console.ConsoleFilter().filter(record)

  assert shown(logging.INFO, ours) and shown(logging.WARNING, ours) and shown(logging.ERROR, ours)
  assert not shown(logging.INFO, ours, **console.LOG_FILE_ONLY)
  assert not shown(logging.INFO, orbax_file) and not shown(logging.WARNING, orbax_file)
  assert shown(logging.ERROR, orbax_file)
  # warnings.warn, through logging.captureWarnings: the message starts with the file that issued it.
  assert shown(logging.WARNING, logging.__file__, "py.warnings", f"{ours}:5: UserWarning: mind this")
  assert not shown(logging.WARNING, logging.__file__, "py.warnings", f"{orbax_file}:5: DeprecationWarning: x")
