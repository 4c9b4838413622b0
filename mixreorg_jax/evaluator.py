"""Zero-shot segmentation evaluations behind one API, for the trainer and the command-line tools.

  evaluator = Evaluator(eval_config, model, tokenizer=..., output_dir=DIR, name="voc")
  metrics = evaluator.run(variables)   # {"eval/voc/mIoU": ..., "eval/voc/per_class/<class>": ..., ...}

An eval config (configs/eval/*.py) holds the dataset, the protocol (GroupViT's, see zeroshot.py) and the options
of one evaluation; a train config declares its evaluations by name in `config.evals.<name>`, each an eval config
with its period (`every_steps`). `Evaluations` runs several of them: the trainer's (`Evaluations.for_training`)
and those of `python -m mixreorg_jax.evaluate` on a checkpoint.

Metrics are named `eval/<name>/<metric>`: mIoU, pixel_acc, mean_acc, groups_per_image, per_class/<class>, and
with the options of the evaluation: best_bg_threshold and best_bg_mIoU (sweep_bg_thresholds), tuned_bg_threshold,
tuned_bg_mIoU and tuned_bg_per_class/<class> (bg_threshold_from: this protocol again at the threshold chosen by
another evaluation), chance_mIoU and untrained_mIoU (baselines), image_top1 and image_top1_chance
(image_recognition).
Each run writes OUTPUT_DIR/metrics.json (the summary and the protocol) and TensorBoard scalars.
"""
import functools
import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from absl import logging
from clu import metric_writers
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from mixreorg_jax import seg_metrics
from mixreorg_jax import train_step
from mixreorg_jax import visualize
from mixreorg_jax import workdir as workdir_lib
from mixreorg_jax import zeroshot
from mixreorg_jax.data import seg_datasets

PROTOCOL_KEYS = ("short_side", "window", "stride", "top_k_classes", "with_background", "bg_threshold",
                 "batch_size")
