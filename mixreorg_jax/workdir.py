"""The layout of a training workdir, read and written by the trainer, the evaluator, export and the ablation runner.

  WORKDIR/config.json                          the train config, every evaluation's protocol included
  WORKDIR/checkpoints/<step>/                  orbax checkpoints (a save in flight: <step>.orbax-checkpoint-tmp)
  WORKDIR/input_state/step_<step>/process_<i>_of_<n>   each host's tf.data position for checkpoint <step>
  WORKDIR/metrics.jsonl                        every scalar written, one JSON object per line
  WORKDIR/eval/<name>/                         each evaluation's metrics.json, TensorBoard scalars, pictures
"""
import os

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
INPUT_STATE_DIR = "input_state"
METRICS_FILE = "metrics.jsonl"
EVAL_DIR = "eval"


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def checkpoint_dir(workdir: str) -> str:
  """Absolute: orbax wants one."""
  return os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))


def input_state_dir(workdir: str) -> str:
  return os.path.join(workdir, INPUT_STATE_DIR)


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, METRICS_FILE)


def eval_dir(workdir: str, name: str) -> str:
  """Where evaluation `name` (config.evals.<name>) writes its outputs."""
  return os.path.join(workdir, EVAL_DIR, name)
