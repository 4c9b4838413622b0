"""A quiet console: this project's messages and every warning on screen, library INFO and native output in a log.

Every command line tool starts with

  from mixreorg_jax import console
  if __name__ == "__main__":
    console.hold_native_output()   # before TensorFlow, XLA and orbax load and print their start-up banners

and calls `console.to_log_file(path)` in main(), once it knows where its outputs go. From then on:
  - the console shows the records of mixreorg_jax's own modules from INFO up (their warnings included) and ERROR
    and above from anyone;
  - the log file gets every record (INFO up, every library: orbax, clu, jax, their warnings and Python warnings)
    and everything written to file descriptors 1 and 2 by native code (TensorFlow's and XLA's C++ logging, gloo,
    fatal traces), including what was held since start-up. The trainer logs into its workdir; a tool without one
    into tool_log_path(tool).
`--verbose` (every tool has it) brings the old behaviour back: everything on the console, no log file.
"""
import logging
import os
import sys
import tempfile
from typing import Optional

from absl import flags
from absl import logging as absl_logging

flags.DEFINE_bool("verbose", False, "Print library INFO (orbax, clu, jax) and TensorFlow's and XLA's native messages "
                  "on the console too; by default they go only to the tool's log file.")
VERBOSE_FLAG = "--verbose"
LOG_FILE_ONLY = {"console": False}  # logging's `extra=` for a record of this package that the console skips.
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

_held: Optional[tempfile.TemporaryFile] = None  # native output since start-up, until to_log_file
_log_path: Optional[str] = None  # where to_log_file sent the logs (it acts once per process)


def hold_native_output() -> None:
  """Points file descriptors 1 and 2 at a temporary file; Python's sys.stdout and sys.stderr keep the console.

  Native code writes its logging straight to descriptor 2 (gloo to 1), at import already, before any flag is
  parsed: hence `--verbose` is read from sys.argv here. A no-op with --verbose or when called twice.
  """
  global _held
  if _held is not None or VERBOSE_FLAG in sys.argv[1:]:
    return
  _held = tempfile.TemporaryFile()
  for fd, name in ((1, "stdout"), (2, "stderr")):
    getattr(sys, name).flush()
    console_fd = os.dup(fd)
    os.dup2(_held.fileno(), fd)
    setattr(sys, name, open(console_fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace"))


class ConsoleFilter(logging.Filter):
  """Passes ERROR and above from anyone, and INFO up from this package's own modules unless marked LOG_FILE_ONLY.

  A library's warnings (orbax's notes on checkpointing and preemption, deprecations) go only to the log file;
  Python warnings (logging.captureWarnings) count as this package's when it issued them.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR:
      return True
    ours = (record.getMessage() if record.name == "py.warnings" else record.pathname).startswith(PACKAGE_DIR)
    return ours and getattr(record, "console", True)


def tool_log_path(tool: str) -> str:
  """The log file of a tool that has no workdir of its own: $TMPDIR/mixreorg_jax/<tool>.log (appended to)."""
  return os.path.join(tempfile.gettempdir(), "mixreorg_jax", f"{tool}.log")


def to_log_file(path: str) -> Optional[str]:
  """Sends every log record and the native output (held and future) to `path`; the console keeps its share.

  Returns the log path, or None with --verbose (then nothing changes and everything stays on the console). A
  second call (a tool's main() run twice in one process) keeps the first log file.
  """
  global _held, _log_path
  if VERBOSE_FLAG in sys.argv[1:] or (flags.FLAGS.is_parsed() and flags.FLAGS.verbose):
    return None
  if _log_path is not None:
    return _log_path
  _log_path = path
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  log = open(path, "ab")
  if _held is not None:
    _held.seek(0)
    log.write(_held.read())
    log.flush()
    os.dup2(log.fileno(), 1)  # native output now appends to the log file.
    os.dup2(log.fileno(), 2)
    _held.close()
    _held = None
  file_handler = logging.FileHandler(path)
  file_handler.setFormatter(absl_logging.PythonFormatter())
  logging.getLogger().addHandler(file_handler)
  absl_logging.set_verbosity(absl_logging.INFO)
  console = absl_logging.get_absl_handler().python_handler
  console.stream = sys.stderr
  console.addFilter(ConsoleFilter())
  logging.captureWarnings(True)  # warnings.warn goes through logging: the file, and the console if ours.
  console.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
  logging.info("Library INFO and native output go to %s (%s shows them here).", path, VERBOSE_FLAG)
  return path
