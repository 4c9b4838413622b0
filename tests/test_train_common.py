"""Shared set-up of the trainer tests (no tests here): the tiny training config, its command line, metrics.jsonl."""
import json
import os
import signal
import subprocess
import sys

from configs import demo
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two fake devices and the cheapest XLA:CPU optimisation level keep each trainer process's compile short.
SUBPROCESS_ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                      XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0")


def synthetic_data(tmp_path_factory) -> str:
  """One synthetic data directory per test session (generated once, ~16 s; later calls find it complete)."""
  from mixreorg_jax.data import synthetic  # noqa: PLC0415
  path = str(tmp_path_factory.getbasetemp() / "synthetic")
  synthetic.ensure_synthetic_data(path)
  return path


def train_config(synthetic_dir: str, **overrides):
  """helpers.tiny_config for the trainer: the SentencePiece vocab, per-step metrics, no evaluation."""
  defaults = {"model.text.vocab_size": 256, "log_steps": 1, "ckpt_steps": 1000, "input.synthetic_dir": synthetic_dir,
              "input.shuffle_buffer": 64, "evals.tuning.synthetic": "", "evals.heldout.synthetic": ""}
  return helpers.tiny_config(**{**defaults, **overrides})


def _flat(config, prefix=""):
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_flags(config) -> list:
  """`config` as --config=configs/demo.py plus one --config.key=value per value that differs from the demo."""
  base = _flat(demo.get_config())
  args = ["--config=configs/demo.py"]
  for key, value in sorted(_flat(config).items()):
    if base.get(key) != value:
      args.append(f"--config.{key}={value if isinstance(value, str) else repr(value)}")
  return args


def train_command(config, workdir: str, *extra: str) -> list:
  return [sys.executable, "-m", "mixreorg_jax.train", f"--workdir={workdir}", *config_flags(config), *extra]


class Processes:
  """The subprocesses one test starts; on exit, pass or fail, every one still running is SIGKILLed with its children.

  Each process leads its own session (start_new_session), so killing its process group also ends what it started
  (the trainers of a launch script).
  """

  def __init__(self):
    self.started = []  # (process, the path of its console output)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    for proc, _ in self.started:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

  def start(self, args: list, log_path: str, env=None) -> subprocess.Popen:
    """Starts `args` in the repository with stdout and stderr to log_path."""
    with open(log_path, "w") as log:
      proc = subprocess.Popen(args, cwd=REPO, env=env or SUBPROCESS_ENV, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    self.started.append((proc, log_path))
    return proc

  def console_tails(self, lines: int = 25) -> str:
    """The last `lines` lines of every started process's console output, each under its command and exit status."""
    parts = []
    for proc, path in self.started:
      with open(path, errors="replace") as f:
        tail = f.read().splitlines()[-lines:]
      parts.append(f"--- {os.path.basename(path)} (exit status {proc.poll()}): {' '.join(map(str, proc.args))}\n"
                   + "\n".join(tail))
    return "\n".join(parts)

  def train(self, config, workdir: str, *extra: str, log_name: str = "log.txt") -> subprocess.Popen:
    """Starts the trainer as a process (stdout and stderr to workdir/log_name)."""
    os.makedirs(workdir, exist_ok=True)
    return self.start(train_command(config, workdir, *extra), os.path.join(workdir, log_name))


def read_metrics(workdir: str) -> list:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def losses(workdir: str) -> dict:
  """{step: train/loss} from metrics.jsonl (the last entry per step, as a resumed run appends)."""
  return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}
