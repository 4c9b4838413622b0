"""Zero-shot semantic segmentation of a checkpoint on a benchmark, with GroupViT's protocol (see zeroshot.py).

  python -m mixreorg_jax.evaluate --config=configs/eval/voc.py --checkpoint=DIR [--output_dir=DIR] \
      [--config.data.root=PATH] [--config.save_predictions=DIR]

It prints the protocol and a per-class IoU table, and writes into output_dir (default <checkpoint>/eval/<dataset>/)
metrics.json (mIoU, per_class_iou, pixel_acc, mean_acc, num_images and the protocol), TensorBoard scalars and
overlay pictures of the first config.num_visualizations images. The trainer calls `evaluate_train_state` with an
eval config attached to the train config (config.eval).
"""
from mixreorg_jax import console
if __name__ == "__main__":
  console.hold_native_output()  # before TF and XLA load: their native start-up banners go to the log file.

import functools
import importlib.util
import json
import math
import os
import time
from typing import Any, Dict, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
from clu import metric_writers
import jax
from jax.experimental import multihost_utils
import ml_collections
from ml_collections import config_flags
import numpy as np
import tqdm

from mixreorg_jax import inference
from mixreorg_jax import seg_metrics
from mixreorg_jax import train_step
from mixreorg_jax import visualize
from mixreorg_jax import zeroshot
from mixreorg_jax.data import seg_datasets
from mixreorg_jax.data import tokenizers

PROTOCOL_KEYS = ("short_side", "window", "stride", "top_k_classes", "with_background", "bg_threshold",
                 "batch_size")
CURVE_KEYS = ("train/loss", "train/loss_orig", "train/loss_rest", "train/loss_seg", "train/loss_noun_seg",
              "train/seg_acc", "train/group_info")


