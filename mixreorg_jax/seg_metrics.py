"""Semantic segmentation metrics from an accumulated confusion matrix (mIoU, per-class IoU, accuracies).

The confusion matrix has rows = ground truth and columns = prediction. Pixels whose label is `ignore_index`
(255 in every dataset reader of `mixreorg_jax.data.seg_datasets`) or outside [0, C) are not counted.
`confusion_matrix` is the host (numpy) version; `confusion_matrix_jnp` is the same count as a pure jnp function
that can run inside a jitted evaluation step. Accumulate on the host in int64 (a [C, C] int32 from one batch is
far from overflowing; a whole dataset may not be).

`summarize` follows the mmseg convention that GroupViT's numbers come from: IoU_c = TP / (TP + FP + FN); a class
absent from both the ground truth and the prediction has IoU nan and is left out of the mean, while a class that
is only predicted counts with IoU 0.

`ThresholdSweep` accumulates the confusion matrices of the zero-shot background rule at several thresholds in one
pass over the foreground class scores, so that a threshold can be chosen on a tuning split. Given each image's
best group score (`zeroshot.Segmentation.best_group_score`), the rule is the protocol's exactly whenever one
window covers the image (the synthetic sets); with sliding windows, whose background decisions are averaged over
crops, it is an approximation.
"""
import math
from typing import Dict, Optional, Sequence

import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255
DEFAULT_BG_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(21))  # 0, 0.05, ..., 1


