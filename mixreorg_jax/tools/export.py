r"""Exports a training checkpoint as a params-only inference checkpoint that `inference.load` reads.

  python -m mixreorg_jax.tools.export --workdir=workdirs/demo --output=exports/demo [--step=N]
  python -m mixreorg_jax.tools.export --workdir=DIR --output=OUT --config=configs/demo.py [--config.key=value ...]

The train config comes from the workdir's config.json (written by train.py) unless --config is given. Only the
parameters and BatchNorm statistics of the latest (or --step) checkpoint are read, as host numpy arrays, so the
export needs neither the optimizer state nor the training mesh. A run that keeps a moving average of its
parameters (config.optim.ema_decay > 0) exports that average, as its evaluations score it; --raw_params exports
the trained parameters instead. The tokenizer block of the inference checkpoint comes from config.input.
"""
from mixreorg_jax import console
if __name__ == "__main__":
  console.hold_native_output()  # before TF and XLA load: their native start-up banners go to the log file.

import json
import os
from typing import Any, Dict, Optional, Tuple

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp

from mixreorg_jax import checkpoint_io
from mixreorg_jax import optim
from mixreorg_jax import train_step
from mixreorg_jax import workdir as workdir_lib
from mixreorg_jax.models import groupvit

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags, defined only when run as a program so that tests can import this next to train.py."""
  config_flags.DEFINE_config_file("config", None, "Training config (default: WORKDIR/config.json).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "The training workdir (holds checkpoints/ and config.json).")
  flags.DEFINE_string("output", None, "Directory of the inference checkpoint to write (must not exist yet).")
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
  flags.DEFINE_bool("raw_params", False, "Export the trained parameters, not their moving average (for runs with "
                    "config.optim.ema_decay > 0).")
  flags.mark_flags_as_required(["workdir", "output"])


def load_train_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with, from WORKDIR/config.json (JSON lists become the configs' tuples)."""
  path = workdir_lib.config_path(workdir)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: pass --workdir of a training run, or give --config=configs/X.py.")
  with open(path) as f:
    return ml_collections.ConfigDict(checkpoint_io.lists_to_tuples(json.load(f)))


def restore_variables(workdir: str, config: ml_collections.ConfigDict, step: Optional[int] = None,
                      raw_params: bool = False) -> Tuple[Dict[str, Any], int]:
  """-> ({"params", "batch_stats"} as numpy arrays, step) from the workdir's latest (or `step`) checkpoint.

  "params" is the parameters' moving average when the run kept one (config.optim.ema_decay > 0), unless
  raw_params.
  """
  ckpt_dir = workdir_lib.checkpoint_dir(workdir)
  with ocp.CheckpointManager(ckpt_dir) as manager:
    steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"No finished checkpoint in {ckpt_dir}.")
  step = max(steps) if step is None else step
  if step not in steps:
    raise ValueError(f"--step={step}: no checkpoint at that step in {ckpt_dir}; found steps {sorted(steps)}.")
  model = groupvit.GroupViT.from_config(config.model)
  tx, _ = optim.make_optimizer(config.optim, config.input.batch_size, config.total_steps)
  abstract = train_step.abstract_state(config, model, tx)
  params_key = "ema_params" if train_step.ema_decay(config) and not raw_params else "params"
  target = {params_key: abstract.params, "batch_stats": abstract.batch_stats}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  with ocp.PyTreeCheckpointer() as checkpointer:  # the "state" item of the trainer's Composite checkpoint.
    variables = checkpointer.restore(
        os.path.join(ckpt_dir, str(step), "state"),
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
  return {"params": variables[params_key], "batch_stats": variables["batch_stats"]}, step


def export(workdir: str, output: str, step: Optional[int] = None,
           config: Optional[ml_collections.ConfigDict] = None, raw_params: bool = False) -> str:
  """Writes the inference checkpoint of `workdir`'s checkpoint into `output`; returns its absolute path.

  raw_params: the trained parameters rather than their moving average (see `restore_variables`).
  """
  config = config if config is not None else load_train_config(workdir)
  variables, step = restore_variables(workdir, config, step, raw_params)
  tokenizer = checkpoint_io.tokenizer_info(config.input.tokenizer, config.input.tokenizer_path,
                                           config.input.context_length)
  out = checkpoint_io.save_inference_checkpoint(output, variables, config.model, tokenizer=tokenizer,
                                                image_normalization=config.input.get("normalization", "clip"))
  print(f"Exported step {step} of {workdir} to {out}")
  return out


def main(argv):
  console.to_log_file(console.tool_log_path("export"))
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  export(FLAGS.workdir, FLAGS.output, FLAGS.step, FLAGS.config, FLAGS.raw_params)


if __name__ == "__main__":
  define_flags()
  app.run(main)
