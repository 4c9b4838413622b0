r"""Does a model fail at grouping or at naming? Diagnostics of zero-shot segmentation on a labelled set.

  python -m mixreorg_jax.tools.diagnose --checkpoint=DIR --config=configs/eval/synthetic.py \
      --config.data.root=data/synthetic/voc_val [--output_dir=DIR] [--thresholds=0,0.05,...,1]

Zero-shot segmentation has two parts that mIoU alone cannot tell apart: the image tower *groups* the pixels into
segments, and each segment is *named* by comparing its embedding with the class prompts. Running the eval
config's protocol once, this reports

  oracle mIoU          every group of the argmax group map takes its majority ground-truth label: the mIoU of
                       a perfect namer on these groups (low = the grouping fails);
  patch-grid ceiling   every patch of the model's grid takes its majority label: what a model that groups and
                       names every patch right would reach, the bound its patch size sets on these labels (one-window
                       protocols only; with a resize, a label pixel falls in the patch its centre maps into);
  groups named right   of the object groups (more than half of their labelled pixels one foreground class), the
                       share whose predicted label (the majority of the protocol's labels over the group) is that
                       class (low with a high oracle = the naming fails);
  background FP rate   the share of ground-truth background pixels labelled as an object;
  mIoU(threshold)      the protocol's mIoU with each background threshold, and the best one; choose it on a tuning
                       split, never on a held-out one;
  per class            IoU; oracle IoU (its grouping); named right without the threshold (the share of its pixels
                       whose best foreground class is it, the background rule off: its naming); and called
                       background (the share of its pixels under the protocol's threshold); and the purity of its
                       main group (in each image that has the class, the group holding most of its pixels: the
                       share of that group's labelled pixels that are the class, averaged over those images); and
                       its nearest prompt (the other class whose prompt embedding has the highest cosine with
                       its own). A class named right without the threshold yet called background has weak
                       scores: its groups are impure (low purity) or its prompt is close to others' (a high
                       nearest-prompt cosine caps how sure a softmax over the prompts can be), and the threshold
                       takes it for background;

and writes into output_dir (default <checkpoint>/diagnose/<dataset>/) `diagnose.json`, `confusion.png` (rows =
ground truth, normalised per row) and `bg_threshold.png` (mIoU against the threshold).

The threshold curve comes from one pass with the foreground scores: a pixel is background at threshold t when its
best class score is below min(t, the best class score of any group of the image, those owning no pixel included),
the protocol's rule. With one window per image (the native-size protocols) every point of the curve is the
protocol's mIoU at that threshold; with sliding windows, whose background decisions are averaged over crops, the
curve is an approximation.
"""
from mixreorg_jax import console
if __name__ == "__main__":
  console.hold_native_output()  # before TF and XLA load: their native start-up banners go to the log file.

import dataclasses
import json
import os
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np

from mixreorg_jax import seg_metrics

DEFAULT_THRESHOLDS = seg_metrics.DEFAULT_BG_THRESHOLDS
OBJECT_GROUP_PURITY = 0.5  # an object group has more than this share of its labelled pixels in one class.


# ----------------------------------------------------------------------------------------------------------------
# Per-image statistics (pure numpy).
# ----------------------------------------------------------------------------------------------------------------
def group_label_counts(label: np.ndarray, groups: np.ndarray, num_classes: int,
                       ignore_index: int = seg_metrics.IGNORE_INDEX) -> Tuple[np.ndarray, np.ndarray]:
  """The labelled pixels of each group, per class. label, groups: int [H, W].

  -> (group ids int [S], counts int [S, num_classes]) over the S groups that hold a labelled pixel; unlabelled
  pixels (ignore_index, or >= num_classes) count nowhere.
  """
  keep = (label != ignore_index) & (label < num_classes)
  group_ids, index = np.unique(groups[keep], return_inverse=True)
  counts = np.zeros((len(group_ids), num_classes), np.int64)
  np.add.at(counts, (index.reshape(-1), label[keep]), 1)
  return group_ids, counts


def oracle_labels(label: np.ndarray, groups: np.ndarray, num_classes: int,
                  ignore_index: int = seg_metrics.IGNORE_INDEX) -> np.ndarray:
  """Every group takes its majority ground-truth label. label, groups: int [H, W] -> int [H, W].

  A group with no labelled pixel keeps label 0 (it is not scored anyway: all its pixels are ignored).
  """
  out = np.zeros_like(label)
  for g, counts in zip(*group_label_counts(label, groups, num_classes, ignore_index)):
    out[groups == g] = counts.argmax()
  return out


