"""Zero-shot semantic segmentation of a checkpoint, with GroupViT's protocol (the command over evaluator.py).

  python -m mixreorg_jax.evaluate --config=configs/eval/voc.py --checkpoint=DIR [--output_dir=DIR] \
      [--config.data.root=PATH] [--config.save_predictions=DIR]

Several datasets in one command: give a config with evaluations (`config.evals`, e.g. a train config) and the
data root of each one to run; an evaluation without a root is off.

  python -m mixreorg_jax.evaluate --config=configs/mixreorg_gcc_yfcc.py --checkpoint=DIR \
      --config.evals.voc.data.root=/data --config.evals.context.data.root=/data --config.evals.ade20k.data.root=/ade

It prints the protocol and a per-class IoU table per evaluation, and writes into its output directory metrics.json
(mIoU, per_class_iou, pixel_acc, mean_acc, num_images and the protocol), TensorBoard scalars and overlay pictures
of the first config.num_visualizations images. The output directory is --output_dir, else config.output_dir, else
<checkpoint>/eval/<dataset>/ (with several evaluations: <--output_dir or checkpoint/eval>/<name>/).
"""
from mixreorg_jax import console
if __name__ == "__main__":
  console.hold_native_output()  # before TF and XLA load: their native start-up banners go to the log file.

import os
from typing import Any, Dict

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags

from mixreorg_jax import evaluator as evaluator_lib
from mixreorg_jax import inference
from mixreorg_jax import seg_metrics
from mixreorg_jax.data import tokenizers


def evaluators(checkpoint: str, model: inference.InferenceModel, config: ml_collections.ConfigDict,
               output_dir: str = "") -> evaluator_lib.Evaluations:
  """The evaluations of `config` (an eval config, or a config with evals) on a loaded checkpoint."""
  if "evals" in config:
    evals = evaluator_lib.enabled_evals(config)
    if not evals:
      raise ValueError(f"None of config.evals ({', '.join(config.evals)}) has data; give one a root, e.g. "
                       f"--config.evals.{next(iter(config.evals), 'NAME')}.data.root=PATH.")
    root = output_dir or os.path.join(checkpoint, "eval")
    dirs = {name: c.output_dir or os.path.join(root, name) for name, c in evals.items()}
  else:
    evals = {config.data.name: config}
    dirs = {config.data.name: output_dir or config.output_dir or os.path.join(checkpoint, "eval", config.data.name)}
  tokenizer = tokenizers.checkpoint_tokenizer(model.tokenizer)
  return evaluator_lib.Evaluations({
      name: evaluator_lib.Evaluator(c, model.model, tokenizer=tokenizer, image_normalization=model.image_normalization,
                                    output_dir=dirs[name], name=name, progress=True)
      for name, c in evals.items()})


def evaluate_checkpoint(checkpoint: str, config: ml_collections.ConfigDict, output_dir: str = ""
                        ) -> Dict[str, Any]:
  """The command: loads the checkpoint, runs every evaluation, prints and writes the results; -> the summary of
  the last evaluation run (seg_metrics.summarize plus num_images, images_per_sec, groups_per_image)."""
  model = inference.load(checkpoint)
  evaluations = evaluators(checkpoint, model, config, output_dir)
  print(f"image normalization: {model.image_normalization} (from the checkpoint)", flush=True)
  summaries = []

  def report(evaluator: evaluator_lib.Evaluator) -> None:
    c, summary = evaluator.config, evaluator.summary
    summaries.append(summary)
    class_names = list(summary["per_class_iou"])  # the dataset's, in label-id order.
    print(f"--- {evaluator.name}\n{evaluator_lib.protocol_text(c, class_names)}", flush=True)
    print(seg_metrics.format_table(summary), flush=True)
    print(f"{summary['num_images']} images, {summary['images_per_sec']:.2f} images/s, "
          f"{summary['groups_per_image']:.1f} groups per image", flush=True)
    if jax.process_index() == 0:
      print(f"wrote {os.path.join(evaluator.output_dir, 'metrics.json')}", flush=True)

  evaluations.run(model.variables, done=report)
  return summaries[-1]


def main(argv):
  console.to_log_file(console.tool_log_path("evaluate"))
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  evaluate_checkpoint(flags.FLAGS.checkpoint, flags.FLAGS.config, flags.FLAGS.output_dir)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "An eval config file (configs/eval/*.py), or any config with "
                                  "evaluations (config.evals).", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "An inference checkpoint directory (converter or export).")
  flags.DEFINE_string("output_dir", "", "Where to write results; '' = config.output_dir, else "
                      "<checkpoint>/eval/<dataset>/.")
  flags.mark_flags_as_required(["config", "checkpoint"])
  app.run(main)