# ----------------------------------------------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------------------------------------------
def load_config_file(spec: str, what: str = "config") -> ml_collections.ConfigDict:
  """Loads a config file as `--config=` does: "configs/x.py" or "configs/x.py:arg" -> its get_config(), locked.

  what: how the error names the file when it does not exist.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path!r} does not exist.")
  module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  config.lock()
  return config


def load_eval_config(spec: str) -> ml_collections.ConfigDict:
  """Loads an eval config file as `--config=` does: "configs/eval/voc.py" or "configs/eval/voc.py:full"."""
  return load_config_file(spec, "eval config (config.eval.config; expected a file in configs/eval/)")


def protocol_text(config: ml_collections.ConfigDict, class_names: Sequence[str]) -> str:
  """One line per protocol choice, printed with every result (GroupViT#50/#56 came from hidden ones)."""
  lines = [f"dataset {config.data.name} ({config.data.split}) at {config.data.root or '(default)'}",
           f"classes {len(class_names)}: {', '.join(class_names[:6])}{' ...' if len(class_names) > 6 else ''}",
           f"prompt templates {len(config.prompt_templates)}: {config.prompt_templates[0]!r} ..."]
  lines += [f"{key} {config[key]}" for key in PROTOCOL_KEYS]
  return "\n".join(lines)


def _host_local(tree):
  """Arrays sharded over several hosts gathered onto every host (each host then runs its images alone)."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return multihost_utils.process_allgather(x, tiled=True)
    return x
  return jax.tree.map(fetch, tree)


# ----------------------------------------------------------------------------------------------------------------
# The protocol over a dataset.
# ----------------------------------------------------------------------------------------------------------------
def run_protocol(model, variables: Dict[str, Any], tokenizer, config: ml_collections.ConfigDict,
                 random_groups_seed: Optional[int] = None, progress: bool = True,
                 visualization_dir: str = "", num_visualizations: int = 0,
                 dataset: Optional[seg_datasets.SegDataset] = None, image_normalization: str = "clip",
                 bg_thresholds: Sequence[float] = ()) -> Dict[str, Any]:
  """Segments every image of config's dataset; -> seg_metrics.summarize(...) plus num_images, images_per_sec and
  groups_per_image (distinct groups of the argmax group map, averaged over images).

  Args:
    model: the GroupViT module; variables: its {"params", "batch_stats"}.
    tokenizer: has tokenize_numpy (mixreorg_jax.data.tokenizers).
    config: an eval config (configs/eval/*.py).
    random_groups_seed: set -> the chance baseline (random patch-to-group assignment).
    progress: show a tqdm bar with images/s.
    visualization_dir / num_visualizations: overlay pictures (prediction, ground truth, groups) of the first
      images; save_predictions (config) writes palette PNG label maps named like the ground truth.
    dataset: the dataset of config, if already opened.
    image_normalization: the pixel statistics the model expects ("clip" or "imagenet").
    bg_thresholds: with a background class, also the mIoU of each of these background thresholds from the same
      pass (`seg_metrics.ThresholdSweep`): "mIoU_by_bg_threshold" [len] and "best_bg_threshold" (the best one).
  With several processes, each segments every process_count-th image and the confusion matrices are summed.
  """
  dataset = dataset or seg_datasets.from_config(config)
  class_names = seg_datasets.prompt_class_names(config, dataset)
  protocol = zeroshot.Protocol.from_config(config)
  variables = _host_local(variables)
  text_fn = zeroshot.make_text_fn(model)
  class_emb = zeroshot.class_embeddings(lambda t: text_fn(variables, t), tokenizer,
                                        zeroshot.foreground_names(class_names, config.with_background),
                                        config.prompt_templates)
  segmenter = zeroshot.SlidingWindowSegmenter(model, variables, class_emb, protocol, random_groups_seed,
                                              image_normalization)

  rank, count = jax.process_index(), jax.process_count()
  examples = {}  # name -> (image, label) of images in flight (a few, crops are batched across images).

  def inputs():
    for i, (name, image, label) in enumerate(dataset):
      if i % count == rank:
        examples[name] = (image, label)
        yield name, image

  confusion = np.zeros((len(class_names), len(class_names)), np.int64)
  if bg_thresholds and not config.with_background:
    raise ValueError("run_protocol: bg_thresholds needs a dataset with a background class (with_background).")
  sweep = seg_metrics.ThresholdSweep(class_names, bg_thresholds) if bg_thresholds else None
  num_images, num_groups, start = 0, 0, time.time()
  bar = tqdm.tqdm(total=len(dataset), unit="img", desc=dataset.name, disable=not progress or rank > 0)
  for name, scores, groups in segmenter(inputs()):
    image, label = examples.pop(name)
    if scores.shape[0] != len(class_names):
      raise ValueError(f"{scores.shape[0]} class scores for {len(class_names)} classes; check "
                       "config.with_background against config.class_names.")
    pred = scores.argmax(axis=0).astype(np.uint8)
    confusion += seg_metrics.confusion_matrix(label, pred, len(class_names))
    if sweep:
      sweep.add(label, scores[1:])  # the foreground scores do not depend on the threshold.
    if config.save_predictions:
      _save_label(config.save_predictions, name + dataset.label_suffix, pred)
    if visualization_dir and num_images < num_visualizations:
      picture = visualize.side_by_side(
          [visualize.overlay(image, pred, class_names), visualize.overlay(image, label, class_names),
           visualize.groups_panel(image, groups)], titles=("prediction", "ground truth", "groups"))
      _save_picture(picture, os.path.join(visualization_dir, name.replace("/", "_") + ".png"))
    num_images += 1
    num_groups += len(np.unique(groups))
    bar.update(count)
  bar.close()
  if count > 1:
    confusion = np.asarray(multihost_utils.process_allgather(confusion)).sum(axis=0)
    totals = np.asarray(multihost_utils.process_allgather(np.array([num_images, num_groups], np.int64)))
    num_images, num_groups = (int(v) for v in totals.sum(axis=0))
    if sweep:
      sweep.confusions = np.asarray(multihost_utils.process_allgather(sweep.confusions)).sum(axis=0)
  summary = seg_metrics.summarize(confusion, class_names)
  if sweep:
    summary["mIoU_by_bg_threshold"] = sweep.curve()
    summary["best_bg_threshold"] = sweep.best()["threshold"]
  summary["num_images"] = num_images
  # Distinct groups in the argmax group map per image (with sliding windows, of the last window over each pixel):
  # ~1 means the grouping collapsed onto one segment.
  summary["groups_per_image"] = num_groups / max(num_images, 1)
  summary["images_per_sec"] = num_images / max(time.time() - start, 1e-9)
  return summary


def _save_label(directory: str, relative: str, pred: np.ndarray) -> None:
  path = os.path.join(directory, relative)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  visualize.save_label_png(path, pred)


def _save_picture(picture, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  picture.save(path)


def write_results(summary: Dict[str, Any], config: ml_collections.ConfigDict, output_dir: str, step: int = 0,
                  extra: Optional[Dict[str, Any]] = None) -> str:
  """metrics.json (metrics + the protocol echoed) and TensorBoard scalars into output_dir; -> metrics.json path."""
  os.makedirs(output_dir, exist_ok=True)
  record = dict(seg_metrics.json_safe(summary), step=int(step), protocol=json.loads(config.to_json()), **(extra or {}))
  path = os.path.join(output_dir, "metrics.json")
  with open(path, "w") as f:
    json.dump(record, f, indent=2)
  writer = metric_writers.create_default_writer(output_dir, just_logging=jax.process_index() > 0)
  scalars = {k: summary[k] for k in ("mIoU", "pixel_acc", "mean_acc")}
  scalars.update({f"iou/{name}": v for name, v in summary["per_class_iou"].items() if not math.isnan(v)})
  writer.write_scalars(step, scalars)
  writer.close()
  return path


def chance_miou(model, variables: Dict[str, Any], tokenizer, config: ml_collections.ConfigDict,
                seed: int = 0, image_normalization: str = "clip") -> float:
  """mIoU of the same protocol with every patch assigned to a uniformly random group (seeded): the baseline
  a grouping must beat for its segments to mean anything."""
  return run_protocol(model, variables, tokenizer, config, random_groups_seed=seed, progress=False,
                      image_normalization=image_normalization)["mIoU"]


def untrained_miou(train_config: ml_collections.ConfigDict, model, state, tokenizer,
                   config: ml_collections.ConfigDict, image_normalization: str = "clip") -> float:
  """mIoU of the same protocol with the parameters the run started from (train_config.seed), laid out as the
  trained ones: what pretraining added over a random network."""
  shardings = jax.tree.map(lambda x: x.sharding, {"params": state.params, "batch_stats": state.batch_stats})
  init = jax.jit(functools.partial(train_step.init_variables, train_config, model), out_shardings=shardings)
  variables = init(jax.random.key(train_config.get("seed", 0)))
  return run_protocol(model, variables, tokenizer, config, progress=False,
                      image_normalization=image_normalization)["mIoU"]


def image_recognition(model, variables: Dict[str, Any], tokenizer, config: ml_collections.ConfigDict,
                      image_size: int, batch_size: int = 64, image_normalization: str = "clip") -> Dict[str, float]:
  """Image-level zero-shot recognition on the segmentation set: how often the class with the highest
  image-level affinity (image embedding vs class prompts) is present in the ground truth.

  Separates "the text-image alignment was learned" from "the segments were": a model can name what is in an image
  long before its individual segments do. Images are resized to image_size x image_size. Returns top1 (percent)
  and top1_chance: the expected top-1 of a uniformly random class (the mean share of classes present).
  """
  dataset = seg_datasets.from_config(config)
  class_names = seg_datasets.prompt_class_names(config, dataset)
  names = zeroshot.foreground_names(class_names, config.with_background)
  offset = 1 if config.with_background else 0  # label id of names[0]
  variables = _host_local(variables)
  text_fn = zeroshot.make_text_fn(model)
  class_emb = zeroshot.class_embeddings(lambda t: text_fn(variables, t), tokenizer, names, config.prompt_templates)
  encode = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_image).embedding)
  hits, chance, images, present = [], [], [], []

  def flush():
    batch = np.stack(images + [images[-1]] * (batch_size - len(images)))  # pad: one compile
    top = np.asarray(jax.numpy.argmax(encode(variables, batch) @ class_emb.T, axis=-1))[:len(images)]
    hits.extend(int(t + offset) in p for t, p in zip(top, present))
    images.clear()
    present.clear()

  for _, image, label in dataset:
    classes = set(np.unique(label).tolist()) - {255, 0 if config.with_background else -1}
    if not classes:
      continue
    normalized = zeroshot.normalize_image(image, image_normalization)
    resized = np.asarray(jax.image.resize(normalized, (image_size, image_size, 3), "bilinear"))
    images.append(resized)
    present.append(classes)
    chance.append(len(classes) / len(names))
    if len(images) == batch_size:
      flush()
  if images:
    flush()
  return {"top1": 100.0 * float(np.mean(hits)), "top1_chance": 100.0 * float(np.mean(chance))}


# ----------------------------------------------------------------------------------------------------------------
# From the trainer.
# ----------------------------------------------------------------------------------------------------------------
TUNING_SPLIT, HELD_OUT_SPLIT = "voc_val", "voc"  # the synthetic sets of mixreorg_jax/data/synthetic.py


def eval_config_for_training(config: ml_collections.ConfigDict, final: bool) -> ml_collections.ConfigDict:
  """The eval config of a train config: config.eval.config with config.eval.{data_root, max_images} applied.

  A VOC-layout config without a root uses the synthetic sets of config.input.synthetic_dir: voc_val for the
  periodic evaluations during training, the held-out voc for the final one. Those images are evaluated at their
  native size (short_side = window = stride = 0), the size the synthetic pretraining images have; 448 px windows
  would upsample 64 px images sevenfold.
  """
  eval_config = load_eval_config(config.eval.config)
  if config.eval.data_root:
    eval_config.data.root = config.eval.data_root
  elif not eval_config.data.root and eval_config.data.name == "voc_layout":
    eval_config.data.root = _synthetic_split(config, HELD_OUT_SPLIT if final else TUNING_SPLIT)
    eval_config.short_side = eval_config.window = eval_config.stride = 0
  if config.eval.max_images:
    eval_config.data.max_images = config.eval.max_images
  return eval_config


def _synthetic_split(config: ml_collections.ConfigDict, split: str) -> str:
  """The directory of one synthetic segmentation set (TUNING_SPLIT or HELD_OUT_SPLIT) of a train config."""
  return os.path.join(config.input.synthetic_dir, split)


def _uses_synthetic_sets(config: ml_collections.ConfigDict, eval_config: ml_collections.ConfigDict) -> bool:
  """Whether the trainer's evaluation is on the built-in synthetic sets and the tuning set is there."""
  return (not config.eval.data_root and eval_config.data.root == _synthetic_split(config, HELD_OUT_SPLIT)
          and os.path.isdir(_synthetic_split(config, TUNING_SPLIT)))


def _tuned_threshold_results(model, variables: Dict[str, Any], tokenizer, eval_config: ml_collections.ConfigDict,
                             threshold: float, normalization: str) -> Dict[str, float]:
  """The held-out protocol again with the background threshold chosen on the tuning split.

  -> {"eval/tuned_bg_threshold", "eval/tuned_bg_mIoU", "eval/tuned_bg_per_class/<class>"}.
  """
  tuned = eval_config.copy_and_resolve_references()
  tuned.bg_threshold = float(threshold)
  summary = run_protocol(model, variables, tokenizer, tuned, progress=False, image_normalization=normalization)
  results = {"eval/tuned_bg_threshold": float(threshold), "eval/tuned_bg_mIoU": summary["mIoU"]}
  results.update({f"eval/tuned_bg_per_class/{name}": iou for name, iou in summary["per_class_iou"].items()})
  return results


def evaluate_train_state(config: ml_collections.ConfigDict, model, state, workdir: str, step: int,
                         final: bool = False) -> Dict[str, float]:
  """Evaluates a TrainState (.params, .batch_stats) with config.eval; -> {"eval/mIoU", "eval/pixel_acc", ...}.

  Writes workdir/eval/<dataset>/metrics.json and TensorBoard scalars. With final: also example pictures into
  workdir/examples/, the chance baseline ("eval/chance_mIoU"), the untrained baseline ("eval/untrained_mIoU"),
  image-level recognition ("eval/image_top1" and its chance) and workdir/training_curves.png. On the built-in
  synthetic sets, the final evaluation also reports the tuning split ("eval/tuning_mIoU") and the held-out set at
  the background threshold that is best on the tuning split (`_tuned_threshold_results`).
  """
  eval_config = eval_config_for_training(config, final)
  tokenizer = tokenizers.make_tokenizer(config.input)
  normalization = config.input.get("normalization", "clip")
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  output_dir = os.path.join(workdir, "eval", eval_config.data.name)
  summary = run_protocol(model, variables, tokenizer, eval_config, progress=False,
                         visualization_dir=os.path.join(workdir, "examples") if final else "",
                         num_visualizations=eval_config.num_visualizations if final else 0,
                         image_normalization=normalization)
  results = {"eval/mIoU": summary["mIoU"], "eval/pixel_acc": summary["pixel_acc"],
             "eval/mean_acc": summary["mean_acc"], "eval/groups_per_image": summary["groups_per_image"]}
  results.update({f"eval/per_class/{name}": iou for name, iou in summary["per_class_iou"].items()})
  extra = {}
  if final and _uses_synthetic_sets(config, eval_config):
    # The tuning split too, so that choices over finished runs are made on it, never on the held-out set, and
    # the background threshold of this model chosen on it, then applied to the held-out set.
    tuning = run_protocol(model, variables, tokenizer, eval_config_for_training(config, final=False),
                          progress=False, image_normalization=normalization,
                          bg_thresholds=seg_metrics.DEFAULT_BG_THRESHOLDS)
    results["eval/tuning_mIoU"] = extra["tuning_mIoU"] = tuning["mIoU"]
    results.update(_tuned_threshold_results(model, variables, tokenizer, eval_config, tuning["best_bg_threshold"],
                                            normalization))
    extra.update({k[len("eval/"):]: v for k, v in results.items() if k.startswith("eval/tuned_bg")})
  if final:
    results["eval/chance_mIoU"] = extra["chance_mIoU"] = chance_miou(model, variables, tokenizer, eval_config,
                                                                     config.get("seed", 0), normalization)
    results["eval/untrained_mIoU"] = extra["untrained_mIoU"] = untrained_miou(config, model, state, tokenizer,
                                                                              eval_config, normalization)
    recognition = image_recognition(model, variables, tokenizer, eval_config, config.input.image_size,
                                    image_normalization=normalization)
    results["eval/image_top1"] = extra["image_top1"] = recognition["top1"]
    results["eval/image_top1_chance"] = extra["image_top1_chance"] = recognition["top1_chance"]
  if jax.process_index() == 0:
    write_results(summary, eval_config, output_dir, step, extra)
    jsonl = os.path.join(workdir, "metrics.jsonl")
    if final and os.path.exists(jsonl):
      plot_training_curves(jsonl, os.path.join(workdir, "training_curves.png"), evals={step: results["eval/mIoU"]})
  logging.info("Step %d zero-shot %s: %s", step, eval_config.data.name, results)
  return results


def plot_training_curves(metrics_jsonl_path: str, out_png: str, keys: Sequence[str] = CURVE_KEYS,
                         evals: Optional[Dict[int, float]] = None) -> str:
  """Plots the train losses and seg accuracy of a metrics.jsonl ({"step": ..., "train/loss": ...} per line)
  against the step, one panel per key present; -> out_png.

  Evaluations (the file's eval/mIoU records, plus `evals` {step: mIoU} not yet written) are marked by a dotted
  line in every panel and plotted in a last panel of their own.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  series = {k: ([], []) for k in keys}
  evals = dict(evals or {})
  with open(metrics_jsonl_path) as f:
    for line in f:
      if not line.strip():
        continue
      record = json.loads(line)
      if record.get("eval/mIoU") is not None and "step" in record:
        evals.setdefault(record["step"], record["eval/mIoU"])
      for k in keys:
        if k in record and record[k] is not None and "step" in record:
          series[k][0].append(record["step"])
          series[k][1].append(record[k])
  present = [k for k in keys if series[k][0]]
  if not present:
    raise ValueError(f"{metrics_jsonl_path} has none of {list(keys)}; nothing to plot.")
  panels = len(present) + bool(evals)
  cols = min(panels, 4)
  rows = -(-panels // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False, sharex=True)
  axes = axes.ravel()
  for ax in axes[panels:]:
    ax.axis("off")
  for ax, k in zip(axes, present):
    ax.plot(*series[k], lw=1.2)
    for step in evals:
      ax.axvline(step, color="tab:red", ls=":", lw=1)
    ax.set_title(k.split("/", 1)[-1])
    ax.set_xlabel("step")
    ax.tick_params(labelbottom=True)
    ax.grid(alpha=0.3)
  if evals:
    ax = axes[panels - 1]
    steps = sorted(evals)
    ax.plot(steps, [evals[s] for s in steps], "o-", color="tab:red", lw=1.2)
    ax.set_title("eval mIoU (dotted: evaluations)")
    ax.set_xlabel("step")
    ax.tick_params(labelbottom=True)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=100)
  plt.close(fig)
  return out_png


# ----------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------
def evaluate_checkpoint(checkpoint: str, config: ml_collections.ConfigDict, output_dir: str = "") -> Dict[str, Any]:
  """The command: loads the checkpoint, runs the protocol, prints and writes the results; -> the summary."""
  model = inference.load(checkpoint)
  output_dir = output_dir or os.path.join(checkpoint, "eval", config.data.name)
  dataset = seg_datasets.from_config(config)
  print(protocol_text(config, seg_datasets.prompt_class_names(config, dataset)), flush=True)
  print(f"image normalization: {model.image_normalization} (from the checkpoint)", flush=True)
  summary = run_protocol(model.model, model.variables, zeroshot.checkpoint_tokenizer(model.tokenizer), config,
                         visualization_dir=os.path.join(output_dir, "visualizations"),
                         num_visualizations=config.num_visualizations, dataset=dataset,
                         image_normalization=model.image_normalization)
  print(seg_metrics.format_table(summary), flush=True)
  print(f"{summary['num_images']} images, {summary['images_per_sec']:.2f} images/s, "
        f"{summary['groups_per_image']:.1f} groups per image", flush=True)
  if jax.process_index() == 0:
    path = write_results(summary, config, output_dir, extra={"checkpoint": os.path.abspath(checkpoint)})
    print(f"wrote {path}", flush=True)
  return summary


def define_flags() -> None:
  """The command's flags; defined only when it runs (the trainer imports this module and has its own --config)."""
  config_flags.DEFINE_config_file("config", None, "An eval config file (configs/eval/*.py).", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "An inference checkpoint directory (converter or export).")
  flags.DEFINE_string("output_dir", "", "Where to write results; '' = <checkpoint>/eval/<dataset>/.")
  flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
  console.to_log_file(console.tool_log_path("evaluate"))
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  evaluate_checkpoint(flags.FLAGS.checkpoint, flags.FLAGS.config, flags.FLAGS.output_dir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