def patch_grid(shape: Tuple[int, int], patch: int, resized: Optional[Tuple[int, int]] = None) -> np.ndarray:
  """int [H, W]: the index of the model's patch x patch cell that each pixel of an [H, W] label falls in, row-major
  (a partial last cell counts). resized: the (h, w) the image is resized to before the model sees it (None: its
  own size); a pixel then falls in the cell that its centre maps into."""
  h, w = resized or shape
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  rows = ((yy + 0.5) * h / shape[0]).astype(np.int64) // patch
  columns = ((xx + 0.5) * w / shape[1]).astype(np.int64) // patch
  return rows * -(-w // patch) + columns


def object_groups_named(label: np.ndarray, pred: np.ndarray, groups: np.ndarray, num_classes: int,
                        ignore_index: int = seg_metrics.IGNORE_INDEX) -> Tuple[int, int]:
  """-> (object groups, those named right) of one image. label, pred, groups: int [H, W].

  An object group has more than OBJECT_GROUP_PURITY of its labelled pixels in one foreground class; it is named
  right when the majority of the predicted labels over the whole group is that class.
  """
  total = right = 0
  for g, counts in zip(*group_label_counts(label, groups, num_classes, ignore_index)):
    majority = int(counts.argmax())
    if majority == 0 or counts[majority] <= OBJECT_GROUP_PURITY * counts.sum():
      continue
    total += 1
    right += int(np.bincount(pred[groups == g], minlength=num_classes).argmax() == majority)
  return total, right


def main_group_purity(label: np.ndarray, groups: np.ndarray, num_classes: int,
                      ignore_index: int = seg_metrics.IGNORE_INDEX) -> Dict[int, float]:
  """-> {foreground class in the image: purity of its main group}. label, groups: int [H, W].

  A class's main group is the group holding most of its pixels; its purity is the share of that group's labelled
  pixels that are the class, in [0, 1]. Unlabelled pixels (ignore_index, or >= num_classes) count nowhere.
  """
  _, counts = group_label_counts(label, groups, num_classes, ignore_index)  # [S, C]
  main = counts.argmax(axis=0)  # [C]: each class's main group
  sizes = counts.sum(axis=1)  # [S]
  return {c: float(counts[main[c], c] / sizes[main[c]]) for c in range(1, num_classes) if counts[:, c].any()}


def nearest_prompts(class_emb: np.ndarray, names: Sequence[str]) -> Dict[str, Tuple[str, float]]:
  """For each prompted class, the other class whose prompt is nearest and their cosine.

  class_emb: float [C, D], L2-normalised prompt embeddings of `names` (C >= 2). -> {name: (nearest name, cos)}.
  """
  emb = np.asarray(class_emb, np.float64)
  similarity = emb @ emb.T
  np.fill_diagonal(similarity, -np.inf)
  nearest = similarity.argmax(axis=1)
  return {name: (names[j], float(similarity[i, j])) for i, (name, j) in enumerate(zip(names, nearest))}


def _row_share(confusion: np.ndarray, row: int, column: int) -> float:
  """The percentage of ground-truth class `row`'s pixels predicted `column`; confusion int [C, C]."""
  return 100.0 * confusion[row, column] / max(confusion[row].sum(), 1)


class Diagnosis:
  """Accumulates the statistics of `diagnose` over images (label 0 is the background)."""

  def __init__(self, class_names: Sequence[str], thresholds: Sequence[float], protocol_threshold: float,
               patch_size: int = 0, short_side: int = 0):
    """patch_size: the model's patch, for the patch-grid ceiling (0 = not reported); short_side: the protocol's
    resize (`zeroshot.resized_shape`) of a one-window protocol, 0 = the images' own size."""
    self.class_names = tuple(class_names)
    self.protocol_threshold = float(protocol_threshold)
    self.patch_size = int(patch_size)
    self.short_side = int(short_side)
    c = len(class_names)
    self.confusion = np.zeros((c, c), np.int64)  # at the protocol's threshold
    self.oracle_confusion = np.zeros((c, c), np.int64)
    self.ceiling_confusion = np.zeros((c, c), np.int64)  # every patch its majority label
    self.unthresholded_confusion = np.zeros((c, c), np.int64)  # every pixel its best foreground class
    self.sweep = seg_metrics.ThresholdSweep(class_names, thresholds)
    self.object_groups = self.named_right = self.num_images = 0
    self.purity_sum = np.zeros(c)  # per class: the sum over images of its main group's purity
    self.purity_count = np.zeros(c, np.int64)  # per class: the images that have it

  def add(self, label: np.ndarray, foreground_scores: np.ndarray, groups: np.ndarray,
          best_group_score: Optional[float] = None) -> None:
    """label int [H, W]; foreground_scores float [C-1, H, W] (no background channel); groups int [H, W];
    best_group_score: the image's best group score (`zeroshot.Segmentation`; None: its best pixel's)."""
    c = len(self.class_names)
    pred = seg_metrics.label_with_threshold(foreground_scores, self.protocol_threshold, best_group_score)
    self.confusion += seg_metrics.confusion_matrix(label, pred, c)
    self.oracle_confusion += seg_metrics.confusion_matrix(label, oracle_labels(label, groups, c), c)
    if self.patch_size:
      resized = None
      if self.short_side:
        from mixreorg_jax import zeroshot  # pylint: disable=g-import-not-at-top
        resized = zeroshot.resized_shape(*label.shape, self.short_side)
      cells = patch_grid(label.shape, self.patch_size, resized)
      self.ceiling_confusion += seg_metrics.confusion_matrix(label, oracle_labels(label, cells, c), c)
    self.unthresholded_confusion += seg_metrics.confusion_matrix(label, foreground_scores.argmax(axis=0) + 1, c)
    self.sweep.add(label, foreground_scores, best_group_score)
    total, right = object_groups_named(label, pred, groups, c)
    self.object_groups += total
    self.named_right += right
    for cls, purity in main_group_purity(label, groups, c).items():
      self.purity_sum[cls] += purity
      self.purity_count[cls] += 1
    self.num_images += 1

  def summary(self) -> Dict[str, Any]:
    miou = lambda confusion: seg_metrics.summarize(confusion, self.class_names)["mIoU"]  # noqa: E731
    curve, best = self.sweep.curve(), self.sweep.best()
    background = self.confusion[0]
    protocol = seg_metrics.summarize(self.confusion, self.class_names)
    return {
        "num_images": self.num_images,
        "mIoU": protocol["mIoU"],
        "per_class_iou": protocol["per_class_iou"],
        "oracle_mIoU": miou(self.oracle_confusion),
        "patch_grid_ceiling_mIoU": miou(self.ceiling_confusion) if self.patch_size else None,
        "object_groups": self.object_groups,
        "object_groups_named_right": 100.0 * self.named_right / max(self.object_groups, 1),
        "background_false_positive_rate": 100.0 * background[1:].sum() / max(background.sum(), 1),
        "bg_threshold": self.protocol_threshold,
        "thresholds": list(self.sweep.thresholds),
        "mIoU_by_threshold": curve,
        "best_threshold": best["threshold"] if curve else None,
        "best_threshold_mIoU": best["mIoU"] if curve else None,
        "confusion": self.confusion.tolist(),
        "per_class": self.per_class(protocol["per_class_iou"]),
    }

  def per_class(self, iou: Dict[str, float]) -> Dict[str, Dict[str, float]]:
    """{foreground class: {"iou", "oracle_iou", "named_right_unthresholded", "called_background",
    "main_group_purity"}}, percent."""
    oracle = seg_metrics.summarize(self.oracle_confusion, self.class_names)["per_class_iou"]
    return {name: {"iou": iou[name], "oracle_iou": oracle[name],
                   "named_right_unthresholded": _row_share(self.unthresholded_confusion, c, c),
                   "called_background": _row_share(self.confusion, c, 0),
                   "main_group_purity": 100.0 * self.purity_sum[c] / max(self.purity_count[c], 1)}
            for c, name in enumerate(self.class_names) if c > 0 and self.confusion[c].sum() > 0}


def verdict(summary: Dict[str, Any]) -> str:
  """One sentence: which part loses more mIoU, the grouping (100 - oracle) or the naming (oracle - mIoU)."""
  miou, oracle, named = summary["mIoU"], summary["oracle_mIoU"], summary["object_groups_named_right"]
  grouping_loss, naming_loss = 100.0 - oracle, oracle - miou
  if max(grouping_loss, naming_loss) < 1.0:
    return f"neither: {miou:.1f} mIoU, as much as its groups allow ({oracle:.1f})."
  if grouping_loss >= naming_loss:
    return (f"grouping: a perfect namer would reach only {oracle:.1f} mIoU on these groups (the naming loses "
            f"{naming_loss:.1f} more, to {miou:.1f}).")
  return (f"naming: the groups allow {oracle:.1f} mIoU and the protocol gets {miou:.1f}; "
          f"{named:.0f}% of the object groups are named right and "
          f"{summary['background_false_positive_rate']:.0f}% of the background pixels are called objects.")


# ----------------------------------------------------------------------------------------------------------------
# Pictures.
# ----------------------------------------------------------------------------------------------------------------
def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: str) -> str:
  """Row-normalised confusion matrix (rows = ground truth) as a PNG; -> path."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  n = len(class_names)
  fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
  ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
  for i in range(n):
    for j in range(n):
      if rows[i, j] >= 0.005:
        ax.text(j, i, f"{100 * rows[i, j]:.0f}", ha="center", va="center", fontsize=7,
                color="white" if rows[i, j] > 0.5 else "black")
  ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=8)
  ax.set_yticks(range(n), class_names, fontsize=8)
  ax.set_xlabel("predicted")
  ax.set_ylabel("ground truth")
  ax.set_title("confusion, % of each ground-truth class")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_threshold_curve(thresholds: Sequence[float], mious: Sequence[float], chosen: float, path: str) -> str:
  """mIoU against the background threshold as a PNG, the protocol's threshold marked; -> path."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(4.2, 3.0))
  ax.plot(thresholds, mious, marker="o", ms=3, lw=1.2)
  ax.axvline(chosen, color="grey", ls="--", lw=1, label=f"protocol ({chosen:g})")
  ax.set_xlabel("background threshold")
  ax.set_ylabel("mIoU")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------------------------------------