Variables = Dict[str, Any]


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
def run_protocol(model, variables: Variables, tokenizer, config: ml_collections.ConfigDict,
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
      pass (`seg_metrics.ThresholdSweep`): "mIoU_by_bg_threshold" [len], "best_bg_threshold" (the best one) and
      "best_bg_mIoU" (its mIoU).
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
  for name, scores, groups, best_group_score in segmenter(inputs()):
    image, label = examples.pop(name)
    if scores.shape[0] != len(class_names):
      raise ValueError(f"{scores.shape[0]} class scores for {len(class_names)} classes; check "
                       "config.with_background against config.class_names.")
    pred = scores.argmax(axis=0).astype(np.uint8)
    confusion += seg_metrics.confusion_matrix(label, pred, len(class_names))
    if sweep:
      sweep.add(label, scores[1:], best_group_score)  # the foreground scores do not depend on the threshold.
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
    best = sweep.best()
    summary["best_bg_threshold"], summary["best_bg_mIoU"] = best["threshold"], best["mIoU"]
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


def image_recognition(model, variables: Variables, tokenizer, config: ml_collections.ConfigDict,
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
    classes = set(np.unique(label).tolist()) - {seg_metrics.IGNORE_INDEX, 0 if config.with_background else -1}
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
# One evaluation.
# ----------------------------------------------------------------------------------------------------------------
def check_eval_config(config: ml_collections.ConfigDict, where: str) -> None:
  """The checks that can fail before anything compiles; `where` names the config (e.g. "config.evals.voc")."""
  if config.sweep_bg_thresholds and not config.with_background:
    raise ValueError(f"{where}.sweep_bg_thresholds needs a background class ({where}.with_background=True).")
  if config.bg_threshold_from and not config.with_background:
    raise ValueError(f"{where}.bg_threshold_from needs a background class ({where}.with_background=True).")
  if config.data.root and not os.path.exists(config.data.root):
    raise FileNotFoundError(f"{where}.data.root={config.data.root!r} does not exist.")
  zeroshot.Protocol.from_config(config)  # every protocol key has a value of its type.


class Evaluator:
  """Zero-shot segmentation of one dataset under one protocol: `run(variables) -> metrics`.

  Args:
    config: an eval config (configs/eval/*.py, or one entry of a train config's config.evals).
    model: the GroupViT module the variables belong to.
    tokenizer: has tokenize_numpy (mixreorg_jax.data.tokenizers).
    image_normalization: the pixel statistics the model expects ("clip" or "imagenet").
    output_dir: where metrics.json, TensorBoard scalars and the pictures go ("" = written nowhere).
    name: the metrics are "eval/<name>/..." (default: the dataset's name).
    initial_variables: a function giving the parameters training started from, for the untrained baseline
      (config.baselines); without it only the chance baseline is computed.
    seed: of the chance baseline's random groups.
    progress: a progress bar over the images.
  """

  def __init__(self, config: ml_collections.ConfigDict, model, *, tokenizer, image_normalization: str = "clip",
               output_dir: str = "", name: str = "", initial_variables: Optional[Callable[[], Variables]] = None,
               seed: int = 0, progress: bool = False):
    self.config = config
    self.model = model
    self.tokenizer = tokenizer
    self.image_normalization = image_normalization
    self.output_dir = output_dir
    self.name = name or config.data.name
    self.initial_variables = initial_variables
    self.seed = seed
    self.progress = progress
    self.summary: Dict[str, Any] = {}  # the last run's seg_metrics summary (for the CLI's table).

  def _protocol(self, variables: Variables, config: Optional[ml_collections.ConfigDict] = None,
                **kwargs) -> Dict[str, Any]:
    return run_protocol(self.model, variables, self.tokenizer, config or self.config, progress=False,
                        image_normalization=self.image_normalization, **kwargs)

  def run(self, variables: Variables, step: int = 0, final: bool = True,
          tuned_bg_threshold: Optional[float] = None, extra: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    """Evaluates `variables` ({"params", "batch_stats"}); -> {"eval/<name>/<metric>": value}.

    final: also the end-of-run extras the config asks for (pictures, baselines, image recognition); periodic
    evaluations during training pass final=False. tuned_bg_threshold: the protocol again at this background
    threshold (chosen on another evaluation, see config.bg_threshold_from). extra: more fields for metrics.json.
    """
    c = self.config
    pictures = os.path.join(self.output_dir, "visualizations") if self.output_dir and final else ""
    summary = run_protocol(self.model, variables, self.tokenizer, c, progress=self.progress,
                           visualization_dir=pictures, num_visualizations=c.num_visualizations,
                           image_normalization=self.image_normalization,
                           bg_thresholds=seg_metrics.DEFAULT_BG_THRESHOLDS if c.sweep_bg_thresholds else ())
    self.summary = summary
    found = {k: summary[k] for k in ("mIoU", "pixel_acc", "mean_acc", "groups_per_image")}
    found.update({f"per_class/{name}": iou for name, iou in summary["per_class_iou"].items()})
    if c.sweep_bg_thresholds:
      found["best_bg_threshold"] = summary["best_bg_threshold"]
      found["best_bg_mIoU"] = summary["best_bg_mIoU"]
    if tuned_bg_threshold is not None:
      tuned = c.copy_and_resolve_references()
      tuned.bg_threshold = float(tuned_bg_threshold)
      at_tuned = self._protocol(variables, tuned)
      found.update({"tuned_bg_threshold": float(tuned_bg_threshold), "tuned_bg_mIoU": at_tuned["mIoU"]})
      found.update({f"tuned_bg_per_class/{name}": iou for name, iou in at_tuned["per_class_iou"].items()})
    if final and c.baselines:
      found["chance_mIoU"] = self._protocol(variables, random_groups_seed=self.seed)["mIoU"]
      if self.initial_variables is not None:
        found["untrained_mIoU"] = self._protocol(self.initial_variables())["mIoU"]
    if final and c.image_recognition:
      recognition = image_recognition(self.model, variables, self.tokenizer, c,
                                      self.model.vision_model.image_size,
                                      image_normalization=self.image_normalization)
      found.update({"image_top1": recognition["top1"], "image_top1_chance": recognition["top1_chance"]})
    if self.output_dir and jax.process_index() == 0:
      scalars = {k: v for k, v in found.items() if not k.startswith(("per_class/", "tuned_bg_per_class/"))}
      write_results(summary, c, self.output_dir, step, dict(scalars, **(extra or {})))
    metrics = {f"eval/{self.name}/{k}": v for k, v in found.items()}
    logging.info("Step %d eval %s (%s, %d images): %s", step, self.name, c.data.name, summary["num_images"],
                 ", ".join(f"{k} {v:.4g}" for k, v in found.items() if "per_class/" not in k))
    return metrics


def write_results(summary: Dict[str, Any], config: ml_collections.ConfigDict, output_dir: str, step: int = 0,
                  extra: Optional[Dict[str, Any]] = None) -> str:
  """metrics.json (metrics + the protocol echoed) and TensorBoard scalars into output_dir; -> metrics.json path."""
  os.makedirs(output_dir, exist_ok=True)
  record = dict(seg_metrics.json_safe(summary), step=int(step), protocol=json.loads(config.to_json()),
                **seg_metrics.json_safe(extra or {}))
  path = os.path.join(output_dir, "metrics.json")
  with open(path, "w") as f:
    json.dump(record, f, indent=2)
  writer = metric_writers.create_default_writer(output_dir, just_logging=jax.process_index() > 0)
  scalars = {k: summary[k] for k in ("mIoU", "pixel_acc", "mean_acc")}
  scalars.update({f"iou/{name}": v for name, v in summary["per_class_iou"].items() if not math.isnan(v)})
  writer.write_scalars(step, scalars)
  writer.close()
  return path


# ----------------------------------------------------------------------------------------------------------------
# The evaluations of a train config (config.evals).
# ----------------------------------------------------------------------------------------------------------------
def enabled_evals(config: ml_collections.ConfigDict) -> Dict[str, ml_collections.ConfigDict]:
  """name -> eval config of every evaluation in config.evals that has data: a data.root, or a built-in synthetic
  set (`synthetic`, under config.input.synthetic_dir), whose root is then filled in."""
  found = {}
  for name, eval_config in (config.get("evals") or {}).items():
    if not eval_config.data.root and not eval_config.synthetic:
      continue  # off until its data root is given, e.g. --config.evals.voc.data.root=/data
    eval_config = eval_config.copy_and_resolve_references()
    if not eval_config.data.root:
      eval_config.data.root = os.path.join(config.input.synthetic_dir, eval_config.synthetic)
    found[name] = eval_config
  return found


def _order(evals: Dict[str, ml_collections.ConfigDict]) -> List[str]:
  """The names with every evaluation after the one it takes its background threshold from."""
  return sorted(evals, key=lambda name: bool(evals[name].bg_threshold_from))


def check_evals(config: ml_collections.ConfigDict) -> None:
  """Every evaluation of config.evals is well-formed (run before anything compiles)."""
  evals = enabled_evals(config)
  for name, eval_config in evals.items():
    source = eval_config.bg_threshold_from
    if source and not (source in evals and evals[source].sweep_bg_thresholds):
      raise ValueError(f"config.evals.{name}.bg_threshold_from={source!r}: expected an enabled evaluation of "
                       f"config.evals with sweep_bg_thresholds=True; enabled: {sorted(evals)}.")
    if source and evals[source].bg_threshold_from:
      raise ValueError(f"config.evals.{name}.bg_threshold_from={source!r}: that evaluation takes its threshold "
                       "from another one; chains are not supported.")
    if not config.evals[name].data.root and not os.path.isdir(eval_config.data.root):
      raise FileNotFoundError(
          f"config.evals.{name}.synthetic={eval_config.synthetic!r}: {eval_config.data.root} does not exist; "
          f"generate it (python -m mixreorg_jax.data.synthetic --out={config.input.synthetic_dir}), give "
          f"config.evals.{name}.data.root, or turn the evaluation off with config.evals.{name}.synthetic=''.")
    check_eval_config(eval_config, f"config.evals.{name}")


class Evaluations:
  """Several evaluations run together: each every `every_steps` steps and all of them at the end (final).

  An evaluation with bg_threshold_from also reports its protocol at the background threshold that the named
  evaluation (with sweep_bg_thresholds) found best in the same call.
  """

  def __init__(self, evaluators: Dict[str, Evaluator]):
    self.evaluators = {name: evaluators[name] for name in _order({n: e.config for n, e in evaluators.items()})}

  @classmethod
  def for_training(cls, config: ml_collections.ConfigDict, model, workdir: str,
                   initial_variables: Optional[Callable[[], Variables]] = None) -> "Evaluations":
    """The enabled evaluations of a train config's config.evals; outputs in WORKDIR/eval/<name>/ (or the
    evaluation's output_dir)."""
    from mixreorg_jax.data import tokenizers  # noqa: PLC0415  (TF: only once the trainer runs)
    evals = enabled_evals(config)
    tokenizer = tokenizers.make_tokenizer(config.input) if evals else None
    return cls({name: Evaluator(c, model, tokenizer=tokenizer, image_normalization=config.input.normalization,
                                output_dir=c.output_dir or workdir_lib.eval_dir(workdir, name), name=name,
                                initial_variables=initial_variables, seed=config.seed)
                for name, c in evals.items()})

  def due(self, step: int) -> bool:
    """Whether a periodic evaluation falls on this step."""
    return any(self._due(e, step) for e in self.evaluators.values())

  @staticmethod
  def _due(evaluator: Evaluator, step: int) -> bool:
    return bool(evaluator.config.every_steps) and step % evaluator.config.every_steps == 0

  def run(self, variables: Variables, step: int = 0, final: bool = True,
          done: Optional[Callable[[Evaluator], None]] = None) -> Dict[str, float]:
    """The evaluations due at `step` (all of them if final) -> their metrics; `done` is called after each."""
    metrics: Dict[str, float] = {}
    for evaluator in self.evaluators.values():
      if final or self._due(evaluator, step):
        source = evaluator.config.bg_threshold_from
        threshold = metrics.get(f"eval/{source}/best_bg_threshold") if source else None
        metrics.update(evaluator.run(variables, step, final=final, tuned_bg_threshold=threshold))
        if done:
          done(evaluator)
    return metrics


def initial_variables(config: ml_collections.ConfigDict, model, state) -> Callable[[], Variables]:
  """A function giving the parameters a run started from (config.seed), laid out as the trained ones in `state`:
  the untrained baseline of config.evals.<name>.baselines."""
  def init() -> Variables:
    shardings = jax.tree.map(lambda x: x.sharding, {"params": state.params, "batch_stats": state.batch_stats})
    fn = jax.jit(functools.partial(train_step.init_variables, config, model), out_shardings=shardings)
    return fn(jax.random.key(config.seed))
  return init
