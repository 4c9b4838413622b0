"""Semantic segmentation metrics from an accumulated confusion matrix (mIoU, per-class IoU, accuracies).

The confusion matrix has rows = ground truth and columns = prediction. Pixels whose label is `ignore_index`
(255 in every dataset reader of `mixreorg_jax.data.seg_datasets`) or outside [0, C) are not counted.
`confusion_matrix` is the host (numpy) version; `confusion_matrix_jnp` is the same count as a pure jnp function
that can run inside a jitted evaluation step. Accumulate on the host in int64 (a [C, C] int32 from one batch is
far from overflowing; a whole dataset may not be).

`summarize` follows the mmseg convention that GroupViT's numbers come from: IoU_c = TP / (TP + FP + FN); a class
absent from both the ground truth and the prediction has IoU nan and is left out of the mean, while a class that
is only predicted counts with IoU 0.
"""
import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255


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