# Running the protocol.
# ----------------------------------------------------------------------------------------------------------------
def diagnose_examples(examples: Iterable[Tuple[np.ndarray, np.ndarray, np.ndarray, float]],
                      class_names: Sequence[str], config: ml_collections.ConfigDict,
                      thresholds: Sequence[float], patch_size: int = 0) -> Dict[str, Any]:
  """(label [H, W], scores [C, H, W] with a background channel first, groups [H, W], best group score) per
  image -> summary. patch_size: the model's patch (0: no patch-grid ceiling), on the grid of config.short_side."""
  diagnosis = Diagnosis(class_names, thresholds, config.bg_threshold, patch_size, config.short_side)
  for label, scores, groups, best_group_score in examples:
    diagnosis.add(label, scores[1:], groups, best_group_score)
  return diagnosis.summary()


def diagnose_checkpoint(checkpoint: str, config: ml_collections.ConfigDict, output_dir: str = "",
                        thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> Dict[str, Any]:
  """The command: segments config's dataset with the checkpoint, prints and writes the diagnosis."""
  from mixreorg_jax import inference  # pylint: disable=g-import-not-at-top
  from mixreorg_jax import zeroshot  # pylint: disable=g-import-not-at-top
  from mixreorg_jax.data import seg_datasets  # pylint: disable=g-import-not-at-top
  from mixreorg_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  if not config.with_background:
    raise ValueError("diagnose needs a dataset with a background class (config.with_background=True): the "
                     "background false positives and the threshold curve are about it.")
  model = inference.load(checkpoint)
  dataset = seg_datasets.from_config(config)
  class_names = seg_datasets.prompt_class_names(config, dataset)
  variables = model.variables
  text_fn = zeroshot.make_text_fn(model.model)
  class_emb = zeroshot.class_embeddings(lambda t: text_fn(variables, t),
                                        tokenizers.checkpoint_tokenizer(model.tokenizer),
                                        zeroshot.foreground_names(class_names, True), config.prompt_templates)
  # The background rule off (threshold 0), so that the scores are the foreground ones for every threshold.
  protocol = dataclasses.replace(zeroshot.Protocol.from_config(config), bg_threshold=0.0)
  segmenter = zeroshot.SlidingWindowSegmenter(model.model, variables, class_emb, protocol,
                                              image_normalization=model.image_normalization)
  labels = {}

  def images():
    for name, image, label in dataset:
      labels[name] = label
      yield name, image

  segmented = ((labels.pop(s.key), s.scores, s.groups, s.best_group_score) for s in segmenter(images()))
  one_window = not protocol.window  # the patch grid is one grid over the (resized) image
  patch_size = int(model.config.vision.patch_size) if one_window else 0
  summary = diagnose_examples(segmented, class_names, config, thresholds, patch_size)
  prompted = zeroshot.foreground_names(class_names, True)
  for name, (other, cos) in nearest_prompts(np.asarray(class_emb), prompted).items():
    if name in summary["per_class"]:
      summary["per_class"][name].update(nearest_prompt=other, nearest_prompt_cos=cos)
  summary["class_names"] = list(class_names)
  summary["checkpoint"] = os.path.abspath(checkpoint)
  summary["dataset"] = f"{config.data.name} at {config.data.root}"
  summary["verdict"] = verdict(summary)
  output_dir = output_dir or os.path.join(checkpoint, "diagnose", config.data.name)
  os.makedirs(output_dir, exist_ok=True)
  plot_confusion(np.asarray(summary["confusion"]), class_names, os.path.join(output_dir, "confusion.png"))
  plot_threshold_curve(summary["thresholds"], summary["mIoU_by_threshold"], config.bg_threshold,
                       os.path.join(output_dir, "bg_threshold.png"))
  with open(os.path.join(output_dir, "diagnose.json"), "w") as f:
    json.dump(seg_metrics.json_safe(summary), f, indent=1)
  print(format_report(summary), flush=True)
  print(f"wrote {output_dir}/diagnose.json, confusion.png, bg_threshold.png", flush=True)
  return summary


def format_report(summary: Dict[str, Any]) -> str:
  lines = [f"{summary['num_images']} images of {summary.get('dataset', '')}",
           f"mIoU at background threshold {summary['bg_threshold']:g}: {summary['mIoU']:.1f}",
           f"oracle mIoU of the groups (majority label per group): {summary['oracle_mIoU']:.1f}",
           *([f"patch-grid ceiling (majority label per patch): {summary['patch_grid_ceiling_mIoU']:.1f}"]
             if summary.get("patch_grid_ceiling_mIoU") is not None else []),
           f"object groups named right: {summary['object_groups_named_right']:.1f}% of {summary['object_groups']}",
           f"background pixels called objects: {summary['background_false_positive_rate']:.1f}%",
           f"best background threshold: {summary['best_threshold']:g} (mIoU {summary['best_threshold_mIoU']:.1f})",
           "per-class IoU: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["per_class_iou"].items()),
           f"verdict: {summary['verdict']}"]
  per_class = summary.get("per_class", {})
  if per_class:
    width = max(len(name) for name in per_class)
    lines.append(f"{'class':<{width}}  {'IoU':>5}  {'oracle IoU':>10}  {'named right, no threshold %':>27}  "
                 f"{'called background %':>19}  {'main group purity %':>19}  nearest prompt (cos)")
    for name, row in per_class.items():
      nearest = f"{row['nearest_prompt']} ({row['nearest_prompt_cos']:.2f})" if "nearest_prompt" in row else ""
      lines.append(f"{name:<{width}}  {row['iou']:>5.1f}  {row['oracle_iou']:>10.1f}  "
                   f"{row['named_right_unthresholded']:>27.1f}  {row['called_background']:>19.1f}  "
                   f"{row['main_group_purity']:>19.1f}  {nearest}".rstrip())
  return "\n".join(lines)


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "An eval config file (configs/eval/*.py).", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "An inference checkpoint directory (export or converter).")
  flags.DEFINE_string("output_dir", "", "Where to write; '' = <checkpoint>/diagnose/<dataset>/.")
  flags.DEFINE_list("thresholds", [str(t) for t in DEFAULT_THRESHOLDS], "Background thresholds of the curve.")
  flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
  console.to_log_file(console.tool_log_path("diagnose"))
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  diagnose_checkpoint(flags.FLAGS.checkpoint, flags.FLAGS.config, flags.FLAGS.output_dir,
                      [float(t) for t in flags.FLAGS.thresholds])


if __name__ == "__main__":
  define_flags()
  app.run(main)
