"""mIoU and accuracies from the confusion matrix, checked against scikit-learn on random label maps."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from mixreorg_jax import seg_metrics


def _random_maps(seed, num_classes=6, shape=(4, 17, 23)):
  """Label and prediction maps with ~20% ignore pixels; class 4 is in neither, class 5 only in the prediction."""
  rng = np.random.default_rng(seed)
  label = rng.choice([0, 1, 2, 3], size=shape).astype(np.uint8)
  label[rng.random(shape) < 0.2] = 255
  pred = rng.choice([0, 1, 2, 3, 5], size=shape).astype(np.uint8)
  return label, pred, num_classes


def _sklearn_reference(label, pred, num_classes):
  keep = label.reshape(-1) != 255
  return sk_confusion_matrix(label.reshape(-1)[keep], pred.reshape(-1)[keep], labels=list(range(num_classes)))


@pytest.mark.parametrize("seed", [0, 1])
def test_confusion_matrix_matches_sklearn(seed):
  label, pred, c = _random_maps(seed)
  np.testing.assert_array_equal(seg_metrics.confusion_matrix(label, pred, c), _sklearn_reference(label, pred, c))


def test_jnp_confusion_matrix_matches_numpy_under_jit():
  label, pred, c = _random_maps(2)
  fn = jax.jit(seg_metrics.confusion_matrix_jnp, static_argnums=2)
  np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(label), jnp.asarray(pred), c)),
                                seg_metrics.confusion_matrix(label, pred, c))


def test_summarize_matches_independent_iou():
  label, pred, c = _random_maps(3)
  names = [f"c{i}" for i in range(c)]
  # Accumulated over images, as the evaluator does.
  confusion = sum(seg_metrics.confusion_matrix(l, p, c) for l, p in zip(label, pred))
  summary = seg_metrics.summarize(confusion, names)

  ref = _sklearn_reference(label, pred, c)
  keep = label != 255
  ious = []
  for k in range(c):
    inter = np.sum((label == k) & (pred == k) & keep)
    union = np.sum(((label == k) | (pred == k)) & keep)
    ious.append(inter / union * 100 if union else math.nan)
  assert math.isnan(summary["per_class_iou"]["c4"])  # in neither: excluded from the mean.
  assert summary["per_class_iou"]["c5"] == 0.0  # only predicted: counts as 0.
  np.testing.assert_allclose([summary["per_class_iou"][n] for n in names], ious, equal_nan=True)
  assert summary["mIoU"] == pytest.approx(np.nanmean(ious))
  assert summary["pixel_acc"] == pytest.approx(np.trace(ref) / ref.sum() * 100)
  per_class_acc = [ref[k, k] / ref[k].sum() * 100 for k in range(4)]  # classes 4, 5 have no GT pixel.
  assert summary["mean_acc"] == pytest.approx(np.mean(per_class_acc))


def test_json_safe_turns_nan_into_none_and_table_lists_classes():
  summary = seg_metrics.summarize(np.array([[5, 0], [0, 0]]), ["bg", "cat"])
  assert summary["mIoU"] == 100.0
  assert seg_metrics.json_safe(summary)["per_class_iou"] == {"bg": 100.0, "cat": None}
  assert "cat" in seg_metrics.format_table(summary)


def test_summarize_rejects_mismatched_class_names():
  with pytest.raises(ValueError, match="config.class_names"):
    seg_metrics.summarize(np.eye(3), ["a", "b"])


def test_threshold_sweep_applies_the_background_rule_at_each_threshold():
  rng = np.random.default_rng(0)
  names = ("background", "a", "b")
  label = rng.integers(0, 3, (6, 5))
  scores = rng.random((2, 6, 5))  # foreground scores of a and b
  sweep = seg_metrics.ThresholdSweep(names, (0.0, 2.0))
  sweep.add(label, scores)
  # Threshold 0: never background, the argmax class. Threshold 2 (above every score): background except the
  # image's best pixel, which keeps its class.
  no_background = scores.argmax(axis=0) + 1
  only_best = np.zeros_like(label)
  best = np.unravel_index(scores.max(axis=0).argmax(), label.shape)
  only_best[best] = no_background[best]
  expected = [seg_metrics.summarize(seg_metrics.confusion_matrix(label, p, 3), names)["mIoU"]
              for p in (no_background, only_best)]
  assert sweep.curve() == pytest.approx(expected)
  assert sweep.best() == {"threshold": float(np.argmax(expected) * 2.0), "mIoU": pytest.approx(max(expected))}
  # The protocol's cap is the best score of any group: when a group owning no pixel scores higher than every
  # pixel, a threshold above all of them leaves no pixel its class.
  capped = seg_metrics.ThresholdSweep(names, (2.0,))
  capped.add(label, scores, best_group_score=float(scores.max()) + 0.1)
  all_background = np.zeros_like(label)
  assert capped.curve() == pytest.approx(
      [seg_metrics.summarize(seg_metrics.confusion_matrix(label, all_background, 3), names)["mIoU"]])


def test_threshold_sweep_best_is_nan_without_images():
  best = seg_metrics.ThresholdSweep(("background", "a"), (0.5,)).best()
  assert np.isnan(best["threshold"]) and np.isnan(best["mIoU"])