def confusion_matrix(label: np.ndarray, pred: np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
  """Counts (ground truth, prediction) pairs.

  Args:
    label: int [...] ground-truth class ids; `ignore_index` and ids outside [0, C) are skipped.
    pred: int [...] predicted class ids, same shape as label.
    num_classes: C.
    ignore_index: the label value that marks unlabelled pixels.
  Returns:
    int64 [C, C], rows = ground truth, columns = prediction.
  """
  label, pred = np.asarray(label), np.asarray(pred)
  if label.shape != pred.shape:
    raise ValueError(f"confusion_matrix: label shape {label.shape} != prediction shape {pred.shape}.")
  label = label.reshape(-1).astype(np.int64)
  pred = pred.reshape(-1).astype(np.int64)
  valid = (label != ignore_index) & (label >= 0) & (label < num_classes) & (pred >= 0) & (pred < num_classes)
  counts = np.bincount(label[valid] * num_classes + pred[valid], minlength=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes)


def confusion_matrix_jnp(label: jnp.ndarray, pred: jnp.ndarray, num_classes: int,
                         ignore_index: int = IGNORE_INDEX) -> jnp.ndarray:
  """`confusion_matrix` in jnp, for use inside jit (num_classes must be static).

  Args:
    label: int [...] ground truth (padding pixels can be set to ignore_index to drop them).
    pred: int [...] predictions, same shape.
  Returns:
    int32 [C, C], rows = ground truth, columns = prediction.
  """
  assert label.shape == pred.shape, (label.shape, pred.shape)
  label = label.reshape(-1).astype(jnp.int32)
  pred = pred.reshape(-1).astype(jnp.int32)
  valid = (label != ignore_index) & (label >= 0) & (label < num_classes) & (pred >= 0) & (pred < num_classes)
  # Invalid pixels go to one extra bin that is dropped, so the output shape stays static.
  index = jnp.where(valid, label * num_classes + pred, num_classes * num_classes)
  counts = jnp.bincount(index, length=num_classes * num_classes + 1)[:-1]
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def summarize(confusion: np.ndarray, class_names: Sequence[str]) -> dict:
  """Metrics in percent from a [C, C] confusion matrix (rows = ground truth).

  Returns:
    dict(mIoU=float, per_class_iou={name: float}, pixel_acc=float, mean_acc=float, per_class_acc={name: float}).
    Per-class values are nan for a class absent from both ground truth and prediction (IoU) or from the
    ground truth (accuracy); the means skip nan, as mmseg does. All nan -> mean nan.
  """
  confusion = np.asarray(confusion, np.float64)
  num_classes = confusion.shape[0]
  if confusion.shape != (num_classes, num_classes) or len(class_names) != num_classes:
    raise ValueError(f"summarize: confusion matrix {confusion.shape} does not match {len(class_names)} class "
                     "names; check config.class_names against the dataset.")
  tp = np.diag(confusion)
  gt = confusion.sum(axis=1)
  predicted = confusion.sum(axis=0)
  union = gt + predicted - tp
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = np.where(union > 0, tp / union, np.nan) * 100
    acc = np.where(gt > 0, tp / gt, np.nan) * 100
  total = gt.sum()
  return dict(
      mIoU=_nanmean(iou),
      per_class_iou={name: float(v) for name, v in zip(class_names, iou)},
      pixel_acc=float(tp.sum() / total * 100) if total > 0 else math.nan,
      mean_acc=_nanmean(acc),
      per_class_acc={name: float(v) for name, v in zip(class_names, acc)},
  )


def label_with_threshold(foreground_scores: np.ndarray, threshold: float,
                         best_group_score: Optional[float] = None) -> np.ndarray:
  """Foreground class scores [C-1, H, W] -> labels int [H, W] (0 = background, c = foreground class c - 1).

  Background where the best score is below min(threshold, best_group_score): the zero-shot protocol's rule
  (`zeroshot.pixel_logits`), where best_group_score is the best class score of any group of the crop, those that
  own no pixel included. Without it, the image's best pixel score stands in: the same cap when the best group
  owns a pixel, a lower one (fewer background pixels) when it owns none.
  """
  best = foreground_scores.max(axis=0)
  cap = float(best.max()) if best_group_score is None else float(best_group_score)
  background = best < min(threshold, cap)
  return np.where(background, 0, foreground_scores.argmax(axis=0) + 1)


class ThresholdSweep:
  """mIoU of the background rule at each of `thresholds`, accumulated over images (label 0 = background)."""

  def __init__(self, class_names: Sequence[str], thresholds: Sequence[float]):
    self.class_names = tuple(class_names)
    self.thresholds = tuple(float(t) for t in thresholds)
    c = len(self.class_names)
    self.confusions = np.zeros((len(self.thresholds), c, c), np.int64)

  def add(self, label: np.ndarray, foreground_scores: np.ndarray, best_group_score: Optional[float] = None) -> None:
    """label int [H, W]; foreground_scores float [C-1, H, W] (no background channel); best_group_score: see
    `label_with_threshold`."""
    for i, t in enumerate(self.thresholds):
      self.confusions[i] += confusion_matrix(label, label_with_threshold(foreground_scores, t, best_group_score),
                                             len(self.class_names))

  def curve(self) -> list:
    """mIoU (percent) per threshold, in the order of `thresholds`."""
    return [summarize(m, self.class_names)["mIoU"] for m in self.confusions]

  def best(self) -> Dict[str, float]:
    """{"threshold", "mIoU"} of the best threshold (the lowest of ties); nan entries never win."""
    curve = self.curve()
    if not curve or all(math.isnan(v) for v in curve):
      return {"threshold": math.nan, "mIoU": math.nan}
    i = int(np.nanargmax(curve))
    return {"threshold": self.thresholds[i], "mIoU": curve[i]}


def _nanmean(values: np.ndarray) -> float:
  """The mean over non-nan entries; nan (without a warning) when there are none."""
  finite = values[~np.isnan(values)]
  return float(finite.mean()) if finite.size else math.nan


def format_table(summary: dict, digits: int = 2) -> str:
  """A plain-text report: the headline metrics, then one line per class (IoU, accuracy)."""
  lines = [f"mIoU {summary['mIoU']:.{digits}f}  pixel_acc {summary['pixel_acc']:.{digits}f}  "
           f"mean_acc {summary['mean_acc']:.{digits}f}"]
  width = max((len(n) for n in summary["per_class_iou"]), default=5)
  lines.append(f"{'class':<{width}}  {'IoU':>7}  {'acc':>7}")
  for name, iou in summary["per_class_iou"].items():
    acc = summary.get("per_class_acc", {}).get(name, math.nan)
    lines.append(f"{name:<{width}}  {iou:>7.{digits}f}  {acc:>7.{digits}f}")
  return "\n".join(lines)


def json_safe(summary: dict) -> dict:
  """The summary with nan replaced by None, so `json.dump` writes valid JSON (null for absent classes)."""
  def fix(v):
    if isinstance(v, dict):
      return {k: fix(x) for k, x in v.items()}
    return None if isinstance(v, float) and math.isnan(v) else v
  return fix(summary)
